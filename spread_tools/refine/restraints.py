"""Restraints on the refined scattering factors f′, f″: functions ``x -> (f, g1)`` of a flat vector.

Every restraint is a callable of one flat parameter vector ``x`` (float64) returning
``(f, g1)``: the loss and its gradient with respect to every entry of ``x`` (a float64
array of ``len(x)``), so it plugs into any minimizer. Where f′ and f″ sit in ``x`` is a
:class:`FlatLayout`:

``order="kind_major"`` (the S1 objective's layout, :class:`spread_tools.refine.objective.S1Problem`)
    ``[f′ of site 0 on the grid, f′ of site 1, …, f″ of site 0, f″ of site 1, …, other]``
``order="site_major"``
    ``[f′ of site 0, f″ of site 0, f′ of site 1, f″ of site 1, …, other]``

``kinds=("fdp",)`` holds f″ only (the KK-constrained mode); ``n_other`` trailing entries
(scales, backgrounds, offsets …) are not restrained (zero gradient). Nothing here needs
the configuration system: plain arrays of energies and values, or a
:class:`spread_tools.physics.kk_reference.ReferenceCurve`, are enough.

Sauter (2020) adjacent-difference restraint, on f′ or f″ (:class:`SauterRestraint`)::

    f = Σ_s Σ_{k>=1} (u_sk − u_s,k−1 − mean)² / (2 σ²)

Kramers–Kronig restraint (:class:`KramersKronigRestraint`)::

    r_s = f′_s − (a0_s + A_s f″_s),     f = w Σ_s Σ_k (r_sk − r̄_s)²

(r̄_s the mean over the grid: with ``offset=True``, the default, a constant in f′ is free,
what the far tails and the relativistic term leave and what the window cannot tell; with
``offset=False`` r̄ = 0)

with ``(A_s, a0_s)`` the exact operator of
:class:`spread_tools.physics.kk_reference.WindowKK` at the grid nodes: f″ linear between
the nodes, the site element's self-consistent reference beyond the grid (joined by linear
ramps over ``pad`` eV), f′ = KK[f″] + the reference's constant. A curve whose f′ *is*
the KK transform of its f″ still leaves r ≠ 0 where its f″ is not linear between nodes
(a sharp edge on a 4 eV grid): :func:`spread_tools.physics.kk_reference.discretisation_floor`
measures that floor σ_floor for the grid and pad in use, and the default weight is
``w = 1 / (2 σ_floor²)`` (26 e⁻⁻² for Fe on a 4 eV grid, 950 on 1 eV); the
reference KK run's ``restraints.kramers_kronig.weight=1e5`` is one word away.

Example: fit one f′, f″ pair to noisy samples with scipy (any minimizer that takes
``jac=True`` works the same way):

>>> import numpy as np, scipy.optimize
>>> from spread_tools.refine.restraints import FlatLayout, SauterRestraint, RestraintSum
>>> e = np.arange(7070.0, 7171.0, 4.0)
>>> layout = FlatLayout(n_site=1, n_grid=e.size)            # [f' (26), f'' (26)]
>>> rng = np.random.default_rng(0)
>>> data = np.concatenate([-5 - 2 * np.exp(-((e - 7112) / 12) ** 2),     # f' then f''
...                        0.5 + 3 / (1 + np.exp(-(e - 7112) / 6))])
>>> noisy = data + rng.normal(scale=0.3, size=data.size)
>>> restraints = RestraintSum([SauterRestraint("fp", 0.0, 0.2, layout),
...                            SauterRestraint("fdp", 0.0, 0.3, layout)], layout)
>>> def objective(x):
...     f_r, g_r = restraints(x)                            # (f, g1), g1.shape == x.shape
...     resid = (x - noisy) / 0.3
...     return 0.5 * resid @ resid + f_r, resid / 0.3 + g_r
>>> fit = scipy.optimize.minimize(objective, noisy, jac=True, method="L-BFGS-B")
>>> rms = lambda v: float(np.sqrt(np.mean((v - data) ** 2)))
>>> bool(fit.success), rms(fit.x) < rms(noisy)               # smoother and closer to the truth
(True, True)

Defaults (:data:`RESTRAINT_SCHEMA`): f′ Sauter on (mean 0, σ 0.2 e⁻), f″ Sauter on
(mean 0, σ 0.3 e⁻), KK off. The reference LY99 S1 run used σ 0.04 and 0.08 e⁻
(f″ mean 0.03); on simulated data those stiffer values flatten the f′ dip and give
errors 5–10× the reported σ (``benchmarks/recovery_sweep.py``).
``restraints.fdp.edge_sigma`` / ``restraints.fp.edge_sigma`` (default None: off) give the
adjacent differences inside each site's edge region (its element's reference edge −10 to
+20 eV, :func:`edge_region_steps`) a σ of their own (:func:`sauter_terms`): a single σ
small enough to smooth the flat parts flattens the 3–4 e⁻ rise of f″, and at LY99 size
that bias is most of the f″ error (``benchmarks/RESULTS.md``). KK restraint:
``restraints.fdp.mean=None restraints.kramers_kronig.use=True``;
``restraints.kramers_kronig.mode=constrained`` refines f″ only and computes f′ from it
(:mod:`spread_tools.refine.kk_constrained`).
"""

