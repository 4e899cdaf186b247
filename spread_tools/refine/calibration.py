"""Standard uncertainties that include the bias of the restraints (refine_fdp's default σ).

Why
---
The covariance ``(F + H)⁻¹`` (F: Fisher information of the data with the scales and
backgrounds profiled out; H: the restraints' Hessian) treats the restraints as
information. It is the right error only when the true curve is as smooth as the
restraints say. At the edge it is not (f′ of Fe falls by 3 e⁻ within 20 eV), so where
the data are weak the restraints pull the result away from the truth by more than σ:
on the embedded 40-lattice example the errors were 1.8σ rms (``benchmarks/sigma_calibration.py``:
Poisson replicates show that the noise part of σ is right — the scatter is 0.6–0.9 of σ — and
that the noise-free result is off by 1.2–2.0σ: the error is the restraints' bias).

What
----
In the Gauss–Newton (linear) model of the objective around the solution x̂::

    data:       ½ (x − x_d)ᵀ F (x − x_d),        F x_d = F x̂ + ∇R(x̂)
    restraint:  R_j(x) = ½ xᵀ H_j x − b_jᵀ x + c_j,  b_j = H_j x̂ − ∇R_j(x̂)

1. The scale τ_j of every Sauter (smoothness) term is estimated from the data by
   type-II maximum likelihood (EM: τ_j² = (2 R_j(x_τ) + tr(H_j Σ_τ)) / rank(H_j), with
   x_τ, Σ_τ the solution and covariance of the linear model with the term divided by
   τ_j²): how much rougher the curve is than the restraint assumes. Kramers–Kronig terms
   (physics, not a smoothness guess) keep τ = 1.
2. The restraints' pull on the result, ``b = (F + H)⁻¹ ∇R(x_τ)``, is evaluated at x_τ,
   the curve those data-scaled restraints give (less smoothed than x̂, so closer to the
   truth where it is sharp).
3. The reported covariance is ``(F + H)⁻¹ + b bᵀ``: noise plus the systematic shift (a
   rank-one term, so that the edge position and other derived values carry it too).

The estimate x̂ itself is unchanged. Where the data dominate (F ≫ H) the pull vanishes
and σ is the posterior σ; where the restraints dominate σ grows by the pull. On Poisson
replicates of simulated data (``benchmarks/sigma_calibration.py``) the rms of
(refined − truth)/σ over 7090–7150 eV is 1.05 at 40 lattices and 0.84 at 400 lattices
with the default Sauter restraints and 0.87 at 40 lattices with the KK restraint (it was
1.77, 1.11 and 1.33 with the posterior σ). When the restraints supply nearly all the
information σ stays somewhat small (a linear toy with 10× too stiff restraints: 3.2 → 1.4,
``tests/refine/test_calibration.py``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RestraintPart", "restraint_parts", "calibrated_covariance"]


class RestraintPart:
    """One restraint term at a point: value, gradient and (exact) Hessian over the global block.

    Attributes
    ----------
    name : str
    f : float
    grad : array (n_glob,)
    hess : array (n_glob, n_glob)
    rank : int
        Number of independent residuals (rank of ``hess``).
    scalable : bool
        Whether the term is a smoothness assumption whose scale is estimated (Sauter).
    """

    def __init__(self, name, f, grad, hess, scalable):
        self.name = name
        self.f = float(f)
        self.grad = np.asarray(grad, dtype=np.float64)
        self.hess = 0.5 * (np.asarray(hess, dtype=np.float64) + np.asarray(hess, dtype=np.float64).T)
        scale = float(np.abs(self.hess).max(initial=0.0))
        self.rank = int(np.linalg.matrix_rank(self.hess, tol=1e-9 * scale)) if scale > 0 else 0
        self.scalable = bool(scalable)


def restraint_parts(problem, x):
    """The active restraint terms of an :class:`~spread_tools.refine.objective.S1Problem` at ``x``.

    Parameters
    ----------
    problem : S1Problem
    x : array (n_x,) or (n_glob,)

    Returns
    -------
    list of RestraintPart
    """
    from spread_tools.refine.restraints import SauterRestraint
    xg = np.asarray(x[:problem.n_glob], dtype=np.float64)

    def fg(term, v):
        # the flat interface: the term's layout is the leading part of the global parameters
        m = term.layout.size
        f, g1 = term(v[:m])
        return float(f), np.concatenate([np.asarray(g1, np.float64), np.zeros(len(v) - m)])

    parts = []
    for term in problem.restraints.terms:
        f0, g0 = fg(term, xg)
        H = np.empty((problem.n_glob, problem.n_glob))
        for i in range(problem.n_glob):           # exact: the terms are quadratic
            v = xg.copy()
            v[i] += 1.0
            H[:, i] = fg(term, v)[1] - g0
        name = getattr(term, "name", None) or {"KramersKronigRestraint": "kramers_kronig"}.get(
            type(term).__name__, type(term).__name__)
        parts.append(RestraintPart(name, f0, g0, H, isinstance(term, SauterRestraint)))
    return parts


def _pinv(A):
    w, V = np.linalg.eigh(0.5 * (A + A.T))
    tol = max(float(w.max(initial=0.0)), 0.0) * 1e-13
    inv = np.where(w > tol, 1.0 / np.where(w > tol, w, 1.0), 0.0)
    return (V * inv) @ V.T


def calibrated_covariance(F_data, parts, x_glob, cov_posterior, max_iter=300, tol=1e-5,
                          tau_range=(1e-2, 1e2)):
    """Covariance of the global parameters including the restraints' bias (module docstring).

    Parameters
    ----------
    F_data : array (n_glob, n_glob)
        Fisher information of the data (local parameters profiled out), restraints excluded.
    parts : list of RestraintPart
        The restraint terms at ``x_glob`` (:func:`restraint_parts`).
    x_glob : array (n_glob,)
        The solution.
    cov_posterior : array (n_glob, n_glob)
        ``(F_data + Σ H_j)⁻¹`` as reported before (NaN rows where undetermined).
    max_iter, tol : EM iterations and relative tolerance on τ².
    tau_range : (float, float)
        Bounds of the estimated scales.

    Returns
    -------
    dict
        ``covariance`` (n_glob, n_glob), ``pull`` (n_glob,), ``tau`` (one per part; 1 for
        the fixed ones), ``iterations``, ``x_scaled`` (x_τ).
    """
    x = np.asarray(x_glob, dtype=np.float64)
    F = 0.5 * (np.asarray(F_data, dtype=np.float64) + np.asarray(F_data, dtype=np.float64).T)
    if not parts:
        return {"covariance": np.array(cov_posterior, copy=True), "pull": np.zeros_like(x),
                "tau": [], "iterations": 0, "x_scaled": x.copy()}
    H = sum(p.hess for p in parts)
    grad = sum(p.grad for p in parts)
    c = F @ x + grad                                   # = F x_d
    bs = [p.hess @ x - p.grad for p in parts]
    consts = [p.f - 0.5 * x @ p.hess @ x + b @ x for p, b in zip(parts, bs)]
    tau2 = np.ones(len(parts))
    lo, hi = tau_range[0] ** 2, tau_range[1] ** 2

    def solve(t2):
        P = F + sum(p.hess / t for p, t in zip(parts, t2))
        S = _pinv(P)
        return S @ (c + sum(b / t for b, t in zip(bs, t2))), S

    it = 0
    if any(p.scalable and p.rank > 0 for p in parts):
        for it in range(1, max_iter + 1):
            xt, S = solve(tau2)
            new = tau2.copy()
            for j, (p, b, cj) in enumerate(zip(parts, bs, consts)):
                if p.scalable and p.rank > 0:
                    two_r = xt @ p.hess @ xt - 2 * b @ xt + 2 * cj
                    new[j] = np.clip((two_r + np.sum(p.hess * S)) / p.rank, lo, hi)
            done = np.max(np.abs(np.log(new / tau2))) < tol
            tau2 = new
            if done:
                break
    xt, _ = solve(tau2)
    grad_t = sum(p.hess @ xt - b for p, b in zip(parts, bs))
    A = _pinv(F + H)
    pull = A @ grad_t
    cov = np.asarray(cov_posterior, dtype=np.float64) + np.outer(pull, pull)
    return {"covariance": cov, "pull": pull, "tau": [float(np.sqrt(t)) for t in tau2],
            "iterations": it, "x_scaled": xt}
