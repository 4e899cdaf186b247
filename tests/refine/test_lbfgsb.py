"""spread_tools.refine.lbfgsb: scipy's L-BFGS-B path, bit for bit, through any save/restore."""

import numpy as np
import pytest
import scipy.optimize as so

from spread_tools.refine.lbfgsb import LbfgsbRun

OPTS = dict(maxiter=400, maxcor=7, gtol=1e-9, ftol=1e-15, maxls=40)


def rosen(x):
    return so.rosen(x), so.rosen_der(x)


def quartic(x):
    d = np.arange(1, x.size + 1)
    return float(np.sum(d * (x - 1) ** 4 + (x - 0.5) ** 2)), 4 * d * (x - 1) ** 3 + 2 * (x - 0.5)


def scipy_path(fun, x0, **opts):
    xs = []
    res = so.minimize(fun, x0, jac=True, method="L-BFGS-B", callback=lambda intermediate_result: xs.append(intermediate_result.x.copy()),
                      options=dict(maxiter=opts["maxiter"], maxcor=opts["maxcor"], gtol=opts["gtol"],
                                   ftol=opts["ftol"], maxls=opts["maxls"]))
    return res, xs


@pytest.mark.parametrize("fun", [rosen, quartic])
def test_same_path_as_scipy_minimize(fun):
    x0 = np.linspace(-1.2, 1.5, 25)
    ref, ref_xs = scipy_path(fun, x0, **OPTS)
    xs = []
    run = LbfgsbRun(x0, **OPTS).minimize(fun, callback=lambda r: xs.append(r.x.copy()))
    assert run.nit == ref.nit and run.nfev == ref.nfev
    assert np.array_equal(run.x, ref.x)
    assert len(xs) == len(ref_xs) and all(np.array_equal(a, b) for a, b in zip(xs, ref_xs))
    assert run.message == ref.message and run.converged == ref.success


def test_iteration_limit_as_scipy():
    x0 = np.linspace(-1.2, 1.5, 25)
    ref, _ = scipy_path(rosen, x0, **{**OPTS, "maxiter": 5})
    run = LbfgsbRun(x0, **{**OPTS, "maxiter": 5}).minimize(rosen)
    assert run.nit == 5 and np.array_equal(run.x, ref.x) and not run.converged
    assert "ITERATIONS" in run.message


def test_restore_at_every_turn_and_interleaved_runs_change_nothing():
    """A state copied out and restored at every turn of the loop (mid line search too), while a
    second run is stepped in between: both end exactly where undisturbed runs end (no hidden
    state outside the arrays)."""
    x0 = np.linspace(-1.2, 1.5, 25)
    ref_a = LbfgsbRun(x0, **OPTS).minimize(rosen)
    ref_b = LbfgsbRun(x0[::-1].copy(), **OPTS).minimize(quartic)
    a = LbfgsbRun(x0, **OPTS)
    b = LbfgsbRun(x0[::-1].copy(), **OPTS)
    turns = 0
    while not (a.done and b.done):
        for name, fun in (("a", rosen), ("b", quartic)):
            run = a if name == "a" else b
            if run.done:
                continue
            state = {k: v.copy() for k, v in run.state().items()}
            run = LbfgsbRun.from_state(state)
            if run.wants_evaluation:
                run.give(*fun(run.x_requested))
            run.advance()
            turns += 1
            if name == "a":
                a = run
            else:
                b = run
    assert turns > 100
    assert np.array_equal(a.x, ref_a.x) and a.nit == ref_a.nit and a.nfev == ref_a.nfev
    assert np.array_equal(b.x, ref_b.x) and b.nit == ref_b.nit


def test_inconsistent_state_refused():
    run = LbfgsbRun(np.zeros(4), **OPTS)
    st = run.state()
    st["wa"] = st["wa"][:-1]
    with pytest.raises(ValueError, match="inconsistent"):
        LbfgsbRun.from_state(st)
    with pytest.raises(RuntimeError, match="give f and g"):
        run.advance()


def test_bounds_same_path_as_scipy_and_survive_a_restore():
    """Box bounds (some one-sided, some active at the end) follow scipy's bounded path bit for
    bit, also when the run is restored from its state half way."""
    x0 = np.linspace(-1.2, 1.5, 25)
    lo = np.full(25, -np.inf)
    hi = np.full(25, np.inf)
    lo[::3] = 1.2                     # lower bounds above the optimum (1): active at the end
    hi[1::3] = 0.3                    # upper bounds below it
    lo[2], hi[2] = -0.5, 0.5          # both
    xs = []
    ref = so.minimize(rosen, x0, jac=True, method="L-BFGS-B", bounds=so.Bounds(lo, hi),
                      callback=lambda intermediate_result: xs.append(intermediate_result.x.copy()),
                      options=dict(maxiter=400, maxcor=7, gtol=1e-9, ftol=1e-15, maxls=40))
    run = LbfgsbRun(x0, **OPTS, lower=lo, upper=hi)
    mine = []
    while not run.done:
        if run.nfev == 10:
            run = LbfgsbRun.from_state({k: v.copy() for k, v in run.state().items()})
        if run.wants_evaluation:
            run.give(*rosen(run.x_requested))
        run.advance()
        if run.new_iteration:
            mine.append(run.x.copy())
    assert run.nit == ref.nit and np.array_equal(run.x, ref.x)
    assert len(mine) == len(xs) and all(np.array_equal(a, b) for a, b in zip(mine, xs))
    assert run.status == ref.status
    assert np.all(run.x >= lo) and np.all(run.x <= hi) and np.any(run.x == lo) and np.any(run.x == hi)


def test_bounds_checked():
    with pytest.raises(ValueError, match="bounds"):
        LbfgsbRun(np.zeros(3), **OPTS, lower=np.ones(3), upper=np.zeros(3))
    with pytest.raises(ValueError, match="bounds"):
        LbfgsbRun(np.zeros(3), **OPTS, lower=np.zeros(2))
