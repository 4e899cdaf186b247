"""Tests of spread_tools.refine.geometry_uncertainty: the crystal models' share of S1's
information against a brute-force Schur complement of the joint Fisher information, the
choice of families, and σ in refine_fdp with and without it."""

import json
from pathlib import Path

import numpy as np
import pytest

from spread_tools.config import resolve
from spread_tools.io.dataset import Dataset
from spread_tools.model.crystal_params import domain_matrices, split_orientation
from spread_tools.model.lattice_batch import LatticeBatch
from spread_tools.refine import REFINE_SCHEMA, refine
from spread_tools.refine.geometry_uncertainty import geometry_profile_for, local_geometry_correction
from spread_tools.refine.objective import S1Problem
from spread_tools.refine.prepare import prepare_data
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


@pytest.fixture(scope="module")
def small():
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 3, 7])
    cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu"])
    prep = prepare_data([ds], cache, cfg.shoebox.min_pixels, cfg.lattice.min_shoeboxes)
    p = S1Problem(prep, cache, cfg)
    rng = np.random.default_rng(1)
    n = p.n_ref * p.n_grid
    x = np.zeros(p.n_x)
    x[:n] = -1.0 + 0.1 * rng.standard_normal(n)
    x[n:2 * n] = 3.0 + 0.1 * rng.standard_normal(n)
    x[2 * n:2 * n + p.n_lat] = np.log(p.local.truth.G)
    x[2 * n + p.n_lat:] = p.local.truth.background.ravel()
    return p, x, ds


def _brute_force(p, x, profile):
    """Σ-free reference: one joint information over [f | x_j of every lattice | b_k], profiled
    by one pseudo-inverse, with x_j = (crystal columns, g) and with x_j = (g) alone."""
    ds, pm, fs, param = p.local, p.pm, profile.fs, profile.param
    W, S, bg, Gp, dfp, dfdp, _, _, _ = p._pixel_terms(x)
    Jg = p._jac_global(0, pm.n_sb, Gp, dfp, dfdp)
    fp, fdp, g, b = p._local_params(x)
    I, _, _ = p._intensities(fp, fdp, grad=False)
    I_sb = np.ascontiguousarray(I[pm.sb_h_index])
    mats, dms, off = [], [], [0]
    for j in range(ds.n_lattices):
        U0, p0 = split_orientation(ds.A[j], param)
        mi, dm, _ = domain_matrices(U0, np.zeros(3), param, p0, ds.mosaic_spread_deg[j], ds.n_domains[j],
                                    want_rotation=fs.rotation, want_cell=fs.cell, want_mosaic=fs.mosaic)
        mats.append(mi)
        dms.append(dm)
        off.append(off[-1] + len(mi))
    batch = LatticeBatch(ds, backend="cpu", cut=fs.cut)
    jac = batch.evaluate(np.concatenate(mats), np.concatenate(dms), np.array(off), ds.domain_size_cells,
                         batch.inverse_wavelength(np.zeros(ds.n_lattices)), I_sb, np.zeros_like(I_sb),
                         np.exp(g), b, want_jac=True).jac
    nq = profile.n_q()
    pix_sb = np.repeat(np.arange(pm.n_sb), np.diff(pm.pixel_offset))
    pix_lat = pm.sb_lattice[pix_sb]
    ng = p.n_glob

    def profiled(with_crystal):
        cols, prior = [Jg], [np.zeros(ng)]
        for j in range(ds.n_lattices):
            Jx, pr = profile.columns(jac), profile.prior(float(ds.mosaic_spread_deg[j]))
            if not with_crystal:
                Jx, pr = Jx[:, -1:], pr[-1:]
            cols.append(np.where((pix_lat == j)[:, None], Jx, 0.0))
            prior.append(pr)
        for k in range(pm.n_sb):
            cols.append(np.where((pix_sb == k)[:, None], jac[:, nq + 5:nq + 8], 0.0))
            prior.append(np.zeros(3))
        J = np.concatenate(cols, axis=1)
        F = J.T @ (W[:, None] * J) + np.diag(np.concatenate(prior))
        return F[:ng, :ng] - F[:ng, ng:] @ np.linalg.pinv(F[ng:, ng:], hermitian=True) @ F[ng:, :ng]

    return profiled(False) - profiled(True)


