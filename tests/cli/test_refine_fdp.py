"""The refine_fdp script: a run on a tiny dataset, outputs, resume, one-line errors."""

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from typer.testing import CliRunner

from spread_tools import refine as R
from spread_tools.cli.refine_fdp import app
from spread_tools.io.dataset import Dataset

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
CACHE = TEST_DATA / "sf_cache.h5"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 1])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::3] = True
    ds = ds.select_shoeboxes(keep)
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    ds.write(path)
    return path


def _one_line_error(result, fragment):
    assert_one_line_error(result, "refine_fdp", fragment)


def test_refine_fdp_runs_and_writes(tiny_file, tmp_path):
    out = tmp_path / "res.h5"
    r = runner.invoke(app, [str(tiny_file), "--sf-cache", str(CACHE), "-o", str(out), "-q",
                            "restraints.fp.sigma=0.1"])
    assert r.exit_code == 0, r.output
    assert "FE1: edge" in r.output and "converged" in r.output
    shift_line = next(line for line in r.output.splitlines() if "edge shift FE2 - FE1" in line)
    assert out.exists() and (tmp_path / "res.csv").exists()
    assert not (tmp_path / "res.ckpt.h5").exists()              # removed after convergence
    res = R.read_result(out)
    assert res["site_names"] == ["FE1", "FE2"] and res["fp"].shape == (2, 26)
    assert res["config"]["restraints"]["fp"]["sigma"] == 0.1
    assert res["datasets"] and res["sf_cache"].endswith("sf_cache.h5")
    # the edges use the stored windows, and the printed shift is the edges' difference
    e, n, ng = res["energy_ev"], 2, len(res["energy_ev"])
    assert res["edge_window_ev"].shape == (2, 2) and np.all(res["edge_window_ev"][:, 0] > e[0])
    for s in range(n):
        idx = n * ng + s * ng + np.arange(ng)
        edge, sig = R.edge_position(e, res["fdp"][s], res["covariance"][np.ix_(idx, idx)], *res["edge_window_ev"][s])
        assert res["edge_ev"][s] == pytest.approx(edge, nan_ok=True)
        assert res["edge_sigma_ev"][s] == pytest.approx(sig, nan_ok=True)
    shown = float(shift_line.split(":")[-1].split("±")[0])
    assert shown == pytest.approx(res["edge_ev"][1] - res["edge_ev"][0], abs=0.006, nan_ok=True)
    with h5py.File(out) as h5:
        assert h5.attrs["format"] == "spread_tools.result" and h5.attrs["version"] == 1
        for k in ("energy_ev", "fp_sigma", "fdp_sigma", "edge_ev", "edge_sigma_ev", "lattice_G",
                  "shoebox_background", "history/objective", "history/gradient_norm", "history/time_s"):
            assert k in h5, k
    header = (tmp_path / "res.csv").read_text().splitlines()[0]
    assert header == "energy_ev,FE1_fp,FE1_fp_sigma,FE1_fdp,FE1_fdp_sigma,FE2_fp,FE2_fp_sigma,FE2_fdp,FE2_fdp_sigma"
    _one_line_error(runner.invoke(app, [str(tiny_file), "--sf-cache", str(CACHE), "-o", str(out)]),
                    "exists already")


def test_cli_stop_and_resume_same_answer(tiny_file, tmp_path):
    base = [str(tiny_file), "--sf-cache", str(CACHE), "-q", "optimizer.iterations=3"]
    full = tmp_path / "full.h5"
    assert runner.invoke(app, base + ["-o", str(full)]).exit_code == 0
    part = tmp_path / "part.h5"
    r = runner.invoke(app, base + ["-o", str(part), "optimizer.max_macrocycles=1"])
    assert r.exit_code == 0 and "not converged" in r.output
    assert (tmp_path / "part.ckpt.h5").exists()
    # without --resume an existing checkpoint is not silently ignored
    _one_line_error(runner.invoke(app, base + ["-o", str(tmp_path / "part.h5")]), "checkpoint exists")
    r = runner.invoke(app, base + ["-o", str(part), "--resume"])
    assert r.exit_code == 0, r.output
    a, b = R.read_result(full), R.read_result(part)
    np.testing.assert_array_equal(a["fp"], b["fp"])
    np.testing.assert_array_equal(a["fdp_sigma"], b["fdp_sigma"])
    np.testing.assert_array_equal(a["history"]["objective"], b["history"]["objective"])
    # another configuration refuses the checkpoint
    r = runner.invoke(app, base + ["-o", str(tmp_path / "x.h5"), "optimizer.max_macrocycles=1"])
    r = runner.invoke(app, base + ["-o", str(tmp_path / "x.h5"), "--resume", "restraints.fdp.sigma=0.2"])
    _one_line_error(r, "another configuration")


def test_show_config_and_help():
    r = runner.invoke(app, ["--show-config", "restraints.fp.sigma=0.05"])
    assert r.exit_code == 0 and "sigma = 0.05" in r.output and "[restraints.kramers_kronig]" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for word in ("--sf-cache", "--resume", "grid.step_ev=4.0", "restraints.fp.sigma", "eV"):
        assert word in r.output, word


@pytest.mark.parametrize("case", ["no_cache", "no_output", "missing", "site", "grid", "cell",
                                  "not_dataset", "bad_key", "iterations", "control"])
