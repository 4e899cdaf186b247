"""Tests of the per-lattice objective and solver (spread_tools.refine.lattice_fit): the gradient
with respect to every parameter family through the layout (bounded transforms, priors, the
energy offsets) against finite differences, the Schur-reduced step against the full system."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools.io.dataset import Dataset
from spread_tools.model.crystal_params import CellParameterization, split_orientation
from spread_tools.model.lattice_batch import LatticeBatch
from spread_tools.refine.lattice_fit import FitSettings, LatticeProblem
from spread_tools.refine.site_curves import SiteCurves, intensities_with_slope
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


def make_problem(domain_size="anisotropic", offset="per_lattice", moves=True):
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([2, 7])
    ds = ds.select_shoeboxes(np.r_[0:5, ds.n_shoeboxes - 5:ds.n_shoeboxes])
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    curves = SiteCurves(cache)
    rows = cache.index_of(ds.sb_miller_index)

    def intensity(energies):
        I = np.empty((ds.n_shoeboxes, energies.shape[1]))
        dI = np.empty_like(I)
        for k in range(ds.n_shoeboxes):
            a, b = intensities_with_slope(cache, curves, rows[k:k + 1], energies[ds.sb_lattice[k]])
            I[k], dI[k] = a[0], b[0]
        return I, dI
    param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
    target = param.free(ds.cell)
    fs = FitSettings(domain_size=domain_size, mosaic=True, offset=offset, cell_target=target,
                     cell_sigma=np.r_[0.002 * target[:3], 0.1], cut=30.0,
                     offset_moves_intensity=moves)
    prob = LatticeProblem(LatticeBatch(ds, backend="cpu", cut=30.0), ds, param, fs, intensity)
    U0, p0 = zip(*[split_orientation(ds.A[j], param) for j in range(ds.n_lattices)])
    st = prob.initial_state(np.array(U0), np.array(p0), delta=0.4)
    rng = np.random.default_rng(5)
    # a point near the stored models (spots stay in their shoeboxes: θ ~ 1e-5 rad)
    scale = np.full(prob.layout.m, 0.05)
    scale[prob.layout.cols["theta"]] = 1e-5
    scale[prob.layout.cols["p"]] = 0.0
    st = prob.apply(st, np.arange(2), scale * rng.standard_normal((2, prob.layout.m)),
                    0.01 * rng.standard_normal((ds.n_shoeboxes, 3)), np.arange(ds.n_shoeboxes))
    st.p = st.p * (1 + 5e-4)
    st.dlat[:] = [0.2, -0.3]
    prob.prepare_intensities(st)
    return prob, st


#: Steps of the x columns by family (radians, Å/°, logistic units, eV, ln G).
STEP = {"theta": 1e-7, "p": 1e-5, "mosaic": 1e-5, "N": 1e-5, "dlat": 1e-4, "g": 1e-6}


@pytest.mark.parametrize("domain_size,offset,moves", [("anisotropic", "per_lattice", True),
                                                       ("isotropic", "global", True),
                                                       ("off", "per_lattice", False)])
def test_gradient_over_every_family_matches_finite_differences(domain_size, offset, moves):
    prob, st = make_problem(domain_size, offset, moves)
    ev = prob.evaluate(st)
    g_x, g_b = prob.gradient(st, ev)
    lay = prob.layout
    for fam, cols in lay.cols.items():
        for c in cols:
            for j in range(st.n_lat):
                h = STEP[fam]
                dx = np.zeros((1, lay.m))
                dx[0, c] = h
                none = np.zeros((0, 3)), np.zeros(0, np.int64)
                fp = prob.evaluate(prob.apply(st, [j], dx, *none)).f_lat[j]
                fm = prob.evaluate(prob.apply(st, [j], -dx, *none)).f_lat[j]
                numeric = (fp - fm) / (2 * h)
                scale = max(abs(numeric), 1e-3 * np.abs(g_x[:, :lay.m]).max())
                assert abs(g_x[j, c] - numeric) <= 3e-5 * scale, (fam, c, j, g_x[j, c], numeric)
    # the global offset: every lattice's δ moves together (I re-evaluated exactly at each δ)
    h = 1e-4
    f = []
    for d in (h, -h):
        s2 = st.copy()
        s2.delta += d
        prob.prepare_intensities(s2)
        f.append(prob.evaluate(s2).f_lat)
    prob.prepare_intensities(st)
    np.testing.assert_allclose(g_x[:, lay.m], (f[0] - f[1]) / (2 * h), rtol=1e-4)
    # backgrounds of the first shoebox of each lattice
    for k in (0, 5):
        for i in range(3):
            d = np.zeros((1, 3))
            d[0, i] = 1e-6
            j = prob.sb_lat[k]
            zero = np.zeros((1, lay.m))
            fp = prob.evaluate(prob.apply(st, [j], zero, d, [k])).f_lat[j]
            fm = prob.evaluate(prob.apply(st, [j], zero, -d, [k])).f_lat[j]
            np.testing.assert_allclose(g_b[k, i], (fp - fm) / 2e-6, rtol=1e-4, atol=1e-6)


def test_schur_step_equals_the_full_gauss_newton_system():
    prob, st = make_problem()
    ev = prob.evaluate(st)
    j = 1
    dx, dB, dec = prob.step(st, ev, np.zeros(1), [j])
    lay = prob.layout
    sbs = prob.shoeboxes_of([j])
    T = lay.transform(st)[j, :, :lay.m]
    nG, m, nb = lay.nG, lay.m, 3 * len(sbs)
    F = np.zeros((m + nb, m + nb))
    g = np.zeros(m + nb)
    for i, k in enumerate(sbs):
        Fk, gk = ev.fisher_sb[k], ev.grad_sb[k]
        J = np.zeros((nG + 3, m + nb))
        J[:nG, :m] = T
        J[nG:, m + 3 * i:m + 3 * i + 3] = np.eye(3)
        F += J.T @ Fk @ J
        g += J.T @ gk
    _, gp, hp = prob.prior(st)
    g[:m] += gp[j, :m]
    F[:m, :m] += np.diag(hp[j, :m])
    full = -np.linalg.solve(F, g)
    np.testing.assert_allclose(dx[0], full[:m], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(dB.ravel(), full[m:], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(dec[0], g @ np.linalg.solve(F, g), rtol=1e-8)


def test_fit_lowers_every_objective_and_converges():
    prob, st = make_problem("isotropic", "global")
    ev0 = prob.evaluate(st)
    st, ev, info = prob.fit(st)
    assert np.all(ev.f_lat < ev0.f_lat)
    assert info["converged"].all() and np.all(info["decrement"] < prob.fs.tol)
    # bounded families stay inside their bounds
    assert np.all((st.mosaic_deg > prob.fs.mosaic_bounds_deg[0]) & (st.mosaic_deg < prob.fs.mosaic_bounds_deg[1]))


def test_fit_of_some_lattices_leaves_the_others_as_they_are():
    prob, st = make_problem("isotropic", "global")
    st_all, ev_all, info_all = prob.fit(st.copy())
    st_one, ev_one, info_one = prob.fit(st.copy(), lattices=[1])
    # lattice 0 untouched, lattice 1 exactly as in the fit of both (the fits are independent)
    assert info_one["iterations"][0] == 0 and not info_one["converged"][0]
    for name in ("theta", "p", "u_N", "g"):
        np.testing.assert_array_equal(getattr(st_one, name)[0], getattr(st, name)[0])
        np.testing.assert_array_equal(getattr(st_one, name)[1], getattr(st_all, name)[1])
    sb0, sb1 = prob.shoeboxes_of([0]), prob.shoeboxes_of([1])
    np.testing.assert_array_equal(st_one.bg[sb0], st.bg[sb0])
    np.testing.assert_array_equal(st_one.bg[sb1], st_all.bg[sb1])
    assert info_one["converged"][1] and info_one["iterations"][1] == info_all["iterations"][1]
    assert ev_one.f_lat[1] == ev_all.f_lat[1]
    np.testing.assert_array_equal(ev_one.f_lat[0], prob.evaluate(st).f_lat[0])


def test_blocks_then_reduce_is_the_system():
    prob, st = make_problem()
    ev = prob.evaluate(st)
    mu = np.array([0.3, 2e-3])
    blk = prob.blocks(st, ev, [0, 1], with_delta=True)
    for a, b in zip(prob.systems(st, ev, mu, [0, 1], with_delta=True)[:2], prob.reduce(blk, mu)[:2]):
        np.testing.assert_array_equal(a, b)
    # a lattice's step does not depend on the others in the set
    dx, dB, dec = prob.step(st, ev, mu, [0, 1])
    dx1, dB1, dec1 = prob.step(st, ev, mu[1:], [1])
    np.testing.assert_array_equal(dx[1], dx1[0])
    np.testing.assert_array_equal(dB[len(prob.shoeboxes_of([0])):], dB1)


@pytest.mark.parametrize("domain_size", ["anisotropic", "off"])
def test_forward_gives_the_full_evaluations_lambda_bit_for_bit(domain_size):
    prob, st = make_problem(domain_size)
    full = prob.evaluate(st, want_lam=True)
    fwd = prob.forward(st)
    assert np.any(full.bragg > 0)
    np.testing.assert_array_equal(fwd.lam, full.lam)
    np.testing.assert_array_equal(fwd.bragg, full.bragg)
    np.testing.assert_array_equal(fwd.nll_sb, full.nll_sb)
    np.testing.assert_array_equal(fwd.f_lat, full.f_lat)
    # the G override scales the Bragg part only
    g0 = prob.forward(st, g_override=np.zeros(st.n_lat))
    G = np.exp(st.g)[prob.sb_lat]
    per_pix = np.repeat(G, np.diff(prob.ds.pixel_offset))
    np.testing.assert_allclose(g0.bragg * per_pix, full.bragg, rtol=1e-12)
    # the matrix-parameter derivatives are still there afterwards
    again = prob.evaluate(st)
    np.testing.assert_array_equal(again.grad_sb, full.grad_sb)
