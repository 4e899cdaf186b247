"""The kk_check script on the measured Fe tables, a smooth Chantler table, a refinement
result, and bad input (one-line errors, exit status != 0)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from spread_tools.cli.kk_check import app
from spread_tools.io.h5io import atomic_writer, write_strings
from spread_tools.physics.scattering import read_table, reference_fp_fdp

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kk_check: error:"), result.output
    assert fragment in lines[0], lines[0]


def read_csv(path):
    rows = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    header = rows[0].split(",")
    data = np.array([[float(v) if v else np.nan for v in r.split(",")] for r in rows[1:]])
    return {h: data[:, i] for i, h in enumerate(header)}


@pytest.mark.parametrize("name", ["pf-rd-ox_fftkk.out", "pf-rd-red_fftkk.out"])
def test_measured_fe_tables(test_data, tmp_path, name):
    table = test_data / "spectra" / name
    prefix = tmp_path / name.split("_")[0]
    res = invoke(table, "window.min_ev=7070", "window.max_ev=7170", "-o", prefix)
    assert res.exit_code == 0, res.output
    assert "mode table" in res.output and "reference chantler Fe" in res.output
    for suffix in (".csv", ".png", ".pdf"):
        assert (tmp_path / (prefix.name + suffix)).stat().st_size > 1000
    csv = read_csv(tmp_path / (prefix.name + ".csv"))
    assert csv["energy_ev"].size == 101
    np.testing.assert_allclose(csv["residual"], csv["fp"] - csv["fp_kk"], atol=1e-6)
    rms = np.sqrt(np.mean(csv["residual"] ** 2))
    i = np.argmax(np.abs(csv["residual"]))
    print(f"\n{name}: rms {rms:.3f} e-, max {abs(csv['residual'][i]):.3f} e- at "
          f"{csv['energy_ev'][i]:g} eV")
    # not perfectly KK-consistent on the rising edge: the largest residual is there
    assert 0.1 < rms < 0.4
    assert 0.5 < abs(csv["residual"][i]) < 1.5
    assert 7112 <= csv["energy_ev"][i] <= 7125
    # away from the edge the table is consistent to ~0.1 e-
    far = (csv["energy_ev"] < 7100) | (csv["energy_ev"] > 7140)
    assert np.max(np.abs(csv["residual"][far])) < 0.2
    # the threshold sets the exit status
    assert invoke(table, "--max-rms", 0.5).exit_code == 0
    bad = invoke(table, "--max-rms", 0.1)
    assert bad.exit_code == 1 and "exceeds max_rms" in bad.output
    assert invoke(table, "max_rms=0.1").exit_code == 1


def test_smooth_chantler_table(tmp_path):
    """A smooth, self-consistent table (Chantler Fe at 1 eV): small residual.

    Default: differential against Chantler sampled at 0.1 eV near the window, so
    what remains is the table's 1 eV sampling of its own edge. reference=None
    (plain KK over the table): a near-constant offset from the untabulated tails
    and the relativistic term remains, the rms about it is small.
    """
    e = np.arange(1000.0, 30001.0, 1.0)
    fp, fdp = reference_fp_fdp("Fe", e)
    path = tmp_path / "chantler_fe.dat"
    path.write_text("".join(f"{a:.1f} {b:.8f} {c:.8f}\n" for a, b, c in zip(e, fp, fdp)))
    res = invoke(path, "-o", tmp_path / "ch")
    assert res.exit_code == 0, res.output
    r = read_csv(tmp_path / "ch.csv")["residual"]
    print(f"\nChantler Fe 1 eV table, default check: rms {np.sqrt(np.mean(r ** 2)):.3f}, "
          f"max {np.max(np.abs(r)):.3f} e-")
    assert np.sqrt(np.mean(r ** 2)) < 0.03 and np.max(np.abs(r)) < 0.15
    res = invoke(path, "reference=none", "-o", tmp_path / "ch_plain", "plot=false")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "ch_plain.png").exists()
    r = read_csv(tmp_path / "ch_plain.csv")["residual"]
    print(f"\nChantler Fe, plain KK over 1000-30000 eV: rms {np.sqrt(np.mean(r ** 2)):.3f}, "
          f"max {np.max(np.abs(r)):.3f}, mean {r.mean():+.3f}, rms about mean {r.std():.3f} e-")
    # the largest deviation is at the edge (7111 eV): Chantler's jump sampled at 1 eV
    assert abs(r.mean()) < 0.3 and r.std() < 0.06 and np.max(np.abs(r - r.mean())) < 0.3


def test_coarse_henke_table_is_consistent_with_its_own_fdp(test_data):
    """Henke f1 is itself a KK transform of f2: a coarse table, a small residual."""
    res = invoke(test_data / "spectra" / "fe.nff", "window.min_ev=6000", "window.max_ev=9000",
                 "--max-rms", 0.1)
    assert res.exit_code == 0, res.output


def test_refinement_result_site(test_data, tmp_path):
    grid = np.arange(7070.0, 7171.0, 4.0)
    ox = read_table(test_data / "spectra" / "pf-rd-ox_fftkk.out")
    fp_ox, fdp_ox = ox.interpolate(grid)
    fp_ref, fdp_ref = reference_fp_fdp("Fe", grid)
    path = tmp_path / "result.h5"
    with atomic_writer(path, "spread_tools.result", 1) as h5:
        h5["energy_ev"] = grid
        write_strings(h5, "site_names", ["FE1", "FE2"])
        write_strings(h5, "site_elements", ["Fe", "Fe"])
        h5["fp"] = np.array([fp_ref, fp_ox])
        h5["fdp"] = np.array([fdp_ref, fdp_ox])
    res = invoke(path, "site=FE1")
    assert res.exit_code == 0, res.output
    assert "mode restraint (pad 100 eV)" in res.output and "(26 energies)" in res.output
    assert "rms |f' - KK(f'')| = 0.0000 e-" in res.output
    res = invoke(path, "site=FE2", "-o", tmp_path / "fe2")
    assert res.exit_code == 0, res.output
    assert read_csv(tmp_path / "fe2.csv")["energy_ev"].size == 26
    print("\nox table on the 4 eV grid as a result, restraint mode:", res.output.splitlines()[1])
    # the refinement CSV of the same result
    csv_path = tmp_path / "result.csv"
    csv_path.write_text("energy_ev,FE1_fp,FE1_fp_sigma,FE1_fdp,FE1_fdp_sigma\n" + "".join(
        f"{e},{a},0.1,{b},0.1\n" for e, a, b in zip(grid, fp_ox, fdp_ox)))
    res_csv = invoke(csv_path, "site=FE1")
    assert res_csv.exit_code == 0, res_csv.output
    assert res_csv.output.splitlines()[1] == res.output.splitlines()[1]
    one_error_line(invoke(path), "choose one with site=")
    one_error_line(invoke(path, "site=FE2", "-o", tmp_path / "no" / "x"), "does not exist")
    one_error_line(invoke(path, "site=FE3"), "no site 'FE3'")


def test_no_overwrite_without_flag(test_data, tmp_path):
    table = test_data / "spectra" / "pf-rd-red_fftkk.out"
    assert invoke(table, "-o", tmp_path / "x", "plot=false").exit_code == 0
    one_error_line(invoke(table, "-o", tmp_path / "x", "plot=false"), "exists already")
    assert invoke(table, "-o", tmp_path / "x.csv", "plot=false", "--overwrite").exit_code == 0


FLAT = "".join(f"{7000 + i} -5 1\n" for i in range(300))     # 7000-7299 eV


@pytest.mark.parametrize("text, words, fragment", [
    ("7000 1 2\n7001 1\n7002 1 2\n", [], "expected 3 columns"),     # f'' missing in a row
    ("7000 1 2\n7002 1 2\n7001 1 2\n", [], "not increasing"),
    ("7000 1 2\n7001 nan 2\n7002 1 2\n", [], "NaN"),
    (FLAT, ["window.min_ev=6900"], "not inside the table"),
    (FLAT, ["window.max_ev=7400"], "not inside the table"),
    (FLAT, ["window.min_ev=7100", "window.max_ev=7100.5"], "need at least 2"),
    (FLAT, ["window.min_ev=7170", "window.max_ev=7070"], "below max_ev"),
    (FLAT, ["pad=-1"], "parameter pad: must be > 0"),
    (FLAT, ["element=Xx"], "unknown element"),
    (FLAT, ["mode=fast"], "not one of"),
    (FLAT, ["--max-rms", "-1"], "max_rms: must be >= 0"),
], ids=["short-row", "unsorted", "nan", "window-low", "window-high", "window-empty",
        "window-reversed", "pad", "element", "mode", "max-rms"])
def test_bad_input_is_one_line(tmp_path, text, words, fragment):
    path = tmp_path / "t.dat"
    path.write_text(text)
    one_error_line(invoke(path, *words), fragment)


def test_missing_file_and_arguments(tmp_path):
    one_error_line(invoke(tmp_path / "nope.dat"), "no such file")
    one_error_line(invoke(), "expects 1 input file")
