"""The simulate_data script: a small real run, reload, and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_line_error
from typer.testing import CliRunner

from spread_tools.cli.simulate_data import app
from spread_tools.io.dataset import Dataset
from spread_tools.structure.build import build_sf_cache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
MODEL = TEST_DATA / "models" / "6lk1.pdb"
OX = TEST_DATA / "spectra" / "pf-rd-ox_fftkk.out"
RED = TEST_DATA / "spectra" / "pf-rd-red_fftkk.out"
TRUTH = f"truth=FE1={OX},FE2={RED}"
FAST = ["lattices=3", "seed=3", "spectrum.step_ev=4", "crystal.n_domains=2",
        "detector.distance_mm=100", "detector.pixel_size_mm=0.2", "detector.n_fast=1024",
        "detector.n_slow=1024"]
runner = CliRunner()


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "sf_cache.h5"
    build_sf_cache(MODEL, ["FE1=FES/FE1", "FE2=FES/FE2"], 3.0, 4.0, route="direct").write(path)
    return path


def _one_line_error(result, fragment):
    assert_one_line_error(result, "simulate_data", fragment)


def test_simulate_data_runs_and_reloads(cache_file, tmp_path):
    out = tmp_path / "ds.h5"
    result = runner.invoke(app, [str(cache_file), "-o", str(out), TRUTH, *FAST, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "shoeboxes" in result.output and f"wrote {out}" in result.output
    assert "off the detector" in result.output
    ds = Dataset.read(out)
    assert ds.n_lattices == 3 and ds.n_shoeboxes > 0 and ds.truth.site_names == ["FE1", "FE2"]
    assert ds.source == "simulate_data" and '"lattices": 3' in ds.config_json
    # --lattices/--seed options and the same seed give the same file content
    out2 = tmp_path / "ds2.h5"
    again = runner.invoke(app, [str(cache_file), "-o", str(out2), TRUTH, *FAST[2:], "--lattices",
                                "3", "--seed", "3", "-q"])
    assert again.exit_code == 0, again.output
    ds2 = Dataset.read(out2)
    assert np.array_equal(ds.counts, ds2.counts) and np.array_equal(ds.A, ds2.A)
    # no overwrite without --overwrite
    _one_line_error(runner.invoke(app, [str(cache_file), "-o", str(out), TRUTH, *FAST]),
                    "exists already")


def test_default_multi_panel_detector(cache_file, tmp_path):
    """The 16-module default detector: shoeboxes on several modules, none across a gap."""
    out = tmp_path / "ds.h5"
    result = runner.invoke(app, [str(cache_file), "-o", str(out), TRUTH, "lattices=4", "seed=2",
                                 "spectrum.step_ev=4", "crystal.n_domains=1", "shoebox_size=11"])
    assert result.exit_code == 0, result.output
    ds = Dataset.read(out)
    assert len(ds.origin_mm) == 16 and len(np.unique(ds.sb_panel)) > 3
    img = ds.image_size[ds.sb_panel]
    assert np.all(ds.sb_bbox[:, [0, 2]] >= 0) and np.all(ds.sb_bbox[:, 1] <= img[:, 0])
    assert np.all(ds.sb_bbox[:, 3] <= img[:, 1])
    assert "crossing a panel edge" in result.output


def test_truth_from_a_refinement_csv(cache_file, tmp_path):
    """A refine_fdp-style CSV with several sites gives each site its own columns."""
    rows = np.loadtxt(OX)
    rows = rows[(rows[:, 0] >= 7000) & (rows[:, 0] <= 7200)]
    csv = tmp_path / "result.csv"
    lines = ["energy_ev,FE1_fp,FE1_fp_sigma,FE1_fdp,FE1_fdp_sigma,FE2_fp,FE2_fp_sigma,FE2_fdp,"
             "FE2_fdp_sigma"]
    lines += [f"{e},{fp},0.1,{fdp},0.1,{fp - 1},0.1,{fdp + 1},0.1" for e, fp, fdp in rows]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds.h5"
    result = runner.invoke(app, [str(cache_file), "-o", str(out), f"truth=FE1={csv},FE2={csv}",
                                 *FAST])
    assert result.exit_code == 0, result.output
    ds = Dataset.read(out)
    fp1 = np.interp(ds.truth.energy_ev, rows[:, 0], rows[:, 1])
    assert np.allclose(ds.truth.fp[0], fp1) and np.allclose(ds.truth.fp[1], fp1 - 1)


def test_show_config_and_help():
    result = runner.invoke(app, ["--show-config", "lattices=7"])
    assert result.exit_code == 0 and "lattices = 7" in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in ("fluence=10000.0", "photons/Å²", "shoebox_size=7", "px", "eV", "--lattices"):
        assert text in result.output, text


@pytest.mark.parametrize("case", ["sites", "coverage", "fluence", "off_detector", "no_truth",
                                  "bad_truth_word", "no_output", "missing_cache", "annulus"])
def test_bad_input_gives_one_line(case, cache_file, tmp_path):
    out = tmp_path / "ds.h5"
    short = tmp_path / "short.out"
    rows = np.loadtxt(OX)
    np.savetxt(short, rows[(rows[:, 0] >= 7000) & (rows[:, 0] <= 7120)])
    base = [str(cache_file), "-o", str(out), *FAST]
    cases = {
        "sites": ([*base, f"truth=FE1={OX},FE3={RED}"],
                  "truth: sites FE1, FE3 do not match the sites FE1, FE2"),
        "coverage": ([*base, f"truth=FE1={short},FE2={RED}"],
                     "covers 7000-7120 eV but the spectrum channels span 7070-7170 eV"),
        "fluence": ([*base, TRUTH, "fluence=0"], "zero photons per shot"),
        "off_detector": ([*base, TRUTH, "detector.offset_mm=4000,4000"],
                         "no shoeboxes on the detector"),
        "no_truth": (base, "parameter truth: give a curve for every site"),
        "bad_truth_word": ([*base, "truth=FE1"], "is not SITE=TABLE"),
        "no_output": ([str(cache_file), TRUTH, *FAST], "-o FILE.h5"),
        "missing_cache": ([str(tmp_path / "nope.h5"), "-o", str(out), TRUTH], "no such file"),
        "annulus": ([*base, TRUTH, "d_min=2.0"], "not inside the SF cache range"),
    }
    args, fragment = cases[case]
    _one_line_error(runner.invoke(app, args), fragment)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "short.out"]


def test_console_script_exit_code_and_stderr(cache_file, tmp_path):
    """Through a real process: exit status 2 and one line on stderr, nothing written."""
    out = tmp_path / "ds.h5"
    proc = subprocess.run([sys.executable, "-m", "spread_tools.cli.simulate_data",
                           str(cache_file), "-o", str(out), TRUTH, *FAST, "fluence=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simulate_data: error: parameter fluence:")
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()
