"""The Kramers–Kronig operator: exactness, analytic pairs, convergence, speed, bad input.

Figures printed with ``-s`` (the max error of two analytic pairs at 4, 2, 1, 0.5 eV
spacing and the observed convergence order).
"""

import time

import numpy as np
import pytest
from scipy.integrate import quad

from spread_tools.errors import InputError
from spread_tools.physics.kk import (
    kk_consistency,
    kk_matrix,
    kk_transform,
    padded_kk_matrix,
)

# ----------------------------------------------------------------- brute force (independent)

def _pl(x, u):
    return lambda t: np.interp(t, x, u, left=0.0, right=0.0)


def brute_kk(x, u, e, kind="fdp_to_fp"):
    """(1/π)[PV∫ u/(e − t) ∓ ∫ u/(e + t)] by adaptive quadrature.

    The principal value uses the subtraction PV∫_a^b u/(t − e) = ∫ (u(t) − u(e))/(t − e) dt
    + u(e) ln|(b − e)/(a − e)|, whose integrand is bounded.
    """
    f = _pl(x, u)
    a, b = x[0], x[-1]
    opts = dict(points=list(x[1:-1]), limit=800, epsabs=1e-13, epsrel=1e-13)
    if a < e < b:
        fe = f(e)
        reg = quad(lambda t: (f(t) - fe) / (t - e) if t != e else 0.0, a, b, **opts)[0]
        pv_t_minus_e = reg + fe * np.log((b - e) / (e - a))
        i_minus = -pv_t_minus_e
    else:
        i_minus = quad(lambda t: f(t) / (e - t), a, b, **opts)[0]
    i_plus = quad(lambda t: f(t) / (e + t), a, b, **opts)[0]
    if kind == "fdp_to_fp":
        return (i_minus - i_plus) / np.pi
    return -(i_minus + i_plus) / np.pi


@pytest.mark.parametrize("kind", ["fdp_to_fp", "fp_to_fdp"])
def test_matrix_is_exact_for_piecewise_linear_curves(kind):
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(100.0, 200.0, 11))        # non-uniform grid
    u = rng.normal(size=x.size)
    u[0] = u[-1] = 0.0                                 # continuous at the ends as well
    e_out = np.concatenate([x[1:-1], 0.5 * (x[1:] + x[:-1]), x[[0, -1]], [20.0, 90.0, 250.0, 900.0]])
    got = kk_matrix(x, e_out, kind=kind) @ u
    want = np.array([brute_kk(x, u, e, kind) for e in e_out])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_end_nodes_with_a_jump_give_the_finite_part_elsewhere_exact():
    rng = np.random.default_rng(2)
    x = np.linspace(50.0, 80.0, 7)
    u = rng.normal(size=x.size)                        # jumps to zero at both ends
    e_out = np.array([55.0, 61.3, 79.0, 30.0, 100.0])  # away from the ends: exact
    np.testing.assert_allclose(kk_matrix(x, e_out) @ u,
                               [brute_kk(x, u, e) for e in e_out], atol=1e-9)
    k_end = kk_matrix(x, x[[0, -1]])
    assert np.all(np.isfinite(k_end))


def test_padded_matrix_is_the_ramp_continuation():
    x = np.arange(7070.0, 7171.0, 4.0)
    pad = 100.0
    rng = np.random.default_rng(5)
    u = rng.normal(size=x.size)
    k = padded_kk_matrix(x, pad)
    # explicit ramp with many nodes: same piecewise-linear function, so the same numbers
    left = np.linspace(x[0] - pad, x[0], 41)[:-1]
    right = np.linspace(x[-1], x[-1] + pad, 41)[1:]
    xe = np.concatenate([left, x, right])
    ue = np.concatenate([u[0] * (left - left[0]) / pad, u, u[-1] * (1 - (right - x[-1]) / pad)])
    np.testing.assert_allclose(k @ u, kk_matrix(xe, x) @ ue, atol=1e-11)
    np.testing.assert_allclose((k @ u)[[0, 12, -1]], [brute_kk(xe, ue, e) for e in x[[0, 12, -1]]],
                               atol=1e-9)


