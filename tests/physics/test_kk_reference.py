"""Self-consistent references and the window operator (spread_tools.physics.kk_reference):
closed forms (damped oscillator, Gaussian and its Dawson partner, arctangent edge), an
independent transform (kkcalc), the reference's constant, the discretisation floor."""

import numpy as np
import pytest
from scipy.special import dawsn

from spread_tools.errors import InputError
from spread_tools.physics.kk import kk_matrix
from spread_tools.physics.kk_reference import (
    ReferenceCurve,
    WindowKK,
    discretisation_floor,
    kk_consistent_fp,
    reference_curve,
)
from spread_tools.physics.scattering import reference_fp_fdp

E0 = 7112.0


def oscillator(e, gamma=5.0, peak=4.0):
    """f′ + i f″ = A E0² / (E² − E0² − iγE) (the convention of spread_tools.physics.kk)."""
    a = peak * gamma / E0
    c = a * E0 ** 2 / (e ** 2 - E0 ** 2 - 1j * gamma * e)
    return c.real, c.imag


def gaussian_dawson(e, height=2.0, width=4.0):
    """f″ a Gaussian line (odd-extended), f′ its Hilbert partner (2/√π) × Dawson."""
    fdp = height * (np.exp(-((e - E0) / width) ** 2) - np.exp(-((e + E0) / width) ** 2))
    fp = 2 * height / np.sqrt(np.pi) * (dawsn((e - E0) / width) - dawsn((e + E0) / width))
    return fp, fdp


def arctan_edge(e, width=3.0, e1=7400.0, height=4.0):
    """A broadened box edge in f″ (odd-extended) and its exact f′."""
    g = width
    fdp = height / np.pi * (np.arctan((e - E0) / g) - np.arctan((e - e1) / g)
                            + np.arctan((e + E0) / g) - np.arctan((e + e1) / g))
    fp = height / (2 * np.pi) * (np.log(((e - E0) ** 2 + g ** 2) / ((e - e1) ** 2 + g ** 2))
                                 + np.log(((e + E0) ** 2 + g ** 2) / ((e + e1) ** 2 + g ** 2)))
    return fp, fdp


def closed_form_reference(pair):
    """The pair's f″ on fine nodes (0.05 eV near the features, geometric elsewhere) as a
    ReferenceCurve with C = 0: its KK partner must be the closed-form f′."""
    nodes = np.union1d(np.geomspace(1.0, 3e6, 40000), np.arange(6800.0, 7700.0, 0.05))
    return ReferenceCurve(nodes, pair(nodes)[1], 0.0, pair.__name__)


@pytest.mark.parametrize("pair", [oscillator, gaussian_dawson, arctan_edge],
                         ids=["oscillator", "gaussian_dawson", "arctan_edge"])
def test_reference_and_window_operator_reproduce_closed_forms(pair):
    ref = closed_form_reference(pair)
    window = np.arange(7050.0, 7180.0, 0.5)
    fp_exact, fdp_exact = pair(window)
    span = np.ptp(fp_exact)
    # the reference's own f' = KK of its f''
    err_ref = np.max(np.abs(ref.fp(window) - fp_exact))
    # the window operator: f'' values at the 0.5 eV nodes inside, the reference outside
    op = WindowKK(window, ref, pad_ev=30.0)
    err_win = np.max(np.abs(op.fp(fdp_exact) - fp_exact))
    B, b0 = op.fdp_operator(window)
    np.testing.assert_allclose(B @ fdp_exact + b0, fdp_exact, atol=1e-12)
    print(f"\n{pair.__name__}: f' range {span:.2f} e-; max error reference {err_ref:.2e}, "
          f"window operator (0.5 eV) {err_win:.2e} e-")
    assert err_ref < 2e-3 * span and err_win < 7e-3 * span     # 0.5 eV sampling of the peak


def test_window_operator_is_second_order_in_the_step():
    ref = closed_form_reference(arctan_edge)
    errs = {}
    for h in (2.0, 1.0, 0.5):
        w = np.arange(7040.0, 7200.0 + 1e-9, h)
        errs[h] = np.max(np.abs(WindowKK(w, ref, 30.0).fp(arctan_edge(w)[1]) - arctan_edge(w)[0]))
    order = [np.log2(errs[h] / errs[h / 2]) for h in (2.0, 1.0)]
    print(f"\nwindow operator, arctan edge: {errs}, order {order}")
    assert all(1.6 < p < 2.8 for p in order)