from __future__ import annotations

import numpy as np

from spread_tools.config import P
from spread_tools.errors import InputError
from spread_tools.physics.kk import check_grid

__all__ = ["RESTRAINT_SCHEMA", "FlatLayout", "sauter_difference", "SauterRestraint",
           "KramersKronigRestraint", "RestraintSum", "Restraints", "build_restraints",
           "active_terms", "kk_weight_from_floor", "edge_region_steps", "sauter_terms",
           "reference_edges_on_grid"]

RESTRAINT_SCHEMA = {
    "fp": {
        "mean": P(0.0, "Sauter restraint on f': expected difference between adjacent grid "
                  "points", units="e-", type=float, optional=True),
        "sigma": P(0.2, "Sauter restraint on f': sigma of the adjacent difference (the reference "
                   "S1 run used 0.04)", units="e-"),
        "edge_sigma": P(None, "Sauter restraint on f': sigma of the adjacent differences inside "
                        "each site's edge region (its reference edge -10 to +20 eV, where f' dips "
                        "by several e-); None: restraints.fp.sigma there too", units="e-",
                        type=float, optional=True),
    },
    "fdp": {
        "mean": P(0.0, "Sauter restraint on f'': expected difference between adjacent grid "
                  "points (the reference S1 run used 0.03; None for the KK run)", units="e-", type=float,
                  optional=True),
        "sigma": P(0.3, "Sauter restraint on f'': sigma of the adjacent difference (the reference "
                   "S1 run used 0.08)", units="e-"),
        "edge_sigma": P(None, "Sauter restraint on f'': sigma of the adjacent differences inside "
                        "each site's edge region (its reference edge -10 to +20 eV, where f'' "
                        "rises by 3-4 e- within about 12 eV); None: restraints.fdp.sigma there too",
                        units="e-", type=float, optional=True),
    },
    "kramers_kronig": {
        "use": P(False, "tie f' to f'' by Kramers-Kronig (with the element's self-consistent "
                 "reference beyond the grid); the reference KK run used it with "
                 "restraints.fdp.mean=None"),
        "mode": P("restraint", "restraint: penalty w * sum (f' - KK[f''])^2 on the grid; "
                  "constrained: refine f'' only, f' = KK[f''] + constant exactly",
                  choices=("restraint", "constrained")),
        "pad": P(100.0, "f'' joins the reference over this many eV beyond each end of the "
                 "refined grid (linear ramp)", units="eV"),
        "weight": P(None, "restraint mode: weight w of w * sum (f' - KK[f''])^2; None: "
                    "1/(2 floor^2) with the discretisation floor of the grid in use (the "
                    "reference KK run used 1e5)", units="e-^-2", type=float),
        "fdp_step_ev": P(None, "constrained mode: step of the refined f'' grid (None: grid.step_ev); "
                         "restraints.fdp.sigma then applies per grid.step_ev, scaled by "
                         "sqrt(step/grid.step_ev)", units="eV", type=float),
        "offset": P(True, "a constant in f' of each site is free (what the far tails and the "
                    "relativistic term leave): the restraint acts on f' - KK[f''] less its mean; "
                    "the constrained mode refines the constant"),
    },
}

