"""The cache_sf script: a real run on 6lk1, reload, and one-line errors for bad input."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_one_line_error
from typer.testing import CliRunner

from spread_tools.cli.cache_sf import app
from spread_tools.structure.cache import SFCache

MODEL = Path(__file__).resolve().parents[2] / "test_data" / "models" / "6lk1.pdb"
ARGS = ["sites=FE1=FES/FE1,FE2=FES/FE2", "d_min=3.5", "d_max=4.0",
        "energy.min_ev=7070", "energy.max_ev=7170", "energy.step_ev=4"]
runner = CliRunner()


def _one_line_error(result, fragment):
    assert_one_line_error(result, "cache_sf", fragment)


def test_cache_sf_runs_reloads_and_validates(tmp_path):
    out = tmp_path / "sf.h5"
    result = runner.invoke(app, [str(MODEL), "-o", str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert "site FE1 (Fe): 2 atom(s), 4 in the unit cell" in result.output
    assert "site FE2 (Fe): 2 atom(s)" in result.output
    assert "total" in result.output and "route direct" in result.output
    cache = SFCache.read(out)
    cache.validate()
    assert cache.site_names == ["FE1", "FE2"] and cache.site_elements == ["Fe", "Fe"]
    np.testing.assert_allclose(cache.energy_ev, np.arange(7070, 7171, 4.0))
    assert cache.d_min_a == 3.5 and cache.d_max_a == 4.0
    assert "FE1=FES/FE1" in cache.config and cache.model_file.endswith("6lk1.pdb")
    d = 1 / np.sqrt(cache.inv_d2())
    assert d.min() >= 3.5 - 1e-9 and d.max() <= 4.0 + 1e-9
    # the same run again refuses to overwrite, and --overwrite replaces
    _one_line_error(runner.invoke(app, [str(MODEL), "-o", str(out), *ARGS]), "exists already")
    again = runner.invoke(app, [str(MODEL), "-o", str(out), "--overwrite", *ARGS, "route=fft"])
    assert again.exit_code == 0, again.output
    fft = SFCache.read(out)
    rel = np.abs(fft.F_base - cache.F_base) / np.sqrt(np.mean(np.abs(cache.F_base) ** 2))
    assert rel.max() < 1e-3


def test_show_config_and_help():
    result = runner.invoke(app, ["--show-config", "d_min=3"])
    assert result.exit_code == 0 and "d_min = 3.0" in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "energy.step_ev=4.0" in result.output and "Å" in result.output


@pytest.mark.parametrize("case", ["missing", "no_match", "mixed", "d_range", "energy",
                                  "energy_list", "no_sites", "no_output", "not_a_model"])
def test_bad_input_gives_one_line(case, tmp_path):
    out = str(tmp_path / "sf.h5")
    args = {
        "missing": ([str(tmp_path / "nope.pdb"), "-o", out, *ARGS], "nope.pdb: no such file"),
        "no_match": ([str(MODEL), "-o", out, *ARGS[1:], "sites=ZN1=ZN/ZN"],
                     "site ZN1 (//*/(ZN)/ZN) matches no atom"),
        "mixed": ([str(MODEL), "-o", out, *ARGS[1:], "sites=FES=(FES)/*"],
                  "different elements (Fe, S)"),
        "d_range": ([str(MODEL), "-o", out, *ARGS, "d_min=4", "d_max=4"],
                    "must be smaller than d_max"),
        "energy": ([str(MODEL), "-o", out, *ARGS, "energy.max_ev=7000"],
                   "energy grid must increase"),
        "energy_list": ([str(MODEL), "-o", out, *ARGS, "energy.list_ev=[7100, 7100, 7120]"],
                        "strictly increasing"),
        "no_sites": ([str(MODEL), "-o", out, *ARGS[1:]], "at least one site"),
        "no_output": ([str(MODEL), *ARGS], "-o FILE.h5"),
        "not_a_model": ([str(Path(__file__)), "-o", out, *ARGS], "cannot read the model"),
    }[case]
    _one_line_error(runner.invoke(app, args[0]), args[1])
    assert not Path(out).exists()


def test_bad_cache_files_give_one_line(tmp_path):
    """Reading a damaged cache from a script: one line, exit 2 (through the same wrapper)."""
    import typer

    from spread_tools.cli.common import make_app, user_errors

    reader = make_app("cache_sf", "read")

    @reader.command()
    def read(path: Path):
        with user_errors("cache_sf"):
            SFCache.read(path)
            typer.echo("ok")

    good = tmp_path / "sf.h5"
    assert runner.invoke(app, [str(MODEL), "-o", str(good), *ARGS]).exit_code == 0
    assert runner.invoke(reader, [str(good)]).output.strip() == "ok"
    text = tmp_path / "text.h5"
    text.write_text("not hdf5\n")
    _one_line_error(runner.invoke(reader, [str(text)]), "not an HDF5 file")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:5000])
    _one_line_error(runner.invoke(reader, [str(cut)]), "cut.h5")
    other = tmp_path / "other.h5"
    shutil.copy(good, other)
    import h5py
    with h5py.File(other, "a") as h5:
        h5.attrs["format"] = "spread_tools.dataset"
    _one_line_error(runner.invoke(reader, [str(other)]), "expected spread_tools.sf_cache")


def test_console_script_exit_code_and_stderr(tmp_path):
    """Through a real process: exit status 2 and one line on stderr, nothing written."""
    import subprocess
    import sys
    out = tmp_path / "sf.h5"
    proc = subprocess.run([sys.executable, "-m", "spread_tools.cli.cache_sf",
                           str(tmp_path / "missing.pdb"), "-o", str(out), *ARGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cache_sf: error: {tmp_path / 'missing.pdb'}: no such file"]
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()


def test_no_low_resolution_limit(tmp_path):
    out = tmp_path / "sf.h5"
    result = runner.invoke(app, [str(MODEL), "-o", str(out), *ARGS, "d_min=8", "d_max=None"])
    assert result.exit_code == 0, result.output
    cache = SFCache.read(out)
    assert np.isinf(cache.d_max_a) and cache.index_of([[1, 0, 0]])[0] >= 0
