"""Restraints: values against closed forms, gradients against finite differences
(every parameter, including both grid ends), composition from the configuration, bad input."""

import numpy as np
import pytest

from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.physics.kk import kk_matrix
from spread_tools.refine.restraints import (
    RESTRAINT_SCHEMA,
    KramersKronigRestraint,
    SauterRestraint,
    active_terms,
    build_restraints,
    sauter_difference,
)

SCHEMA = {"restraints": RESTRAINT_SCHEMA}
GRID = np.arange(7070.0, 7170.0 + 1e-9, 4.0)[:9]          # 9 points, 7070-7102 eV


def cfg(*words):
    return resolve(SCHEMA, overrides=list(words))


def curves(n_site, seed=0, grid=GRID):
    rng = np.random.default_rng(seed)
    fp = -5.0 + rng.normal(scale=0.5, size=(n_site, grid.size))
    fdp = 1.0 + rng.normal(scale=0.5, size=(n_site, grid.size))
    return fp, fdp


def reference(n_site, grid=GRID, seed=99):
    rng = np.random.default_rng(seed)
    return (-6.0 + rng.normal(scale=0.3, size=(n_site, grid.size)),
            2.0 + rng.normal(scale=0.3, size=(n_site, grid.size)))


def fd_gradients(fn, fp, fdp, step=1e-5):
    """Central differences of fn(fp, fdp)[0] with respect to every parameter."""
    g = []
    for which in (0, 1):
        base = (fp, fdp)[which]
        out = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus = [fp.copy(), fdp.copy()]
            minus = [fp.copy(), fdp.copy()]
            plus[which][idx] += step
            minus[which][idx] -= step
            out[idx] = (fn(*plus)[0] - fn(*minus)[0]) / (2 * step)
        g.append(out)
    return g


def assert_gradients(fn, fp, fdp):
    f, g_fp, g_fdp = fn(fp, fdp)
    assert np.isfinite(f)
    fd_fp, fd_fdp = fd_gradients(fn, fp, fdp)
    scale = max(1.0, np.max(np.abs(g_fp)), np.max(np.abs(g_fdp)))
    # every point, the two grid ends included
    np.testing.assert_allclose(g_fp, fd_fp, rtol=1e-6, atol=1e-7 * scale)
    np.testing.assert_allclose(g_fdp, fd_fdp, rtol=1e-6, atol=1e-7 * scale)
    for g, fd in ((g_fp, fd_fp), (g_fdp, fd_fdp)):
        for end in (0, -1):
            np.testing.assert_allclose(g[:, end], fd[:, end], rtol=1e-6, atol=1e-7 * scale)


# ----------------------------------------------------------------- values

def test_sauter_value_by_hand():
    u = np.array([[1.0, 1.5, 1.4, 2.0]])
    f, g = sauter_difference(u, mean=0.1, sigma=0.5)
    d = np.array([0.5, -0.1, 0.6]) - 0.1
    assert f == pytest.approx(np.sum(d ** 2) / (2 * 0.25))
    np.testing.assert_allclose(g, [[-d[0] / 0.25, (d[0] - d[1]) / 0.25, (d[1] - d[2]) / 0.25,
                                    d[2] / 0.25]])


def test_kk_restraint_value_is_the_padded_transform():
    fp, fdp = curves(2)
    fp_ref, fdp_ref = reference(2)
    pad, w = 60.0, 3.0
    r = KramersKronigRestraint(GRID, fp_ref, fdp_ref, pad=pad, weight=w)
    # independent: the ramp written out as explicit nodes, zero at x0 - pad and xN + pad
    xe = np.concatenate([[GRID[0] - pad], GRID, [GRID[-1] + pad]])
    want = 0.0
    for s in range(2):
        dfdp = np.concatenate([[0.0], fdp[s] - fdp_ref[s], [0.0]])
        res = (fp[s] - fp_ref[s]) - kk_matrix(xe, GRID) @ dfdp
        want += w * np.sum(res ** 2)
    assert r(fp, fdp)[0] == pytest.approx(want, rel=1e-12)
    assert r(fp_ref, fdp_ref)[0] == 0.0


# ----------------------------------------------------------------- gradients

