"""The f″ edge position with pre-/post-edge windows, its σ, and the edge shift between sites."""

import math

import numpy as np
import pytest

from spread_tools.refine.s1 import edge_windows
from spread_tools.refine.uncertainty import EDGE_POST_GAP_EV, EDGE_PRE_GAP_EV, edge_position, edge_shift


def _step_curve(e, edge_ev, width_ev=3.0, low=0.5, high=4.0):
    return low + (high - low) / (1 + np.exp(-(e - edge_ev) / width_ev))


def _fd_gradient(fun, f, h=1e-6):
    g = np.zeros(len(f))
    for i in range(len(f)):
        fp, fm = f.copy(), f.copy()
        fp[i] += h
        fm[i] -= h
        g[i] = (fun(fp) - fun(fm)) / (2 * h)
    return g


def test_windows_closed_form():
    e = np.arange(0.0, 50.0, 5.0)                  # 0 … 45
    f = np.array([1.0, 1.2, 0.8, 1.0, 2.0, 5.0, 5.5, 4.5, 5.0, 5.0])
    # pre: E <= 10 (1.0, 1.2, 0.8 -> 1.0), post: E >= 30 (5.5, 4.5, 5.0, 5.0 -> 5.0); level 3.0
    edge, _ = edge_position(e, f, None, 10.0, 30.0)
    assert edge == pytest.approx(20 + (3.0 - 2.0) / (5.0 - 2.0) * 5)
    # without windows: the end points (1.0, 5.0), the same level here, the same crossing
    assert edge_position(e, f)[0] == pytest.approx(edge)


def test_no_windows_is_the_end_point_definition():
    e = np.arange(0.0, 50.0, 5.0)
    f = np.where(e < 20, 1.0, 5.0)
    f[0], f[-1] = 0.0, 6.0                         # level 3.0 from the end points alone
    f[4] = 2.0
    edge, _ = edge_position(e, f)
    assert edge == pytest.approx(20 + (3.0 - 2.0) / (5.0 - 2.0) * 5)
    # windows wider than the grid clip to the end points
    assert edge_position(e, f, None, -100.0, 1e4)[0] == pytest.approx(edge)


@pytest.mark.parametrize("windows", [(None, None), (7100.0, 7130.0), (7070.0, 7170.0)])
def test_sigma_is_the_propagated_covariance(windows):
    e = np.arange(7070.0, 7171.0, 4.0)
    f = _step_curve(e, 7118.3)
    rng = np.random.default_rng(3)
    L = rng.normal(size=(e.size, e.size)) * 0.05
    cov = L @ L.T + np.diag(np.full(e.size, 0.02))
    _, sig = edge_position(e, f, cov, *windows)
    g = _fd_gradient(lambda v: edge_position(e, v, None, *windows)[0], f)
    assert sig == pytest.approx(math.sqrt(g @ cov @ g), rel=1e-6)


def test_undefined_cases_are_nan():
    e = np.arange(0.0, 50.0, 5.0)
    f = np.linspace(1.0, 5.0, e.size)
    assert math.isnan(edge_position(e, f[::-1])[0])                  # falls
    assert math.isnan(edge_position(e, f, None, 30.0, 20.0)[0])      # windows overlap
    assert all(math.isnan(v) for v in edge_position(e, f[::-1], np.eye(e.size)))


def test_windows_make_the_edge_less_noisy_and_sigma_describes_the_scatter():
    """Monte Carlo over noisy curves: the windowed edge scatters less, as its σ says."""
    e = np.arange(7070.0, 7171.0, 4.0)
    truth = _step_curve(e, 7118.3)
    sd = np.where((e < 7090) | (e > 7150), 0.45, 0.22)              # grid ends worst covered
    cov = np.diag(sd ** 2)
    win = (7112.0 - EDGE_PRE_GAP_EV, 7112.0 + EDGE_POST_GAP_EV)
    rng = np.random.default_rng(7)
    draws = truth + rng.normal(size=(4000, e.size)) * sd
    old = np.array([edge_position(e, d)[0] for d in draws])
    new = np.array([edge_position(e, d, None, *win)[0] for d in draws])
    sig_old = edge_position(e, truth, cov)[1]
    sig_new = edge_position(e, truth, cov, *win)[1]
    assert np.nanstd(new) < 0.6 * np.nanstd(old)
    assert sig_new < 0.6 * sig_old
    # the delta-method σ against the scatter (the edge is a ratio: 25 % is close enough)
    assert np.nanstd(new) == pytest.approx(sig_new, rel=0.25)
    assert abs(np.nanmean(new) - edge_position(e, truth, None, *win)[0]) < 0.1 * sig_new


