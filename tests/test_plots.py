"""plots.py and the plot_curves script: figures from results, truth, tables; one-line errors."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spread_tools import refine as R
from spread_tools.cli.plot_curves import app
from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.plots import Curve, curves_from_result, plot_curves, read_truth
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[1] / "test_data"
runner = CliRunner()


@pytest.fixture(scope="module")
def result_files(tmp_path_factory):
    """A tiny refinement (and its dataset file) with Sauter and with KK restraints."""
    d = tmp_path_factory.mktemp("plots")
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 1])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::3] = True
    ds = ds.select_shoeboxes(keep)
    ds.write(d / "tiny.h5")
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    out = []
    for name, words in (("sauter", []), ("kk", ["restraints.fdp.mean=None",
                                                 "restraints.kramers_kronig.use=True"])):
        res = R.refine([ds], cache, resolve(R.REFINE_SCHEMA, overrides=words), backend="cpu")
        R.write_result(d / f"{name}.h5", res)
        out.append(d / f"{name}.h5")
    return d / "tiny.h5", out


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_library(result_files):
    data, (sauter, kk) = result_files
    res = [curves_from_result(sauter, "Sauter"), curves_from_result(kk, "KK")]
    truth = read_truth(data)
    fig = plot_curves(res, truth=truth)
    assert len(fig.axes) == 8                    # 2 sites x (fp, fdp) x (curve, residual)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:3] == ["truth (simulation)", "result: Sauter", "result: KK"]
    # one legend for the whole figure, saying what the band is; site names as panel titles
    assert len(fig.legends) == 1 and all(a.get_legend() is None for a in fig.axes)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["truth (simulation)", "result: Sauter (band: ±1σ)", "result: KK (band: ±1σ)"]
    titles = [a.get_title(loc="left") for a in fig.axes if a.get_title(loc="left")]
    assert titles == ["FE1 — f′", "FE1 — f″", "FE2 — f′", "FE2 — f″"]
    # the residual panel holds result - truth at the grid
    e = res[0]["FE1"].energy_ev
    d = ax.get_lines()[1].get_ydata() - np.interp(e, truth["FE1"].energy_ev, truth["FE1"].fp)
    np.testing.assert_allclose(fig.axes[1].get_lines()[1].get_ydata(), d)
    fig = plot_curves(res, truth=None)
    assert len(fig.axes) == 4
    with pytest.raises(InputError, match="FE5"):
        plot_curves(res, sites=["FE5"])


def test_plot_curves_cli_png_pdf_table_gallery(result_files, tmp_path):
    data, (sauter, kk) = result_files
    out = tmp_path / "c.png"
    r = runner.invoke(app, [str(sauter), str(kk), "--label", "Sauter", "--label", "KK", "--truth",
                            str(data), "--table", str(TEST_DATA / "spectra" / "Fe.dat"), "-o", str(out),
                            "also=pdf", "--gallery", str(data), "--sf-cache",
                            str(TEST_DATA / "sf_cache.h5"), "gallery.n_shoeboxes=3"])
    assert r.exit_code == 0, r.output
    assert _is_png(out) and (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"
    assert _is_png(tmp_path / "c_gallery.png")
    r = runner.invoke(app, [str(sauter), "-o", str(out)])
    assert r.exit_code == 2 and "exists already" in r.output


@pytest.mark.parametrize("case", ["no_output", "format", "not_result", "labels", "gallery",
                                  "reversed_energy"])
def test_plot_curves_bad_input(case, result_files, tmp_path):
    data, (sauter, _) = result_files
    argv = {"no_output": [str(sauter)],
            "format": [str(sauter), "-o", str(tmp_path / "c.txt")],
            "not_result": [str(data), "-o", str(tmp_path / "c.png")],
            "labels": [str(sauter), "--label", "a", "--label", "b", "-o", str(tmp_path / "c.png")],
            "gallery": [str(sauter), "--gallery", str(data), "-o", str(tmp_path / "c.png")],
            # accepted before (a reversed axis): issue 13
            "reversed_energy": [str(sauter), "-o", str(tmp_path / "c.png"), "energy.min_ev=7170",
                                "energy.max_ev=7070"]}[case]
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("plot_curves: error:"), r.output
    if case == "reversed_energy":
        assert "energy.min_ev=7170" in lines[0] and not (tmp_path / "c.png").exists()


def test_curve_band_drawn():
    c = Curve("x", "S", [1, 2, 3], [0, 1, 0], [1, 2, 1], [0.1] * 3, [0.2] * 3)
    fig = plot_curves([{"S": c}])
    band = fig.axes[0].collections
    assert len(band) == 1                          # the ±1σ band, from y - σ to y + σ
    ys = band[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(-0.1) and ys.max() == pytest.approx(1.1)


def test_result_and_table_labelled_apart():
    res = Curve("run1", "S", [1, 2, 3], [0, 1, 0], [1, 2, 1])
    tab = Curve("Fe.dat", "S", [1, 2, 3], [0, 0, 0], [1, 1, 1], kind="table")
    fig = plot_curves([{"S": res}], tables=[{"S": tab}])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["table: Fe.dat", "result: run1"]
    with pytest.raises(InputError, match="reversed"):
        plot_curves([{"S": res}], energy_range_ev=(3.0, 1.0))


def test_convergence_trace_library_and_cli(result_files, tmp_path):
    from spread_tools.plots import plot_convergence
    data, (sauter, kk) = result_files
    res = [R.read_result(sauter), R.read_result(kk)]
    fig = plot_convergence(res, labels=["Sauter", "KK"])
    ax_f, ax_g = fig.axes
    h = res[0]["history"]
    line = ax_g.get_lines()[0]
    np.testing.assert_array_equal(line.get_ydata(), h["gradient_norm"])      # one point per iteration
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(h["objective"]) + 1))
    gt = [ln for ln in ax_g.get_lines() if ln.get_label().startswith("gtol")]
    assert len(gt) == 1 and gt[0].get_ydata()[0] == pytest.approx(1e-3)
    drop = ax_f.get_lines()[0].get_ydata()
    assert np.all(drop > 0) and drop[-1] <= drop[0]
    # macrocycle boundaries are marked (one dotted line per panel and boundary)
    n_mc = len(res[0]["convergence"]["objective_end"])
    n_vlines = sum(1 for ln in ax_f.get_lines() if ln.get_linestyle() == ":")
    assert n_vlines == (n_mc - 1) + (len(res[1]["convergence"]["objective_end"]) - 1)
    out = tmp_path / "c.png"
    r = runner.invoke(app, [str(sauter), str(kk), "-o", str(out), "--convergence"])
    assert r.exit_code == 0, r.output
    assert _is_png(out) and _is_png(tmp_path / "c_convergence.png")
    empty = dict(res[0], history={"objective": np.zeros(0), "gradient_norm": np.zeros(0)})
    with pytest.raises(InputError, match="no convergence history"):
        plot_convergence([empty])
