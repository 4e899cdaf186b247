"""What rank 0's optimizer talks to: collective evaluation commands and scaled variables.

:class:`_Driver` runs the collective commands (objective + gradient, Fisher diagonal,
profiled Fisher information, start vector) over the ranks: rank 0 broadcasts a command
and ``x``, the other ranks serve them, partial sums are added in rank order.
:class:`_Preconditioner` maps ``x`` to the optimizer's variables in units of their
standard uncertainty (see :mod:`spread_tools.refine.s1`, sections *Optimizer* and *MPI*).
"""

from __future__ import annotations

import numpy as np

__all__ = []


_CMD_STOP, _CMD_EVAL, _CMD_DIAG, _CMD_FISHER, _CMD_START, _CMD_LOCALS, _CMD_GEOMETRY = range(7)


class _Driver:
    """Collective operations; rank 0 calls them, the other ranks serve them in :meth:`serve`."""

    def __init__(self, problem):
        self.p = problem
        self.comm = problem.comm
        self.loc_counts = [len(problem.local_slices(r)) for r in range(self.comm.size)]
        self.loc_index = np.concatenate([problem.local_slices(r) for r in range(self.comm.size)]) \
            if self.comm.size > 1 else None
        self.n_eval = 0

    def _command(self, cmd, x=None):
        """Rank 0: announce a command (and broadcast x for the commands that take one)."""
        c = self.comm
        if c.size > 1:
            c.bcast_array([cmd], 1, np.int64)
        if cmd in (_CMD_EVAL, _CMD_DIAG, _CMD_FISHER, _CMD_LOCALS, _CMD_GEOMETRY):
            x = c.bcast_array(x, self.p.n_x)
        return x

    def _dispatch(self, cmd, x):
        p, c = self.p, self.comm
        if cmd == _CMD_EVAL:
            f, gg, gl = p.local_objective(x)
            tot = c.sum_in_order(np.concatenate([[f], gg]))
            loc = c.concat(gl, self.loc_counts)
            if c.rank != 0:
                return None
            grad = np.empty(p.n_x)
            grad[:p.n_glob] = tot[1:]
            self._scatter_local(grad, loc)
            fr, gr = p.restraint_terms(x)
            grad[:p.n_glob] += gr
            return tot[0] + fr, grad
        if cmd == _CMD_DIAG:
            _, dg, dl = p.local_fisher(x)
            tot = c.sum_in_order(dg)
            loc = c.concat(dl, self.loc_counts)
            if c.rank != 0:
                return None
            diag = np.empty(p.n_x - p.n_glob)
            full = np.empty(p.n_x)
            self._scatter_local(full, loc)
            diag[:] = full[p.n_glob:]
            Hg = np.diag(tot) + p.restraint_hessian(x)
            return Hg, diag
        if cmd == _CMD_FISHER:
            F = c.sum_in_order(p.local_fisher(x)[0].ravel())
            if c.rank != 0:
                return None
            return F.reshape(p.n_glob, p.n_glob) + p.restraint_hessian(x)
        if cmd == _CMD_GEOMETRY:
            # the crystal models' share of the information (refine.geometry_uncertainty)
            dF, worst = p.local_geometry_information(x, p.geometry_profile)
            tot = c.sum_in_order(dF.ravel())
            worst = c.concat(np.array([worst]), [1] * c.size)
            if c.rank != 0:
                return None
            return tot.reshape(p.n_glob, p.n_glob), float(np.max(worst))
        if cmd == _CMD_LOCALS:
            # every rank refits its own g and b exactly at x's curves (refine.local_fit)
            loc = c.concat(p.refit_locals(x), self.loc_counts)
            if c.rank != 0:
                return None
            out = np.array(x, dtype=np.float64)
            self._scatter_local(out, loc)
            return out
        if cmd == _CMD_START:
            glob, loc = p.start_vector(x)
            loc = c.concat(loc, self.loc_counts)
            if c.rank != 0:
                return None
            out = np.empty(p.n_x)
            out[:p.n_glob] = glob
            self._scatter_local(out, loc)
            return out
        raise RuntimeError(f"unknown command {cmd}")

    def _scatter_local(self, full, loc):
        p = self.p
        if self.comm.size == 1:
            full[p.n_glob:] = loc
        else:
            full[self.loc_index] = loc

    def call(self, cmd, x):
        """Run a collective command (EVAL, DIAG, FISHER, LOCALS, GEOMETRY) from rank 0."""
        x = self._command(cmd, x)
        if cmd == _CMD_EVAL:
            self.n_eval += 1
        return self._dispatch(cmd, x)

    def start(self, curves):
        """Start vector (collective; ``curves`` is the same on every rank)."""
        if self.comm.rank == 0:
            self._command(_CMD_START)
        return self._dispatch(_CMD_START, curves)

    def stop(self):
        """Release the serving ranks."""
        if self.comm.size > 1 and self.comm.rank == 0:
            self._command(_CMD_STOP)

    def serve(self, curves=None):
        """Loop of the ranks > 0: execute rank 0's commands until told to stop."""
        c = self.comm
        while True:
            cmd = int(c.bcast_array(None, 1, np.int64)[0])
            if cmd == _CMD_STOP:
                return
            if cmd == _CMD_START:
                self._dispatch(cmd, curves)
                continue
            x = c.bcast_array(None, self.p.n_x)
            self._dispatch(cmd, x)


class _Preconditioner:
    """Variables z of the optimizer: x_glob = L⁻ᵀ z_glob (H_glob = L Lᵀ), x_loc = z_loc / sqrt(diag).

    ``H_glob`` is the Fisher diagonal of the global parameters plus the restraints' full
    (exact) Hessian, so stiff restraints such as Kramers-Kronig are whitened exactly.
    """

    def __init__(self, H_glob, diag_loc, n_glob):
        import scipy.linalg
        self.n_glob = n_glob
        H = 0.5 * (H_glob + H_glob.T)
        d = np.diag(H).copy()
        ridge = 1e-10 * max(float(d.max(initial=0.0)), 1e-300)
        H = H + np.diag(np.where(d > ridge, 0.0, 1.0) + ridge)   # no information: unit scale
        self.L = scipy.linalg.cholesky(H, lower=True)
        self.s = 1.0 / np.sqrt(np.where(diag_loc > 0, diag_loc, 1.0))
        self._solve = scipy.linalg.solve_triangular

    def to_x(self, z):
        x = np.empty_like(z)
        x[:self.n_glob] = self._solve(self.L, z[:self.n_glob], lower=True, trans="T")
        x[self.n_glob:] = z[self.n_glob:] * self.s
        return x

    def to_z(self, x):
        z = np.empty_like(x)
        z[:self.n_glob] = self.L.T @ x[:self.n_glob]
        z[self.n_glob:] = x[self.n_glob:] / self.s
        return z

    def grad_z(self, g):
        out = np.empty_like(g)
        out[:self.n_glob] = self._solve(self.L, g[:self.n_glob], lower=True)
        out[self.n_glob:] = g[self.n_glob:] * self.s
        return out
