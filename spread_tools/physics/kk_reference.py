"""Self-consistent Kramers–Kronig references and the window operator built on them.

A reference table (Chantler, Cromer–Liberman) supplies what a refined or
tabulated curve does not: f″ outside the window, the far tails, the constant
relativistic term. For that its f′ must be the KK transform of its *own* f″
under the operator in use, which tabulated f′ values are not: Chantler's Fe f′
differs from the exact transform of its own f″ by up to 0.34 e⁻ at the K edge,
and Cromer–Liberman's f″ is a sharp step at the edge whose exact partner f′
diverges logarithmically there (gemmi gives −21.6 e⁻ at 7112 eV), which no
sampled f″ can match: the cause of the 9 e⁻ that ``kk_check
reference=cromer_liberman`` reported.

:class:`ReferenceCurve`
    f″ piecewise linear on a fine node set (the table's own f″ sampled finely,
    sharp jumps bisected to 0.05 eV), and f′ = C + KK[f″] exactly (the operator
    of :func:`spread_tools.physics.kk.kk_matrix`), C a constant (the relativistic
    and nuclear Thomson terms: −0.0745 e⁻ for Fe), fitted once as the median of
    (tabulated f′ − KK[f″]) at 1–100 keV.
:class:`WindowKK`
    The operator of the refinement's Kramers–Kronig terms. On the window nodes
    x_0 … x_N the curve's f″ values u are the unknowns; f″ is linear between
    them, equals the reference beyond ``pad`` eV of the window, and in between
    carries the end mismatch u_0 − f″_ref(x_0) (u_N − f″_ref(x_N)) as a linear
    ramp to zero, so the whole f″ is continuous and piecewise linear. Then, at
    any output energies E, exactly::

        f′(E) = a0(E) + A(E) u,        f″(E) = b0(E) + B(E) u.

    Nothing inside the window comes from the reference (unlike the older
    differential form f′_ref + K(f″ − f″_ref), which carried the reference's
    own edge, sampled on the grid, into the residual).

Cost: the Fe reference has about 8,000 nodes; an operator for 100 output energies
is a 100 × 8,000 matrix product, about 0.1 s; references are built once per
element and source and cached.
"""

from __future__ import annotations

import functools

import numpy as np

from spread_tools.errors import InputError
from spread_tools.physics.kk import check_grid, kk_matrix

__all__ = ["ReferenceCurve", "WindowKK", "reference_curve", "kk_consistent_fp", "discretisation_floor"]

#: relative spacing of the fine nodes (2e-3: piecewise-linear vs log-log interpolation of a
#: power-law f″ differ by < 1e-5 relative)
_REL_STEP = 2e-3
#: jumps in f″ between adjacent nodes larger than this (e⁻) are bisected ...
_JUMP_E = 0.02
#: ... down to this interval (eV)
_MIN_STEP_EV = 0.05


class ReferenceCurve:
    """A reference f″ (piecewise linear on nodes) with its exact KK partner f′ = C + KK[f″].

    Parameters
    ----------
    energy_ev : array_like
        Nodes (eV), strictly increasing, > 0. f″ is zero outside them.
    fdp : array_like
        f″ at the nodes (e⁻).
    constant : float
        C (e⁻): what f′ has beyond KK[f″] (relativistic, nuclear Thomson terms, tails
        beyond the nodes).
    source : str
        Name for messages, e.g. ``"chantler:Fe"``.

    Examples
    --------
    A user-made reference, here a broadened step, without any table:

    >>> import numpy as np
    >>> e = np.arange(6000.0, 9000.0, 0.5)
    >>> ref = ReferenceCurve(e, 0.5 + 3.0 / (1 + np.exp(-(e - 7112.0) / 1.0)), 0.0, "step")
    >>> fp, fdp = ref.fp_fdp([7000.0, 7112.0, 7200.0])
    >>> bool(fp[1] < fp[0] and fp[1] < fp[2])      # the dip of f′ at the edge
    True
    """

    def __init__(self, energy_ev, fdp, constant=0.0, source="reference"):
        self.energy_ev = check_grid(energy_ev, f"{source}: energy", allow_zero=False)
        self.fdp_nodes = np.asarray(fdp, dtype=np.float64)
        if self.fdp_nodes.shape != self.energy_ev.shape:
            raise InputError(f"{source}: f'' has shape {self.fdp_nodes.shape}, the nodes "
                             f"{self.energy_ev.shape}")
        if not np.all(np.isfinite(self.fdp_nodes)):
            raise InputError(f"{source}: f'' contains NaN or inf")
        self.constant = float(constant)
        self.source = source

    def fdp(self, energy_ev):
        """The reference f″ (e⁻) at any energies (zero outside the nodes)."""
        e = np.asarray(energy_ev, dtype=np.float64)
        return np.interp(e, self.energy_ev, self.fdp_nodes, left=0.0, right=0.0)

    def fp(self, energy_ev):
        """f′ = C + KK[f″] (e⁻) at positive energies (exact for the piecewise-linear f″)."""
        e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
        out = self.constant + kk_matrix(self.energy_ev, e.ravel()) @ self.fdp_nodes
        return out.reshape(np.shape(energy_ev))

    def fp_fdp(self, energy_ev):
        """(f′, f″) at ``energy_ev`` (e⁻)."""
        return self.fp(energy_ev), self.fdp(energy_ev)

    def describe(self):
        """One line for logs."""
        return (f"{self.source}: self-consistent (f' = KK[f''] + {self.constant:+.4f} e-, "
                f"{self.energy_ev.size} nodes {self.energy_ev[0]:g}-{self.energy_ev[-1]:g} eV)")