def test_kk_matrix_agrees_with_kkcalc():
    """kkcalc (Watts & Lauk), an independent piecewise-polynomial KK code, on the same
    piecewise-linear f″: same numbers."""
    kkcalc = pytest.importorskip("kkcalc.kk")
    rng = np.random.default_rng(4)
    x = np.sort(np.concatenate([np.geomspace(100.0, 50000.0, 300), rng.uniform(7000, 7300, 80)]))
    u = np.abs(rng.normal(size=x.size)) + 0.1
    out = np.array([150.0, 3000.0, 7051.3, 7112.0, 7250.5, 9000.0, 30000.0])
    s = np.diff(u) / np.diff(x)
    coef = np.zeros((x.size - 1, 5))
    coef[:, 0] = s
    coef[:, 1] = u[:-1] - s * x[:-1]
    theirs = kkcalc.KK_PP(out, x, coef, 0.0)
    mine = kk_matrix(x, out) @ u
    print(f"\nkk_matrix vs kkcalc: max |difference| {np.max(np.abs(theirs - mine)):.2e} e-")
    np.testing.assert_allclose(mine, theirs, atol=1e-8)


def test_chantler_reference_constant_and_what_tabulated_fp_lacks():
    ref = reference_curve("Fe")
    # the constant: the relativistic term −(Z/82.5)^2.37 and nuclear Thomson −Z²/(A·1823)
    z, a = 26, 55.845
    expect = -(z / 82.5) ** 2.37 - z * z / (a * 1822.888)
    print(f"\nFe: C = {ref.constant:+.4f} e- (relativistic + nuclear Thomson {expect:+.4f})")
    assert ref.constant == pytest.approx(expect, abs=0.005)
    e = np.arange(7070.0, 7171.0, 1.0)
    sc_fp, sc_fdp = ref.fp_fdp(e)
    tab_fp, tab_fdp = reference_fp_fdp("Fe", e)
    np.testing.assert_allclose(sc_fdp, tab_fdp, atol=2e-3)      # the same f''
    d = tab_fp - sc_fp
    print(f"tabulated Chantler f' - KK of its f'': max {np.max(np.abs(d)):.3f} e- at "
          f"{e[np.argmax(np.abs(d))]:g} eV")
    assert 0.15 < np.max(np.abs(d)) < 0.6                        # the false floor removed
    far = np.array([3000.0, 20000.0])
    np.testing.assert_allclose(ref.fp(far), reference_fp_fdp("Fe", far)[0], atol=0.01)


def test_cromer_liberman_reference_is_finite_at_its_step_edge():
    import gemmi
    cl = reference_curve("Fe", "cromer_liberman")
    tab = gemmi.cromer_liberman(z=26, energy=7112.0)[0]
    sc = float(cl.fp(np.array([7112.0]))[0])
    print(f"\nCromer-Liberman Fe f' at 7112 eV: gemmi {tab:.2f} e-, self-consistent {sc:.2f} e-")
    assert tab < -15 and -16 < sc < -8
    assert cl.constant == pytest.approx(-(26 / 82.5) ** 2.37, abs=0.003)


def test_consistent_fp_of_a_table_and_the_floor():
    ref = reference_curve("Fe")
    e = np.arange(6500.0, 8500.0, 1.0)
    fdp = ref.fdp(e)
    out = e[560:660]
    d = kk_consistent_fp(e, fdp, out_ev=out) - ref.fp(out)
    # the table is the reference sampled at 1 eV: equal away from the edge, its floor at it
    far = np.abs(out - 7112.0) > 15
    assert np.max(np.abs(d[far])) < 2e-3 and np.max(np.abs(d)) < 0.15
    grid = np.arange(7070.0, 7171.0, 4.0)
    fl = discretisation_floor(WindowKK(grid, ref, 100.0))
    assert len(fl["per_probe"]) == 4 and fl["step_ev"] == 4.0
    assert fl["max"] >= max(p[2] for p in fl["per_probe"]) - 1e-12


def test_bad_input():
    ref = reference_curve("Fe")
    with pytest.raises(InputError, match="pad"):
        WindowKK(np.arange(100.0, 110.0), ref, 0.0)
    with pytest.raises(InputError, match="below 0 eV"):
        WindowKK(np.arange(100.0, 110.0), ref, 200.0)
    with pytest.raises(InputError, match="not strictly increasing"):
        WindowKK(np.array([3.0, 2.0, 5.0]) * 1000, ref)
    with pytest.raises(InputError, match="ReferenceCurve"):
        WindowKK(np.arange(7000.0, 7010.0), "chantler")
    with pytest.raises(InputError, match="not one of"):
        reference_curve("Fe", "henke")
    with pytest.raises(InputError, match="NaN"):
        ReferenceCurve([1.0, 2.0], [np.nan, 1.0])