@pytest.mark.parametrize("words", [[], ["refine.domain_size=anisotropic", "refine.energy_offset=per_lattice"],
                                   ["refine.cell=False", "refine.mosaic_spread=False"]])
def test_correction_equals_the_brute_force_schur_complement(small, words):
    p, x, ds = small
    ref = ds.select_lattices(np.arange(ds.n_lattices))
    ref.source = "refine_geometry"
    ref.config_json = json.dumps(_nested(words))
    profile = geometry_profile_for([ref], p.local, "auto")
    dF, agreement = local_geometry_correction(p, x, profile, max_pixels=3000)   # several passes
    expected = _brute_force(p, x, profile)
    assert np.max(np.abs(expected)) > 1e-3 * np.max(np.abs(p.local_fisher(x)[0]))
    np.testing.assert_allclose(dF, expected, rtol=0, atol=1e-7 * np.max(np.abs(expected)))
    assert agreement < 1e-4                     # the two pixel models of the same lattices
    assert np.linalg.eigvalsh(dF).min() > -1e-9 * np.max(np.abs(dF))   # information is only removed


def _nested(words):
    out = {}
    for w in words:
        key, value = w.split("=")
        *head, last = key.split(".")
        node = out
        for h in head:
            node = node.setdefault(h, {})
        node[last] = {"False": False, "True": True}.get(value, value)
    return out


def test_families_follow_the_stored_refine_geometry_parameters(small):
    p, _, ds = small
    assert geometry_profile_for([ds], p.local, "auto") is None          # not written by refine_geometry
    assert geometry_profile_for([ds], p.local, "off") is None
    on = geometry_profile_for([ds], p.local, "on")
    assert on.describe() == "rotation, cell, mosaic spread, domain size (isotropic)"
    ref = ds.select_lattices(np.arange(ds.n_lattices))
    ref.source = "refine_geometry"
    ref.config_json = json.dumps({"refine": {"cell": False, "domain_size": "off"}, "unknown": {"x": 1}})
    prof = geometry_profile_for([ref], p.local, "auto")
    assert prof.describe() == "rotation, mosaic spread"
    assert prof.n_q() == 4
    assert geometry_profile_for([ref, ds], p.local, "auto") is None      # one dataset not refined


def test_refine_fdp_sigma_grows_when_the_crystal_models_are_profiled_out(tmp_path):
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices(np.arange(12))
    out = {}
    for mode in ("off", "on"):
        cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu", f"uncertainty.geometry={mode}",
                                                "uncertainty.calibrate=False"])
        out[mode] = refine([ds], cache, cfg)
    off, on = out["off"], out["on"]
    np.testing.assert_array_equal(on.fdp, off.fdp)                       # the estimate is unchanged
    assert off.geometry_in_sigma == "" and on.geometry_in_sigma.startswith("rotation")
    ratio = on.fdp_sigma / off.fdp_sigma
    assert np.all(ratio >= 1 - 1e-9) and ratio.max() > 1.02
    from spread_tools.refine.s1 import read_result, write_result
    write_result(tmp_path / "r.h5", on)
    assert read_result(tmp_path / "r.h5")["geometry_in_sigma"] == on.geometry_in_sigma


def test_kk_constrained_mode_profiles_the_crystal_models_and_labels_its_sigma():
    """The KK-constrained mode maps the correction by its T; its σ label says what σ is
    (it read "calibrated" with uncertainty.calibrate=False, because that mode's curve
    covariance is a new array)."""
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices(np.arange(8))
    out = {}
    for mode in ("off", "on"):
        cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu", f"uncertainty.geometry={mode}",
                                                "uncertainty.calibrate=False", "restraints.kramers_kronig.use=True",
                                                "restraints.kramers_kronig.mode=constrained"])
        out[mode] = refine([ds], cache, cfg)
    assert out["on"].uncertainty == "posterior" and out["off"].uncertainty == "posterior"
    np.testing.assert_array_equal(out["on"].fdp, out["off"].fdp)
    ratio = out["on"].fdp_sigma / out["off"].fdp_sigma
    assert np.all(ratio >= 1 - 1e-9) and ratio.max() > 1.01
