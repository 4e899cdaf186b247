"""End-to-end command-line chains with tiny settings that reload what each step wrote."""

import csv
import subprocess
import sys

import h5py
import numpy as np

from spread_tools.io.dataset import Dataset


def run(*args, cwd=None):
    """Run a console script through its module, as a user would from the shell."""
    module = {"cache_sf": "cache_sf", "simulate_data": "simulate_data", "import_dials": "import_dials",
              "refine_fdp": "refine_fdp", "plot_curves": "plot_curves", "kk_check": "kk_check",
              "refine_geometry": "refine_geometry"}[args[0]]
    cmd = [sys.executable, "-c", f"from spread_tools.cli.{module} import main; main()", *map(str, args[1:])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_import_dials_then_refine(tmp_path, test_data):
    """DIALS files exported from the simulation import back and refine unchanged (issue 6)."""
    imported = tmp_path / "imported.h5"
    run("import_dials", test_data / "dials/sim/sim.list", "-o", imported, "--quiet",
        "channels.min_ev=7070", "channels.max_ev=7170", "crystal.domain_size_cells=48,48,24")
    ds = Dataset.read(imported)
    original = Dataset.read(test_data / "dataset.h5").select_lattices([0, 1, 2, 3])
    assert ds.n_lattices == 4 and ds.n_shoeboxes == original.n_shoeboxes
    assert np.array_equal(np.sort(ds.counts), np.sort(original.counts))

    result = tmp_path / "result.h5"
    run("refine_fdp", imported, "--sf-cache", test_data / "sf_cache.h5", "-o", result, "--quiet",
        "optimizer.iterations=3", "optimizer.max_macrocycles=1")
    with h5py.File(result, "r") as h5:
        assert h5.attrs["format"] == "spread_tools.result"
        fp, fdp = h5["fp"][()], h5["fdp"][()]
        assert fp.shape == fdp.shape == (2, len(h5["energy_ev"]))
        assert np.all(np.isfinite(fp)) and np.all(np.isfinite(fdp))
        assert len(h5["lattice_G"]) == 4
    rows = list(csv.DictReader(open(result.with_suffix(".csv"))))
    assert len(rows) == fp.shape[1]
    assert np.isclose(float(rows[0]["FE1_fdp"]), fdp[0, 0], rtol=1e-6)


def test_example_chain_writes_every_product(tmp_path, test_data):
    """cache_sf -> simulate_data (ly99 preset) -> refine_geometry -> refine_fdp -> plot_curves ->
    kk_check, each reading the last."""
    cache = tmp_path / "sf.h5"
    run("cache_sf", test_data / "models/6lk1.pdb", "-o", cache, "--quiet", "sites=FE1=FES/FE1,FE2=FES/FE2",
        "d_min=3.0", "d_max=4.0", "energy.min_ev=7090", "energy.max_ev=7150", "energy.step_ev=4")
    data = tmp_path / "data.h5"
    spectra = test_data / "spectra"
    run("simulate_data", cache, "-o", data, "--quiet", "preset=ly99", "lattices=4", "seed=3", "shoebox_size=9",
        f"truth=FE1={spectra / 'pf-rd-ox_fftkk.out'},FE2={spectra / 'pf-rd-red_fftkk.out'}",
        "spectrum.min_ev=7090", "spectrum.max_ev=7150", "spectrum.centre_min_ev=7105",
        "spectrum.centre_max_ev=7135", "spectrum.step_ev=2")
    refined = tmp_path / "refined.h5"
    run("refine_geometry", data, "--sf-cache", cache, "-o", refined, "--quiet", "lattice.min_shoeboxes=3")
    table = list(csv.DictReader(open(tmp_path / "refined.lattices.csv")))
    assert len(table) == 4 and all(r["status"] in ("ok", "too_few_shoeboxes", "not_converged") for r in table)
    assert Dataset.read(refined).n_lattices == sum(r["status"] == "ok" for r in table) >= 1
    result = tmp_path / "result.h5"
    run("refine_fdp", refined, "--sf-cache", cache, "-o", result, "--quiet",
        "optimizer.iterations=3", "optimizer.max_macrocycles=1")
    run("plot_curves", result, "--truth", data, "-o", tmp_path / "curves.png")
    run("kk_check", result, "site=FE2", "window.min_ev=7095", "window.max_ev=7145", "-o", tmp_path / "kk")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    lines = [ln for ln in open(tmp_path / "kk.csv") if not ln.startswith("#")]
    rows = list(csv.DictReader(lines))
    assert len(rows) > 10
    assert all(np.isfinite(float(v)) for r in rows for v in r.values() if v not in ("",))
