"""Restraints on the refined scattering factors f′, f″ of every site.

Parameters are ``fp``, ``fdp``: arrays of shape (n_site, n_grid) on the
energy grid ``energy_ev`` (n_grid,). Every restraint is a callable
``(fp, fdp) -> (f, g_fp, g_fdp)``: the loss and its gradient with respect to
every parameter (arrays shaped like ``fp`` and ``fdp``).

Sauter (2020) adjacent-difference restraint, on f′ and on f″ separately::

    f = Σ_s Σ_{k>=1} (u_sk − u_s,k−1 − mean)² / (2 σ²)

(``restraints.fp.mean/sigma``, ``restraints.fdp.mean/sigma``; ``mean=None``
switches that term off).

Kramers–Kronig restraint, differential form against a smooth reference
(``restraints.kramers_kronig.use/pad/weight``)::

    Δf′ = f′ − f′_ref,  Δf″ = f″ − f″_ref   (reference of the site's element at the grid)
    r_s = Δf′_s − K Δf″_s,      f = weight · Σ_s Σ_k r_sk²

K = :func:`spread_tools.physics.kk.padded_kk_matrix` (n_grid × n_grid), computed
once per grid: Δf″ is piecewise linear on the grid, continued beyond each end
of the refined window by a linear ramp to zero over ``pad`` eV, and zero
beyond. The reference carries everything outside the window (the far tails
of f″ cancel in the difference), so the restraint only asks that the
*change* from the free-atom curve be KK-consistent. The reference comes from
:func:`spread_tools.physics.scattering.reference_fp_fdp` (Chantler tables) unless
given as arrays.

Defaults (:data:`RESTRAINT_SCHEMA`): f′ Sauter on (mean 0, σ 0.2 e⁻), f″ Sauter on
(mean 0, σ 0.3 e⁻), KK off. The reference LY99 S1 run used σ 0.04 and 0.08 e⁻
(f″ mean 0.03); on simulated data of 400–1600 lattices those stiffer values flatten
the f′ dip and give errors 5–10× the reported σ, while 0.2/0.3 give errors about
equal to σ (``benchmarks/recovery_sweep.py``). The reference KK run is
``restraints.fdp.mean=None restraints.kramers_kronig.use=True`` (pad 100 eV and
weight 1e5 e⁻⁻² are the defaults).
"""

from __future__ import annotations

import numpy as np

from spread_tools.config import P
from spread_tools.errors import InputError
from spread_tools.physics.kk import check_grid, padded_kk_matrix

__all__ = ["RESTRAINT_SCHEMA", "sauter_difference", "SauterRestraint", "KramersKronigRestraint",
           "Restraints", "build_restraints", "active_terms"]

RESTRAINT_SCHEMA = {
    "fp": {
        "mean": P(0.0, "Sauter restraint on f': expected difference between adjacent grid "
                  "points", units="e-", type=float, optional=True),
        "sigma": P(0.2, "Sauter restraint on f': sigma of the adjacent difference (the reference "
                   "S1 run used 0.04)", units="e-"),
    },
    "fdp": {
        "mean": P(0.0, "Sauter restraint on f'': expected difference between adjacent grid "
                  "points (the reference S1 run used 0.03; None for the KK run)", units="e-", type=float,
                  optional=True),
        "sigma": P(0.3, "Sauter restraint on f'': sigma of the adjacent difference (the reference "
                   "S1 run used 0.08)", units="e-"),
    },
    "kramers_kronig": {
        "use": P(False, "Kramers-Kronig restraint between f' and f'' (differential form against "
                 "the element's Chantler reference); the reference KK run used it with "
                 "restraints.fdp.mean=None"),
        "pad": P(100.0, "delta-f'' is ramped linearly to zero over this many eV beyond each end "
                 "of the refined grid", units="eV"),
        "weight": P(1e5, "weight w of w * sum (delta-f' - K delta-f'')^2", units="e-^-2"),
    },
}