@pytest.mark.parametrize("kind", ["fdp_to_fp", "fp_to_fdp"])
def test_transform_fft_and_chunked_paths_agree_with_the_matrix(kind):
    rng = np.random.default_rng(11)
    x = 1000.0 + 2.0 * np.arange(3000)
    u = np.cumsum(rng.normal(size=(2, x.size)), axis=1) * 0.01
    k = kk_matrix(x, kind=kind)
    np.testing.assert_allclose(kk_transform(x, u, kind=kind), u @ k.T, atol=1e-10)  # FFT path
    xn = np.sort(rng.uniform(500.0, 900.0, 400))
    un = rng.normal(size=xn.size)
    e_out = np.linspace(400.0, 1000.0, 77)
    np.testing.assert_allclose(kk_transform(xn, un, e_out, kind=kind, chunk_bytes=10_000),
                               kk_matrix(xn, e_out, kind=kind) @ un, atol=1e-11)


def test_full_table_size_is_fast():
    x = np.arange(1006.0, 24906.0, 1.0)               # the measured tables' grid (23,900 rows)
    u = 3.4 * np.tanh(np.maximum(x - 7100.0, 0.0) / 5.0) * (7112.0 / x) ** 2.5
    t0 = time.perf_counter()
    full = kk_transform(x, u)                         # every node: FFT (Toeplitz + Hankel)
    t_full = time.perf_counter() - t0
    window = np.arange(7070.0, 7171.0)
    t0 = time.perf_counter()
    part = kk_matrix(x, window) @ u                   # the window rows of the dense matrix
    t_win = time.perf_counter() - t0
    np.testing.assert_allclose(full[(x >= 7070) & (x <= 7170)], part, atol=1e-9)
    print(f"\nKK of 23,900 nodes: all nodes (FFT) {t_full * 1e3:.1f} ms, "
          f"101 window rows (dense) {t_win * 1e3:.1f} ms")
    assert t_full < 1.0 and t_win < 1.0


# ----------------------------------------------------------------- analytic pairs

E0 = 7112.0


def oscillator(e, gamma=5.0, peak=4.0):
    """f′ + i f″ = A E0² / (E² − E0² − iγE): satisfies f′ = (2/π) P∫ E′ f″/(E² − E′²)."""
    a = peak * gamma / E0                              # max f″ ≈ peak e⁻
    c = a * E0 ** 2 / (e ** 2 - E0 ** 2 - 1j * gamma * e)
    return c.real, c.imag


def arctan_edge(e, width=3.0, e1=7400.0, height=4.0):
    """A broadened box edge in f″ (odd-extended) and its exact f′ (logarithms)."""
    g = width
    fdp = height / np.pi * (np.arctan((e - E0) / g) - np.arctan((e - e1) / g)
                            + np.arctan((e + E0) / g) - np.arctan((e + e1) / g))
    fp = height / (2 * np.pi) * (np.log(((e - E0) ** 2 + g ** 2) / ((e - e1) ** 2 + g ** 2))
                                 + np.log(((e + E0) ** 2 + g ** 2) / ((e + e1) ** 2 + g ** 2)))
    return fp, fdp


LO, HI = 4000.0, 12000.0
WINDOW = np.arange(7000.0, 7201.0, 2.0)


def _tails(fdp_fn, e_out):
    """(2/π)∫ E′ f″/(E² − E′²) over [0, LO] and [HI, ∞): the part outside the grid."""
    out = []
    for e in e_out:
        fn = lambda t: t * fdp_fn(t) / (e * e - t * t)  # noqa: E731
        out.append(2 / np.pi * (quad(fn, 0.0, LO, limit=400, epsabs=1e-12)[0]
                                + quad(fn, HI, np.inf, limit=400, epsabs=1e-12)[0]))
    return np.array(out)


@pytest.mark.parametrize("pair", [oscillator, arctan_edge], ids=["oscillator", "arctan_edge"])
def test_analytic_pairs_converge_at_second_order(pair):
    fdp_fn = lambda t: pair(np.asarray(t, dtype=float))[1]  # noqa: E731
    fp_exact = pair(WINDOW)[0]
    tails = _tails(fdp_fn, WINDOW)
    errors = {}
    for h in (4.0, 2.0, 1.0, 0.5):
        x = np.arange(LO, HI + h / 2, h)
        fp = kk_matrix(x, WINDOW) @ fdp_fn(x) + tails
        errors[h] = float(np.max(np.abs(fp - fp_exact)))
    order = [np.log2(errors[h] / errors[h / 2]) for h in (2.0, 1.0)]
    print(f"\n{pair.__name__}: max |f' - KK(f'')| = " + ", ".join(
        f"{errors[h]:.3g} e- at {h:g} eV" for h in errors)
        + f" (f' range {np.ptp(fp_exact):.2f} e-); order {order[0]:.2f}, {order[1]:.2f}")
    assert all(1.8 < p < 2.6 for p in order)
    assert errors[1.0] < 0.02 * np.ptp(fp_exact) and errors[0.5] < 0.005 * np.ptp(fp_exact)


