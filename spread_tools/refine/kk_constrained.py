"""The KK-constrained S1 mode: f″ is refined, f′ is its exact Kramers–Kronig partner.

``restraints.kramers_kronig.use=True restraints.kramers_kronig.mode=constrained``.
Per refined site s the global parameters are f″ on a grid x_0 … x_N
(``restraints.kramers_kronig.fdp_step_ev``, default ``grid.step_ev``; it may be finer
than the spectrum channels) and, with ``restraints.kramers_kronig.offset`` (default),
one constant c_s. At every channel energy E_c::

    f″_s(E_c) = b0(E_c) + B(E_c) u_s,      f′_s(E_c) = a0(E_c) + A(E_c) u_s + c_s

with (A, a0, B, b0) the exact operator of :class:`spread_tools.physics.kk_reference.WindowKK`:
f″ linear between the grid nodes, the element's self-consistent reference beyond them
(joined by linear ramps over ``restraints.kramers_kronig.pad`` eV), f′ = KK[f″] + the
reference's constant. f′ and f″ are consistent by construction and the parameter count is
about half that of the penalty form.

Implementation: the map from θ = (u, c) to the channel values is affine, so the problem is
the ordinary :class:`spread_tools.refine.objective.S1Problem` with its grid on the channel
energies (interpolation matrix = identity) composed with that map ``x_S1 = T θ + t0``:
gradients are ``Tᵀ ∂f/∂x_S1`` (chain rule), the profiled Fisher information is
``Tᵀ F T`` (profiling the local parameters commutes with a linear map of the global ones),
and the reported curves on the f″ grid with their covariance are ``J cov_θ Jᵀ``.
Restraints: the Sauter f″ term(s) (``restraints.fdp.mean/sigma/edge_sigma``) act on the f″ grid with σ
scaled by sqrt(step / grid.step_ev) and the mean by step / grid.step_ev (the same prior per
``grid.step_ev`` as the ordinary mode); f′ terms do not apply (f′ is not a parameter).

Parameter layout of ``x``: ``[u (n_ref, n_fdp) site-major, c (n_ref) if offset, g (n_lat),
b (n_sb, 3)]``.
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError
from spread_tools.refine.grid import energy_grid
from spread_tools.refine.objective import S1Problem
from spread_tools.refine.restraints import FlatLayout, RestraintSum, reference_edges_on_grid, sauter_terms

__all__ = ["KKConstrainedProblem", "make_problem"]


class _ConstrainedRestraints(RestraintSum):
    """The Sauter f″ term on the f″ grid; names and log lines say that f′ is constrained."""

    def __init__(self, terms, layout, operator_lines):
        super().__init__(terms, layout)
        self.operator_lines = operator_lines

    @property
    def active(self):
        return super().active + ["kk_constrained"]

    def describe(self):
        return ([t.describe() for t in self.terms]
                + [f"kk_constrained: {line}" for line in self.operator_lines])


class KKConstrainedProblem:
    """S1 with f″ parameters only and f′ = KK[f″] (+ a constant per site).

    Parameters
    ----------
    prepared, cache, cfg, comm, backend
        As for :class:`spread_tools.refine.objective.S1Problem`.

    Notes
    -----
    Attributes not defined here (``pm``, ``cache``, ``site_names``, ``channel_ev``,
    ``n_ref``, ``comm`` …) are those of the inner :class:`S1Problem` (attribute ``inner``),
    whose grid is the channel energies.
    """

    def __init__(self, prepared, cache, cfg, comm=None, backend=None):
        from spread_tools.physics.kk_reference import WindowKK, reference_curve
        ds = prepared.ds
        channel_ev = np.asarray(ds.energy_ev, dtype=np.float64)
        kk = cfg.restraints.kramers_kronig
        base_step = float(cfg.grid.step_ev)
        step = base_step if kk.fdp_step_ev is None else float(kk.fdp_step_ev)
        if not (np.isfinite(step) and step > 0):
            raise InputError(f"parameter restraints.kramers_kronig.fdp_step_ev: must be > 0 eV, "
                             f"got {kk.fdp_step_ev}")
        self.grid_ev = energy_grid(channel_ev, ds.spectrum_weight, step, cfg.grid.min_ev,
                                   cfg.grid.max_ev)
        self.fdp_step_ev = step
        self.inner = S1Problem(prepared, cache, cfg, comm, backend=backend, grid_ev=channel_ev)
        inn = self.inner
        self.n_grid = self.grid_ev.size
        self.offset = bool(kk.offset)
        pad = float(kk.pad)
        refs, ops = {}, {}
        for el in inn.site_elements:
            if el not in ops:
                refs[el] = reference_curve(el, cfg.reference)
                try:
                    ops[el] = WindowKK(self.grid_ev, refs[el], pad)
                except InputError as exc:
                    raise InputError(f"parameter restraints.kramers_kronig.pad: {exc}") from None
        mats = {}
        for el, op in ops.items():
            Ac, a0c = op.fp_operator(channel_ev)
            Bc, b0c = op.fdp_operator(channel_ev)
            Ao, a0o = op.fp_operator(self.grid_ev)
            mats[el] = (Ac, a0c, Bc, b0c, Ao, a0o)
        self._mats = [mats[el] for el in inn.site_elements]
        self.operators = [ops[el] for el in inn.site_elements]
        n_ref, ng, nc = inn.n_ref, self.n_grid, channel_ev.size
        self.n_off = n_ref if self.offset else 0
        self.n_glob = n_ref * ng + self.n_off
        self.n_x = self.n_glob + inn.n_lat + 3 * inn.n_sb
        # T: d(x_S1 global)/d(theta), dense (2 n_ref nc, n_glob), and t0
        T = np.zeros((inn.n_glob, self.n_glob))
        t0 = np.zeros(inn.n_glob)
        for s, (Ac, a0c, Bc, b0c, _, _) in enumerate(self._mats):
            rp = slice(s * nc, (s + 1) * nc)
            rd = slice((n_ref + s) * nc, (n_ref + s + 1) * nc)
            cols = slice(s * ng, (s + 1) * ng)
            T[rp, cols] = Ac
            T[rd, cols] = Bc
            t0[rp] = a0c
            t0[rd] = b0c
            if self.offset:
                T[rp, n_ref * ng + s] = 1.0
        self.T, self.t0 = T, t0
        layout = FlatLayout(n_ref, ng, kinds=("fdp",), n_other=self.n_off)
        terms = []
        rf = cfg.restraints.fdp
        if rf.mean is not None:
            scale = step / base_step
            edge_sigma = None if rf.edge_sigma is None else float(rf.edge_sigma) * np.sqrt(scale)
            edges = None if edge_sigma is None else \
                reference_edges_on_grid(self.grid_ev, inn.site_elements, cfg.reference)
            terms += sauter_terms("fdp", float(rf.mean) * scale, float(rf.sigma) * np.sqrt(scale),
                                  edge_sigma, layout, self.grid_ev, edges)
        lines = [ops[el].describe() for el in dict.fromkeys(inn.site_elements)]
        lines.append(f"{n_ref} x {ng} f'' parameters (step {step:g} eV)"
                     + (f" + {n_ref} f' offsets" if self.offset else "")
                     + f"; f' at the {nc} channels from KK, f' terms (restraints.fp) do not apply")
        self.restraints = _ConstrainedRestraints(terms, layout, lines)
        self._H = None

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ maps
    def to_inner(self, x):
        """The inner S1 vector ``[fp_chan, fdp_chan, g, b]`` of ``x``."""
        x = np.asarray(x, dtype=np.float64)
        return np.concatenate([self.T @ x[:self.n_glob] + self.t0, x[self.n_glob:]])

    def local_slices(self, rank=None):
        """Index arrays into ``x`` of a rank's g and b entries."""
        return self.inner.local_slices(rank) - self.inner.n_glob + self.n_glob

    def split(self, x):
        """(fp, fdp) on the f″ grid (n_ref, n_grid), g (n_lat,), b (n_sb, 3) of ``x``."""
        fp, fdp = self.curves(x)
        _, _, g, b = self.inner.split(self.to_inner(x))
        return fp, fdp, g, b

    def curves(self, x):
        """f′, f″ on the f″ grid (n_ref, n_grid) from ``x``."""
        ng, n_ref = self.n_grid, self.inner.n_ref
        u = np.asarray(x[:n_ref * ng], dtype=np.float64).reshape(n_ref, ng)
        fp = np.empty_like(u)
        for s, m in enumerate(self._mats):
            fp[s] = m[4] @ u[s] + m[5] + (x[n_ref * ng + s] if self.offset else 0.0)
        return fp, u.copy()

    def curve_jacobian(self):
        """J = ∂(fp (site-major), fdp (site-major)) on the f″ grid / ∂θ, (2 n_ref n_grid, n_glob)."""
        ng, n_ref = self.n_grid, self.inner.n_ref
        J = np.zeros((2 * n_ref * ng, self.n_glob))
        for s, m in enumerate(self._mats):
            J[s * ng:(s + 1) * ng, s * ng:(s + 1) * ng] = m[4]
            J[(n_ref + s) * ng:(n_ref + s + 1) * ng, s * ng:(s + 1) * ng] = np.eye(ng)
            if self.offset:
                J[s * ng:(s + 1) * ng, n_ref * ng + s] = 1.0
        return J

    def curves_and_covariance(self, x, cov):
        """f′, f″ on the f″ grid and their covariance (fp all sites, then fdp), from cov_θ."""
        fp, fdp = self.curves(x)
        J = self.curve_jacobian()
        return fp, fdp, J @ cov @ J.T

    def local_bounds(self):
        """Bounds of every entry of ``x``: θ free, the locals as in the inner problem."""
        lo_i, hi_i = self.inner.local_bounds()
        lo = np.full(self.n_x, -np.inf)
        hi = np.full(self.n_x, np.inf)
        lo[self.n_glob:] = lo_i[self.inner.n_glob:]
        hi[self.n_glob:] = hi_i[self.inner.n_glob:]
        return lo, hi

    def refit_locals(self, x):
        """This rank's g and b refitted exactly at the curves of ``x`` (the inner problem's fit)."""
        return self.inner.refit_locals(self.to_inner(x))

    # ------------------------------------------------------------------ evaluation
    def local_objective(self, x):
        """This rank's data term; gradients with respect to θ (global) and the local block."""
        f, gg, gl = self.inner.local_objective(self.to_inner(x))
        return f, self.T.T @ gg, gl

    def evaluate(self, x):
        """Full objective and gradient at ``x`` (single rank)."""
        if self.inner.comm.size != 1:
            raise RuntimeError("KKConstrainedProblem.evaluate is for single-rank use")
        f, gg, gl = self.local_objective(x)
        fr, gr = self.restraint_terms(x)
        return f + fr, np.concatenate([gg + gr, gl])

    def restraint_terms(self, x):
        """Restraint loss and gradient over the θ block (rank 0 adds them)."""
        f, g = self.restraints(np.asarray(x[:self.n_glob], dtype=np.float64))
        return float(f), g

    def restraint_hessian(self, x):
        """Exact Hessian of the restraints over θ."""
        if self._H is None:
            self._H = self.restraints.hessian()
        return self._H.copy()

    def local_fisher(self, x, **kw):
        """(Tᵀ F_prof T, its diagonal, local diagonal) of this rank (see the module notes).

        The global diagonal returned is that of the *profiled* information in θ (the inner
        problem only has the diagonal of the unprofiled one in its own parameters); it
        serves the preconditioner.
        """
        F, _, dloc = self.inner.local_fisher(self.to_inner(x), **kw)
        Ft = self.T.T @ F @ self.T
        Ft = 0.5 * (Ft + Ft.T)
        return Ft, np.diag(Ft).copy(), dloc

    def local_geometry_information(self, x, profile):
        """Tᵀ ΔF T of the inner problem's crystal-model correction (see ``local_fisher``)."""
        dF, worst = self.inner.local_geometry_information(self.to_inner(x), profile)
        dFt = self.T.T @ dF @ self.T
        return 0.5 * (dFt + dFt.T), worst

    def predicted(self, x):
        """λ of this rank's pixels at ``x``."""
        return self.inner.predicted(self.to_inner(x))

    def start_vector(self, start_curves=None):
        """Start θ (f″ of the reference or of ``start_curves`` on the f″ grid, offsets from
        the start f′) and this rank's g, b (the inner problem's start at those curves)."""
        from spread_tools.physics.kk_reference import reference_curve
        inn = self.inner
        n_ref = inn.n_ref
        if start_curves is None:
            u = np.array([reference_curve(el, inn.cfg.reference).fdp(self.grid_ev)
                          for el in inn.site_elements])
            c = np.zeros(n_ref)
        else:
            fp0, u = (np.asarray(a, dtype=np.float64) for a in start_curves)
            c = np.array([np.mean(fp0[s] - (m[4] @ u[s] + m[5])) for s, m in enumerate(self._mats)])
        theta = np.concatenate([u.ravel(), c if self.offset else np.zeros(0)])
        xin = self.T @ theta + self.t0
        nc = inn.channel_ev.size
        fp_c = xin[:n_ref * nc].reshape(n_ref, nc)
        fdp_c = xin[n_ref * nc:].reshape(n_ref, nc)
        _, loc = inn.start_vector((fp_c, fdp_c))
        return theta, loc


def make_problem(prepared, cache, cfg, comm=None, backend=None):
    """The S1 problem a configuration asks for: :class:`KKConstrainedProblem` in the
    KK-constrained mode, else :class:`spread_tools.refine.objective.S1Problem`."""
    from spread_tools.refine.restraints import kk_mode
    if kk_mode(cfg) == "constrained":
        return KKConstrainedProblem(prepared, cache, cfg, comm, backend=backend)
    return S1Problem(prepared, cache, cfg, comm, backend=backend)
