"""Negative controls of S1 (spread_tools.refine.controls): what they do to the inputs, the edge
step that judges them, and their outcome at small size (edge step against its sigma)."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools import refine as R
from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.refine import controls as C
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


@pytest.fixture(scope="module")
def cache():
    return SFCache.read(TEST_DATA / "sf_cache.h5")


@pytest.fixture(scope="module")
def small():
    return Dataset.read(TEST_DATA / "dataset.h5").select_lattices(np.arange(10))


@pytest.fixture(scope="module")
def example():
    return Dataset.read(TEST_DATA / "dataset.h5")


def test_permute_miller_moves_only_the_anomalous_terms(cache):
    a = C.permute_miller(cache, np.random.default_rng(5))
    b = C.permute_miller(cache, np.random.default_rng(5))
    np.testing.assert_array_equal(a.S_site, b.S_site)                   # reproducible
    np.testing.assert_array_equal(a.hkl, cache.hkl)
    np.testing.assert_array_equal(a.S_el, cache.S_el)
    # the site sums are the same multiset, on (almost) every row another reflection's
    np.testing.assert_array_equal(np.sort(np.abs(a.S_site), axis=1), np.sort(np.abs(cache.S_site), axis=1))
    assert np.mean(a.S_site[0] != cache.S_site[0]) > 0.99
    # F at f' = f'' = 0 (protein + solvent + the sites' f0) is unchanged, to round-off
    f_zero = lambda c: c.F_base + np.sum(c.S_site * c.f0_site, axis=0)   # noqa: E731
    np.testing.assert_allclose(f_zero(a), f_zero(cache), rtol=0, atol=1e-9 * np.abs(cache.F_base).max())
    # with f'' = 4 e- the anomalous part is another reflection's
    f_an = lambda c: f_zero(c) + 4j * np.sum(c.S_site, axis=0)           # noqa: E731
    assert not np.allclose(np.abs(f_an(a)), np.abs(f_an(cache)), rtol=1e-3)


def test_channel_permutations_one_per_lattice_reproducible():
    p = C.channel_permutations(30, 26, seed=4)
    assert p.shape == (30, 26)
    np.testing.assert_array_equal(np.sort(p, axis=1), np.tile(np.arange(26), (30, 1)))
    np.testing.assert_array_equal(p, C.channel_permutations(30, 26, seed=4))
    np.testing.assert_array_equal(p[:7], C.channel_permutations(7, 26, seed=4))   # lattice j: j only
    assert len({tuple(r) for r in p}) == 30                                    # one of its own each
    assert not np.array_equal(p, C.channel_permutations(30, 26, seed=5))


def _problem(ds, cache, *words):
    cfg = resolve(R.REFINE_SCHEMA, overrides=list(words))
    prep = R.prepare_data([ds], cache, cfg.shoebox.min_pixels)
    p = R.S1Problem(prep, cache, cfg, backend="cpu")
    return p, np.concatenate(p.start_vector())


@pytest.fixture(scope="module")
def tiny(example):
    """Three lattices, a third of their shoeboxes."""
    ds = example.select_lattices([0, 1, 2])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::3] = True
    return ds.select_shoeboxes(keep)


def test_shuffle_channels_with_identity_lookup_is_the_normal_objective(tiny, cache):
    """One row of I per shoebox and the lookup route give the normal objective, gradient and
    Fisher information when every permutation is the identity."""
    normal, x = _problem(tiny, cache, "grid.step_ev=8")
    shuf, _ = _problem(tiny, cache, "grid.step_ev=8", "control=shuffle_channels")
    assert shuf.pm.n_h == tiny.n_shoeboxes > normal.pm.n_h - 1
    shuf.lookup[:] = np.arange(len(shuf.channel_ev))
    shuf._set_lookup_maps()
    shuf.lnG_mu = normal.lnG_mu             # its start fit (the prior's centre) saw the shuffle
    rng = np.random.default_rng(1)
    x = x.copy()
    x[:normal.n_glob] += rng.normal(0, 0.3, normal.n_glob)
    f0, g0 = normal.evaluate(x)
    f1, g1 = shuf.evaluate(x)
    assert f1 == pytest.approx(f0, rel=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9 * np.abs(g0).max())
    F0, d0, l0 = normal.local_fisher(x)
    F1, d1, l1 = shuf.local_fisher(x)
    np.testing.assert_allclose(F1, F0, rtol=1e-9, atol=1e-10 * np.abs(F0).max())
    np.testing.assert_allclose(d1, d0, rtol=1e-9, atol=1e-10 * d0.max())


@pytest.fixture(scope="module")
def shuffled(tiny, cache):
    p, x = _problem(tiny, cache, "grid.step_ev=8", "control=shuffle_channels", "control_seed=3")
    x = x.copy()
    x[:p.n_glob] += np.random.default_rng(2).normal(0, 0.3, p.n_glob)
    return p, x


def test_shuffled_intensities_brute_force(shuffled, cache):
    """Row r, channel c: |F| at E_c with the refined sites' f', f'' taken at the energy of
    channel lookup[r, c] and everything else at E_c (one structure-factor call per point)."""
    from spread_tools.structure.factors import structure_factors
    p, x = shuffled
    fp, fdp, _, _ = p.split(x)
    I, _, _ = p._intensities(fp, fdp, grad=False)
    fpc, fdpc = p.channel_values(fp, fdp)
    rng = np.random.default_rng(0)
    assert np.any(p.lookup != np.arange(p.lookup.shape[1]))
    for r, c in zip(rng.integers(0, p.pm.n_h, 12), rng.integers(0, len(p.channel_ev), 12)):
        u, v = p.fp_chan0[:, [c]].copy(), p.fdp_chan0[:, [c]].copy()
        u[p.ref_sites, 0] = fpc[p.ref_sites, p.lookup[r, c]]
        v[p.ref_sites, 0] = fdpc[p.ref_sites, p.lookup[r, c]]
        F = structure_factors(cache, p.channel_ev[[c]], u, v, p.h_rows[[r]])
        assert I[r, c] == pytest.approx(abs(F[0, 0]) ** 2, rel=1e-12)


def test_shuffled_gradient_matches_finite_differences(shuffled, gradient_check):
    p, x = shuffled
    f0 = p.evaluate(x)[0]
    n, ng = p.n_ref * p.n_grid, p.n_grid
    idx = [s * ng + k + off for s in range(p.n_ref) for k in (0, ng // 2, ng - 1) for off in (0, n)]
    idx += [p.n_glob, p.n_glob + p.n_lat, p.n_x - 1]
    gradient_check(p.evaluate, x, idx, abs_tol=2e-7 * max(1.0, abs(f0)))


def test_shuffled_fisher_channel_route_matches_pixel_route(shuffled):
    p, x = shuffled
    F, dg, _ = p.local_fisher(x, chunk=5, route="channel")
    F_ref = p.local_fisher_profiled(x)
    dg_ref, _ = p.local_fisher_diag(x)
    assert np.max(np.abs(F - F_ref)) < 1e-9 * np.abs(F_ref).max()
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-9, atol=1e-12 * dg_ref.max())


def test_apply_control_choices(small, cache):
    ds, c = C.apply_control([small], cache, None, 1)
    assert ds[0] is small and c is cache
    with pytest.raises(InputError, match="parameter control"):
        C.apply_control([small], cache, "permute_hkl", 1)


def test_edge_step_against_closed_form():
    e = np.arange(7070.0, 7171.0, 4.0)
    fdp = np.where(e > 7112, 3.9, 0.5) + 0.01 * (e - 7070)
    cov = np.diag(np.full(len(e), 0.04)) + 0.01          # correlated: a common offset cancels
    step, sig = C.edge_step(e, fdp, cov, 7112.0)
    hi, lo = e >= 7122, e <= 7102
    assert step == pytest.approx(np.mean(fdp[hi]) - np.mean(fdp[lo]))
    assert sig == pytest.approx(np.sqrt(0.04 / hi.sum() + 0.04 / lo.sum()))
    assert np.isnan(C.edge_step(e, fdp, cov, 7300.0)[0])


@pytest.fixture(scope="module")
def runs(example, cache):
    """The normal refinement and both controls on the 40 embedded lattices (8 eV grid)."""
    out = {}
    for control in (None, "permute_miller", "shuffle_channels"):
        cfg = resolve(R.REFINE_SCHEMA, overrides=["grid.step_ev=8", f"control={control}"])
        out[control] = R.refine([example], cache, cfg, backend="cpu")
    return out


def _z(res):
    return res.edge_step / res.edge_step_sigma


def _flat(res):
    """rms over the grid of (f'' - its mean)/sigma, per site."""
    return np.sqrt(np.mean(((res.fdp - res.fdp.mean(axis=1, keepdims=True)) / res.fdp_sigma) ** 2,
                           axis=1))


def test_normal_run_shows_the_edge(runs):
    res = runs[None]
    assert res.converged and res.control is None
    print("normal run: edge step", res.edge_step, "+-", res.edge_step_sigma, "z", _z(res))
    assert np.all(_z(res) > 4)                  # both edges seen at this size (6-8 sigma)
    assert np.all(_flat(res) > 2)               # and f'' is not flat


@pytest.mark.parametrize("control", ["permute_miller", "shuffle_channels"])
def test_control_runs_and_reports_its_edge_step(runs, control):
    res = runs[control]
    assert res.converged and res.control == control
    assert np.all(np.isfinite(res.edge_step)) and np.all(res.edge_step_sigma > 0)
    assert not np.allclose(res.fdp, runs[None].fdp, atol=0.1)        # the inputs were controlled
    print(f"control {control}: edge step {res.edge_step} +- {res.edge_step_sigma}, z {_z(res)}, "
          f"f'' {res.fdp.min():.2f} .. {res.fdp.max():.2f} e-")


def test_permute_miller_erases_the_edge(runs):
    res = runs["permute_miller"]
    assert np.all(np.abs(_z(res)) < 3), _z(res)
    assert np.all(_flat(res) < 2), _flat(res)
    assert np.all(np.abs(res.fdp) < 2)          # no huge f'' absorbing a wrong model


def test_shuffle_channels_erases_the_edge(runs):
    res = runs["shuffle_channels"]
    assert np.all(np.abs(_z(res)) < 3), _z(res)
    assert np.all(_flat(res) < 2), _flat(res)