def test_edge_shift_uses_the_cross_covariance():
    e = np.arange(7070.0, 7171.0, 4.0)
    fa, fb = _step_curve(e, 7120.0), _step_curve(e, 7117.0, width_ev=2.5)
    n = e.size
    rng = np.random.default_rng(11)
    L = rng.normal(size=(2 * n, 2 * n)) * 0.04
    cov = L @ L.T + np.diag(np.full(2 * n, 0.01))
    cov[:n, n:] += 0.02                             # correlated sites
    cov[n:, :n] += 0.02
    w = (7102.0, 7132.0)
    shift, sig = edge_shift(e, fa, fb, cov, w, w)
    assert shift == pytest.approx(edge_position(e, fa, None, *w)[0] - edge_position(e, fb, None, *w)[0])
    both = np.concatenate([fa, fb])
    g = _fd_gradient(lambda v: edge_position(e, v[:n], None, *w)[0] - edge_position(e, v[n:], None, *w)[0], both)
    assert sig == pytest.approx(math.sqrt(g @ cov @ g), rel=1e-6)
    # the sites' own σ alone would give another answer: the cross terms are used
    sa, sb = edge_position(e, fa, cov[:n, :n], *w)[1], edge_position(e, fb, cov[n:, n:], *w)[1]
    assert abs(sig - math.hypot(sa, sb)) > 1e-3


def test_edge_windows_from_the_reference_edges():
    e = np.arange(7070.0, 7171.0, 4.0)
    w = edge_windows(e, [7112.0, np.nan, 7065.0])
    assert w[0] == pytest.approx([7112.0 - EDGE_PRE_GAP_EV, 7112.0 + EDGE_POST_GAP_EV])
    assert w[1] == pytest.approx([7070.0, 7170.0])                    # no reference edge: end points
    assert w[2] == pytest.approx([7070.0, 7085.0])                    # clipped to the grid


def test_edge_shifts_of_a_result_pick_the_fdp_blocks():
    """s1.edge_shifts against edge_shift on hand-picked blocks of the (fp…, fdp…) covariance."""
    import types

    from spread_tools.refine.s1 import edge_shifts
    e = np.arange(7070.0, 7171.0, 4.0)
    n = e.size
    fdp = np.array([_step_curve(e, 7119.0), _step_curve(e, 7116.0), _step_curve(e, 7121.0)])
    rng = np.random.default_rng(5)
    L = rng.normal(size=(6 * n, 6 * n)) * 0.03
    cov = L @ L.T + np.eye(6 * n) * 0.01
    windows = np.array([[7102.0, 7132.0], [7100.0, 7130.0], [7104.0, 7134.0]])
    res = types.SimpleNamespace(energy_ev=e, fdp=fdp, covariance=cov, edge_window_ev=windows,
                                site_names=["A", "B", "C"])
    out = edge_shifts(res)
    assert [(a, b) for a, b, _, _ in out] == [("B", "A"), ("C", "A")]
    for k, (_, _, shift, sig) in enumerate(out, start=1):
        ia = 3 * n + k * n + np.arange(n)
        ib = 3 * n + np.arange(n)
        idx = np.concatenate([ia, ib])
        want = edge_shift(e, fdp[k], fdp[0], cov[np.ix_(idx, idx)], windows[k], windows[0])
        assert (shift, sig) == pytest.approx(want)
        assert shift == pytest.approx(edge_position(e, fdp[k], None, *windows[k])[0]
                                      - edge_position(e, fdp[0], None, *windows[0])[0])