ORDERS = ("kind_major", "site_major")


class FlatLayout:
    """Where the f′ and f″ of every site sit in a flat parameter vector.

    Parameters
    ----------
    n_site : int
        Number of sites (curves of each kind).
    n_grid : int
        Grid points per curve.
    order : str
        ``"kind_major"`` (default; the S1 objective: all f′, then all f″, each site-major)
        or ``"site_major"`` (f′ then f″ of site 0, then of site 1, …).
    kinds : tuple of str
        ``("fp", "fdp")`` (default) or ``("fdp",)`` (f″ only).
    n_other : int
        Trailing entries that are not f′/f″ (not restrained).
    """

    def __init__(self, n_site, n_grid, order="kind_major", kinds=("fp", "fdp"), n_other=0):
        if order not in ORDERS:
            raise InputError(f"layout: order {order!r} is not one of {', '.join(ORDERS)}")
        kinds = tuple(kinds)
        if kinds not in (("fp", "fdp"), ("fdp",)):
            raise InputError(f"layout: kinds must be ('fp', 'fdp') or ('fdp',), got {kinds}")
        self.n_site, self.n_grid = int(n_site), int(n_grid)
        if self.n_site < 1 or self.n_grid < 1 or int(n_other) < 0:
            raise InputError(f"layout: needs n_site >= 1, n_grid >= 1, n_other >= 0 "
                             f"(got {n_site}, {n_grid}, {n_other})")
        self.order, self.kinds, self.n_other = order, kinds, int(n_other)
        self.n_curves = len(kinds) * self.n_site * self.n_grid
        self.size = self.n_curves + self.n_other

    def _check(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1 or x.size != self.size:
            raise InputError(f"restraints: x has shape {x.shape}, the layout needs ({self.size},) "
                             f"({self.n_site} sites x {self.n_grid} points x {len(self.kinds)} "
                             f"kinds + {self.n_other} others)")
        if not np.all(np.isfinite(x[:self.n_curves])):
            raise InputError("restraints: x contains NaN or inf")
        return x

    def split(self, x):
        """(f′, f″) of x, each (n_site, n_grid) (f′ is None for an f″-only layout)."""
        x = self._check(x)
        c = x[:self.n_curves]
        ns, ng = self.n_site, self.n_grid
        if self.kinds == ("fdp",):
            return None, c.reshape(ns, ng)
        if self.order == "kind_major":
            return c[:ns * ng].reshape(ns, ng), c[ns * ng:].reshape(ns, ng)
        both = c.reshape(ns, 2, ng)
        return both[:, 0], both[:, 1]

    def join(self, g_fp, g_fdp):
        """Flat gradient (length ``size``) from per-kind gradients (n_site, n_grid) or None."""
        ns, ng = self.n_site, self.n_grid
        out = np.zeros(self.size)
        z = np.zeros((ns, ng))
        gp = z if g_fp is None else np.asarray(g_fp, dtype=np.float64)
        gd = z if g_fdp is None else np.asarray(g_fdp, dtype=np.float64)
        if self.kinds == ("fdp",):
            out[:ns * ng] = gd.ravel()
        elif self.order == "kind_major":
            out[:ns * ng] = gp.ravel()
            out[ns * ng:2 * ns * ng] = gd.ravel()
        else:
            out[:2 * ns * ng] = np.stack([gp, gd], axis=1).ravel()
        return out


def _check_sigma(key, sigma):
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"parameter {key}: expected a number, got {sigma!r}") from None
    if not np.isfinite(s) or s <= 0:
        raise InputError(f"parameter {key}: must be > 0, got {sigma!r}")
    return s


