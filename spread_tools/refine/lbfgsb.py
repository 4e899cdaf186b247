"""L-BFGS-B whose whole state can be saved at any evaluation and resumed bit for bit.

:class:`LbfgsbRun` drives scipy's own L-BFGS-B code (the routine behind
``scipy.optimize.minimize(method="L-BFGS-B")``) through its reverse-communication
interface, exactly as scipy's wrapper does, so it follows the same path to the
last bit (tested against ``scipy.optimize.minimize``). The routine keeps all of its
state in a few arrays; :meth:`LbfgsbRun.state` copies them (with x, f, g and the
counters) and :meth:`LbfgsbRun.from_state` continues from such a copy, in this or
another process, as if nothing had happened. A checkpoint therefore never has to
wait for the end of a macrocycle.

The interface is scipy's private ``scipy.optimize._lbfgsb.setulb`` in the form of
scipy ≥ 1.15 (C translation of the Fortran code); ``tests/refine/test_lbfgsb.py``
fails loudly if a scipy release changes it. Box bounds are passed as scipy's wrapper
passes them (``nbd`` codes) and are part of the saved state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LbfgsbRun", "STATE_ARRAYS"]

#: Arrays of a saved state (all numpy; ``f`` is a 0-d float64 array).
STATE_ARRAYS = ("x", "f", "g", "wa", "iwa", "task", "ln_task", "lsave", "isave", "dsave",
                "counters", "last_g", "last_f")

_TASK_FG, _TASK_NEW_X, _TASK_CONVERGED = 3, 1, 4


def _setulb():
    try:
        from scipy.optimize import _lbfgsb
    except ImportError as exc:                     # pragma: no cover
        raise RuntimeError("scipy's L-BFGS-B module is not available") from exc
    return _lbfgsb.setulb


def _bound_arrays(lower, upper):
    """scipy's (low, up, nbd) for setulb: nbd 0 none, 1 lower, 2 both, 3 upper."""
    has_lo, has_hi = np.isfinite(lower), np.isfinite(upper)
    low = np.where(has_lo, lower, 0.0).astype(np.float64)
    up = np.where(has_hi, upper, 0.0).astype(np.float64)
    nbd = np.where(has_lo & has_hi, 2, np.where(has_lo, 1, np.where(has_hi, 3, 0))).astype(np.int32)
    return low, up, nbd


def _messages(task):
    try:
        from scipy.optimize._lbfgsb_py import status_messages, task_messages
        return f"{status_messages[int(task[0])]}: {task_messages[int(task[1])]}"
    except (ImportError, KeyError, IndexError):     # pragma: no cover
        return f"L-BFGS-B task {int(task[0])}/{int(task[1])}"