def _check_pair(fp, fdp, n_grid=None, n_site=None):
    fp = np.asarray(fp, dtype=np.float64)
    fdp = np.asarray(fdp, dtype=np.float64)
    if fp.ndim != 2 or fp.shape != fdp.shape:
        raise InputError(f"restraints: fp and fdp must both have shape (n_site, n_grid), got "
                         f"{fp.shape} and {fdp.shape}")
    if n_grid is not None and fp.shape[1] != n_grid:
        raise InputError(f"restraints: fp/fdp have {fp.shape[1]} grid points, the energy grid "
                         f"has {n_grid}")
    if n_site is not None and fp.shape[0] != n_site:
        raise InputError(f"restraints: fp/fdp have {fp.shape[0]} sites, expected {n_site}")
    for name, a in (("fp", fp), ("fdp", fdp)):
        if not np.all(np.isfinite(a)):
            raise InputError(f"restraints: {name} contains NaN or inf")
    return fp, fdp


def _check_sigma(key, sigma):
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"parameter {key}: expected a number, got {sigma!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"parameter {key}: must be > 0, got {sigma!r}")
    return s


def sauter_difference(u, mean, sigma):
    """Sauter (2020) adjacent-difference restraint on one kind of parameter.

    Parameters
    ----------
    u : numpy.ndarray
        Values, shape (n_site, n_grid) (or (n_grid,)).
    mean : float
        Expected difference u_k − u_{k−1} (e⁻).
    sigma : float
        Its standard deviation (e⁻), > 0.

    Returns
    -------
    f : float
        Σ (u_k − u_{k−1} − mean)² / (2σ²) over sites and k.
    g : numpy.ndarray
        ∂f/∂u, shape of ``u``.
    """
    sigma = _check_sigma("sigma", sigma)
    u = np.asarray(u, dtype=np.float64)
    d = np.diff(u, axis=-1) - float(mean)
    f = float(np.sum(d * d)) / (2.0 * sigma * sigma)
    w = d / (sigma * sigma)
    g = np.zeros_like(u)
    g[..., 1:] += w
    g[..., :-1] -= w
    return f, g


class SauterRestraint:
    """Sauter adjacent-difference restraint on ``fp`` or ``fdp``.

    Parameters
    ----------
    which : str
        ``"fp"`` or ``"fdp"``.
    mean : float
        Expected adjacent difference (e⁻).
    sigma : float
        Its standard deviation (e⁻), > 0.
    """

    def __init__(self, which, mean, sigma):
        if which not in ("fp", "fdp"):
            raise ValueError(which)
        self.which = which
        self.name = f"sauter_{which}"
        self.mean = float(mean)
        self.sigma = _check_sigma(f"restraints.{which}.sigma", sigma)

    def __call__(self, fp, fdp):
        """Loss and gradients ``(f, g_fp, g_fdp)`` at ``fp``, ``fdp`` (n_site, n_grid)."""
        fp, fdp = _check_pair(fp, fdp)
        if fp.shape[1] < 2:
            return 0.0, np.zeros_like(fp), np.zeros_like(fdp)
        f, g = sauter_difference(fp if self.which == "fp" else fdp, self.mean, self.sigma)
        if self.which == "fp":
            return f, g, np.zeros_like(fdp)
        return f, np.zeros_like(fp), g

    def describe(self):
        """One line for logs."""
        return f"{self.name}: mean {self.mean:g} e-, sigma {self.sigma:g} e-"