def _subdivide(base):
    parts = []
    for a, b in zip(base[:-1], base[1:]):
        k = max(2, int(np.ceil((b - a) / (_REL_STEP * a))))
        parts.append(a + (b - a) * np.arange(k) / k)
    parts.append(base[-1:])
    return np.concatenate(parts)


def _refine_jumps(nodes, fdp_fn):
    """Bisect intervals where f″ jumps by more than _JUMP_E until they are _MIN_STEP_EV wide."""
    vals = fdp_fn(nodes)
    for _ in range(60):
        d = np.abs(np.diff(vals))
        width = np.diff(nodes)
        bad = (d > _JUMP_E) & (width > _MIN_STEP_EV)
        if not bad.any():
            break
        mid = 0.5 * (nodes[:-1][bad] + nodes[1:][bad])
        nodes = np.concatenate([nodes, mid])
        vals = np.concatenate([vals, fdp_fn(mid)])
        order = np.argsort(nodes, kind="stable")
        nodes, vals = nodes[order], vals[order]
    return nodes, vals


@functools.lru_cache(maxsize=32)
def _cached_reference(symbol, source):
    from spread_tools.physics.scattering import _chantler_interpolators, reference_fp_fdp
    if source == "chantler":
        e0, e1, _, lnE, _ = _chantler_interpolators(symbol)
        base = np.exp(lnE)
    else:
        base = np.geomspace(30.0, 300000.0, 2000)
        e0, e1 = base[0], base[-1]
    nodes = _subdivide(base)
    nodes = nodes[(nodes >= e0) & (nodes <= e1)]

    def fdp_fn(e):
        return reference_fp_fdp(symbol, e, source=source)[1]

    nodes, vals = _refine_jumps(nodes, fdp_fn)
    # C: the median of (tabulated f′ − KK[f″]) at 1-100 keV, away from the edge structure
    probe = np.geomspace(max(1000.0, e0 * 1.01), min(100000.0, e1 / 1.01), 60)
    kk = kk_matrix(nodes, probe) @ vals
    constant = float(np.median(reference_fp_fdp(symbol, probe, source=source)[0] - kk))
    return nodes, vals, constant


def reference_curve(element, source="chantler"):
    """The self-consistent reference of an element (built once, cached).

    Parameters
    ----------
    element : str or int
        Element symbol or atomic number.
    source : str
        ``"chantler"`` (xraydb's Chantler tables) or ``"cromer_liberman"`` (gemmi).

    Returns
    -------
    ReferenceCurve
        f″ the source's f″ on fine nodes (for Chantler: its table nodes, each interval cut
        into parts of at most 0.2 % of E; jumps of more than 0.02 e⁻ bisected to 0.05 eV),
        f′ = C + KK[f″] with C fitted at 1–100 keV.

    Raises
    ------
    InputError
        Unknown element or source.
    """
    from spread_tools.physics.scattering import REFERENCE_SOURCES, element_symbol
    if source not in REFERENCE_SOURCES:
        raise InputError(f"reference source {source!r} is not one of {', '.join(REFERENCE_SOURCES)}")
    symbol = element_symbol(element)
    nodes, vals, constant = _cached_reference(symbol, source)
    return ReferenceCurve(nodes, vals, constant, source=f"{source}:{symbol}")


