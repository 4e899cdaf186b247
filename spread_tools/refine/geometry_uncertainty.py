"""S1's uncertainties with each lattice's crystal model counted as an estimate, not as exact.

Why
---
S1 holds every lattice's orientation, cell, mosaic spread and domain size at the values in
the dataset and profiles out only G and the backgrounds. After ``refine_geometry`` those
values are themselves estimates from the same pixels, with errors (0.01° per axis,
0.03 % in the cell at LY99 size) that move the energy at which each spot diffracts, the
quantity that f″(E) is read from. Holding them fixed leaves their error out of σ.

What
----
At the solution the joint information of (f′/f″ grid, and per lattice j its crystal
parameters x_j, g_j and background planes b_k) is profiled over every per-lattice block
(Schur complements, the backgrounds first)::

    ΔF = Σ_j F_{f,x_j} F_{x_j,x_j}⁻¹ F_{x_j,f}  −  Σ_j F_{f,g_j} F_{g_j,g_j}⁻¹ F_{g_j,f}

(both with the backgrounds eliminated; x_j includes g_j), so that ``F − ΔF`` is the
information with the crystal models profiled out, where F is S1's information with G and
the backgrounds profiled out. x_j holds the families ``refine_geometry`` refined (rotation,
free cell parameters, mosaic spread, ln N as it was parameterized, the per-shot energy
offset), read from the dataset's stored ``refine_geometry`` parameters, with the diagonal
priors of that run (cell restraint, ln η and ln N priors, per-shot offset σ) in
F_{x_j,x_j}. This is the covariance of the joint maximum-likelihood estimate of curves and
crystal models, the fixed point of alternating ``refine_geometry`` and ``refine_fdp``.

∂λ/∂x per pixel comes from the geometry kernel (:class:`~spread_tools.model.lattice_batch.LatticeBatch`
with ``want_jac``), ∂λ/∂(f′, f″) from S1's channel bands; the two pixel models agree to
their band cuts (~1e-6 relative, reported). The global energy offset is not profiled
(one parameter for all lattices; ``refine_geometry`` reports its σ).
"""

from __future__ import annotations

import json

import numba
import numpy as np

__all__ = ["GeometryProfile", "geometry_profile_for", "local_geometry_correction"]


@numba.njit(parallel=True, cache=True)
def _cross_sums(values, lo, length, sb_offset, pix_off, k0, k1, sb_h, dfp, dfdp, Gp, map_k0, map_t, h_map, n_grid,
                W, Jx, Jb, Gx, Gb, Fxx, Fxb, Fbb):  # pragma: no cover - numba
    """Per shoebox t = k − k0 of k0:k1 the sums over its pixels of W·(∂λ/∂u)(∂λ/∂x)ᵀ into
    ``Gx[t]`` (n_glob, n_x), W·(∂λ/∂u)(∂λ/∂b)ᵀ into ``Gb[t]``, and the crystal/background blocks
    ``Fxx[t]``, ``Fxb[t]``, ``Fbb[t]``; ∂λ/∂u (u: the f′ then f″ grid of every refined site)
    from the channel bands as ``uncertainty._jacobian_bands``, ``Jx``/``Jb`` rows of the pass's
    pixels (p − pix_off[k0])."""
    n_ref = dfp.shape[0]
    n_fp = n_ref * n_grid
    nx = Jx.shape[1]
    p0 = pix_off[k0]
    for t in numba.prange(k1 - k0):
        k = k0 + t
        h = sb_h[k]
        hm = h_map[h]
        o = sb_offset[k]
        for p in range(pix_off[k], pix_off[k + 1]):
            n = np.int64(length[p])
            w = W[p]
            q = p - p0
            if w != 0.0:
                for a in range(nx):
                    wa = w * Jx[q, a]
                    for b in range(nx):
                        Fxx[t, a, b] += wa * Jx[q, b]
                    for b in range(3):
                        Fxb[t, a, b] += wa * Jb[q, b]
                for a in range(3):
                    for b in range(3):
                        Fbb[t, a, b] += w * Jb[q, a] * Jb[q, b]
                g = Gp[p]
                for i in range(n):
                    c = np.int64(lo[p]) + i
                    wc = w * g * np.float64(values[o + i])
                    if wc == 0.0:
                        continue
                    tt = map_t[hm, c]
                    kk = map_k0[hm, c]
                    for s in range(n_ref):
                        for kind in range(2):
                            v = dfp[s, c, h] if kind == 0 else dfdp[s, c, h]
                            base = kind * n_fp + s * n_grid + kk
                            va = wc * (1.0 - tt) * v
                            vb = wc * tt * v
                            for a in range(nx):
                                Gx[t, base, a] += va * Jx[q, a]
                                Gx[t, base + 1, a] += vb * Jx[q, a]
                            for a in range(3):
                                Gb[t, base, a] += va * Jb[q, a]
                                Gb[t, base + 1, a] += vb * Jb[q, a]
            o += n


