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


def test_self_consistent_reference_table_and_the_tabulated_one(tmp_path):
    """A table of the self-consistent Chantler reference (f′ = C + KK of its own f″) at 1 eV
    checks to ~0; Chantler's *tabulated* f′ is not the KK partner of its f″ (up to 0.34 e⁻ at
    the edge): the false floor that the old differential check put under every table."""
    from spread_tools.physics.kk_reference import reference_curve
    e = np.arange(6000.0, 9001.0, 1.0)
    ref = reference_curve("Fe")
    for name, (fp, fdp) in {"consistent": ref.fp_fdp(e), "tabulated": reference_fp_fdp("Fe", e)}.items():
        path = tmp_path / f"{name}.dat"
        path.write_text("".join(f"{a:.1f} {b:.8f} {c:.8f}\n" for a, b, c in zip(e, fp, fdp)))
        res = invoke(path, "-o", tmp_path / name, "plot=false", "metric=rms")
        assert res.exit_code == 0, res.output
        r = read_csv(tmp_path / f"{name}.csv")["residual"]
        print(f"\nChantler Fe at 1 eV, {name} f': rms {np.sqrt(np.mean(r ** 2)):.4f}, "
              f"max {np.max(np.abs(r)):.4f} e-, rms about mean {r.std():.4f} e-")
        if name == "consistent":
            # only the 1 eV sampling of the reference's own edge remains
            assert np.sqrt(np.mean(r ** 2)) <= 0.02 and np.max(np.abs(r)) < 0.1
        else:
            assert np.max(np.abs(r)) > 0.2 and r.std() > 0.03
    res = invoke(tmp_path / "consistent.dat", "reference=none", "-o", tmp_path / "plain",
                 "plot=false")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "plain.png").exists()
    r = read_csv(tmp_path / "plain.csv")["residual"]
    print(f"\nplain KK over 6000-9000 eV: mean {r.mean():+.3f}, rms about mean {r.std():.3f} e-")
    # without the tails: a slowly varying offset, little shape
    assert 0.5 < abs(r.mean()) < 3.0 and r.std() < 0.1


def _kkcalc_consistent_fp(e, fdp, out_ev):
    """f′ of a table's f″ by kkcalc (an independent KK code), xraydb's raw Chantler f2 beyond
    the table, kkcalc's relativistic constant −(Z/82.5)^2.37."""
    import json

    import xraydb
    kkcalc = pytest.importorskip("kkcalc.kk")
    row = xraydb.get_xraydb().get_cache("Chantler", column="element", value="Fe")[0]
    te = np.array(json.loads(row.energy))
    f2 = np.array(json.loads(row.f2))
    keep = np.concatenate([[True], np.diff(te) > 0])
    te, f2 = te[keep], f2[keep]
    out = (te < e[0]) | (te > e[-1])
    nodes = np.concatenate([te[out & (te < e[0])], e, te[out & (te > e[-1])]])
    vals = np.concatenate([f2[out & (te < e[0])], fdp, f2[out & (te > e[-1])]])
    slope = np.diff(vals) / np.diff(nodes)
    coef = np.zeros((nodes.size - 1, 5))
    coef[:, 0] = slope
    coef[:, 1] = vals[:-1] - slope * nodes[:-1]
    z = 26
    return kkcalc.KK_PP(out_ev, nodes, coef, 0.0) - (z / 82.5) ** 2.37


def test_consistent_table_passes_spoiled_copies_fail(test_data, tmp_path):
    """The measured ox f″ with its exact KK f′ (kkcalc, raw Chantler tails) checks to <= 0.02 e⁻
    by default; a copy with a 1 e⁻ bump in f′ or with f′ moved by 3 eV fails at 0.1 e⁻."""
    t = read_table(test_data / "spectra" / "pf-rd-ox_fftkk.out")
    e = t.energy_ev
    fp = _kkcalc_consistent_fp(e, t.fdp, e)
    copies = {"consistent": fp, "bump": fp + np.exp(-0.5 * ((e - 7120.0) / 3.0) ** 2),
              "shift": np.interp(e - 3.0, e, fp)}
    figures = {}
    for name, f in copies.items():
        path = tmp_path / f"{name}.dat"
        path.write_text("".join(f"{a:.1f} {b:.8f} {c:.8f}\n" for a, b, c in zip(e, f, t.fdp)))
        res = invoke(path, "--max-rms", 0.1, "-o", tmp_path / name, "plot=false")
        figures[name] = res.output.splitlines()[1]
        print(f"\n{name}: {figures[name]}")
        r = read_csv(tmp_path / f"{name}.csv")["residual"]
        if name == "consistent":
            assert res.exit_code == 0, res.output
            assert np.sqrt(np.mean(r ** 2)) <= 0.02
            assert invoke(path, "--max-rms", 0.02, "metric=rms").exit_code == 0
        else:
            assert res.exit_code == 1 and "rms_about_mean" in res.output, res.output
            assert r.std() > 0.15
    # the measured table itself: not consistent on its rising edge (0.15 e- about the offset)
    assert invoke(test_data / "spectra" / "pf-rd-ox_fftkk.out", "--max-rms", 0.1).exit_code == 1


def test_cromer_liberman_reference_no_longer_diverges(test_data, tmp_path):
    """reference=cromer_liberman gave 9 e⁻ at 7112 eV (its tabulated f′ diverges at its step
    edge); made self-consistent it agrees with Chantler's tails up to a constant."""
    t = read_table(test_data / "spectra" / "pf-rd-ox_fftkk.out")
    fp = _kkcalc_consistent_fp(t.energy_ev, t.fdp, t.energy_ev)
    path = tmp_path / "c.dat"
    path.write_text("".join(f"{a:.1f} {b:.8f} {c:.8f}\n" for a, b, c in zip(t.energy_ev, fp, t.fdp)))
    res = invoke(path, "reference=cromer_liberman", "-o", tmp_path / "cl", "plot=false")
    assert res.exit_code == 0, res.output
    r = read_csv(tmp_path / "cl.csv")["residual"]
    print(f"\ncromer_liberman: max {np.max(np.abs(r)):.4f}, rms about mean {r.std():.4f} e-")
    assert np.max(np.abs(r)) < 0.05 and r.std() < 0.005


def test_quiet_and_plot_labels(test_data, tmp_path, monkeypatch):
    import spread_tools.cli.kk_check as K
    table = test_data / "spectra" / "pf-rd-red_fftkk.out"
    res = invoke(table, "-q")
    assert res.exit_code == 0 and res.output == ""
    assert invoke(table, "-q", "--max-rms", 0.05).exit_code == 1
    seen = {}
    monkeypatch.setattr(K, "plot_check", lambda check, title, paths, overwrite=False, kind="table":
                        seen.update(title=title, kind=kind))
    assert invoke(table, "-o", tmp_path / "r").exit_code == 0
    assert seen["kind"] == "table" and seen["title"].startswith("pf-rd-red_fftkk.out:")
    assert str(tmp_path) not in seen["title"] and str(test_data) not in seen["title"]
    help_text = runner.invoke(K.app, ["--help"]).output
    assert "Output prefix" in help_text and "-q" in help_text


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
    # the reference on the 4 eV grid is not linear between nodes: its own floor, printed
    assert "discretisation floor of this grid: 0.1" in res.output
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