def _as_reference(reference):
    if isinstance(reference, ReferenceCurve):
        return reference
    raise InputError(f"reference: expected a ReferenceCurve, got {type(reference).__name__}")


class WindowKK:
    """Exact KK operator of a curve known on window nodes, continued by a reference.

    Parameters
    ----------
    window_ev : array_like
        Window nodes x_0 … x_N (eV), strictly increasing: where f″ is the unknown u.
    reference : ReferenceCurve
        Supplies f″ outside the window and the constant.
    pad_ev : float
        Length (eV) of the ramps that join u_0 (u_N) to the reference below x_0
        (above x_N); > 0 and < x_0.

    Notes
    -----
    See the module docstring for the definition of the continued f″. On the merged
    node set (reference nodes outside the window, x_0 − pad, the window nodes,
    x_N + pad) the continued f″ is ``v = P u + p0``; then ``f′(E) = C + K(E) v``
    with K :func:`spread_tools.physics.kk.kk_matrix` on those nodes, and
    ``f″(E)`` the linear interpolation of v.
    """

    def __init__(self, window_ev, reference, pad_ev=100.0):
        self.window_ev = check_grid(window_ev, "window energies", allow_zero=False)
        self.reference = _as_reference(reference)
        pad = float(pad_ev)
        if not (np.isfinite(pad) and pad > 0):
            raise InputError(f"pad: must be a positive number of eV, got {pad_ev!r}")
        x = self.window_ev
        if pad >= x[0]:
            raise InputError(f"pad: {pad:g} eV reaches below 0 eV from the first energy {x[0]:g} eV")
        self.pad_ev = pad
        r = self.reference.energy_ev
        lo, hi = x[0] - pad, x[-1] + pad
        tol = 1e-6 * pad
        left = r[r < x[0] - tol]
        right = r[r > x[-1] + tol]
        left = np.union1d(left[np.abs(left - lo) > tol], [lo])
        right = np.union1d(right[np.abs(right - hi) > tol], [hi])
        nodes = np.concatenate([left, x, right])
        n_l, n_w = left.size, x.size
        ref_vals = self.reference.fdp(nodes)
        P = np.zeros((nodes.size, n_w))
        p0 = ref_vals.copy()
        P[n_l:n_l + n_w] = np.eye(n_w)
        p0[n_l:n_l + n_w] = 0.0
        ramp_l = np.clip((left - lo) / pad, 0.0, 1.0)
        ramp_r = np.clip((hi - right) / pad, 0.0, 1.0)
        f0, fN = self.reference.fdp(x[[0, -1]])
        P[:n_l, 0] = ramp_l
        p0[:n_l] -= ramp_l * f0
        P[n_l + n_w:, -1] = ramp_r
        p0[n_l + n_w:] -= ramp_r * fN
        self.nodes_ev, self._P, self._p0 = nodes, P, p0
        self._win = slice(n_l, n_l + n_w)
        self._ramp_l = slice(0, n_l)
        self._ramp_r = slice(n_l + n_w, nodes.size)

    @property
    def n(self):
        """Number of window nodes (unknowns per curve)."""
        return self.window_ev.size

    def fp_operator(self, energy_ev):
        """(A, a0): f′(E) = a0 + A u at the energies given (exact), shapes (m, n) and (m,).

        Parameters
        ----------
        energy_ev : array_like
            Positive output energies (eV), shape (m,).
        """
        e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
        K = kk_matrix(self.nodes_ev, e)
        A = K[:, self._win].copy()
        A[:, 0] += K[:, self._ramp_l] @ self._P[self._ramp_l, 0]
        A[:, -1] += K[:, self._ramp_r] @ self._P[self._ramp_r, -1]
        a0 = self.reference.constant + K @ self._p0
        return A, a0

    def fdp_operator(self, energy_ev):
        """(B, b0): the continued f″(E) = b0 + B u at the energies given (linear interpolation)."""
        e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
        nodes = self.nodes_ev
        k = np.clip(np.searchsorted(nodes, e, side="right") - 1, 0, nodes.size - 2)
        t = np.clip((e - nodes[k]) / (nodes[k + 1] - nodes[k]), 0.0, 1.0)
        inside = (e >= nodes[0]) & (e <= nodes[-1])
        W = np.zeros((e.size, nodes.size))
        rows = np.arange(e.size)
        W[rows, k] = np.where(inside, 1.0 - t, 0.0)
        W[rows, k + 1] += np.where(inside, t, 0.0)
        return W @ self._P, W @ self._p0

    def fp(self, fdp_window, energy_ev=None):
        """f′ at ``energy_ev`` (default the window nodes) of window values ``fdp_window``.

        Parameters
        ----------
        fdp_window : array_like
            u, shape (n,) or (m_curves, n).
        energy_ev : array_like, optional

        Returns
        -------
        numpy.ndarray
        """
        A, a0 = self.fp_operator(self.window_ev if energy_ev is None else energy_ev)
        return np.asarray(fdp_window, dtype=np.float64) @ A.T + a0

    def describe(self):
        """One line for logs."""
        x = self.window_ev
        return (f"f'' on {x.size} nodes {x[0]:g}-{x[-1]:g} eV, {self.reference.source} beyond "
                f"(ramps of {self.pad_ev:g} eV), f' = KK[f''] {self.reference.constant:+.4f} e-")


