"""Curvature and uncertainties of the S1 objective.

Gauss–Newton / Fisher information ``Jᵀ diag(1/λ) J`` of the Poisson likelihood with the
local parameters (backgrounds per shoebox, then scales per lattice) profiled out exactly
(Schur complements), its diagonals for the optimizer's preconditioner, the covariance
(pseudo-)inverse, and the edge position of f″ with its propagated uncertainty. See
:mod:`spread_tools.refine.s1`, section *Uncertainties*.

Both routes read the channel-banded weights of the pixel model
(:mod:`spread_tools.model.bands`): the *channel* route (used by the refinement) forms,
per shoebox, the moments Σ w wᵀ/λ over the shoebox's channel span only (the union of
its pixels' bands), so its cost follows the bands, not the spectrum's length; the
*pixel* route forms ∂λ/∂u per pixel from the bands (a cross-check, and the brute-force
tests' reference).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["FisherInformationMixin", "edge_position", "edge_shift", "EDGE_PRE_GAP_EV", "EDGE_POST_GAP_EV"]

#: refine_fdp's edge windows about the reference table's edge (eV): pre-edge points at or
#: below edge − 10 eV (below the rise), post-edge points at or above edge + 20 eV (past
#: the rise and most of the white line).
EDGE_PRE_GAP_EV = 10.0
EDGE_POST_GAP_EV = 20.0


@numba.njit(cache=True)
def _pinv_sym3(A, out):  # pragma: no cover - numba
    """Pseudo-inverse of a symmetric 3×3 matrix (numpy.linalg.pinv(hermitian=True), rcond 1e-15)."""
    evals, evecs = np.linalg.eigh(A)
    cut = 1e-15 * max(abs(evals[0]), abs(evals[2]))
    for a in range(3):
        for b in range(3):
            out[a, b] = 0.0
    for e in range(3):
        if abs(evals[e]) > cut:
            inv = 1.0 / evals[e]
            for a in range(3):
                for b in range(3):
                    out[a, b] += evecs[a, e] * inv * evecs[b, e]


@numba.njit(parallel=True, cache=True)
def _fisher_bands(values, lo, length, sb_offset, pix_off, bbox, mask, sb_lat, sb_h, span_lo, span_off, I, G, bg,
                  dfp, dfdp, map_k0, map_t, h_map, n_grid, n_chunks, F_ch, dglob_ch, c_sb, dp_sb, d_sb,
                  db_sb):  # pragma: no cover
    """Channel-space Fisher information of every shoebox over its channel span.

    Per shoebox k (span c0:c0+n, a = (1, x̂, ŷ), W = mask/λ): C = Σ W G² w wᵀ, V = Σ W bg a G wᵀ,
    u = Σ W G² S w, Fbb = Σ W bg² a aᵀ, q = Σ W bg a G S, d = Σ W (G S)². Profiling the
    background: Cp = C − Vᵀ Fbb⁺ V, up = u − Vᵀ Fbb⁺ q, dp = d − qᵀ Fbb⁺ q. With
    B_i = diag(∂I_i/∂u) M over the span's grid points (i = site and kind; the row of M of
    channel c of row h of I has its two entries at ``map_k0[h_map[h], c]``, + 1 with weights
    1 − ``map_t``, ``map_t``), shoebox chunk
    ``ch`` adds B_iᵀ Cp B_i' into ``F_ch[ch]`` and diag(B_iᵀ C B_i) into ``dglob_ch[ch]``;
    ``c_sb[k]`` = Bᵀ up, ``dp_sb``, ``d_sb`` and ``db_sb`` = diag(Fbb) per shoebox. Chunks are
    fixed ranges of shoeboxes (not threads): the sums do not depend on the thread count.
    """
    n_sb = len(sb_lat)
    n_ref = dfp.shape[0]
    n_i = 2 * n_ref
    per = (n_sb + n_chunks - 1) // n_chunks
    for ch in numba.prange(n_chunks):
        for k in range(ch * per, min(n_sb, (ch + 1) * per)):
            j = sb_lat[k]
            h = sb_h[k]
            g = G[j]
            c0 = span_lo[k]
            ns = span_off[k + 1] - span_off[k]
            C = np.zeros((ns, ns))
            V = np.zeros((3, ns))
            u = np.zeros(ns)
            Fbb = np.zeros((3, 3))
            q = np.zeros(3)
            d = 0.0
            x0 = bbox[k, 0]
            width = bbox[k, 1] - bbox[k, 0]
            y0 = bbox[k, 2]
            xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
            yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
            av = np.empty(3)
            o = sb_offset[k]
            wv = np.empty(max(ns, 1))
            for p in range(pix_off[k], pix_off[k + 1]):
                a0 = np.int64(lo[p]) - c0
                n = np.int64(length[p])
                if mask[p]:
                    # views indexed by loop counters only: no wraparound tests, the loops vectorise
                    vals = values[o:o + n]
                    Ip = I[h, c0 + a0:c0 + a0 + n]
                    s = 0.0
                    for i in range(n):
                        wv[i] = np.float64(vals[i])
                        s += wv[i] * Ip[i]
                    loc = p - pix_off[k]
                    av[0] = 1.0
                    av[1] = (x0 + loc % width) + 0.5 - xc
                    av[2] = (y0 + loc // width) + 0.5 - yc
                    bgp = math.exp(bg[k, 0] + bg[k, 1] * av[1] + bg[k, 2] * av[2])
                    gs = g * s
                    W = 1.0 / (gs + bgp)
                    ub = u[a0:a0 + n]
                    for i in range(n):
                        wi = wv[i]
                        f = W * g * g * wi
                        Crow = C[a0 + i, a0:a0 + n]
                        for e in range(n):
                            Crow[e] += f * wv[e]
                        ub[i] += W * g * gs * wi
                    for a in range(3):
                        Va = V[a, a0:a0 + n]
                        fa = W * bgp * av[a] * g
                        for i in range(n):
                            Va[i] += fa * wv[i]
                    for a in range(3):
                        q[a] += W * bgp * av[a] * gs
                        for b in range(3):
                            Fbb[a, b] += W * bgp * bgp * av[a] * av[b]
                    d += W * gs * gs
                o += n
            Finv = np.empty((3, 3))
            _pinv_sym3(Fbb, Finv)
            fq = Finv @ q
            dp = d - (q[0] * fq[0] + q[1] * fq[1] + q[2] * fq[2])
            d_sb[k] = d
            dp_sb[k] = dp
            for a in range(3):
                db_sb[k, a] = Fbb[a, a]
            if ns == 0:
                continue
            X = Finv @ V                                             # (3, ns)
            Cp = C - V.T @ X
            up = u - X.T @ q
            hm = h_map[h]
            g_lo = map_k0[hm, c0]
            g_hi = g_lo
            for c in range(ns):
                g_lo = min(g_lo, map_k0[hm, c0 + c])
                g_hi = max(g_hi, map_k0[hm, c0 + c])
            n_gl = g_hi + 2 - g_lo
            B = np.zeros((n_i, ns, n_gl))
            for c in range(ns):
                cc = c0 + c
                kc = map_k0[hm, cc] - g_lo
                t = map_t[hm, cc]
                for s_ in range(n_ref):
                    vf = dfp[s_, cc, h]
                    vd = dfdp[s_, cc, h]
                    B[s_, c, kc] += vf * (1.0 - t)
                    B[s_, c, kc + 1] += vf * t
                    B[n_ref + s_, c, kc] += vd * (1.0 - t)
                    B[n_ref + s_, c, kc + 1] += vd * t
            for i2 in range(n_i):
                Bi2 = np.ascontiguousarray(B[i2])
                Z = Cp @ Bi2                                          # (ns, n_gl)
                Zc = C @ Bi2
                col2 = i2 * n_grid + g_lo
                for a in range(n_gl):
                    acc = 0.0
                    cu = 0.0
                    for c in range(ns):
                        acc += Bi2[c, a] * Zc[c, a]
                        cu += Bi2[c, a] * up[c]
                    dglob_ch[ch, col2 + a] += acc
                    c_sb[k, col2 + a] = cu
                for i1 in range(n_i):
                    blk = np.ascontiguousarray(B[i1]).T @ Z          # (n_gl, n_gl)
                    col1 = i1 * n_grid + g_lo
                    for a in range(n_gl):
                        for b in range(n_gl):
                            F_ch[ch, col1 + a, col2 + b] += blk[a, b]


@numba.njit(parallel=True, cache=True)
def _jacobian_bands(values, lo, length, sb_offset, pix_off, k0, k1, sb_h, dfp, dfdp, Gp, map_k0, map_t, h_map,
                    n_grid, out):  # pragma: no cover - numba
    """out[p − p0, s*n_grid + g] (fp) and out[p − p0, n_fp + ...] (fdp) = G Σ_band w ∂I/∂u M for the
    pixels of shoeboxes k0:k1 (p0 their first pixel)."""
    n_ref = dfp.shape[0]
    n_fp = n_ref * n_grid
    p0 = pix_off[k0]
    for k in numba.prange(k0, k1):
        h = sb_h[k]
        hm = h_map[h]
        o = sb_offset[k]
        for p in range(pix_off[k], pix_off[k + 1]):
            g = Gp[p]
            n = np.int64(length[p])
            for i in range(n):
                c = np.int64(lo[p]) + i
                wc = g * np.float64(values[o + i])
                if wc == 0.0:
                    continue
                a = wc * (1.0 - map_t[hm, c])
                b = wc * map_t[hm, c]
                kk = map_k0[hm, c]
                for s in range(n_ref):
                    base = s * n_grid + kk
                    v = dfp[s, c, h]
                    out[p - p0, base] += a * v
                    out[p - p0, base + 1] += b * v
                    v = dfdp[s, c, h]
                    out[p - p0, n_fp + base] += a * v
                    out[p - p0, n_fp + base + 1] += b * v
            o += n


class FisherInformationMixin:
    """Fisher-information methods of :class:`spread_tools.refine.objective.S1Problem`.

    Expects the host class to provide the pixel model ``pm`` (or ``None``), the layout
    sizes ``n_glob``, ``n_ref``, ``n_grid``, the channel energies ``channel_ev``, the two
    entries of each row of the interpolation matrix per row of I (``_map_k0``, ``_map_t``,
    ``_h_map``: see ``S1Problem._set_lookup_maps``), and the methods
    ``_local_params`` and ``_intensities``.
    """

    def _pixel_terms(self, x):
        """Per-pixel arrays at x (pixel route): W = mask/λ, S (Bragg at G=1), bg, G per pixel,
        shoebox per pixel, x̂, ŷ, and ∂I/∂f′, ∂I/∂f″."""
        fp, fdp, g, b = self._local_params(x)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        lam = self.pm.expected_counts(I, G, b)
        S = self.pm.bragg_counts(I)
        sb = self.pm.pixel_shoebox
        xh, yh = self.pm.pixel_offsets_xy()
        bg = np.exp(b[sb, 0] + b[sb, 1] * xh + b[sb, 2] * yh)
        W = np.where(self.pm.mask, 1.0 / lam, 0.0)
        Gp = G[self.pm.sb_lattice[sb]]
        return W, S, bg, Gp, dfp, dfdp, sb, xh, yh

    def _chunks(self, max_pix=65536):
        off = self.pm.pixel_offset
        k = 0
        while k < self.pm.n_sb:
            stop = int(np.searchsorted(off, off[k] + max_pix, side="right")) - 1
            stop = max(stop, k + 1)
            stop = min(stop, self.pm.n_sb)
            yield k, stop
            k = stop

    def _jac_global(self, k0, k1, Gp, dfp, dfdp):
        """∂λ/∂(fp, fdp grid) of the pixels of shoeboxes k0:k1, (n_p, n_glob), from the bands."""
        pm = self.pm
        b = pm.bands
        p0, p1 = pm.pixel_offset[k0], pm.pixel_offset[k1]
        out = np.zeros((p1 - p0, self.n_glob))
        _jacobian_bands(b.host_values(), b.lo, b.length, b.sb_offset, pm.pixel_offset, k0, k1, pm.sb_h_index,
                        np.ascontiguousarray(dfp), np.ascontiguousarray(dfdp), np.ascontiguousarray(Gp),
                        self._map_k0, self._map_t, self._h_map, self.n_grid, out)
        return out

    def local_fisher_diag(self, x):
        """Diagonal of this rank's Fisher information (pixel route): (global (n_glob,), local (n_loc,))."""
        if self.pm is None:
            return np.zeros(self.n_glob), np.zeros(0)
        W, S, bg, Gp, dfp, dfdp, sb, xh, yh = self._pixel_terms(x)
        dglob = np.zeros(self.n_glob)
        for k0, k1 in self._chunks():
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            J = self._jac_global(k0, k1, Gp, dfp, dfdp)
            dglob += np.einsum("p,pi,pi->i", W[p0:p1], J, J)
        lat_pix = self.pm.sb_lattice[sb]
        dg = np.bincount(lat_pix, weights=W * (Gp * S) ** 2, minlength=self.pm.n_lat)
        a = np.stack([np.ones_like(xh), xh, yh], axis=1)
        starts = self.pm.pixel_offset[:-1]
        db = np.stack([np.add.reduceat(W * (bg * a[:, i]) ** 2, starts) for i in range(3)], axis=1)
        return dglob, np.concatenate([dg, db.ravel()])

    def local_fisher_profiled(self, x):
        """This rank's global-block Fisher information with its local parameters profiled out
        (pixel route).

        Per shoebox the background block is eliminated (Schur complement), then per
        lattice the scale g; the result adds over lattices, hence over ranks.

        Returns
        -------
        array (n_glob, n_glob)
        """
        ng = self.n_glob
        if self.pm is None:
            return np.zeros((ng, ng))
        W, S, bg, Gp, dfp, dfdp, sb, xh, yh = self._pixel_terms(x)
        F = np.zeros((ng, ng))
        n_lat = self.pm.n_lat
        c = np.zeros((n_lat, ng))
        d = np.zeros(n_lat)
        for k0, k1 in self._chunks(16384):
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            Jg = self._jac_global(k0, k1, Gp, dfp, dfdp)
            gcol = Gp[p0:p1] * S[p0:p1]
            Jy = np.concatenate([Jg, gcol[:, None]], axis=1)                            # (n_p, ng+1)
            Wc = W[p0:p1]
            F += Jg.T @ (Wc[:, None] * Jg)
            xa = xh[p0:p1]
            ya = yh[p0:p1]
            Jb = bg[p0:p1, None] * np.stack([np.ones_like(xa), xa, ya], axis=1)        # (n_p, 3)
            starts = self.pm.pixel_offset[k0:k1] - p0
            WJb = Wc[:, None] * Jb
            Fbb = np.add.reduceat(WJb[:, :, None] * Jb[:, None, :], starts, axis=0)   # (n_k, 3, 3)
            Fby = np.stack([np.add.reduceat(WJb[:, a, None] * Jy, starts, axis=0)
                            for a in range(3)], axis=1)                                 # (n_k, 3, ng+1)
            X = np.linalg.pinv(Fbb, hermitian=True) @ Fby                             # (n_k, 3, ng+1)
            F -= np.einsum("kai,kaj->ij", Fby[:, :, :ng], X[:, :, :ng])
            lat = self.pm.sb_lattice[k0:k1]
            # per shoebox: (glob, g) column and (g, g) entry, minus the background-profile terms
            cs = np.add.reduceat(Jg * (Wc * gcol)[:, None], starts, axis=0)
            ds_ = np.add.reduceat(Wc * gcol * gcol, starts)
            cs -= np.einsum("kai,ka->ki", Fby[:, :, :ng], X[:, :, ng])
            ds_ -= np.einsum("ka,ka->k", Fby[:, :, ng], X[:, :, ng])
            np.add.at(c, lat, cs)
            np.add.at(d, lat, ds_)
        ok = d > 1e-300
        F -= (c[ok] / d[ok, None]).T @ c[ok]
        return 0.5 * (F + F.T)

    def local_fisher(self, x, chunk=64, route="auto"):
        """This rank's Fisher information (profiled global block and diagonals).

        Two routes give the same numbers (tested): ``"channel"`` accumulates per-shoebox
        channel-space moments Σ w wᵀ/λ over each shoebox's channel span (the union of its
        pixels' bands; cost ∝ Σ_pixels band² plus per shoebox span² × grid points, whatever
        the number of channels) and ``"pixel"`` forms ∂λ/∂u per pixel (cost ∝ pixels ×
        n_glob², a cross-check); ``"auto"`` is the channel route.

        Parameters
        ----------
        x : array (n_x,)
        chunk : int
            Number of fixed shoebox ranges the channel route sums separately (then in order;
            the result does not depend on the number of threads).
        route : {"auto", "channel", "pixel"}

        Returns
        -------
        F_prof : (n_glob, n_glob)
            Global block with the local parameters profiled out (b per shoebox, then g
            per lattice).
        diag_glob : (n_glob,)
            Diagonal of the unprofiled global block.
        diag_loc : (n_lat_rank + 3 n_sb_rank,)
            Diagonal of the local block (g, then b0, b1, b2 per shoebox).
        """
        ng = self.n_glob
        if self.pm is None:
            return np.zeros((ng, ng)), np.zeros(ng), np.zeros(0)
        if route == "pixel":
            dglob, dloc = self.local_fisher_diag(x)
            return self.local_fisher_profiled(x), dglob, dloc
        pm = self.pm
        fp, fdp, g, b = self._local_params(x)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        n_sb = pm.n_sb
        n_chunks = max(1, min(int(chunk), n_sb))
        F_ch = np.zeros((n_chunks, ng, ng))
        dglob_ch = np.zeros((n_chunks, ng))
        c_sb = np.zeros((n_sb, ng))
        dp_sb = np.zeros(n_sb)
        d_sb = np.zeros(n_sb)
        db = np.zeros((n_sb, 3))
        bd = pm.bands
        _fisher_bands(bd.host_values(), bd.lo, bd.length, bd.sb_offset, pm.pixel_offset, pm.bbox, pm.mask,
                      pm.sb_lattice, pm.sb_h_index, pm.span_lo, pm.span_off, np.ascontiguousarray(I), G,
                      np.ascontiguousarray(b), np.ascontiguousarray(dfp), np.ascontiguousarray(dfdp),
                      self._map_k0, self._map_t, self._h_map, self.n_grid, n_chunks, F_ch, dglob_ch, c_sb,
                      dp_sb, d_sb, db)
        F = F_ch.sum(axis=0)
        dglob = dglob_ch.sum(axis=0)
        lat = pm.sb_lattice
        c = np.zeros((pm.n_lat, ng))
        np.add.at(c, lat, c_sb)
        dj = np.bincount(lat, weights=dp_sb, minlength=pm.n_lat)
        dg = np.bincount(lat, weights=d_sb, minlength=pm.n_lat)
        ok = dj > 1e-300
        F -= (c[ok] / dj[ok, None]).T @ c[ok]
        return 0.5 * (F + F.T), dglob, np.concatenate([dg, db.ravel()])


