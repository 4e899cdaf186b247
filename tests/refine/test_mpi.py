"""refine_fdp under mpiexec: 2 (and 3) ranks give the single-rank answer to round-off."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spread_tools import refine as R
from spread_tools.io.dataset import Dataset

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
CACHE = TEST_DATA / "sf_cache.h5"
MPIEXEC = shutil.which("mpiexec")

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 1, 2, 3])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::4] = True
    ds = ds.select_shoeboxes(keep)
    path = tmp_path_factory.mktemp("mpi") / "four.h5"
    ds.write(path)
    return path


def _run(n_ranks, data, out, *words):
    cmd = [sys.executable, "-m", "spread_tools.cli.refine_fdp", str(data), "--sf-cache", str(CACHE),
           "-o", str(out), "-q", *words]
    if n_ranks:
        cmd = [MPIEXEC, "-n", str(n_ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return R.read_result(out)


def _assert_curves_agree(many, one, sigma_rtol=None):
    """The objective to round-off, the curves to far below their σ (and σ to ``sigma_rtol``)."""
    assert many["objective"] == pytest.approx(one["objective"], rel=1e-10)
    for k in ("fp", "fdp"):
        np.testing.assert_allclose(many[k], one[k], rtol=0, atol=1e-4 * np.nanmin(one[k + "_sigma"]) + 1e-7)
        if sigma_rtol is not None:
            np.testing.assert_allclose(many[k + "_sigma"], one[k + "_sigma"], rtol=sigma_rtol)


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_mpi_ranks_agree_with_single_rank(data_file, tmp_path, n_ranks):
    words = ("restraints.kramers_kronig.use=True",)
    one = _run(0, data_file, tmp_path / "one.h5", *words)
    many = _run(n_ranks, data_file, tmp_path / f"n{n_ranks}.h5", *words)
    assert one["n_ranks"] == 1 and many["n_ranks"] == n_ranks
    _assert_curves_agree(many, one, sigma_rtol=1e-5)
    np.testing.assert_allclose(many["lattice_G"], one["lattice_G"], rtol=1e-6)
    np.testing.assert_allclose(many["shoebox_background"], one["shoebox_background"], rtol=1e-5, atol=1e-6)


def test_mpi_kk_constrained_mode_agrees_with_single_rank(data_file, tmp_path):
    """The KK-constrained mode maps every rank's gradient and Fisher block by the same T."""
    words = ("restraints.kramers_kronig.use=True", "restraints.kramers_kronig.mode=constrained")
    one = _run(0, data_file, tmp_path / "one.h5", *words)
    two = _run(2, data_file, tmp_path / "two.h5", *words)
    # sigma follows x, which the ranks reach by another summation order: 1e-5 relative seen
    _assert_curves_agree(two, one, sigma_rtol=1e-4)


def test_mpi_shuffle_channels_control_agrees_with_single_rank(data_file, tmp_path):
    """Every lattice's channel permutation depends on the seed and its index, not on the ranks."""
    words = ("control=shuffle_channels", "control_seed=7")
    one = _run(0, data_file, tmp_path / "one.h5", *words)
    two = _run(2, data_file, tmp_path / "two.h5", *words)
    _assert_curves_agree(two, one)


def test_mpi_crystal_models_in_sigma_agree_with_single_rank(data_file, tmp_path):
    """uncertainty.geometry=on: every rank profiles its own lattices' crystal models; the sum
    over ranks is the single-rank correction."""
    words = ("uncertainty.geometry=on",)
    one = _run(0, data_file, tmp_path / "one.h5", *words)
    off = _run(0, data_file, tmp_path / "off.h5", "uncertainty.geometry=off")
    two = _run(2, data_file, tmp_path / "two.h5", *words)
    assert one["geometry_in_sigma"] and two["geometry_in_sigma"] == one["geometry_in_sigma"]
    assert np.nanmax(one["fdp_sigma"] / off["fdp_sigma"]) > 1.01
    _assert_curves_agree(two, one, sigma_rtol=1e-5)
