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