@pytest.mark.parametrize("n_site", [1, 2])
@pytest.mark.parametrize("words, names", [
    (["fp.mean=0.0", "fdp.mean=None", "kramers_kronig.use=false"], ["sauter_fp"]),
    (["fp.mean=None", "fdp.mean=0.03", "kramers_kronig.use=false"], ["sauter_fdp"]),
    (["fp.mean=None", "fdp.mean=None", "kramers_kronig.use=true"], ["kramers_kronig"]),
    (["fp.mean=0.01", "fdp.mean=0.03", "kramers_kronig.use=true", "kramers_kronig.pad=40",
      "kramers_kronig.weight=7"], ["sauter_fp", "sauter_fdp", "kramers_kronig"]),
    ([], ["sauter_fp", "sauter_fdp"]),                 # defaults = the reference S1 run
], ids=["sauter_fp", "sauter_fdp", "kk", "all", "defaults"])
def test_gradients_match_finite_differences(n_site, words, names):
    restraint = build_restraints(cfg(*words), GRID, ["Fe"] * n_site, reference=reference(n_site))
    assert restraint.active == names
    fp, fdp = curves(n_site, seed=n_site)
    assert_gradients(restraint, fp, fdp)
    # the sum is the sum of the terms
    f, _, _, per_term = restraint.evaluate(fp, fdp)
    assert f == pytest.approx(sum(per_term.values()))
    assert set(per_term) == set(names)


def test_gradients_of_single_terms_on_a_nonuniform_grid():
    grid = np.array([7000.0, 7003.0, 7004.0, 7010.0, 7030.0, 7031.5])
    fp, fdp = curves(2, seed=4, grid=grid)
    for term in (SauterRestraint("fp", 0.02, 0.04), SauterRestraint("fdp", 0.03, 0.08),
                 KramersKronigRestraint(grid, *reference(2, grid), pad=100.0, weight=1e5)):
        assert_gradients(term, fp, fdp)


# ----------------------------------------------------------------- composition

def test_fdp_sauter_off_and_kk_on():
    r = build_restraints(cfg("restraints.fdp.mean=None", "restraints.kramers_kronig.use=True"),
                         GRID, ["Fe", "Fe"], reference=reference(2))
    assert "kramers_kronig" in r.active and "sauter_fdp" not in r.active
    assert active_terms(cfg("restraints.fdp.mean=None", "restraints.kramers_kronig.use=True")) \
        == r.active
    assert any("pad 100 eV" in line for line in r.describe())


def test_everything_off_is_zero():
    r = build_restraints(cfg("fp.mean=None", "fdp.mean=None", "kramers_kronig.use=false"),
                         GRID, ["Fe"])
    assert r.active == [] and r.describe() == ["no restraints"]
    fp, fdp = curves(1)
    f, g_fp, g_fdp = r(fp, fdp)
    assert f == 0.0 and not g_fp.any() and not g_fdp.any()


def test_default_reference_is_the_element_table():
    from spread_tools.physics.scattering import reference_fp_fdp
    grid = np.arange(7070.0, 7171.0, 4.0)
    r = build_restraints(cfg("fp.mean=None", "fdp.mean=None", "kramers_kronig.use=true"), grid,
                         ["Fe", "Fe"])
    fp_ref, fdp_ref = reference_fp_fdp("Fe", grid)
    f, g_fp, g_fdp = r(np.array([fp_ref, fp_ref]), np.array([fdp_ref, fdp_ref]))
    assert f == 0.0 and not g_fp.any() and not g_fdp.any()


def test_config_dict_and_section_are_accepted():
    d = {"restraints": {"fp": {"mean": None}, "fdp": {"mean": 0.03, "sigma": 0.08},
                        "kramers_kronig": {"use": False}}}
    assert active_terms(d) == ["sauter_fdp"]
    assert active_terms(d["restraints"]) == ["sauter_fdp"]
    assert active_terms(cfg().restraints) == ["sauter_fp", "sauter_fdp"]


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
        build_restraints(cfg(*words), GRID, ["Fe"], reference=reference(1))
    assert "\n" not in str(err.value)


def test_bad_arrays():
    r = build_restraints(cfg("fdp.mean=0.03"), GRID, ["Fe", "Fe"], reference=reference(2))
    fp, fdp = curves(2)
    with pytest.raises(InputError, match="shape"):
        r(fp, fdp[:, :-1])
    with pytest.raises(InputError, match="grid points"):
        r(fp[:, :-1], fdp[:, :-1])
    with pytest.raises(InputError, match="sites"):
        r(fp[:1], fdp[:1])
    bad = fp.copy()
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match="fp contains NaN"):
        r(bad, fdp)
    with pytest.raises(InputError, match="not strictly increasing"):
        build_restraints(cfg(), GRID[::-1], ["Fe"], reference=reference(1))
    with pytest.raises(InputError, match="NaN"):
        build_restraints(cfg(), np.where(GRID == GRID[2], np.nan, GRID), ["Fe"],
                         reference=reference(1))
    with pytest.raises(InputError, match="reference arrays must have shape"):
        build_restraints(cfg("kramers_kronig.use=true"), GRID, ["Fe", "Fe"], reference=reference(1))
    with pytest.raises(InputError, match="sigma: must be > 0"):
        sauter_difference(fp, 0.0, 0.0)
