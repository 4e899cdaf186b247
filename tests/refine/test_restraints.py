"""Restraints as flat functions x -> (f, g1): values against closed forms, g1 against finite
differences for every restraint and their sum (every parameter, both grid ends, both layouts),
the KK weight from the discretisation floor, composition from the configuration, bad input,
and the docstring example (scipy.optimize.minimize with jac=True)."""

import doctest

import numpy as np
import pytest

from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.physics.kk import kk_matrix
from spread_tools.physics.kk_reference import ReferenceCurve, WindowKK, reference_curve
from spread_tools.refine import restraints as RM
from spread_tools.refine.restraints import (
    RESTRAINT_SCHEMA,
    FlatLayout,
    KramersKronigRestraint,
    RestraintSum,
    SauterRestraint,
    active_terms,
    build_restraints,
    edge_region_steps,
    reference_edges_on_grid,
    sauter_difference,
    sauter_terms,
)
from spread_tools.refine.uncertainty import EDGE_POST_GAP_EV, EDGE_PRE_GAP_EV

SCHEMA = {"restraints": RESTRAINT_SCHEMA}
GRID = np.arange(7070.0, 7170.0 + 1e-9, 4.0)[:9]          # 9 points, 7070-7102 eV


def cfg(*words):
    return resolve(SCHEMA, overrides=list(words))


def flat_x(layout, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.5, size=layout.size)
    fp, fdp = layout.split(x)
    if fp is not None:
        fp += -5.0
    fdp += 1.0
    return x


def fd_gradient(fn, x, step=1e-5):
    g = np.zeros_like(x)
    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp[i] += step
        xm[i] -= step
        g[i] = (fn(xp)[0] - fn(xm)[0]) / (2 * step)
    return g


def assert_flat_gradient(fn, layout, x):
    f, g1 = fn(x)
    assert np.isfinite(f) and g1.dtype == np.float64 and g1.shape == x.shape
    fd = fd_gradient(fn, x)
    scale = max(1.0, np.max(np.abs(g1)))
    np.testing.assert_allclose(g1, fd, rtol=1e-6, atol=1e-7 * scale)
    # the grid ends of every curve, by their flat index
    ends = []
    for s in range(layout.n_site):
        for kind in layout.kinds:
            for k in (0, layout.n_grid - 1):
                e = np.zeros(layout.size)
                fp, fdp = layout.split(e)
                (fp if kind == "fp" else fdp)[s, k] = 1.0
                ends.append(int(np.flatnonzero(e)[0]))
    np.testing.assert_allclose(g1[ends], fd[ends], rtol=1e-6, atol=1e-7 * scale)
    assert not g1[layout.n_curves:].any()                    # trailing others: not restrained


def fe_kk(grid=GRID, pad=100.0):
    return WindowKK(grid, reference_curve("Fe"), pad)


# ----------------------------------------------------------------- layout

@pytest.mark.parametrize("order", ["kind_major", "site_major"])
def test_layout_split_and_join_are_inverse(order):
    lay = FlatLayout(3, 5, order=order, n_other=4)
    x = np.arange(lay.size, dtype=float)
    fp, fdp = lay.split(x)
    if order == "kind_major":               # the S1 objective: all f', then all f''
        assert fp[1, 0] == 5 and fdp[0, 0] == 15
    else:                                   # f', f'' of site 0, then site 1
        assert fp[1, 0] == 10 and fdp[0, 0] == 5
    back = lay.join(fp, fdp)
    np.testing.assert_array_equal(back[:lay.n_curves], x[:lay.n_curves])
    assert not back[lay.n_curves:].any()
    only = FlatLayout(2, 4, kinds=("fdp",))
    assert only.split(np.arange(8.0))[0] is None


# ----------------------------------------------------------------- values