def test_the_other_sign_convention_is_rejected():
    """A E0²/(E0² − E² − iγE) has the same f″ but the opposite f′: it is not this KK pair."""
    x = np.arange(LO, HI + 0.5, 1.0)
    gamma, a = 5.0, 4.0 * 5.0 / E0
    c_other = a * E0 ** 2 / (E0 ** 2 - WINDOW ** 2 - 1j * gamma * WINDOW)
    fdp = oscillator(x)[1]
    np.testing.assert_allclose(oscillator(x)[1], (a * E0 ** 2 / (E0 ** 2 - x ** 2 - 1j * gamma * x)).imag)
    tails = _tails(lambda t: oscillator(np.asarray(t, dtype=float))[1], WINDOW)
    fp_kk = kk_matrix(x, WINDOW) @ fdp + tails
    span = np.ptp(c_other.real)
    assert np.max(np.abs(fp_kk + c_other.real)) < 0.02 * span  # KK gives −Re of that form
    assert np.max(np.abs(fp_kk - c_other.real)) > 0.5 * span


def test_inverse_relation_recovers_fdp():
    """f″ = −(2E/π) P∫ f′/(E² − E′²): the arctangent pair the other way round."""
    fp_fn = lambda t: arctan_edge(np.asarray(t, dtype=float))[0]  # noqa: E731
    fdp_exact = arctan_edge(WINDOW)[1]
    tails = []
    for e in WINDOW:
        fn = lambda t: -2 * e / np.pi * fp_fn(t) / (e * e - t * t)  # noqa: E731
        tails.append(quad(fn, 0.0, LO, limit=400, epsabs=1e-12)[0]
                     + quad(fn, HI, np.inf, limit=400, epsabs=1e-12)[0])
    x = np.arange(LO, HI + 0.25, 0.5)
    fdp = kk_matrix(x, WINDOW, kind="fp_to_fdp") @ fp_fn(x) + np.array(tails)
    assert np.max(np.abs(fdp - fdp_exact)) < 0.005


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("grid, fragment", [
    ([1.0, 3.0, 2.0], "not strictly increasing"),
    ([1.0, 2.0, 2.0], "not strictly increasing"),
    ([1.0, np.nan, 3.0], "NaN"),
    ([-1.0, 2.0, 3.0], "positive"),
    ([5.0], "at least 2"),
])
def test_bad_grids_are_one_line_errors(grid, fragment):
    with pytest.raises(InputError, match=fragment) as err:
        kk_matrix(grid)
    assert "\n" not in str(err.value)


def test_bad_values_and_pads():
    x = np.arange(10.0, 20.0)
    with pytest.raises(InputError, match="does not match"):
        kk_transform(x, np.ones(5))
    with pytest.raises(InputError, match="NaN"):
        kk_transform(x, np.full(x.size, np.nan))
    with pytest.raises(InputError, match="kind"):
        kk_matrix(x, kind="fp")
    with pytest.raises(InputError, match="pad"):
        padded_kk_matrix(x, 0.0)
    with pytest.raises(InputError, match="below 0 eV"):
        padded_kk_matrix(x, 50.0)


def test_consistency_check_input_errors():
    e = np.arange(7000.0, 7300.0)
    fp, fdp = -np.ones(e.size), np.ones(e.size)
    with pytest.raises(InputError, match="one length"):
        kk_consistency(e, fp[:-1], fdp, 7070, 7170)
    with pytest.raises(InputError, match="not inside the table"):
        kk_consistency(e, fp, fdp, 6900, 7170)
    with pytest.raises(InputError, match="below max_ev"):
        kk_consistency(e, fp, fdp, 7170, 7070)
    with pytest.raises(InputError, match="holds 1 table"):
        kk_consistency(e, fp, fdp, 7100.2, 7101.1)
    with pytest.raises(InputError, match="NaN"):
        kk_consistency(e, np.where(e == 7100, np.nan, fp), fdp, 7070, 7170)
    with pytest.raises(InputError, match="not strictly increasing"):
        kk_consistency(e[::-1], fp, fdp, 7070, 7170)