def sauter_difference(u, mean, sigma, steps=None):
    """Sauter (2020) adjacent-difference restraint on one kind of parameter.

    Parameters
    ----------
    u : numpy.ndarray
        Values, shape (n_site, n_grid) (or (n_grid,)).
    mean : float
        Expected difference u_k − u_{k−1} (e⁻).
    sigma : float
        Its standard deviation (e⁻), > 0.
    steps : numpy.ndarray of bool, optional
        Which differences count, shape of ``numpy.diff(u, axis=-1)`` (default: all).

    Returns
    -------
    f : float
        Σ (u_k − u_{k−1} − mean)² / (2σ²) over sites and the counted k.
    g : numpy.ndarray
        ∂f/∂u, shape of ``u``.
    """
    sigma = _check_sigma("sigma", sigma)
    u = np.asarray(u, dtype=np.float64)
    d = np.diff(u, axis=-1) - float(mean)
    if steps is not None:
        d = np.where(np.asarray(steps, dtype=bool), d, 0.0)
    f = float(np.sum(d * d)) / (2.0 * sigma * sigma)
    w = d / (sigma * sigma)
    g = np.zeros_like(u)
    g[..., 1:] += w
    g[..., :-1] -= w
    return f, g


def edge_region_steps(energy_ev, reference_edges_ev):
    """Which adjacent differences of every site lie in its edge region, (n_site, n_grid − 1) bool.

    The edge region of a site runs from its reference edge minus
    :data:`~spread_tools.refine.uncertainty.EDGE_PRE_GAP_EV` to the edge plus
    :data:`~spread_tools.refine.uncertainty.EDGE_POST_GAP_EV` (the gap between the
    pre- and post-edge windows of the edge position): a difference between grid points
    E_k and E_k+1 belongs to it when E_k+1 > edge − pre gap and E_k < edge + post gap.
    A site whose reference edge is NaN (none on the grid) has no edge region.

    Parameters
    ----------
    energy_ev : array_like
        Grid (eV), (n_grid,).
    reference_edges_ev : array_like
        Reference edge of every site (eV), (n_site,).

    Returns
    -------
    numpy.ndarray of bool
    """
    from spread_tools.refine.uncertainty import EDGE_POST_GAP_EV, EDGE_PRE_GAP_EV
    e = np.asarray(energy_ev, dtype=np.float64)
    e0 = np.asarray(reference_edges_ev, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        inside = (e[None, 1:] > e0 - EDGE_PRE_GAP_EV) & (e[None, :-1] < e0 + EDGE_POST_GAP_EV)
    return inside & np.isfinite(e0)


class _Term:
    """A restraint term: ``curves(fp, fdp) -> (f, g_fp, g_fdp)`` and ``__call__(x) -> (f, g1)``."""

    name = "term"

    def __call__(self, x):
        """Loss and flat gradient ``(f, g1)`` at ``x`` (layout :attr:`layout`)."""
        fp, fdp = self.layout.split(x)
        f, gp, gd = self.curves(fp, fdp)
        return f, self.layout.join(gp, gd)


class SauterRestraint(_Term):
    """Sauter adjacent-difference restraint on ``fp`` or ``fdp``.

    Parameters
    ----------
    which : str
        ``"fp"`` or ``"fdp"``.
    mean : float
        Expected adjacent difference (e⁻).
    sigma : float
        Its standard deviation (e⁻), > 0.
    layout : FlatLayout
        Where the curves sit in ``x``.
    steps : numpy.ndarray of bool, optional
        (n_site, n_grid − 1): the differences this term restrains (default: all), e.g.
        inside or outside the edge regions (:func:`edge_region_steps`).
    name : str, optional
        Default ``"sauter_<which>"``.
    """

    def __init__(self, which, mean, sigma, layout, steps=None, name=None):
        if which not in ("fp", "fdp"):
            raise InputError(f"restraint: which must be 'fp' or 'fdp', got {which!r}")
        if which not in layout.kinds:
            raise InputError(f"restraint: the layout holds no {which}")
        self.which = which
        self.name = name or f"sauter_{which}"
        self.mean = float(mean)
        self.sigma = _check_sigma(f"restraints.{which}.sigma", sigma)
        self.layout = layout
        if steps is not None:
            steps = np.asarray(steps, dtype=bool)
            if steps.shape != (layout.n_site, max(layout.n_grid - 1, 0)):
                raise InputError(f"restraint: steps has shape {steps.shape}, the layout needs "
                                 f"({layout.n_site}, {max(layout.n_grid - 1, 0)})")
        self.steps = steps

    def curves(self, fp, fdp):
        """``(f, g_fp, g_fdp)`` on curve arrays (n_site, n_grid); g of an absent kind is None."""
        u = fp if self.which == "fp" else fdp
        if u.shape[-1] < 2:
            f, g = 0.0, np.zeros_like(u)
        else:
            f, g = sauter_difference(u, self.mean, self.sigma, self.steps)
        return (f, g, None) if self.which == "fp" else (f, None, g)

    def describe(self):
        """One line for logs."""
        where = "" if self.steps is None else \
            f" on {int(self.steps.sum())} of {self.steps.size} adjacent differences"
        return f"{self.name}: mean {self.mean:g} e-, sigma {self.sigma:g} e-{where}"


def sauter_terms(which, mean, sigma, edge_sigma, layout, energy_ev=None, reference_edges_ev=None):
    """The Sauter term(s) of one kind: one term, or one outside and one inside the edge regions.

    Parameters
    ----------
    which : str
        ``"fp"`` or ``"fdp"``.
    mean, sigma : float
        Expected adjacent difference and its σ (e⁻).
    edge_sigma : float or None
        σ inside the edge regions (``restraints.<which>.edge_sigma``); None: one term, σ
        everywhere.
    layout : FlatLayout
    energy_ev, reference_edges_ev : array_like, optional
        Grid (eV) and each site's reference edge (eV); needed with ``edge_sigma``.

    Returns
    -------
    list of SauterRestraint
        ``[sauter_<which>]`` or ``[sauter_<which>, sauter_<which>_edge]`` (a term with no
        difference to restrain is left out). With ``edge_sigma == sigma`` the two add up to
        the single term exactly.
    """
    sigma = _check_sigma(f"restraints.{which}.sigma", sigma)
    if edge_sigma is None:
        return [SauterRestraint(which, mean, sigma, layout)]
    edge_sigma = _check_sigma(f"restraints.{which}.edge_sigma", edge_sigma)
    inside = edge_region_steps(energy_ev, reference_edges_ev)
    terms = []
    if (~inside).any():
        terms.append(SauterRestraint(which, mean, sigma, layout, steps=~inside))
    if inside.any():
        terms.append(SauterRestraint(which, mean, edge_sigma, layout, steps=inside,
                                     name=f"sauter_{which}_edge"))
    return terms


def reference_edges_on_grid(energy_ev, site_elements, source="chantler"):
    """Each site's f″ edge in its element's reference table on the grid (eV; NaN: none on the grid)."""
    from spread_tools.physics.scattering import reference_fp_fdp
    from spread_tools.refine.uncertainty import edge_position
    e = np.asarray(energy_ev, dtype=np.float64)
    cache = {}
    for el in site_elements:
        if el not in cache:
            cache[el] = edge_position(e, reference_fp_fdp(el, e, source)[1])[0]
    return np.array([cache[el] for el in site_elements], dtype=np.float64)


def kk_weight_from_floor(floor_rms):
    """Default KK weight ``1 / (2 σ²)`` for a discretisation floor σ (e⁻), e⁻⁻²."""
    s = max(float(floor_rms), 1e-4)
    return 1.0 / (2.0 * s * s)


class KramersKronigRestraint(_Term):
    """Kramers–Kronig restraint ``w Σ_s Σ_k (f′_sk − a0_sk − (A_s f″_s)_k)²``.

    Parameters
    ----------
    layout : FlatLayout
        With both kinds.
    operators : WindowKK or list of WindowKK
        :class:`spread_tools.physics.kk_reference.WindowKK` on the grid (one for all sites,
        or one per site, e.g. per element); its window nodes are the grid.
    weight : float, optional
        w (e⁻⁻², >= 0); default ``1 / (2 σ_floor²)`` with σ_floor the
        :func:`~spread_tools.physics.kk_reference.discretisation_floor` of the operators
        (about its mean with ``offset``).
    offset : bool
        A constant in f′ per site is free: the residual's mean is removed.
    """

    name = "kramers_kronig"

    def __init__(self, layout, operators, weight=None, offset=True):
        from spread_tools.physics.kk_reference import WindowKK, discretisation_floor
        if layout.kinds != ("fp", "fdp"):
            raise InputError("restraint: the Kramers-Kronig restraint needs f' and f'' in the layout")
        ops = list(operators) if isinstance(operators, (list, tuple)) else [operators] * layout.n_site
        if len(ops) != layout.n_site or not all(isinstance(o, WindowKK) for o in ops):
            raise InputError(f"restraint: need one WindowKK or {layout.n_site} of them")
        if any(o.n != layout.n_grid for o in ops):
            raise InputError(f"restraint: the KK operator has {ops[0].n} nodes, the layout "
                             f"{layout.n_grid} grid points")
        self.layout, self.operators = layout, ops
        self.offset = bool(offset)
        mats = {}
        for o in ops:
            if id(o) not in mats:
                mats[id(o)] = o.fp_operator(o.window_ev)
        self.A = np.stack([mats[id(o)][0] for o in ops])          # (n_site, n_grid, n_grid)
        self.a0 = np.stack([mats[id(o)][1] for o in ops])         # (n_site, n_grid)
        floors = {}
        for o in ops:
            if id(o) not in floors:
                floors[id(o)] = discretisation_floor(o)
        self._floor_key = "rms_about_mean" if self.offset else "rms"
        self.floor = max(floors.values(), key=lambda d: d[self._floor_key])
        if weight is None:
            self.weight = kk_weight_from_floor(self.floor[self._floor_key])
            self.weight_from_floor = True
        else:
            try:
                self.weight = float(weight)
            except (TypeError, ValueError):
                raise InputError(f"parameter restraints.kramers_kronig.weight: expected a number, "
                                 f"got {weight!r}") from None
            if not np.isfinite(self.weight) or self.weight < 0:
                raise InputError(f"parameter restraints.kramers_kronig.weight: must be >= 0, "
                                 f"got {weight!r}")
            self.weight_from_floor = False

    @classmethod
    def from_reference(cls, layout, energy_ev, reference, pad_ev=100.0, weight=None, offset=True):
        """Build the operators from a grid and a reference (one, or one per site).

        Parameters
        ----------
        layout : FlatLayout
        energy_ev : array_like
            Grid (eV), (n_grid,).
        reference : ReferenceCurve or list of ReferenceCurve
        pad_ev : float
        weight : float, optional
        offset : bool

        Returns
        -------
        KramersKronigRestraint
        """
        from spread_tools.physics.kk_reference import WindowKK
        grid = check_grid(energy_ev, "energy_ev", allow_zero=False)
        refs = list(reference) if isinstance(reference, (list, tuple)) else [reference] * layout.n_site
        ops, seen = [], {}
        for r in refs:
            if id(r) not in seen:
                try:
                    seen[id(r)] = WindowKK(grid, r, pad_ev)
                except InputError as exc:
                    raise InputError(f"parameter restraints.kramers_kronig.pad: {exc}") from None
            ops.append(seen[id(r)])
        return cls(layout, ops, weight, offset)

    def residual(self, fp, fdp):
        """r = f′ − (a0 + A f″) (less its mean per site with ``offset``), (n_site, n_grid), e⁻."""
        r = fp - self.a0 - np.einsum("skj,sj->sk", self.A, fdp)
        if self.offset:
            r = r - r.mean(axis=1, keepdims=True)
        return r

    def curves(self, fp, fdp):
        """``(f, g_fp, g_fdp)`` on curve arrays (n_site, n_grid).

        With ``offset`` the residual is P r with P = I − 11ᵀ/n (symmetric, idempotent), so
        the gradient is the same expression with the centred residual.
        """
        r = self.residual(fp, fdp)
        f = self.weight * float(np.sum(r * r))
        g_fp = 2.0 * self.weight * r
        g_fdp = -2.0 * self.weight * np.einsum("skj,sk->sj", self.A, r)
        return f, g_fp, g_fdp

    def describe(self):
        """One line for logs (with the floor and where the weight came from)."""
        fl = self.floor
        how = "1/(2 floor^2)" if self.weight_from_floor else "given"
        about = " about the mean (f' offset free)" if self.offset else ""
        return (f"{self.name}: {self.operators[0].describe()}; discretisation floor on this grid "
                f"{fl[self._floor_key]:.4f} e- rms{about} ({fl['max']:.3f} e- max) for the reference "
                f"edge moved by 0-3/4 of a {fl['step_ev']:g} eV step; weight {self.weight:.4g} "
                f"e-^-2 ({how})")


class RestraintSum:
    """Sum of restraint terms on one layout: ``x -> (f, g1)``.

    Parameters
    ----------
    terms : list
        Terms with ``name``, ``curves`` and ``describe`` (e.g. :class:`SauterRestraint`).
    layout : FlatLayout
    """

    def __init__(self, terms, layout):
        self.terms = list(terms)
        self.layout = layout

    @property
    def active(self):
        """Names of the active terms, e.g. ``["sauter_fp", "kramers_kronig"]``."""
        return [t.name for t in self.terms]

    def describe(self):
        """Lines for the log: one per active term, or ``"no restraints"``."""
        return [t.describe() for t in self.terms] or ["no restraints"]

    def evaluate(self, x):
        """Total, flat gradient and per-term values.

        Returns
        -------
        f : float
        g1 : numpy.ndarray (len(x),)
        per_term : dict
            Term name -> its loss.
        """
        fp, fdp = self.layout.split(x)
        f = 0.0
        g_fp = None if fp is None else np.zeros_like(fp)
        g_fdp = np.zeros_like(fdp)
        per_term = {}
        for t in self.terms:
            ft, gp, gd = t.curves(fp, fdp)
            f += ft
            if gp is not None:
                g_fp += gp
            if gd is not None:
                g_fdp += gd
            per_term[t.name] = ft
        return f, self.layout.join(g_fp, g_fdp), per_term

    def __call__(self, x):
        """Total loss and flat gradient ``(f, g1)`` at ``x``."""
        f, g, _ = self.evaluate(x)
        return f, g

    def hessian(self):
        """Exact Hessian (size × size) of the sum: every term is quadratic."""
        n = self.layout.size
        H = np.zeros((n, n))
        if not self.terms:
            return H
        x0 = np.zeros(n)
        _, g0 = self(x0)
        for i in range(self.layout.n_curves):
            x0[i] = 1.0
            H[:, i] = self(x0)[1] - g0
            x0[i] = 0.0
        return 0.5 * (H + H.T)


#: the name used before the flat interface
Restraints = RestraintSum

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


def kk_mode(cfg):
    """``None`` (KK off), ``"restraint"`` or ``"constrained"`` for a configuration."""
    get = _section(cfg)
    if not bool(get("kramers_kronig.use")):
        return None
    mode = get("kramers_kronig.mode")
    if mode not in ("restraint", "constrained"):
        raise InputError(f"parameter restraints.kramers_kronig.mode: {mode!r} is not one of "
                         f"restraint, constrained")
    return mode


def active_terms(cfg):
    """Names of the restraint terms a configuration switches on (nothing is built).

    Parameters
    ----------
    cfg : spread_tools.config.Config or dict
        Configuration holding a ``restraints`` section (or the section itself).

    Returns
    -------
    list of str
        Subset of ``["sauter_fp", "sauter_fp_edge", "sauter_fdp", "sauter_fdp_edge",
        "kramers_kronig"]`` in that order (the ``_edge`` terms with
        ``restraints.<kind>.edge_sigma``); in the constrained mode ``["sauter_fdp", …,
        "kk_constrained"]`` (f′ is not a parameter). :func:`build_restraints` leaves out a
        Sauter term with no difference to restrain (no site's edge on the grid).
    """
    get = _section(cfg)
    mode = kk_mode(cfg)
    names = []
    for which in ("fp", "fdp"):
        if get(f"{which}.mean") is not None and not (which == "fp" and mode == "constrained"):
            names.append(f"sauter_{which}")
            if get(f"{which}.edge_sigma") is not None:
                names.append(f"sauter_{which}_edge")
    if mode == "restraint":
        names.append("kramers_kronig")
    elif mode == "constrained":
        names.append("kk_constrained")
    return names


def _references(reference, elements, source):
    from spread_tools.physics.kk_reference import ReferenceCurve, reference_curve
    if reference is None:
        cache = {}
        for el in elements:
            if el not in cache:
                cache[el] = reference_curve(el, source)
        return [cache[el] for el in elements]
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference] * len(elements)
    if len(refs) != len(elements) or not all(isinstance(r, ReferenceCurve) for r in refs):
        raise InputError(f"restraints: reference must be a ReferenceCurve or {len(elements)} of them")
    return refs