class GeometryProfile:
    """Which crystal parameters of every lattice S1's uncertainties profile out.

    Parameters
    ----------
    fs : spread_tools.refine.lattice_fit.FitSettings
        The ``refine_geometry`` settings (families, priors, band cut).
    param : spread_tools.model.crystal_params.CellParameterization
    """

    def __init__(self, fs, param):
        self.fs, self.param = fs, param

    def describe(self):
        """One line: the families profiled out."""
        from spread_tools.refine.crystal_models import crystal_families
        bits = crystal_families(self.fs)
        if self.fs.offset == "per_lattice":
            bits.append("per-shot energy offset")
        return ", ".join(bits) or "none"

    def n_q(self):
        """Matrix parameters of the geometry kernel (rotation, cell, mosaic, as asked)."""
        fs = self.fs
        return 3 * bool(fs.rotation) + self.param.n_free * bool(fs.cell) + bool(fs.mosaic)

    def columns(self, jac):
        """Per-pixel columns of x_j (n_p, n_x) from the kernel's Jacobian (n_p, n_q + 8): the
        matrix parameters, ln N (summed when isotropic), the per-shot offset, g last."""
        fs, nq = self.fs, self.n_q()
        cols = [jac[:, :nq]]
        if fs.domain_size == "isotropic":
            cols.append(jac[:, nq:nq + 3].sum(axis=1, keepdims=True))
        elif fs.domain_size == "anisotropic":
            cols.append(jac[:, nq:nq + 3])
        if fs.offset == "per_lattice":
            cols.append(jac[:, nq + 3:nq + 4])
        cols.append(jac[:, nq + 4:nq + 5])           # g = ln G: last, the column S1 profiles itself
        return np.concatenate(cols, axis=1)

    def prior(self, mosaic_deg):
        """Prior curvature of every column of :meth:`columns` (n_x,) for a lattice of mosaic
        spread ``mosaic_deg`` (the ln η prior in the kernel's η column)."""
        fs, nq = self.fs, self.n_q()
        q = np.zeros(nq)
        if fs.cell and fs.cell_sigma is not None:
            a = 3 * bool(fs.rotation)
            q[a:a + self.param.n_free] = 1.0 / np.asarray(fs.cell_sigma, dtype=np.float64) ** 2
        if fs.mosaic and fs.mosaic_log_sigma is not None:
            q[nq - 1] = 1.0 / (fs.mosaic_log_sigma * mosaic_deg) ** 2
        n_curv = 0.0 if fs.domain_size_log_sigma is None else 1.0 / fs.domain_size_log_sigma ** 2
        rest = {"isotropic": [n_curv], "anisotropic": [n_curv] * 3}.get(fs.domain_size, [])
        if fs.offset == "per_lattice":
            rest.append(1.0 / fs.offset_sigma_ev ** 2)
        return np.concatenate([q, rest, [0.0]])


def geometry_profile_for(datasets, ds, mode):
    """The :class:`GeometryProfile` of ``uncertainty.geometry=mode``, or ``None`` (off).

    ``auto``: on when every dataset was written by ``refine_geometry`` (its stored
    parameters give the families); ``on``: also for other datasets (``refine_geometry``'s
    defaults); ``off``: ``None``.
    """
    from spread_tools.config import Config, resolve
    from spread_tools.model.crystal_params import CellParameterization
    from spread_tools.refine.crystal_models import GEOMETRY_SCHEMA, fit_settings
    if mode == "off":
        return None
    refined = [d for d in datasets if getattr(d, "source", "") == "refine_geometry"]
    if mode == "auto" and len(refined) < len(datasets):
        return None
    stored = {}
    if refined:
        try:
            stored = json.loads(refined[0].config_json or "{}")
        except json.JSONDecodeError:
            stored = {}
    values = resolve(GEOMETRY_SCHEMA).to_dict()
    _update_known(values, stored)
    cfg = Config(values, GEOMETRY_SCHEMA)
    param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
    return GeometryProfile(fit_settings(cfg, param, np.asarray(ds.cell, float), ds.n_domains), param)


def _update_known(values, stored):
    """Copy the stored values of the keys ``values`` knows (a file of another version may
    hold others), in place."""
    for key, value in stored.items():
        if key not in values:
            continue
        if isinstance(values[key], dict):
            if isinstance(value, dict):
                _update_known(values[key], value)
        elif not isinstance(value, dict):
            values[key] = value