def test_sauter_value_by_hand():
    u = np.array([[1.0, 1.5, 1.4, 2.0]])
    f, g = sauter_difference(u, mean=0.1, sigma=0.5)
    d = np.array([0.5, -0.1, 0.6]) - 0.1
    assert f == pytest.approx(np.sum(d ** 2) / (2 * 0.25))
    np.testing.assert_allclose(g, [[-d[0] / 0.25, (d[0] - d[1]) / 0.25, (d[1] - d[2]) / 0.25,
                                    d[2] / 0.25]])
    lay = FlatLayout(1, 4, order="site_major")
    x = np.concatenate([np.zeros(4), u[0]])
    f2, g1 = SauterRestraint("fdp", 0.1, 0.5, lay)(x)
    assert f2 == pytest.approx(f)
    np.testing.assert_allclose(g1[4:], g[0])


def test_kk_restraint_value_is_the_exact_window_transform():
    """w Σ (f′ − KK[continued f″])², the continued f″ written out on explicit nodes."""
    lay = FlatLayout(2, GRID.size)
    x = flat_x(lay, 3)
    fp, fdp = lay.split(x)
    pad, w = 60.0, 3.0
    ref = reference_curve("Fe")
    r = KramersKronigRestraint.from_reference(lay, GRID, ref, pad, weight=w, offset=False)
    r_off = KramersKronigRestraint.from_reference(lay, GRID, ref, pad, weight=w)
    want = want_off = 0.0
    rn = ref.energy_ev
    x0, xn = GRID[0], GRID[-1]
    for s in range(2):
        left = rn[rn < x0 - 1e-6]
        right = rn[rn > xn + 1e-6]
        nodes = np.concatenate([left, [x0 - pad], GRID, [xn + pad], right])
        order = np.argsort(nodes)
        nodes = nodes[order]
        vals = ref.fdp(nodes)
        win = (nodes >= x0) & (nodes <= xn)
        vals[win] = np.interp(nodes[win], GRID, fdp[s])
        lo = (nodes < x0) & (nodes >= x0 - pad)
        vals[lo] += (fdp[s, 0] - ref.fdp(x0)) * (nodes[lo] - (x0 - pad)) / pad
        hi = (nodes > xn) & (nodes <= xn + pad)
        vals[hi] += (fdp[s, -1] - ref.fdp(xn)) * ((xn + pad) - nodes[hi]) / pad
        res = fp[s] - (ref.constant + kk_matrix(nodes, GRID) @ vals)
        want += w * np.sum(res ** 2)
        want_off += w * np.sum((res - res.mean()) ** 2)     # a free constant in f'
    assert r(x)[0] == pytest.approx(want, rel=1e-10)
    assert r_off(x)[0] == pytest.approx(want_off, rel=1e-10)


def test_kk_restraint_is_zero_on_a_curve_linear_between_nodes():
    """A KK-consistent curve whose f″ is linear between the grid nodes (and the reference
    beyond) has no floor: the restraint is 0 to round-off."""
    grid = np.arange(7000.0, 7201.0, 4.0)
    ref = reference_curve("Fe")
    op = WindowKK(grid, ref, 100.0)
    rng = np.random.default_rng(0)
    u = ref.fdp(grid) + rng.normal(0, 0.5, grid.size)
    lay = FlatLayout(1, grid.size)
    x = np.concatenate([op.fp(u), u])
    r = KramersKronigRestraint(lay, op, weight=1e5)
    assert r(x)[0] < 1e-12


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("order", ["kind_major", "site_major"])
@pytest.mark.parametrize("n_site", [1, 2])
def test_every_restraint_and_the_sum_match_finite_differences(order, n_site):
    lay = FlatLayout(n_site, GRID.size, order=order, n_other=3)
    other = ReferenceCurve(reference_curve("Fe").energy_ev, reference_curve("Fe").fdp_nodes * 1.1,
                           0.2, "scaled")
    refs = [reference_curve("Fe"), other][:n_site]
    terms = [SauterRestraint("fp", 0.01, 0.2, lay), SauterRestraint("fdp", 0.03, 0.3, lay),
             KramersKronigRestraint.from_reference(lay, GRID, refs, pad_ev=40.0, weight=7.0),
             KramersKronigRestraint.from_reference(lay, GRID, refs, pad_ev=40.0, weight=7.0,
                                                   offset=False)]
    x = flat_x(lay, seed=n_site)
    for t in terms:
        assert_flat_gradient(t, lay, x)
    total = RestraintSum(terms, lay)
    assert_flat_gradient(total, lay, x)
    f, g, per = total.evaluate(x)
    assert set(per) == {t.name for t in terms}
    assert f == pytest.approx(sum(t(x)[0] for t in terms))
    np.testing.assert_allclose(g, sum(t(x)[1] for t in terms))
    # the Hessian of the (quadratic) sum, against differences of g1
    H = total.hessian()
    v = np.random.default_rng(1).normal(size=lay.size)
    v[lay.n_curves:] = 0
    np.testing.assert_allclose(H @ v, total(x + v)[1] - total(x)[1], atol=1e-8 * np.abs(H).max())


