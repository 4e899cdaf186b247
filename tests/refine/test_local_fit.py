"""Exact fit of the local S1 parameters (spread_tools.refine.local_fit): gradients against finite
differences, the optimum against an independent scipy minimisation, bad starts, the ln G prior."""

import numpy as np
import pytest
import scipy.optimize

from spread_tools.refine import local_fit as LF


def _problem(seed=0, n_lat=3, per_lat=4, size=7, signal=(40.0, 5.0, 0.0), bg=2.0):
    """Synthetic shoeboxes: a Gaussian spot of ``signal[j]`` photons per lattice (0: none)."""
    rng = np.random.default_rng(seed)
    n_sb = n_lat * per_lat
    n = size * size
    off = np.arange(n_sb + 1) * n
    sb_lat = np.repeat(np.arange(n_lat), per_lat)
    yy, xx = np.mgrid[0:size, 0:size]
    xh = np.tile((xx.ravel() + 0.5 - size / 2).astype(float), n_sb)
    yh = np.tile((yy.ravel() + 0.5 - size / 2).astype(float), n_sb)
    spot = np.exp(-0.5 * (xh ** 2 + yh ** 2) / 1.2 ** 2)
    spot /= spot[:n].sum()
    amp = np.repeat(np.asarray(signal, float), per_lat * n)
    S = amp * spot * rng.uniform(0.5, 1.5, n_sb).repeat(n)
    g_true = rng.normal(0.0, 0.3, n_lat)
    b_true = np.stack([np.log(bg) + rng.normal(0, 0.2, n_sb), rng.normal(0, 0.03, n_sb),
                       rng.normal(0, 0.03, n_sb)], axis=1)
    lam = np.exp(g_true)[sb_lat].repeat(n) * S + np.exp(
        b_true[:, 0].repeat(n) + b_true[:, 1].repeat(n) * xh + b_true[:, 2].repeat(n) * yh)
    counts = rng.poisson(lam).astype(np.float32)
    mask = np.ones(len(counts), bool)
    mask[rng.choice(len(mask), 20, replace=False)] = False
    return dict(S=S, counts=counts, mask=mask, pixel_offset=off, sb_lattice=sb_lat, xh=xh, yh=yh,
                n_lat=n_lat, n_sb=n_sb, g_true=g_true, b_true=b_true)


def _objective_numpy(pr, g, b, prior=None):
    """Independent plain-numpy objective (sum over lattices) for the checks."""
    n = np.diff(pr["pixel_offset"])
    G = np.exp(g)[pr["sb_lattice"]].repeat(n)
    B = np.exp(b[:, 0].repeat(n) + b[:, 1].repeat(n) * pr["xh"] + b[:, 2].repeat(n) * pr["yh"])
    lam = G * pr["S"] + B
    k = pr["counts"].astype(float)
    m = pr["mask"]
    f = np.sum((lam - k * np.log(lam))[m])
    if prior is not None:
        f += np.sum((g - prior[0]) ** 2) / (2 * prior[1] ** 2)
    return f


def _args(pr):
    return (pr["S"], pr["counts"], pr["mask"], pr["pixel_offset"], pr["sb_lattice"], pr["xh"], pr["yh"])


def test_kernel_gradient_matches_finite_differences():
    pr = _problem()
    px = LF._Pixels(*_args(pr), pr["n_lat"])
    rng = np.random.default_rng(1)
    g = pr["g_true"] + rng.normal(0, 0.3, pr["n_lat"])
    b = pr["b_true"] + rng.normal(0, 0.1, pr["b_true"].shape)
    nll, rb, Fb, cb, rg, dg = px.terms(g, b)
    assert np.sum(nll) == pytest.approx(_objective_numpy(pr, g, b), rel=1e-12)
    h = 1e-6
    for k in (0, 5, pr["n_sb"] - 1):
        for a in range(3):
            bp, bm = b.copy(), b.copy()
            bp[k, a] += h
            bm[k, a] -= h
            fd = (_objective_numpy(pr, g, bp) - _objective_numpy(pr, g, bm)) / (2 * h)
            assert fd == pytest.approx(rb[k, a], rel=1e-5, abs=1e-6)
    for j in range(pr["n_lat"]):
        gp, gm = g.copy(), g.copy()
        gp[j] += h
        gm[j] -= h
        fd = (_objective_numpy(pr, gp, b) - _objective_numpy(pr, gm, b)) / (2 * h)
        assert fd == pytest.approx(px.per_lattice(rg)[j], rel=1e-5, abs=1e-6)
    # the information matrices are the expected (Fisher) ones: Σ a aᵀ B²/λ etc. are symmetric PSD
    assert np.all(np.linalg.eigvalsh(Fb) > 0) and np.all(dg >= 0)