def kk_consistent_fp(energy_ev, fdp, element="Fe", source="chantler", out_ev=None):
    """The exact KK partner f′ of a tabulated f″, with the reference's tails beyond the table.

    f″ is the table's (linear between its rows) over its whole range and the
    self-consistent reference (:func:`reference_curve`) outside it; f′ = C + KK[f″].

    Parameters
    ----------
    energy_ev, fdp : array_like
        The table (eV, e⁻).
    element, source : str
        Reference for the tails and the constant C.
    out_ev : array_like, optional
        Output energies (default the table's).

    Returns
    -------
    numpy.ndarray
        f′ (e⁻) at ``out_ev``.
    """
    e = check_grid(energy_ev, "energy_ev", allow_zero=False)
    u = np.asarray(fdp, dtype=np.float64)
    ref = reference_curve(element, source)
    r = ref.energy_ev
    span = e[-1] - e[0]
    tol = 1e-6 * span
    nodes = np.concatenate([r[r < e[0] - tol], e, r[r > e[-1] + tol]])
    vals = np.concatenate([ref.fdp(r[r < e[0] - tol]), u, ref.fdp(r[r > e[-1] + tol])])
    out = e if out_ev is None else np.asarray(out_ev, dtype=np.float64)
    from spread_tools.physics.kk import kk_transform
    if out_ev is None:
        return ref.constant + kk_transform(nodes, vals, e)
    return ref.constant + kk_transform(nodes, vals, out)


def discretisation_floor(window_kk, phases=(0.0, 0.25, 0.5, 0.75)):
    """Residual of the window operator on KK-consistent curves: the reference with its edge
    moved by fractions of the grid step.

    A curve that is exactly KK-consistent but whose f″ is not linear between the window
    nodes (an edge between two nodes) leaves ``f′ − (a0 + A f″)`` ≠ 0 at the nodes: the
    floor of any KK restraint on that grid. The probes are the reference itself shifted
    by ``phase × step`` (step: the median node spacing), f″ taken at the nodes and f′ its
    exact partner, so every position of the edge relative to the nodes is seen.

    Parameters
    ----------
    window_kk : WindowKK
    phases : sequence of float
        Shifts in units of the grid step.

    Returns
    -------
    dict
        ``rms`` (over all probes and nodes, e⁻), ``max`` (e⁻), ``rms_about_mean`` (each
        probe's residual less its mean: the floor when a constant offset is free),
        ``per_probe`` (list of (shift_ev, rms, max)), ``step_ev``.
    """
    ref = window_kk.reference
    x = window_kk.window_ev
    step = float(np.median(np.diff(x)))
    A, a0 = window_kk.fp_operator(x)
    keep = ref.energy_ev > 4.0 * step
    res, per, centred = [], [], []
    for ph in phases:
        shift = float(ph) * step
        probe = ReferenceCurve(ref.energy_ev[keep] + shift, ref.fdp_nodes[keep], ref.constant,
                               source="probe")
        r = probe.fp(x) - (a0 + A @ probe.fdp(x))
        res.append(r)
        centred.append(r - r.mean())
        per.append((shift, float(np.sqrt(np.mean(r * r))), float(np.max(np.abs(r)))))
    res = np.concatenate(res)
    centred = np.concatenate(centred)
    return {"rms": float(np.sqrt(np.mean(res * res))), "max": float(np.max(np.abs(res))),
            "rms_about_mean": float(np.sqrt(np.mean(centred * centred))),
            "per_probe": per, "step_ev": step}