def test_gradients_on_a_nonuniform_grid_and_fdp_only_layout():
    grid = np.array([7000.0, 7003.0, 7004.0, 7010.0, 7030.0, 7031.5])
    lay = FlatLayout(2, grid.size)
    x = flat_x(lay, 4)
    for term in (SauterRestraint("fp", 0.02, 0.04, lay), SauterRestraint("fdp", 0.03, 0.08, lay),
                 KramersKronigRestraint.from_reference(lay, grid, reference_curve("Fe"), 100.0, 1e5)):
        assert_flat_gradient(term, lay, x)
    only = FlatLayout(2, grid.size, kinds=("fdp",), n_other=2)
    assert_flat_gradient(RestraintSum([SauterRestraint("fdp", 0.0, 0.1, only)], only), only,
                         flat_x(only, 5))


@pytest.mark.parametrize("words, names", [
    (["fp.mean=0.0", "fdp.mean=None", "kramers_kronig.use=false"], ["sauter_fp"]),
    (["fp.mean=None", "fdp.mean=0.03", "kramers_kronig.use=false"], ["sauter_fdp"]),
    (["fp.mean=None", "fdp.mean=None", "kramers_kronig.use=true"], ["kramers_kronig"]),
    (["fp.mean=0.01", "fdp.mean=0.03", "kramers_kronig.use=true", "kramers_kronig.pad=40",
      "kramers_kronig.weight=7"], ["sauter_fp", "sauter_fdp", "kramers_kronig"]),
    ([], ["sauter_fp", "sauter_fdp"]),
    (["fdp.edge_sigma=1.0"], ["sauter_fp", "sauter_fdp", "sauter_fdp_edge"]),
    (["fp.edge_sigma=0.6", "fdp.edge_sigma=1.0"],
     ["sauter_fp", "sauter_fp_edge", "sauter_fdp", "sauter_fdp_edge"]),
], ids=["sauter_fp", "sauter_fdp", "kk", "all", "defaults", "fdp_edge", "both_edges"])
def test_built_from_the_configuration(words, names):
    r = build_restraints(cfg(*words), GRID, ["Fe", "Fe"])
    assert r.active == names == active_terms(cfg(*words))
    assert_flat_gradient(r, r.layout, flat_x(r.layout, 2))


# ----------------------------------------------------------------- edge regions

FULL_GRID = np.arange(7070.0, 7171.0, 4.0)                 # 26 points over the Fe K edge


def test_edge_region_steps_by_brute_force():
    edges = np.array([7112.0, 7119.3, np.nan, 7071.0, 7160.0])  # NaN: no edge on the grid
    mask = edge_region_steps(FULL_GRID, edges)
    assert mask.shape == (edges.size, FULL_GRID.size - 1)
    for s, e0 in enumerate(edges):
        for k in range(FULL_GRID.size - 1):
            a, b = FULL_GRID[k], FULL_GRID[k + 1]
            # the open interval (a, b) meets the open interval (e0 - pre, e0 + post)
            meets = np.isfinite(e0) and b > e0 - EDGE_PRE_GAP_EV and a < e0 + EDGE_POST_GAP_EV
            assert mask[s, k] == meets, (s, k)
    # 7112 eV: from the step 7102-7106 (7102 = edge - 10, the last pre-edge point) to 7130-7134
    assert FULL_GRID[:-1][mask[0]][[0, -1]].tolist() == [7102.0, 7130.0]
    assert not mask[2].any() and mask[3, 0] and mask[4, -1]        # regions at both grid ends