class LbfgsbRun:
    """One L-BFGS-B minimisation of ``fun`` that can be stepped, saved and resumed.

    Parameters
    ----------
    x0 : array (n,)
        Start point.
    maxiter : int
        Stop after this many iterations.
    maxcor : int
        Memory (correction pairs).
    gtol : float
        Projected-gradient tolerance (scipy's ``gtol``).
    ftol : float
        Relative objective-change tolerance (scipy's ``ftol``).
    maxls : int
        Line-search steps per iteration.
    maxfun : int
        Stop after this many evaluations.
    lower, upper : array (n,), optional
        Box bounds (``-inf``/``inf`` or ``None``: none); ``x0`` is clipped into them, as
        ``scipy.optimize.minimize`` does.

    Notes
    -----
    Use::

        run = LbfgsbRun(x0, maxiter=100, maxcor=20, gtol=1e-3, ftol=1e-15, maxls=40)
        while not run.done:
            if run.wants_evaluation:
                run.give(*fun(run.x_requested))     # f, g at the requested point
            run.advance()                            # may set run.new_iteration
            ... run.state() may be saved here, at any turn of the loop ...

    or simply :meth:`minimize` with a callback. The same calls on a state restored
    with :meth:`from_state` continue exactly where the saved run was.
    """

    def __init__(self, x0, maxiter, maxcor=10, gtol=1e-5, ftol=2.2e-9, maxls=20, maxfun=15000,
                 lower=None, upper=None):
        x0 = np.asarray(x0, dtype=np.float64).ravel()
        n = x0.size
        lo = np.full(n, -np.inf) if lower is None else np.asarray(lower, np.float64).ravel()
        hi = np.full(n, np.inf) if upper is None else np.asarray(upper, np.float64).ravel()
        if lo.shape != (n,) or hi.shape != (n,) or np.any(lo > hi):
            raise ValueError("bounds must have the length of x0 and lower <= upper")
        x0 = np.clip(x0, lo, hi)
        m = int(maxcor)
        self.m = m
        self.maxiter = int(maxiter)
        self.maxfun = int(maxfun)
        self.factr = float(ftol) / np.finfo(float).eps
        self.pgtol = float(gtol)
        self.maxls = int(maxls)
        if not self.maxls > 0:
            raise ValueError("maxls must be positive")
        self.x = np.array(x0, dtype=np.float64)
        self.f = np.array(0.0, dtype=np.float64)
        self.g = np.zeros(n, dtype=np.float64)
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
        self.iwa = np.zeros(3 * n, dtype=np.int32)
        self.task = np.zeros(2, dtype=np.int32)
        self.ln_task = np.zeros(2, dtype=np.int32)
        self.lsave = np.zeros(4, dtype=np.int32)
        self.isave = np.zeros(44, dtype=np.int32)
        self.dsave = np.zeros(29, dtype=np.float64)
        self.nit = 0
        self.nfev = 0
        self.last_f = np.array(np.nan)
        self.last_g = np.zeros(0)
        self._low, self._up, self._nbd = _bound_arrays(lo, hi)
        self.done = False
        self.wants_evaluation = False
        self.new_iteration = False
        self._pending = False
        self.advance()

    # ------------------------------------------------------------------ stepping
    @property
    def x_requested(self):
        """Copy of the point where the routine wants f and g."""
        return self.x.copy()

    def give(self, f, g):
        """Hand over f and g at :attr:`x_requested` (after :attr:`wants_evaluation`)."""
        self.f = np.array(float(f), dtype=np.float64)
        self.g = np.asarray(g, dtype=np.float64).copy()
        self.nfev += 1
        self.wants_evaluation = False
        self._pending = True

    def advance(self):
        """One call of the routine; sets :attr:`wants_evaluation`, :attr:`new_iteration`
        or :attr:`done`."""
        if self.wants_evaluation:
            raise RuntimeError("give f and g at x_requested first")
        self.new_iteration = False
        self._pending = False
        _setulb()(self.m, self.x, self._low, self._up, self._nbd, self.f, self.g, self.factr,
                  self.pgtol, self.wa, self.iwa, self.task, self.lsave, self.isave, self.dsave,
                  self.maxls, self.ln_task)
        t = int(self.task[0])
        if t == _TASK_FG:
            self.wants_evaluation = True
        elif t == _TASK_NEW_X:
            self.nit += 1
            self.new_iteration = True
            if self.nit >= self.maxiter:
                self.task[0], self.task[1] = 5, 504
            elif self.nfev > self.maxfun:
                self.task[0], self.task[1] = 5, 502
        else:
            self.done = True

    def minimize(self, fun, callback=None):
        """Run to the end: ``fun(x) -> (f, g)``, ``callback(run)`` after every iteration.

        Returns
        -------
        self
        """
        while not self.done:
            if self.wants_evaluation:
                self.give(*fun(self.x_requested))
            self.advance()
            if self.new_iteration and callback is not None:
                callback(self)
        return self

    # ------------------------------------------------------------------ outcome
    @property
    def converged(self):
        """True when the routine stopped on its own tolerance (scipy's ``success``)."""
        return self.done and int(self.task[0]) == _TASK_CONVERGED

    @property
    def status(self):
        """scipy's ``status``: 0 converged, 1 iteration or evaluation limit, 2 otherwise."""
        if self.converged:
            return 0
        if self.nfev > self.maxfun or self.nit >= self.maxiter:
            return 1
        return 2

    @property
    def message(self):
        """scipy's message, e.g. ``"CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL"``."""
        return _messages(self.task)

    # ------------------------------------------------------------------ state
    def state(self):
        """Copy of the whole state (dict of numpy arrays, see :data:`STATE_ARRAYS`)."""
        out = {k: np.array(getattr(self, k), copy=True)
               for k in ("x", "f", "g", "wa", "iwa", "task", "ln_task", "lsave", "isave", "dsave",
                         "last_g", "last_f")}
        out["counters"] = np.array([self.m, self.maxiter, self.maxfun, self.maxls, self.nit,
                                    self.nfev, int(self.done), int(self.wants_evaluation),
                                    int(self._pending)], dtype=np.int64)
        out["tolerances"] = np.array([self.factr, self.pgtol], dtype=np.float64)
        out["bounds"] = np.stack([np.where(self._nbd % 3 >= 1, self._low, -np.inf),
                                  np.where(self._nbd >= 2, self._up, np.inf)])
        return out

    @classmethod
    def from_state(cls, state):
        """Continue a run saved with :meth:`state`.

        Parameters
        ----------
        state : dict
            As returned by :meth:`state` (e.g. read back from a checkpoint).

        Returns
        -------
        LbfgsbRun
        """
        self = cls.__new__(cls)
        c = [int(v) for v in np.asarray(state["counters"])]
        self.m, self.maxiter, self.maxfun, self.maxls, self.nit, self.nfev = c[:6]
        self.done, self.wants_evaluation, self._pending = bool(c[6]), bool(c[7]), bool(c[8])
        self.factr, self.pgtol = (float(v) for v in np.asarray(state["tolerances"]))
        dtypes = {"x": np.float64, "f": np.float64, "g": np.float64, "wa": np.float64,
                  "iwa": np.int32, "task": np.int32, "ln_task": np.int32, "lsave": np.int32,
                  "isave": np.int32, "dsave": np.float64, "last_g": np.float64,
                  "last_f": np.float64}
        for k, dt in dtypes.items():
            setattr(self, k, np.array(state[k], dtype=dt, copy=True))
        self.f = np.array(float(self.f), dtype=np.float64)
        n = self.x.size
        if self.g.size != n or self.wa.size != 2 * self.m * n + 5 * n + 11 * self.m ** 2 + 8 * self.m:
            raise ValueError("inconsistent L-BFGS-B state")
        if "bounds" in state:
            b = np.asarray(state["bounds"], dtype=np.float64)
            self._low, self._up, self._nbd = _bound_arrays(b[0], b[1])
        else:                                        # states written before bounds existed
            self._low, self._up, self._nbd = _bound_arrays(np.full(n, -np.inf), np.full(n, np.inf))
        self.new_iteration = False
        return self