class KramersKronigRestraint:
    """Differential Kramers–Kronig restraint ``w Σ (Δf′ − K Δf″)²``.

    Parameters
    ----------
    energy_ev : array_like
        Refinement grid (eV), strictly increasing, (n_grid,).
    fp_ref, fdp_ref : array_like
        Reference f′, f″ of each site at the grid, shape (n_site, n_grid).
    pad : float
        Ramp length (eV) of Δf″ beyond each end of the grid.
    weight : float
        w (e⁻⁻²), >= 0.
    """

    name = "kramers_kronig"

    def __init__(self, energy_ev, fp_ref, fdp_ref, pad=100.0, weight=1e5):
        self.energy_ev = check_grid(energy_ev, "energy_ev", allow_zero=False)
        n = self.energy_ev.size
        self.fp_ref, self.fdp_ref = _check_pair(np.atleast_2d(fp_ref), np.atleast_2d(fdp_ref), n)
        try:
            self.weight = float(weight)
        except (TypeError, ValueError):
            raise InputError(f"parameter restraints.kramers_kronig.weight: expected a number, "
                             f"got {weight!r}") from None
        if not np.isfinite(self.weight) or self.weight < 0:
            raise InputError(f"parameter restraints.kramers_kronig.weight: must be >= 0, got {weight!r}")
        try:
            self.pad = float(pad)
        except (TypeError, ValueError):
            raise InputError(f"parameter restraints.kramers_kronig.pad: expected a number, "
                             f"got {pad!r}") from None
        if not np.isfinite(self.pad) or self.pad <= 0:
            raise InputError(f"parameter restraints.kramers_kronig.pad: must be > 0 eV, got {pad!r}")
        try:
            self.K = padded_kk_matrix(self.energy_ev, self.pad)
        except InputError as exc:
            raise InputError(f"parameter restraints.kramers_kronig.pad: {exc}") from None

    def residual(self, fp, fdp):
        """r = Δf′ − K Δf″, shape (n_site, n_grid) (e⁻)."""
        fp, fdp = _check_pair(fp, fdp, self.energy_ev.size, self.fp_ref.shape[0])
        return (fp - self.fp_ref) - (fdp - self.fdp_ref) @ self.K.T

    def __call__(self, fp, fdp):
        """Loss and gradients ``(f, g_fp, g_fdp)`` at ``fp``, ``fdp`` (n_site, n_grid)."""
        r = self.residual(fp, fdp)
        f = self.weight * float(np.sum(r * r))
        g_fp = 2.0 * self.weight * r
        g_fdp = -2.0 * self.weight * (r @ self.K)
        return f, g_fp, g_fdp

    def describe(self):
        """One line for logs."""
        return (f"{self.name}: differential form against the reference, pad {self.pad:g} eV, "
                f"weight {self.weight:g}")


class Restraints:
    """Sum of the active restraint terms; call it as ``(fp, fdp) -> (f, g_fp, g_fdp)``.

    Parameters
    ----------
    terms : list
        Restraint callables with a ``name`` attribute.
    n_site, n_grid : int
        Expected parameter shape.
    """

    def __init__(self, terms, n_site, n_grid):
        self.terms = list(terms)
        self.n_site = int(n_site)
        self.n_grid = int(n_grid)

    @property
    def active(self):
        """Names of the active terms, e.g. ``["sauter_fp", "kramers_kronig"]``."""
        return [t.name for t in self.terms]

    def describe(self):
        """Lines for the log: one per active term, or ``"no restraints"``."""
        return [t.describe() for t in self.terms] or ["no restraints"]

    def evaluate(self, fp, fdp):
        """Total and per-term values.

        Returns
        -------
        f : float
        g_fp, g_fdp : numpy.ndarray
        per_term : dict
            Term name -> its loss (for logging).
        """
        fp, fdp = _check_pair(fp, fdp, self.n_grid, self.n_site)
        f = 0.0
        g_fp = np.zeros_like(fp)
        g_fdp = np.zeros_like(fdp)
        per_term = {}
        for t in self.terms:
            ft, gp, gd = t(fp, fdp)
            f += ft
            g_fp += gp
            g_fdp += gd
            per_term[t.name] = ft
        return f, g_fp, g_fdp, per_term

    def __call__(self, fp, fdp):
        """Total loss and gradients ``(f, g_fp, g_fdp)`` at ``fp``, ``fdp`` (n_site, n_grid)."""
        f, g_fp, g_fdp, _ = self.evaluate(fp, fdp)
        return f, g_fp, g_fdp


_MISSING = object()


def _section(cfg):
    """Getter ``get("fp.mean")`` on the ``restraints`` section of a Config or nested dict.

    A key that is absent (not a key set to ``None``) takes its schema default.
    """
    if isinstance(cfg, dict):
        node = cfg.get("restraints", cfg)
    else:
        node = getattr(cfg, "restraints", cfg)

    def get(path):
        cur = node
        for part in path.split("."):
            if isinstance(cur, dict):
                cur = cur.get(part, _MISSING)
            else:
                cur = getattr(cur, part, _MISSING)
            if cur is _MISSING:
                default = RESTRAINT_SCHEMA
                for p in path.split("."):
                    default = default[p]
                return default.default
        return cur
    return get