def test_reference_edge_of_iron_is_the_k_edge():
    e0 = reference_edges_on_grid(FULL_GRID, ["Fe", "Fe"])
    assert e0[0] == e0[1] and 7108.0 < e0[0] < 7116.0              # Fe K: 7112 eV
    assert np.isnan(reference_edges_on_grid(FULL_GRID, ["Zn"])[0])  # Zn K (9659 eV) is off the grid


def test_edge_sigma_equal_to_sigma_is_the_single_term():
    lay = FlatLayout(2, FULL_GRID.size, n_other=2)
    x = flat_x(lay, 7)
    edges = reference_edges_on_grid(FULL_GRID, ["Fe", "Fe"])
    for which in ("fp", "fdp"):
        one = SauterRestraint(which, 0.02, 0.3, lay)
        two = sauter_terms(which, 0.02, 0.3, 0.3, lay, FULL_GRID, edges)
        assert [t.name for t in two] == [f"sauter_{which}", f"sauter_{which}_edge"]
        np.testing.assert_allclose(sum(t(x)[0] for t in two), one(x)[0], rtol=1e-13)
        np.testing.assert_allclose(sum(t(x)[1] for t in two), one(x)[1], rtol=1e-12, atol=1e-13)
        assert [t.name for t in sauter_terms(which, 0.02, 0.3, None, lay)] == [f"sauter_{which}"]


def test_edge_terms_by_hand_and_against_finite_differences():
    lay = FlatLayout(2, FULL_GRID.size, order="site_major", n_other=1)
    x = flat_x(lay, 8)
    edges = np.array([7112.0, 7160.0])                              # site 1: region at the top end
    out, inside = sauter_terms("fdp", 0.05, 0.3, 1.5, lay, FULL_GRID, edges)
    m = edge_region_steps(FULL_GRID, edges)
    d = np.diff(lay.split(x)[1], axis=1) - 0.05
    assert inside(x)[0] == pytest.approx(np.sum(d[m] ** 2) / (2 * 1.5 ** 2))
    assert out(x)[0] == pytest.approx(np.sum(d[~m] ** 2) / (2 * 0.3 ** 2))
    for t in (out, inside, RestraintSum([out, inside], lay)):
        assert_flat_gradient(t, lay, x)
    # 7102-7106 … 7130-7134 (8) and 7150-7154 … 7166-7170 (5)
    assert "on 13 of 50 adjacent differences" in inside.describe()


def test_edge_sigma_in_the_constrained_mode_and_bad_values():
    words = ["kramers_kronig.use=true", "kramers_kronig.mode=constrained", "fdp.edge_sigma=1"]
    assert active_terms(cfg(*words)) == ["sauter_fdp", "sauter_fdp_edge", "kk_constrained"]
    with pytest.raises(InputError, match="restraints.fdp.edge_sigma: must be > 0") as err:
        build_restraints(cfg("fdp.edge_sigma=0"), FULL_GRID, ["Fe"])
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="steps has shape"):
        SauterRestraint("fdp", 0.0, 0.3, FlatLayout(1, 5), steps=np.ones((1, 5), bool))


# ----------------------------------------------------------------- floor and weight