def _invert(F):
    """Covariance from an information matrix (pseudo-inverse when singular)."""
    try:
        evals, evecs = np.linalg.eigh(F)
    except np.linalg.LinAlgError:
        return np.full_like(F, np.nan)
    tol = max(evals.max(initial=0.0), 0.0) * 1e-13
    inv = np.where(evals > tol, 1.0 / np.where(evals > tol, evals, 1.0), 0.0)
    cov = (evecs * inv) @ evecs.T
    bad = np.abs(evecs[:, evals <= tol]).max(axis=1, initial=0.0) > 1e-6
    cov[bad, :] = np.nan
    cov[:, bad] = np.nan
    return cov


def edge_position(energy_ev, fdp, cov=None, pre_edge_max_ev=None, post_edge_min_ev=None):
    """Energy where f″ first crosses half its step, with its standard uncertainty.

    The level is L = (f″_pre + f″_post)/2, with f″_pre the mean of f″ over the grid points
    at or below ``pre_edge_max_ev`` and f″_post the mean over the points at or above
    ``post_edge_min_ev`` (without them: the first and the last grid point alone). The
    edge is the first upward crossing of L after the pre-edge points, interpolated
    linearly between the two grid points around it. Means over several points make the
    level, and so the edge, far less noisy than the two end points (which the SASE
    spectra cover least); refine_fdp takes the windows from the reference table's edge
    (:data:`EDGE_PRE_GAP_EV`, :data:`EDGE_POST_GAP_EV`).

    Parameters
    ----------
    energy_ev : array (n,)
    fdp : array (n,)
    cov : array (n, n), optional
        Covariance of ``fdp``.
    pre_edge_max_ev, post_edge_min_ev : float, optional
        Upper end of the pre-edge window and lower end of the post-edge window (eV);
        clipped to the grid, so each window holds at least its end point.

    Returns
    -------
    edge_ev, sigma_ev : float
        NaN when f″ does not rise from the pre-edge to the post-edge level, when the
        windows overlap, or when there is no crossing.
    """
    edge, grad = _edge_and_gradient(energy_ev, fdp, pre_edge_max_ev, post_edge_min_ev)
    if cov is None or not math.isfinite(edge):
        return edge, math.nan
    var = float(grad @ np.asarray(cov) @ grad)
    return edge, math.sqrt(var) if var >= 0 else math.nan


