"""The import_dials script: the committed DIALS fixture → a valid dataset; one-line errors."""

from pathlib import Path

import numpy as np
from cli_checks import assert_one_line_error
from typer.testing import CliRunner

from spread_tools.cli.import_dials import app
from spread_tools.io.dataset import Dataset
from spread_tools.io.dials.importer import export_dials

TD = Path(__file__).resolve().parents[2] / "test_data"
SIM = TD / "dials" / "sim"
CH = ["channels.min_ev=7070", "channels.max_ev=7170", "crystal.domain_size_cells=48,48,24"]
runner = CliRunner()


def _one_line_error(result, fragment):
    assert_one_line_error(result, "import_dials", fragment)


def test_import_list_file_matches_simulation(tmp_path):
    out = tmp_path / "ds.h5"
    r = runner.invoke(app, [str(SIM / "sim.list"), "-o", str(out), *CH])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "4 lattices" in r.output
    ds = Dataset.read(out)          # validates
    assert ds.source == "import_dials" and ds.n_lattices == 4
    ref = Dataset.read(TD / "dataset.h5").select_lattices([0, 1, 2, 3])
    if ref.n_pixels == ds.n_pixels:  # test_data/dataset.h5 is the fixture's source unless regenerated since
        np.testing.assert_array_equal(ds.counts, ref.counts)
        np.testing.assert_array_equal(ds.sb_miller_index, ref.sb_miller_index)
        np.testing.assert_allclose(ds.spectrum_weight, ref.spectrum_weight, rtol=1e-9, atol=1e-9)
    # no overwrite without --overwrite
    r2 = runner.invoke(app, [str(SIM / "sim.list"), "-o", str(out), *CH])
    _one_line_error(r2, "exists already")
    r3 = runner.invoke(app, [str(SIM / "sim.list"), "-o", str(out), "--overwrite", "d_min=3", "-q", *CH])
    assert r3.exit_code == 0, r3.output
    assert Dataset.read(out).n_shoeboxes < ds.n_shoeboxes


def test_import_expt_refl_and_one_spectrum(tmp_path):
    out = tmp_path / "ds.h5"
    r = runner.invoke(app, [str(SIM / "sim.expt"), str(SIM / "sim.refl"), "-o", str(out),
                            f"spectrum.file={SIM / 'sim_000.lam'}", "spectrum.fluence=100", *CH])
    assert r.exit_code == 0, r.output
    ds = Dataset.read(out)
    np.testing.assert_allclose(ds.spectrum_weight.sum(axis=1), 100.0, rtol=1e-9)
    np.testing.assert_allclose(ds.spectrum_weight, ds.spectrum_weight[:1].repeat(4, axis=0))


def test_show_config_and_help():
    r = runner.invoke(app, ["--show-config"])
    assert r.exit_code == 0 and "step_ev = 1.0" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "channels.step_ev" in r.output


def test_bad_inputs_one_line(tmp_path):
    out = str(tmp_path / "o.h5")
    notmsg = tmp_path / "x.refl"
    notmsg.write_text("not a table")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.expt"), str(notmsg), "-o", out]),
                    "not a DIALS msgpack reflection table")
    trunc = tmp_path / "t.refl"
    trunc.write_bytes((SIM / "sim.refl").read_bytes()[:5000])
    _one_line_error(runner.invoke(app, [str(SIM / "sim.expt"), str(trunc), "-o", out]), "truncated")
    neg = tmp_path / "n.lam"
    neg.write_text("wavelength,weight\n1.75,1\n1.76,-2\n")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.expt"), str(SIM / "sim.refl"), str(neg), "-o", out, *CH]),
                    "negative weight")
    nohead = tmp_path / "h.lam"
    nohead.write_text("1.75,1\n1.76,2\n")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.expt"), str(SIM / "sim.refl"), "-o", out,
                                        f"spectrum.file={nohead}", *CH]), "missing header")
    # identifiers that do not match the experiment list
    lst = export_dials(Dataset.read(TD / "dataset.h5"), tmp_path / "other", lattices=[0])
    other_refl = lst.parent / "sim.refl"
    _one_line_error(runner.invoke(app, [str(TD / "dials" / "CuNiR_integrated.expt"), str(other_refl), "-o", out]),
                    "experiment identifiers do not match")
    # a real DIALS table without shoeboxes
    _one_line_error(runner.invoke(app, [str(TD / "dials" / "CuNiR_integrated.expt"),
                                        str(TD / "dials" / "CuNiR_integrated.refl"), "-o", out]),
                    "no 'shoebox' column")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.list")]), "-o FILE.h5")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.expt"), "-o", out]), "give the .expt and the .refl together")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.list"), "-o", out, "flags.require=integrated_summ"]),
                    "unknown DIALS reflection flag")
    # accepted before (an empty dataset, exit 0): issue 13
    _one_line_error(runner.invoke(app, [str(SIM / "sim.list"), "-o", out, "d_min=5", "d_max=4"]),
                    "d_min (the high-resolution limit) must be below d_max")
    _one_line_error(runner.invoke(app, [str(SIM / "sim.list"), "-o", out, "d_min=-1"]),
                    "parameter d_min: must be a positive resolution")
    # a resolution window without reflections: nothing written
    _one_line_error(runner.invoke(app, [str(SIM / "sim.list"), "-o", out, "-q", "d_min=40", "d_max=50"]),
                    "no reflection left")
    assert not Path(out).exists()