def test_kk_weight_comes_from_the_floor_of_the_grid():
    from spread_tools.physics.kk_reference import discretisation_floor
    grid4 = np.arange(7070.0, 7171.0, 4.0)
    grid1 = np.arange(7070.0, 7171.0, 1.0)
    fl4 = discretisation_floor(WindowKK(grid4, reference_curve("Fe"), 100.0))
    fl1 = discretisation_floor(WindowKK(grid1, reference_curve("Fe"), 100.0))
    print(f"\nFe KK floor: 4 eV {fl4['rms']:.4f} e- rms (max {fl4['max']:.3f}), "
          f"1 eV {fl1['rms']:.4f} e- rms (max {fl1['max']:.3f})")
    assert 0.05 < fl4["rms"] < 0.3 and fl1["rms"] < 0.05 and fl1["rms"] < fl4["rms"] / 3
    r = build_restraints(cfg("fdp.mean=None", "kramers_kronig.use=true"), grid4, ["Fe"])
    kk = r.terms[-1]
    # a free f' offset (default): the floor about each probe's mean
    assert kk.weight == pytest.approx(1.0 / (2.0 * fl4["rms_about_mean"] ** 2))
    line = r.describe()[-1]
    assert "floor" in line and "1/(2 floor^2)" in line and f"{fl4['rms_about_mean']:.4f}" in line
    r0 = build_restraints(cfg("fdp.mean=None", "kramers_kronig.use=true", "kramers_kronig.offset=false"),
                          grid4, ["Fe"])
    assert r0.terms[-1].weight == pytest.approx(1.0 / (2.0 * fl4["rms"] ** 2))
    # the reference KK run's weight is one word away
    r5 = build_restraints(cfg("fdp.mean=None", "kramers_kronig.use=true",
                              "kramers_kronig.weight=1e5"), grid4, ["Fe"])
    assert r5.terms[-1].weight == 1e5 and "(given)" in r5.describe()[-1]


def test_constrained_mode_leaves_f_prime_terms_out():
    words = ["kramers_kronig.use=true", "kramers_kronig.mode=constrained"]
    assert active_terms(cfg(*words)) == ["sauter_fdp", "kk_constrained"]
    r = build_restraints(cfg(*words), GRID, ["Fe"], layout=FlatLayout(1, GRID.size, kinds=("fdp",)))
    assert r.active == ["sauter_fdp"]


def test_docstring_example_runs():
    """The module docstring's scipy.optimize.minimize(jac=True) example (a doctest)."""
    result = doctest.testmod(RM, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("words, fragment", [
    (["fp.sigma=0"], "restraints.fp.sigma: must be > 0"),
    (["fdp.mean=0.03", "fdp.sigma=-1"], "restraints.fdp.sigma: must be > 0"),
    (["kramers_kronig.use=true", "kramers_kronig.pad=0"], "restraints.kramers_kronig.pad: must be > 0"),
    (["kramers_kronig.use=true", "kramers_kronig.pad=8000"], "below 0 eV"),
    (["kramers_kronig.use=true", "kramers_kronig.weight=-1"], "weight: must be >= 0"),
])
def test_bad_parameters(words, fragment):
    with pytest.raises(InputError, match=fragment) as err:
        build_restraints(cfg(*words), GRID, ["Fe"])
    assert "\n" not in str(err.value)


def test_bad_arrays():
    r = build_restraints(cfg("fdp.mean=0.03"), GRID, ["Fe", "Fe"])
    x = flat_x(r.layout)
    with pytest.raises(InputError, match="x has shape"):
        r(x[:-1])
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        r(bad)
    with pytest.raises(InputError, match="not strictly increasing"):
        build_restraints(cfg(), GRID[::-1], ["Fe"])
    with pytest.raises(InputError, match="NaN"):
        build_restraints(cfg(), np.where(GRID == GRID[2], np.nan, GRID), ["Fe"])
    with pytest.raises(InputError, match="ReferenceCurve"):
        build_restraints(cfg("kramers_kronig.use=true"), GRID, ["Fe", "Fe"],
                         reference=[reference_curve("Fe")])
    with pytest.raises(InputError, match="sigma: must be > 0"):
        sauter_difference(x, 0.0, 0.0)
    with pytest.raises(InputError, match="no fp"):
        SauterRestraint("fp", 0.0, 0.1, FlatLayout(1, 3, kinds=("fdp",)))
    with pytest.raises(InputError, match="order"):
        FlatLayout(1, 3, order="random")
