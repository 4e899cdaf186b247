"""Shared test fixtures: paths to the embedded test data, a temporary work folder."""

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "test_data"


@pytest.fixture
def test_data():
    """Folder of the embedded test data (``test_data/``)."""
    return TEST_DATA


def _assert_gradient_matches(evaluate, x, indices, h=1e-4, rel=2e-5, abs_tol=0.0):
    """Central differences of ``evaluate(x)[0]`` along every index against ``evaluate(x)[1]``."""
    _, g = evaluate(x)
    for i in indices:
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd = (evaluate(xp)[0] - evaluate(xm)[0]) / (2 * h)
        assert fd == pytest.approx(g[i], rel=rel, abs=abs_tol), i


@pytest.fixture
def gradient_check():
    """``gradient_check(evaluate, x, indices, h, rel, abs_tol)``: a finite-difference test of an
    objective returning ``(f, grad)``."""
    return _assert_gradient_matches
