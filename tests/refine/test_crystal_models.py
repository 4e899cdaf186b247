"""Tests of refine_geometry's library entry point (spread_tools.refine.crystal_models) on
small simulations: recovery of perturbed crystal models on the beamtime-like ly99 preset,
exact models left in place, the energy offset, the per-lattice table and the flags."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools.cli.simulate_data import PRESETS, SCHEMA as SIM_SCHEMA, settings_from_config
from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.model.crystal_params import rotation_angle_deg
from spread_tools.physics.scattering import read_table
from spread_tools.refine.crystal_models import (GEOMETRY_SCHEMA, QC_COLUMNS, lattice_table_csv,
                                                refine_geometry, refined_dataset)
from spread_tools.simulate.simulator import make_detector, simulate_dataset
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


def simulate(path, preset, *words):
    cfg = resolve(SIM_SCHEMA, overrides=[f"preset={preset}", *words], presets=PRESETS)
    truth = {"FE1": read_table(TEST_DATA / "spectra" / "pf-rd-ox_fftkk.out"),
             "FE2": read_table(TEST_DATA / "spectra" / "pf-rd-red_fftkk.out")}
    simulate_dataset(SFCache.read(TEST_DATA / "sf_cache.h5"), truth, make_detector(),
                     settings_from_config(cfg), path)
    return Dataset.read(path)


@pytest.fixture(scope="module")
def cache():
    return SFCache.read(TEST_DATA / "sf_cache.h5")


@pytest.fixture(scope="module")
def ly99(tmp_path_factory):
    """Six beamtime-like lattices (ly99 preset; smaller boxes and 2 eV channels for speed)."""
    return simulate(tmp_path_factory.mktemp("geo") / "ly99.h5", "ly99", "lattices=6", "seed=3",
                    "shoebox_size=13", "spectrum.step_ev=2")


@pytest.fixture(scope="module")
def ly99_result(ly99, cache):
    return refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=["refine.energy_offset=off",
                                                                          "energy_offset.start_ev=2.0"]))


def _errors(ds, A):
    t = ds.truth
    return np.array([rotation_angle_deg(A[j], t.A[j]) for j in range(ds.n_lattices)])


def test_ly99_preset_stores_models_with_indexing_size_errors(ly99):
    t = ly99.truth
    rot = _errors(ly99, ly99.A)
    assert 0.02 < np.sqrt(np.mean(rot ** 2)) < 0.12
    assert np.std(t.cell[:, 0] / ly99.cell[0] - 1) > 5e-4
    assert np.std(np.log(t.domain_size_cells[:, 0])) > 0.05
    np.testing.assert_allclose(t.spectrum_offset_ev.mean(), 2.0, atol=0.3)
    assert np.allclose(ly99.domain_size_cells, ly99.domain_size_cells[0])   # stored: nominal


def test_refinement_recovers_the_true_crystal_models(ly99, ly99_result):
    r, ds = ly99_result, ly99
    k = r.kept
    assert len(k) >= 5
    before = _errors(ds, ds.A)[k]
    after = _errors(ds, r.A)[k]
    assert np.sqrt(np.mean(after ** 2)) < 0.4 * np.sqrt(np.mean(before ** 2))
    sigma = r.table["rotation_sigma_deg"][k]
    # per-axis error over σ: honest to a factor of two on six lattices
    z = np.sqrt(np.mean((after / np.sqrt(3)) ** 2 / sigma ** 2))
    assert 0.3 < z < 2.0, z
    cell = np.stack([r.table[c] for c in "abc"], 1)[k]
    err_after = np.sqrt(np.mean((cell / ds.truth.cell[k, :3] - 1) ** 2))
    err_before = np.sqrt(np.mean((ds.truth.cell[k, :3] / ds.cell[:3] - 1) ** 2))
    assert err_after < 0.5 * err_before
    lnN = np.log(r.domain_size_cells[k, 0] / ds.truth.domain_size_cells[k, 0])
    assert np.sqrt(np.mean(lnN ** 2)) < np.sqrt(np.mean(np.log(ds.domain_size_cells[k, 0] /
                                                             ds.truth.domain_size_cells[k, 0]) ** 2))
    t = r.table
    have = np.isfinite(t["centroid_rmsd_start_px"][k])       # lattices with significant spots
    assert have.sum() >= 4
    assert np.all(t["centroid_rmsd_final_px"][k][have] < t["centroid_rmsd_start_px"][k][have])
    assert np.all(t["nll_final"][k] < t["nll_start"][k])


def test_table_covers_every_lattice_and_reloads(ly99, ly99_result, tmp_path):
    text = lattice_table_csv(ly99_result.table)
    lines = text.strip().splitlines()
    assert lines[0].split(",") == list(QC_COLUMNS) and len(lines) == ly99.n_lattices + 1
    out = refined_dataset(ly99, ly99_result)
    out.write(tmp_path / "r.h5")
    back = Dataset.read(tmp_path / "r.h5")
    k = ly99_result.kept
    np.testing.assert_array_equal(back.A, ly99_result.A[k])
    np.testing.assert_allclose(back.energy_ev, ly99.energy_ev + 2.0)
    assert back.truth is not None and np.array_equal(back.truth.A, ly99.truth.A[k])


def test_exact_models_stay_within_their_sigma(tmp_path, cache):
    ds = simulate(tmp_path / "ideal.h5", "ideal", "lattices=4", "seed=4", "spectrum.step_ev=2",
                  "crystal.n_domains=4")
    r = refine_geometry(ds, cache, resolve(GEOMETRY_SCHEMA, overrides=[
        "refine.energy_offset=off", "refine.domain_size=off", "refine.mosaic_spread=False"]))
    rot = _errors(ds, r.A)[r.kept] / np.sqrt(3)
    assert np.all(rot < 4 * r.table["rotation_sigma_deg"][r.kept])
    cell = np.stack([r.table[c] for c in "abc"], 1)[r.kept]
    assert np.max(np.abs(cell / ds.cell[:3] - 1)) < 3e-4


def test_global_energy_offset_is_found_when_the_cells_are_known(tmp_path, cache):
    ds = simulate(tmp_path / "off.h5", "ideal", "lattices=4", "seed=6", "spectrum.step_ev=2",
                  "crystal.n_domains=4", "model_error.spectrometer_offset_ev=2.0")
    r = refine_geometry(ds, cache, resolve(GEOMETRY_SCHEMA, overrides=[
        "cell.sigma_fraction=2e-5", "refine.domain_size=off", "refine.mosaic_spread=False"]))
    assert abs(r.energy_offset_ev - 2.0) < 0.3, r.energy_offset_ev
    # the reported σ is honest to a factor 3 (one draw) and small with known cells
    assert 0 < r.energy_offset_sigma_ev < 0.3 and abs(r.energy_offset_ev - 2.0) < 3 * r.energy_offset_sigma_ev + 0.05
    steps = [m.get("offset_step_ev", 0.0) for m in r.macrocycles]
    assert len(r.macrocycles) >= 2 and r.energy_offset_ev == pytest.approx(sum(steps))
    # every macrocycle records its times; after a step below offset_tol_ev the final pass
    # refits only the lattices that had not converged
    tol = GEOMETRY_SCHEMA["optimizer"]["offset_tol_ev"].default
    n = ds.n_lattices
    for i, m in enumerate(r.macrocycles):
        assert m["fit_s"] >= 0 and m["iterations"] >= 0
        if i + 1 < len(r.macrocycles):
            assert m["offset_s"] >= 0 and 1 <= m["offset_trials"] <= 4
        prev = r.macrocycles[i - 1] if i else None
        final = prev is not None and abs(prev["offset_step_ev"]) < tol
        assert m["refitted_lattices"] == (n - prev["converged_lattices"] if final else n)
        assert not final or i == len(r.macrocycles) - 1
    assert abs(r.macrocycles[-2]["offset_step_ev"]) < tol     # the run ended with a final pass


def test_too_few_shoeboxes_are_flagged_and_left_out(ly99, cache):
    n_sb = np.bincount(ly99.sb_lattice)
    cut = int(np.sort(n_sb)[1]) + 1
    r = refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=[
        f"lattice.min_shoeboxes={cut}", "refine.energy_offset=off"]))
    flagged = np.flatnonzero(n_sb < cut)
    assert set(r.table["status"][flagged]) == {"too_few_shoeboxes"}
    assert not np.isin(flagged, r.kept).any()


@pytest.mark.parametrize("words,fragment", [
    (["cell.sigma_fraction=0"], "must be positive"),
    (["cell.sigma_edges_a=0.04,0,0.15"], "must be positive"),
    (["cell.sigma_angles_deg=-1"], "must be positive"),
    (["cell.restrain=False"], "one parameter"),
    (["curves.tables=FE1=__short__"], "covers"),
    (["curves.tables=FE9=__short__"], "not in the SF cache"),
])
def test_bad_settings_are_one_clear_error(ly99, cache, tmp_path, words, fragment):
    short = tmp_path / "short.dat"
    short.write_text("7000 -4 3\n7050 -5 3.2\n")
    words = [w.replace("__short__", str(short)) for w in words]
    with pytest.raises(InputError, match=fragment):
        refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=words))


def test_lattice_without_shoeboxes_is_an_error(ly99, cache):
    ds = ly99.select_shoeboxes(ly99.sb_lattice != 2)
    with pytest.raises(InputError, match="lattice 2 .* has no shoeboxes"):
        refine_geometry(ds, cache, resolve(GEOMETRY_SCHEMA))


def test_per_shot_offsets_move_each_spectrum_onto_the_common_channels(ly99, cache):
    # with the cells fixed, a shot's offset is set by its spots (free cells would absorb it; here
    # it also absorbs the true cell spread of the preset, which only the cells can tell apart)
    r = refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=[
        "refine.energy_offset=per_lattice", "refine.cell=False", "optimizer.max_macrocycles=3"]))
    k = r.kept
    off = r.lattice_offset_ev[k]
    assert np.max(np.abs(off)) > 0.05
    out = refined_dataset(ly99, r)
    before = ly99.spectrum_weight[k]
    # photons are conserved up to what a shift pushes past the ends of the channel window
    np.testing.assert_allclose(out.spectrum_weight.sum(axis=1), before.sum(axis=1), rtol=0.05)
    centroid = lambda w, e: (w * e).sum(axis=1) / w.sum(axis=1)  # noqa: E731
    moved = centroid(out.spectrum_weight, ly99.energy_ev) - centroid(before, ly99.energy_ev)
    inside = np.abs(out.spectrum_weight.sum(axis=1) / before.sum(axis=1) - 1) < 1e-6   # nothing lost
    assert inside.sum() >= 3
    np.testing.assert_allclose(moved[inside], off[inside], atol=0.01)


class _StopAfter:
    """A stop request that arrives at the n-th time it is looked at (like a signal mid-run)."""

    def __init__(self, n):
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        return 15 if self.n < 0 else None


@pytest.mark.parametrize("stop_at", [3, 12, 40])
def test_stop_and_resume_reaches_the_uninterrupted_answer_bit_for_bit(ly99, cache, tmp_path, stop_at):
    from spread_tools.refine.checkpoint import Interrupted
    words = ["checkpoint.interval_s=0", "optimizer.max_macrocycles=3"]
    cfg = resolve(GEOMETRY_SCHEMA, overrides=words)
    ref = refine_geometry(ly99, cache, cfg)
    ckpt = tmp_path / "g.ckpt.h5"
    with pytest.raises(Interrupted) as exc:
        refine_geometry(ly99, cache, cfg, checkpoint=ckpt, stop=_StopAfter(stop_at))
    assert exc.value.exit_code == 143 and ckpt.exists()
    again = refine_geometry(ly99, cache, cfg, checkpoint=ckpt, resume=True)
    assert np.array_equal(again.A, ref.A, equal_nan=True)
    assert again.energy_offset_ev == ref.energy_offset_ev
    assert lattice_table_csv(again.table) == lattice_table_csv(ref.table)


def test_resume_refuses_a_checkpoint_of_other_parameters(ly99, cache, tmp_path):
    from spread_tools.refine.checkpoint import Interrupted
    ckpt = tmp_path / "g.ckpt.h5"
    with pytest.raises(Interrupted):
        refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=["checkpoint.interval_s=0"]),
                        checkpoint=ckpt, stop=_StopAfter(2))
    with pytest.raises(InputError, match="another configuration"):
        refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=["cell.sigma_fraction=0.01"]),
                        checkpoint=ckpt, resume=True)


def test_curves_over_the_channels_are_enough_unless_the_offset_moves_the_intensities(ly99, cache, tmp_path):
    """A refine_fdp result spans the channels only: refine_geometry must take it (the held
    curves enter at the channel energies), and ask for a margin only when the refined offset
    also moves the energies of the intensities."""
    e = np.asarray(ly99.energy_ev)
    table = tmp_path / "fe1.dat"
    grid = np.linspace(e[0] - 0.1, e[-1] + 0.1, 30)
    table.write_text("".join(f"{x:.3f} -5.0 3.0\n" for x in grid))
    words = [f"curves.tables=FE1={table}", "lattice.min_shoeboxes=1000"]   # checks only: no lattice fits
    with pytest.raises(InputError, match="no lattice has 1000 usable shoeboxes"):
        refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=words))
    with pytest.raises(InputError, match="covers"):
        refine_geometry(ly99, cache, resolve(GEOMETRY_SCHEMA, overrides=words + ["energy_offset.moves_intensity=True"]))