def build_restraints(cfg, energy_ev, site_elements, reference=None, reference_source="chantler",
                     layout=None):
    """Compose the restraints a configuration switches on (the S1 objective's restraints).

    Parameters
    ----------
    cfg : spread_tools.config.Config or dict
        Configuration with a ``restraints`` section (schema :data:`RESTRAINT_SCHEMA`),
        or that section itself.
    energy_ev : array_like
        Refinement grid (eV), strictly increasing, (n_grid,).
    site_elements : sequence of str
        Element of every site (n_site,), e.g. ``["Fe", "Fe"]``.
    reference : ReferenceCurve or list of ReferenceCurve, optional
        KK reference per site. Default: the self-consistent reference of each site's
        element (:func:`spread_tools.physics.kk_reference.reference_curve`).
    reference_source : str
        Source of the default reference (``"chantler"``, ``"cromer_liberman"``).
    layout : FlatLayout, optional
        Default: the S1 layout ``FlatLayout(n_site, n_grid)`` (kind-major, no others).

    Returns
    -------
    RestraintSum
        Callable ``x -> (f, g1)`` with ``.active``, ``.describe()``, ``.hessian()``. In the
        KK-constrained mode the terms on f′ are left out (the constrained problem builds
        its own, :mod:`spread_tools.refine.kk_constrained`).

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
    layout = layout or FlatLayout(n_site, n_grid)
    if (layout.n_site, layout.n_grid) != (n_site, n_grid):
        raise InputError(f"restraints: layout of {layout.n_site} x {layout.n_grid}, the grid and "
                         f"sites give {n_site} x {n_grid}")
    get = _section(cfg)
    mode = kk_mode(cfg)
    terms = []
    edges = None
    for which in ("fp", "fdp"):
        mean = get(f"{which}.mean")
        if mean is not None and which in layout.kinds:
            edge_sigma = get(f"{which}.edge_sigma")
            if edge_sigma is not None and edges is None:
                edges = reference_edges_on_grid(energy, elements, reference_source)
            terms += sauter_terms(which, mean, get(f"{which}.sigma"), edge_sigma, layout, energy, edges)
    if mode == "restraint":
        pad = get("kramers_kronig.pad")
        try:
            pad = float(pad)
        except (TypeError, ValueError):
            raise InputError(f"parameter restraints.kramers_kronig.pad: expected a number, "
                             f"got {pad!r}") from None
        if not np.isfinite(pad) or pad <= 0:
            raise InputError(f"parameter restraints.kramers_kronig.pad: must be > 0 eV, got {pad!r}")
        refs = _references(reference, elements, reference_source)
        terms.append(KramersKronigRestraint.from_reference(layout, energy, refs, pad,
                                                           get("kramers_kronig.weight"),
                                                           bool(get("kramers_kronig.offset"))))
    return RestraintSum(terms, layout)