def local_geometry_correction(problem, x, profile, max_pixels=1048576):
    """ΔF of this rank's lattices (module docstring) and the pixel models' agreement.

    Parameters
    ----------
    problem : spread_tools.refine.objective.S1Problem
    x : array (n_x,)
        The S1 solution.
    profile : GeometryProfile
    max_pixels : int
        Pixels per pass of the geometry kernel (memory: its Jacobian, ~150 bytes a pixel).

    Returns
    -------
    dF : (n_glob, n_glob)
    agreement : float
        Largest |λ_geometry − λ_S1| / λ_S1 over the unmasked pixels.
    """
    from spread_tools.model.crystal_params import stored_domain_matrices
    from spread_tools.model.lattice_batch import LatticeBatch
    p, pm = problem, problem.pm
    ng = p.n_glob
    dF = np.zeros((ng, ng))
    if pm is None:
        return dF, 0.0
    fs, param = profile.fs, profile.param
    ds = p.local
    fp, fdp, g, b = p._local_params(x)
    I, dfp, dfdp = p._intensities(fp, fdp)
    G = np.exp(g)
    W = pm.expected_counts(I, G, b)
    np.divide(1.0, W, out=W)
    W[~np.asarray(pm.mask, dtype=bool)] = 0.0                      # mask / λ
    Gp = G[pm.sb_lattice[pm.pixel_shoebox]]
    I_sb = np.ascontiguousarray(I[pm.sb_h_index])
    lat_sb = np.concatenate([[0], np.cumsum(np.bincount(pm.sb_lattice, minlength=pm.n_lat))]).astype(np.int64)
    lat_pix = pm.pixel_offset[lat_sb]
    worst = 0.0
    c0 = 0
    while c0 < pm.n_lat:
        c1 = max(c0 + 1, int(np.searchsorted(lat_pix, lat_pix[c0] + max_pixels, side="right")) - 1)
        c1 = min(c1, pm.n_lat)
        sub = ds.select_lattices(np.arange(c0, c1))
        k_a, k_b = lat_sb[c0], lat_sb[c1]
        p_a, p_b = pm.pixel_offset[k_a], pm.pixel_offset[k_b]
        batch = LatticeBatch(sub, backend=pm.backend, cut=fs.cut)
        minv, dminv, dom_off = stored_domain_matrices(sub, param, fs.rotation, fs.cell, fs.mosaic)
        out = batch.evaluate(minv, dminv, dom_off, sub.domain_size_cells,
                             batch.inverse_wavelength(np.zeros(sub.n_lattices)), I_sb[k_a:k_b],
                             np.zeros_like(I_sb[k_a:k_b]), np.exp(g[c0:c1]), b[k_a:k_b], want_lam=True,
                             want_jac=True)
        Wc = W[p_a:p_b]
        m = Wc > 0
        if np.any(m):
            worst = max(worst, float(np.max(np.abs(out.lam[m] * Wc[m] - 1.0))))
        Jx = np.ascontiguousarray(profile.columns(out.jac))
        nq, nx = profile.n_q(), Jx.shape[1]
        Jb = np.ascontiguousarray(out.jac[:, nq + 5:nq + 8])
        n_k = k_b - k_a
        Gx, Gb = np.zeros((n_k, ng, nx)), np.zeros((n_k, ng, 3))
        Fxx, Fxb, Fbb = np.zeros((n_k, nx, nx)), np.zeros((n_k, nx, 3)), np.zeros((n_k, 3, 3))
        bd = pm.bands
        _cross_sums(bd.host_values(), bd.lo, bd.length, bd.sb_offset, pm.pixel_offset, k_a, k_b, pm.sb_h_index,
                    np.ascontiguousarray(dfp), np.ascontiguousarray(dfdp), np.ascontiguousarray(Gp), p._map_k0,
                    p._map_t, p._h_map, p.n_grid, W, Jx, Jb, Gx, Gb, Fxx, Fxb, Fbb)
        # the backgrounds out per shoebox, then the sums per lattice
        B = np.linalg.pinv(Fbb, hermitian=True)
        FxbB = np.einsum("kxa,kab->kxb", Fxb, B)
        Gx -= np.einsum("kia,kxa->kix", Gb, FxbB)
        Fxx -= np.einsum("kxb,kyb->kxy", FxbB, Fxb)
        first = lat_sb[c0:c1] - k_a
        Fgx = np.add.reduceat(Gx, first, axis=0)                     # (n_l, ng, nx)
        Fxx = np.add.reduceat(Fxx, first, axis=0)                    # (n_l, nx, nx)
        prior = np.stack([profile.prior(float(ds.mosaic_spread_deg[j])) for j in range(c0, c1)])
        ok = Fxx[:, -1, -1] > 1e-300
        Fgx, Fxx, prior = Fgx[ok], Fxx[ok], prior[ok]
        X = np.einsum("lxy,liy->lxi", np.linalg.pinv(Fxx + prior[:, :, None] * np.eye(nx), hermitian=True), Fgx)
        dF += np.einsum("lix,lxj->ij", Fgx, X)
        dF -= np.einsum("li,lj->ij", Fgx[:, :, -1] / Fxx[:, -1, -1, None], Fgx[:, :, -1])
        c0 = c1
    return 0.5 * (dF + dF.T), worst