def _edge_and_gradient(energy_ev, fdp, pre_edge_max_ev=None, post_edge_min_ev=None):
    """:func:`edge_position` without σ: the edge (eV, NaN where undefined) and ∂edge/∂f″."""
    e = np.asarray(energy_ev, dtype=np.float64)
    f = np.asarray(fdp, dtype=np.float64)
    nan = (math.nan, np.full(len(f), math.nan))
    lo = e <= (e[0] if pre_edge_max_ev is None else max(float(pre_edge_max_ev), e[0]))
    hi = e >= (e[-1] if post_edge_min_ev is None else min(float(post_edge_min_ev), e[-1]))
    if np.any(lo & hi):
        return nan
    a_level = 0.5 * (lo / lo.sum() + hi / hi.sum())            # L = a_level @ f
    level = float(a_level @ f)
    if not float(hi @ f) / hi.sum() > float(lo @ f) / lo.sum():
        return nan
    k_start = int(np.flatnonzero(lo)[-1]) + 1
    above = k_start + np.flatnonzero(f[k_start:] >= level)
    if above.size == 0:
        return nan
    k1 = int(above[0])
    k = k1 - 1
    de = e[k1] - e[k]
    df = f[k1] - f[k]
    edge = e[k] + (level - f[k]) / df * de
    grad = a_level * de / df
    grad[k] += de * (level - f[k1]) / df ** 2
    grad[k1] += -de * (level - f[k]) / df ** 2
    return float(edge), grad


def edge_shift(energy_ev, fdp_a, fdp_b, cov, window_a=(None, None), window_b=(None, None)):
    """Edge of site a minus edge of site b (:func:`edge_position`), σ from their joint covariance.

    Parameters
    ----------
    energy_ev : array (n,)
    fdp_a, fdp_b : arrays (n,)
    cov : array (2n, 2n)
        Covariance of ``(fdp_a, fdp_b)``: the cross terms count (the sites share the
        lattices' scales and backgrounds).
    window_a, window_b : (pre_edge_max_ev, post_edge_min_ev) of each site

    Returns
    -------
    shift_ev, sigma_ev : float
    """
    ea, ga = _edge_and_gradient(energy_ev, fdp_a, *window_a)
    eb, gb = _edge_and_gradient(energy_ev, fdp_b, *window_b)
    shift = ea - eb
    if not math.isfinite(shift):
        return math.nan, math.nan
    g = np.concatenate([ga, -gb])
    var = float(g @ np.asarray(cov) @ g)
    return float(shift), math.sqrt(var) if var >= 0 else math.nan