def active_terms(cfg):
    """Names of the restraint terms a configuration switches on (nothing is built).

    Parameters
    ----------
    cfg : spread_tools.config.Config or dict
        Configuration holding a ``restraints`` section (or the section itself).

    Returns
    -------
    list of str
        Subset of ``["sauter_fp", "sauter_fdp", "kramers_kronig"]`` in that order.
    """
    get = _section(cfg)
    names = []
    if get("fp.mean") is not None:
        names.append("sauter_fp")
    if get("fdp.mean") is not None:
        names.append("sauter_fdp")
    if bool(get("kramers_kronig.use")):
        names.append("kramers_kronig")
    return names


def build_restraints(cfg, energy_ev, site_elements, reference=None, reference_source="chantler"):
    """Compose the restraints a configuration switches on.

    Parameters
    ----------
    cfg : spread_tools.config.Config or dict
        Configuration with a ``restraints`` section (schema :data:`RESTRAINT_SCHEMA`),
        or that section itself.
    energy_ev : array_like
        Refinement grid (eV), strictly increasing, (n_grid,).
    site_elements : sequence of str
        Element of every site (n_site,), e.g. ``["Fe", "Fe"]``.
    reference : tuple of array_like, optional
        ``(fp_ref, fdp_ref)``, each (n_site, n_grid): the KK reference at the
        grid. Default: :func:`spread_tools.physics.scattering.reference_fp_fdp` of each
        site's element.
    reference_source : str
        Source passed to ``reference_fp_fdp`` (``"chantler"``).

    Returns
    -------
    Restraints
        Callable ``(fp, fdp) -> (f, g_fp, g_fdp)`` with ``.active`` and ``.describe()``.

    Raises
    ------
    InputError
        σ <= 0, pad <= 0, weight < 0, non-increasing grid, NaN, mismatched shapes.
    """
    energy = check_grid(energy_ev, "energy_ev", allow_zero=False)
    elements = [str(e) for e in site_elements]
    if not elements:
        raise InputError("restraints: no sites")
    n_site, n_grid = len(elements), energy.size
    get = _section(cfg)
    terms = []
    for which in ("fp", "fdp"):
        mean = get(f"{which}.mean")
        if mean is not None:
            terms.append(SauterRestraint(which, mean, _check_sigma(f"restraints.{which}.sigma",
                                                                   get(f"{which}.sigma"))))
    if bool(get("kramers_kronig.use")):
        if reference is None:
            from spread_tools.physics.scattering import reference_fp_fdp
            refs = [reference_fp_fdp(el, energy, source=reference_source) for el in elements]
            fp_ref = np.array([r[0] for r in refs])
            fdp_ref = np.array([r[1] for r in refs])
        else:
            try:
                fp_ref, fdp_ref = reference
            except (TypeError, ValueError):
                raise InputError("restraints: reference must be a pair (fp_ref, fdp_ref)") from None
            fp_ref = np.asarray(fp_ref, dtype=np.float64)
            fdp_ref = np.asarray(fdp_ref, dtype=np.float64)
            if fp_ref.ndim == 1:
                fp_ref = np.broadcast_to(fp_ref, (n_site, n_grid))
            if fdp_ref.ndim == 1:
                fdp_ref = np.broadcast_to(fdp_ref, (n_site, n_grid))
            if fp_ref.shape != (n_site, n_grid) or fdp_ref.shape != (n_site, n_grid):
                raise InputError(f"restraints: reference arrays must have shape ({n_site}, {n_grid}), "
                                 f"got {fp_ref.shape} and {fdp_ref.shape}")
        terms.append(KramersKronigRestraint(energy, fp_ref, fdp_ref,
                                            pad=get("kramers_kronig.pad"),
                                            weight=get("kramers_kronig.weight")))
    return Restraints(terms, n_site, n_grid)
