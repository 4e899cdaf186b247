"""End-to-end tests of the refine_geometry script: tiny settings, reload what it wrote, one-line
errors, and the same answer under mpiexec -n 2."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from spread_tools.cli.refine_geometry import app
from spread_tools.cli.simulate_data import app as simulate_app
from spread_tools.io.dataset import Dataset

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
CACHE = TEST_DATA / "sf_cache.h5"
MPIEXEC = shutil.which("mpiexec")
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("rg") / "ly99.h5"
    r = runner.invoke(simulate_app, [str(CACHE), "-o", str(path), "-q", "preset=ly99", "lattices=4",
                                     "seed=9", "shoebox_size=11", "spectrum.step_ev=4",
                                     f"truth=FE1={TEST_DATA / 'spectra' / 'pf-rd-ox_fftkk.out'},"
                                     f"FE2={TEST_DATA / 'spectra' / 'pf-rd-red_fftkk.out'}"])
    assert r.exit_code == 0, r.output
    return path


FAST = ["refine.energy_offset=off", "energy_offset.start_ev=2"]


def test_runs_and_writes_a_dataset_and_a_table(data, tmp_path):
    out = tmp_path / "refined.h5"
    r = runner.invoke(app, [str(data), "--sf-cache", str(CACHE), "-o", str(out), "-q", *FAST])
    assert r.exit_code == 0, r.output
    assert "kept" in r.output and "wrote" in r.output
    ds_in, ds_out = Dataset.read(data), Dataset.read(out)
    assert ds_out.source == "refine_geometry" and 1 <= ds_out.n_lattices <= ds_in.n_lattices
    assert not np.array_equal(ds_out.A, ds_in.A[:ds_out.n_lattices])
    np.testing.assert_allclose(ds_out.energy_ev, ds_in.energy_ev + 2.0)
    with h5py.File(out) as h5:
        status = [s.decode() if isinstance(s, bytes) else s for s in h5["geometry_refinement/status"][()]]
    assert len(status) == ds_in.n_lattices
    lines = (tmp_path / "refined.lattices.csv").read_text().splitlines()
    assert lines[0].startswith("lattice,identifier,status") and len(lines) == ds_in.n_lattices + 1
    # refine_fdp accepts the refined dataset
    from spread_tools.cli.refine_fdp import app as fdp_app
    r = runner.invoke(fdp_app, [str(out), "--sf-cache", str(CACHE), "-o", str(tmp_path / "res.h5"), "-q",
                                "optimizer.max_macrocycles=1", "optimizer.iterations=3"])
    assert r.exit_code == 0, r.output


def test_refuses_to_overwrite_and_to_replace_its_input(data, tmp_path):
    out = tmp_path / "r.h5"
    out.write_text("x")
    assert_one_line_error(runner.invoke(app, [str(data), "--sf-cache", str(CACHE), "-o", str(out)]),
                          "refine_geometry", "exists")
    assert_one_line_error(runner.invoke(app, [str(data), "--sf-cache", str(CACHE), "-o", str(data),
                                              "--overwrite"]), "refine_geometry", "also an input")
    assert out.read_text() == "x"


@pytest.mark.parametrize("words,fragment", [
    (["cell.sigma_fraction=-0.1"], "must be positive"),
    (["refine.domain_size=both"], "refine.domain_size"),
    (["refine.color=True"], "unknown parameter"),
    (["curves.tables=FE1=__short__"], "covers"),
    (["optimizer.max_iterations=0"], "at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, words, fragment):
    short = tmp_path / "short.dat"
    short.write_text("7000 -4 3\n7050 -5 3.2\n")
    out = tmp_path / "r.h5"
    words = [w.replace("__short__", str(short)) for w in words]
    assert_one_line_error(runner.invoke(app, [str(data), "--sf-cache", str(CACHE), "-o", str(out), *words]),
                          "refine_geometry", fragment)
    assert not out.exists() and not (tmp_path / "r.lattices.csv").exists()


def test_missing_inputs(tmp_path, data):
    assert_one_line_error(runner.invoke(app, [str(data), "-o", str(tmp_path / "r.h5")]), "refine_geometry",
                          "--sf-cache")
    assert_one_line_error(runner.invoke(app, [str(tmp_path / "nope.h5"), "--sf-cache", str(CACHE), "-o",
                                              str(tmp_path / "r.h5")]), "refine_geometry", "no such file")


@pytest.mark.mpi
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_two_ranks_give_the_single_rank_answer(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    outs = []
    for n in (1, 2):
        out = tmp_path / f"r{n}.h5"
        cmd = [sys.executable, "-m", "spread_tools.cli.refine_geometry", str(data), "--sf-cache", str(CACHE),
               "-o", str(out), "-q"]
        if n > 1:
            cmd = [MPIEXEC, "-n", str(n)] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        outs.append(out)
    a, b = Dataset.read(outs[0]), Dataset.read(outs[1])
    assert np.array_equal(a.A, b.A) and np.array_equal(a.energy_ev, b.energy_ev)
    assert (tmp_path / "r1.lattices.csv").read_text() == (tmp_path / "r2.lattices.csv").read_text()


def test_sigterm_writes_a_checkpoint_and_resume_gives_the_same_answer(data, tmp_path):
    import signal
    import time
    words = ["checkpoint.interval_s=0", "optimizer.max_macrocycles=3"]
    base = [sys.executable, "-m", "spread_tools.cli.refine_geometry", str(data), "--sf-cache", str(CACHE)]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    ref = tmp_path / "ref.h5"
    r = subprocess.run(base + ["-o", str(ref), "-q", *words], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run.h5"
    ckpt = tmp_path / "run.ckpt.h5"
    proc = subprocess.Popen(base + ["-o", str(out), *words], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    t0 = time.time()
    while not ckpt.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert "interrupted by SIGTERM" in last and "--resume" in last and ckpt.exists()
    r = subprocess.run(base + ["-o", str(out), "-q", "--resume", *words], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(Dataset.read(out).A, Dataset.read(ref).A)
    assert (tmp_path / "run.lattices.csv").read_text() == (tmp_path / "ref.lattices.csv").read_text()
    assert not ckpt.exists() and not list(tmp_path.glob("*.lock"))
