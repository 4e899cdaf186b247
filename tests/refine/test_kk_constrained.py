"""The KK-constrained S1 mode (spread_tools.refine.kk_constrained): f′ is the exact KK
partner of the refined f″, gradients against finite differences (grid ends, offsets,
local parameters), the Fisher information as Tᵀ F T, and a short refinement."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools import refine as R
from spread_tools.config import resolve
from spread_tools.io.dataset import Dataset
from spread_tools.physics.kk_reference import reference_curve
from spread_tools.refine.kk_constrained import KKConstrainedProblem, make_problem
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
KK = ("restraints.kramers_kronig.use=True", "restraints.kramers_kronig.mode=constrained")


@pytest.fixture(scope="module")
def cache():
    return SFCache.read(TEST_DATA / "sf_cache.h5")


@pytest.fixture(scope="module")
def tiny():
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 1])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::3] = True
    return ds.select_shoeboxes(keep)


def problem(ds, cache, *words):
    cfg = resolve(R.REFINE_SCHEMA, overrides=list(KK) + list(words))
    prep = R.prepare_data([ds], cache, cfg.shoebox.min_pixels)
    return make_problem(prep, cache, cfg, backend="cpu")


def test_make_problem_picks_the_mode(tiny, cache):
    p = problem(tiny, cache, "restraints.kramers_kronig.fdp_step_ev=2")
    assert isinstance(p, KKConstrainedProblem)
    assert p.restraints.active == ["sauter_fdp", "kk_constrained"]
    assert np.allclose(np.diff(p.grid_ev), 2.0)
    assert p.n_glob == p.n_ref * p.n_grid + p.n_ref          # f'' + one offset per site
    cfg = resolve(R.REFINE_SCHEMA, overrides=["restraints.kramers_kronig.use=True"])
    prep = R.prepare_data([tiny], cache, cfg.shoebox.min_pixels)
    assert not isinstance(make_problem(prep, cache, cfg, backend="cpu"), KKConstrainedProblem)


def test_channel_fp_is_the_exact_kk_partner(tiny, cache):
    """f′ at the channels from the map equals C + KK of the continued f″, built here on a
    dense explicit node set (independent of the operator's bookkeeping)."""
    from spread_tools.physics.kk import kk_matrix
    p = problem(tiny, cache)
    rng = np.random.default_rng(1)
    ref = reference_curve("Fe")
    u = ref.fdp(p.grid_ev) + rng.normal(0, 0.3, p.grid_ev.size)
    theta = np.zeros(p.n_glob)
    theta[:p.n_grid] = u
    theta[p.n_grid:2 * p.n_grid] = ref.fdp(p.grid_ev)
    theta[p.n_ref * p.n_grid] = 0.07                          # offset of site 0
    xin = p.T @ theta + p.t0
    nc = p.channel_ev.size
    fp_c, fdp_c = xin[:nc], xin[p.n_ref * nc:p.n_ref * nc + nc]
    # the continued f'' written out: window PL, ramps to the reference over pad, reference beyond
    x0, xn, pad = p.grid_ev[0], p.grid_ev[-1], 100.0
    dense = np.union1d(ref.energy_ev, np.concatenate([p.grid_ev, [x0 - pad, xn + pad],
                                                      np.linspace(x0 - pad, xn + pad, 3001)]))

    def cont(e):
        out = ref.fdp(e)
        win = (e >= x0) & (e <= xn)
        out[win] = np.interp(e[win], p.grid_ev, u)
        lo = (e < x0) & (e >= x0 - pad)
        out[lo] += (u[0] - ref.fdp(np.array([x0]))[0]) * (e[lo] - (x0 - pad)) / pad
        hi = (e > xn) & (e <= xn + pad)
        out[hi] += (u[-1] - ref.fdp(np.array([xn]))[0]) * ((xn + pad) - e[hi]) / pad
        return out

    want = ref.constant + 0.07 + kk_matrix(dense, p.channel_ev) @ cont(dense)
    np.testing.assert_allclose(fp_c, want, atol=1e-9)
    np.testing.assert_allclose(fdp_c, cont(p.channel_ev.copy()), atol=1e-12)


@pytest.mark.parametrize("words", [(), ("restraints.kramers_kronig.offset=False",
                                        "restraints.kramers_kronig.fdp_step_ev=1",
                                        "restraints.fdp.mean=0.01"),
                                   ("restraints.kramers_kronig.fdp_step_ev=2", "restraints.fdp.edge_sigma=1.0")],
                         ids=["4eV-offset", "1eV-no-offset", "2eV-edge-sigma"])
def test_gradient_matches_finite_differences(tiny, cache, words, gradient_check):
    p = problem(tiny, cache, *words)
    if "restraints.fdp.edge_sigma=1.0" in words:
        # σ per grid.step_ev, so sqrt(2/4) of it per 2 eV step inside the edge region
        assert p.restraints.active == ["sauter_fdp", "sauter_fdp_edge", "kk_constrained"]
        assert p.restraints.terms[1].sigma == pytest.approx(np.sqrt(0.5))
    rng = np.random.default_rng(5)
    glob, loc = p.start_vector()
    x = np.concatenate([glob, loc])
    x[:p.n_glob] += rng.normal(0, 0.2, p.n_glob)
    x[p.n_glob:] += rng.normal(0, 0.05, p.n_x - p.n_glob)
    f0 = p.evaluate(x)[0]
    ng = p.n_grid
    idx = []
    for s in range(p.n_ref):
        idx += [s * ng, s * ng + ng // 2, s * ng + ng - 1]    # grid ends and the middle
    idx += list(range(p.n_ref * ng, p.n_glob))                # offsets
    idx += [p.n_glob, p.n_glob + p.n_lat, p.n_x - 1]          # a scale, backgrounds
    gradient_check(p.evaluate, x, idx, abs_tol=2e-7 * max(1.0, abs(f0)))


def test_fisher_is_the_mapped_fisher_of_the_curves(tiny, cache):
    """Tᵀ F T against finite differences of the gradient's data term (Gauss-Newton at the
    truth-like start is close to the Hessian only statistically), so check linear algebra:
    F_θ v = Tᵀ (F (T v)) for a random v, and the diagonal returned is diag(F_θ)."""
    p = problem(tiny, cache)
    glob, loc = p.start_vector()
    x = np.concatenate([glob, loc])
    F_theta, diag, _ = p.local_fisher(x)
    F_in, _, _ = p.inner.local_fisher(p.to_inner(x))
    v = np.random.default_rng(2).normal(size=p.n_glob)
    np.testing.assert_allclose(F_theta @ v, p.T.T @ (F_in @ (p.T @ v)), rtol=1e-10,
                               atol=1e-10 * np.abs(F_theta).max())
    np.testing.assert_allclose(diag, np.diag(F_theta))
    assert np.all(np.linalg.eigvalsh(F_theta + p.restraint_hessian(x)) > 0)


def test_short_refinement_writes_consistent_curves(tiny, cache, tmp_path):
    """A refinement in the constrained mode: the result's f′ is the KK partner of its f″
    (kk_check in restraint mode reports only the offset), σ are finite."""
    from spread_tools.physics.kk import kk_consistency
    cfg = resolve(R.REFINE_SCHEMA, overrides=list(KK) + ["optimizer.iterations=15",
                                                         "optimizer.max_macrocycles=2"])
    res = R.refine([tiny], cache, cfg, backend="cpu")
    assert res.restraints == ["sauter_fdp", "kk_constrained"]
    assert res.fp.shape == res.fdp.shape == (2, res.energy_ev.size)
    assert np.all(np.isfinite(res.fp_sigma)) and np.all(np.isfinite(res.fdp_sigma))
    assert res.covariance.shape == (2 * res.fp.size, 2 * res.fp.size)
    for s in range(2):
        chk = kk_consistency(res.energy_ev, res.fp[s], res.fdp[s], res.energy_ev[0],
                             res.energy_ev[-1], mode="restraint")
        assert chk.rms_about_mean < 1e-8, chk.rms_about_mean
    path = tmp_path / "kkc.h5"
    R.write_result(path, res)
    back = R.read_result(path)
    np.testing.assert_array_equal(back["fdp"], res.fdp)