def test_bad_input_gives_one_line(case, tiny_file, tmp_path):
    out = str(tmp_path / "r.h5")
    args = {"no_cache": ([str(tiny_file), "-o", out], "--sf-cache"),
            "no_output": ([str(tiny_file), "--sf-cache", str(CACHE)], "-o"),
            "missing": ([str(tmp_path / "nope.h5"), "--sf-cache", str(CACHE), "-o", out], "no such file"),
            "site": ([str(tiny_file), "--sf-cache", str(CACHE), "-o", out, "sites=FE7"], "FE7"),
            "grid": ([str(tiny_file), "--sf-cache", str(CACHE), "-o", out, "grid.max_ev=7100"],
                     "does not cover"),
            "not_dataset": ([str(CACHE), "--sf-cache", str(CACHE), "-o", out], "expected spread_tools.dataset"),
            "bad_key": ([str(tiny_file), "--sf-cache", str(CACHE), "-o", out, "restraints.fp.sigmaa=1"],
                        "unknown parameter"),
            # accepted before (one iteration per macrocycle): issue 13
            "iterations": ([str(tiny_file), "--sf-cache", str(CACHE), "-o", out,
                            "optimizer.iterations=-1"], "optimizer.iterations: must be at least 1"),
            "control": ([str(tiny_file), "--sf-cache", str(CACHE), "-o", out,
                         "control=permute_hkl"], "parameter control")}
    if case == "cell":
        ds = Dataset.read(tiny_file)
        other = dataclasses.replace(ds, cell=np.asarray(ds.cell) * [1.05, 1, 1, 1, 1, 1])
        path = tmp_path / "other.h5"
        other.write(path)
        argv, frag = [str(path), "--sf-cache", str(CACHE), "-o", out], "different models or cells"
    else:
        argv, frag = args[case]
    _one_line_error(runner.invoke(app, argv + ["-q"]), frag)
    assert not Path(out).exists()


# --------------------------------------------------------------------------- kills and signals

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "bin" / "refine_fdp"
KILL_WORDS = ["-q", "optimizer.iterations=4", "checkpoint.interval_s=0"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    r = runner.invoke(app, [str(tiny_file), "--sf-cache", str(CACHE), "-o", str(out), *KILL_WORDS])
    assert r.exit_code == 0, r.output
    return R.read_result(out)


def _start(args):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, str(BIN), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def _wait_for_new_checkpoint(proc, ckpt, since_ns, timeout_s=90):
    """Wait until ``proc`` has written ``ckpt`` (mtime after ``since_ns``); False if it ended."""
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            return False
        try:
            if ckpt.stat().st_mtime_ns > since_ns:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _same_answer(a, b):
    for k in ("fp", "fdp", "fp_sigma", "fdp_sigma", "edge_ev", "lattice_G", "shoebox_background"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(a["history"]["objective"], b["history"]["objective"])


def _no_leftovers(folder):
    left = [p.name for p in folder.iterdir() if p.name.endswith(".lock") or ".tmp" in p.name
            or p.name.endswith(".bak")]
    assert not left, left


def test_sigkill_at_random_times_then_resume_gives_the_same_answer(tiny_file, uninterrupted, tmp_path):
    """SIGKILL at random moments (checkpoints written at every evaluation, so some kills land
    while one is written), then --resume: the result is bit for bit the uninterrupted one."""
    import time
    seed = int(np.random.default_rng().integers(1 << 30))
    rng = np.random.default_rng(seed)
    out, ckpt = tmp_path / "k.h5", tmp_path / "k.ckpt.h5"
    args = [tiny_file, "--sf-cache", CACHE, "-o", out, "--resume", *KILL_WORDS]
    kills, evaluations = 0, []
    for _ in range(3):
        since = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        proc = _start(args)
        if not _wait_for_new_checkpoint(proc, ckpt, since):
            break                                            # finished before the kill
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        if not ckpt.exists():
            # the kill landed after the result was written and the checkpoint removed
            assert out.exists(), f"seed {seed}: neither checkpoint nor result after a kill"
            break
        kills += 1
        import h5py
        with h5py.File(ckpt) as h5:                          # the last complete checkpoint
            evaluations.append(int(h5.attrs["n_evaluations"]))
    assert kills >= 2, f"seed {seed}: only {kills} kill(s) landed"
    assert evaluations == sorted(evaluations) and evaluations[-1] > 0, (seed, evaluations)
    if ckpt.exists():
        proc = _start(args)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"seed {seed}\n{stdout}\n{stderr}"
    _same_answer(R.read_result(out), uninterrupted)
    _no_leftovers(tmp_path)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tiny_file, uninterrupted, tmp_path):
    import shlex
    import signal
    out, ckpt = tmp_path / "t.h5", tmp_path / "t.ckpt.h5"
    proc = _start([tiny_file, "--sf-cache", CACHE, "-o", out, *KILL_WORDS])
    assert _wait_for_new_checkpoint(proc, ckpt, 0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("refine_fdp: interrupted by SIGTERM; checkpoint ") and str(ckpt) in line
    assert "continue with: refine_fdp " in line and line.endswith("--resume")
    assert ckpt.exists() and not out.exists()
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "refine_fdp"
    proc = _start(command[1:])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    _same_answer(R.read_result(out), uninterrupted)
    _no_leftovers(tmp_path)