@pytest.mark.parametrize("prior", [None, (0.2, 0.5)])
def test_fit_reaches_the_optimum_of_an_independent_minimisation(prior):
    pr = _problem(signal=(40.0, 5.0, 20.0))
    n_lat, n_sb = pr["n_lat"], pr["n_sb"]
    g0 = pr["g_true"] - np.array([6.2, 0.0, 3.0])         # moment-match starts 500x / 20x too small
    b0 = np.zeros((n_sb, 3))
    b0[:, 0] = np.log(np.mean(pr["counts"]))
    fit = LF.fit_locals(*_args(pr), g0, b0, prior=prior, tol=1e-10)
    assert fit.converged and fit.rounds < 40

    def fun(v):
        return _objective_numpy(pr, v[:n_lat], v[n_lat:].reshape(-1, 3), prior)
    ref = scipy.optimize.minimize(fun, np.concatenate([pr["g_true"], pr["b_true"].ravel()]),
                                  method="BFGS", options={"gtol": 1e-9, "maxiter": 5000})
    assert fun(np.concatenate([fit.g, fit.b.ravel()])) <= ref.fun + 1e-7
    np.testing.assert_allclose(fit.g, ref.x[:n_lat], atol=2e-4)
    np.testing.assert_allclose(fit.b, ref.x[n_lat:].reshape(-1, 3), atol=2e-4)
    per_lat = LF.local_objective_per_lattice(*_args(pr), fit.g, fit.b, prior)
    assert per_lat.sum() == pytest.approx(fun(np.concatenate([fit.g, fit.b.ravel()])), rel=1e-12)


def test_lattice_without_signal_stays_at_the_prior_centre():
    """A lattice whose spots are not in the data: the likelihood alone walks G towards 0 (its
    optimum is G = 0) and the prior holds it near its centre; a model without Bragg part at all
    (S = 0) leaves g at the prior's centre exactly."""
    pr = _problem(signal=(40.0, 5.0, 30.0))
    n = np.diff(pr["pixel_offset"])
    b_t = pr["b_true"]
    bg = np.exp(b_t[:, 0].repeat(n) + b_t[:, 1].repeat(n) * pr["xh"] + b_t[:, 2].repeat(n) * pr["yh"])
    on2 = (pr["sb_lattice"] == 2).repeat(n)
    pr["counts"] = np.where(on2, bg, pr["counts"]).astype(np.float32)   # lattice 2: background only
    free = LF.fit_locals(*_args(pr), pr["g_true"], b_t, prior=None, max_rounds=10)
    assert free.g[2] < pr["g_true"][2] - 8              # walks down, at most 2 per round
    assert np.isfinite(free.g).all() and np.isfinite(free.b).all()
    held = LF.fit_locals(*_args(pr), free.g, free.b, prior=(0.1, 2.0), tol=1e-10)
    assert held.converged
    assert -6.0 < held.g[2] < 0.1                       # pulled back towards the centre
    ml = LF.fit_locals(*_args(pr), pr["g_true"], b_t, prior=None, tol=1e-10)
    assert abs(held.g[0] - ml.g[0]) < 0.02              # a lattice with signal: hardly moved
    pr["S"] = np.where(on2, 0.0, pr["S"])
    none = LF.fit_locals(*_args(pr), free.g, free.b, prior=(0.1, 2.0), tol=1e-12)
    assert none.g[2] == pytest.approx(0.1, abs=1e-6)


def test_fit_is_deterministic_and_keeps_input_arrays():
    pr = _problem()
    g0 = np.zeros(pr["n_lat"])
    b0 = np.zeros((pr["n_sb"], 3))
    a = LF.fit_locals(*_args(pr), g0, b0, prior=(0.0, 2.0))
    b = LF.fit_locals(*_args(pr), g0, b0, prior=(0.0, 2.0))
    assert np.array_equal(a.g, b.g) and np.array_equal(a.b, b.b)
    assert not g0.any() and not b0.any()
