"""Curvature and uncertainties of the S1 objective.

Gauss–Newton / Fisher information ``Jᵀ diag(1/λ) J`` of the Poisson likelihood with the
local parameters (backgrounds per shoebox, then scales per lattice) profiled out exactly
(Schur complements), its diagonals for the optimizer's preconditioner, the covariance
(pseudo-)inverse, and the edge position of f″ with its propagated uncertainty. See
:mod:`spread_tools.refine.s1`, section *Uncertainties*.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["FisherInformationMixin", "edge_position"]


@numba.njit(cache=True, parallel=True)
def _shoebox_moments(w, W, S, bg, Gp, xh, yh, pix_off, k0, k1, C, V, u, Fbb, q, d):  # pragma: no cover
    """Per-shoebox channel-space sums of shoeboxes k0:k1 (index k - k0 in the outputs).

    C[k] = Σ W G² w wᵀ, V[k, a] = Σ W bg a_a G w, u[k] = Σ W G² S w, Fbb[k] = Σ W bg² a aᵀ,
    q[k] = Σ W bg a G S, d[k] = Σ W (G S)², with a = (1, x̂, ŷ).
    """
    n_chan = w.shape[1]
    for kk in numba.prange(k1 - k0):
        k = k0 + kk
        for p in range(pix_off[k], pix_off[k + 1]):
            wp = W[p]
            if wp == 0.0:
                continue
            g = Gp[p]
            av = (1.0, xh[p], yh[p])
            gs = g * S[p]
            for c in range(n_chan):
                wc = w[p, c]
                if wc == 0.0:
                    continue
                f = wp * g * g * wc
                for e in range(n_chan):
                    C[kk, c, e] += f * w[p, e]
                u[kk, c] += wp * g * gs * wc
                for a in range(3):
                    V[kk, a, c] += wp * bg[p] * av[a] * g * wc
            for a in range(3):
                q[kk, a] += wp * bg[p] * av[a] * gs
                for b in range(3):
                    Fbb[kk, a, b] += wp * bg[p] * bg[p] * av[a] * av[b]
            d[kk] += wp * gs * gs

@numba.njit(cache=True, parallel=True)
def _jacobian_kernel(w, dfp, dfdp, hp, Gp, k0, t, n_grid, out):  # pragma: no cover - numba
    """out[p, s*n_grid + k] (fp) and out[p, n_fp + ...] (fdp): G Σ_c w[p,c] ∂I/∂u[s,c,h_p] M[c,k]."""
    n_p, n_chan = w.shape
    n_ref = dfp.shape[0]
    n_fp = n_ref * n_grid
    for p in numba.prange(n_p):
        h = hp[p]
        g = Gp[p]
        for c in range(n_chan):
            wc = g * w[p, c]
            if wc == 0.0:
                continue
            a = wc * (1.0 - t[c])
            b = wc * t[c]
            k = k0[c]
            for s in range(n_ref):
                base = s * n_grid + k
                v = dfp[s, c, h]
                out[p, base] += a * v
                out[p, base + 1] += b * v
                v = dfdp[s, c, h]
                out[p, n_fp + base] += a * v
                out[p, n_fp + base + 1] += b * v


class FisherInformationMixin:
    """Fisher-information methods of :class:`spread_tools.refine.objective.S1Problem`.

    Expects the host class to provide the pixel model ``pm`` (or ``None``), the per-pixel
    offsets ``xh``, ``yh``, the layout sizes ``n_glob``, ``n_ref``, ``n_grid``, the
    channel energies ``channel_ev``, the interpolation matrix ``M_dense`` with its two
    entries per row ``_m_k0``, ``_m_t``, and the methods ``_local_params`` and
    ``_intensities``.
    """

    def _pixel_terms(self, x):
        """Per-pixel arrays at x: W = mask/λ, S (Bragg at G=1), bg, G per pixel, h row per pixel."""
        fp, fdp, g, b = self._local_params(x)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        lam = self.pm.expected_counts(I, G, b)
        S = self.pm.bragg_counts(I)
        sb = self.pm.pixel_shoebox
        bg = np.exp(b[sb, 0] + b[sb, 1] * self.xh + b[sb, 2] * self.yh)
        W = np.where(self.pm.mask, 1.0 / lam, 0.0)
        Gp = G[self.pm.sb_lattice[sb]]
        return W, S, bg, Gp, dfp, dfdp, sb

    def _chunks(self, max_pix=65536):
        off = self.pm.pixel_offset
        k = 0
        while k < self.pm.n_sb:
            stop = int(np.searchsorted(off, off[k] + max_pix, side="right")) - 1
            stop = max(stop, k + 1)
            stop = min(stop, self.pm.n_sb)
            yield k, stop
            k = stop

    def _jac_global(self, p0, p1, sb, Gp, dfp, dfdp, w):
        """∂λ/∂(fp, fdp grid) of pixels p0:p1, (n_p, n_glob) (Numba, M's two entries per channel)."""
        hp = np.ascontiguousarray(self.pm.sb_h_index[sb[p0:p1]])
        out = np.zeros((p1 - p0, self.n_glob))
        _jacobian_kernel(w[p0:p1], np.ascontiguousarray(dfp), np.ascontiguousarray(dfdp), hp,
                         np.ascontiguousarray(Gp[p0:p1]), self._m_k0, self._m_t, self.n_grid, out)
        return out

    def local_fisher_diag(self, x):
        """Diagonal of this rank's Fisher information: (global (n_glob,), local (n_loc,))."""
        if self.pm is None:
            return np.zeros(self.n_glob), np.zeros(0)
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        dglob = np.zeros(self.n_glob)
        for k0, k1 in self._chunks():
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            J = self._jac_global(p0, p1, sb, Gp, dfp, dfdp, w)
            dglob += np.einsum("p,pi,pi->i", W[p0:p1], J, J)
        lat_pix = self.pm.sb_lattice[sb]
        dg = np.bincount(lat_pix, weights=W * (Gp * S) ** 2, minlength=self.pm.n_lat)
        a = np.stack([np.ones_like(self.xh), self.xh, self.yh], axis=1)
        starts = self.pm.pixel_offset[:-1]
        db = np.stack([np.add.reduceat(W * (bg * a[:, i]) ** 2, starts) for i in range(3)], axis=1)
        return dglob, np.concatenate([dg, db.ravel()])

    def local_fisher_profiled(self, x):
        """This rank's global-block Fisher information with its local parameters profiled out.

        Per shoebox the background block is eliminated (Schur complement), then per
        lattice the scale g; the result adds over lattices, hence over ranks.

        Returns
        -------
        array (n_glob, n_glob)
        """
        ng = self.n_glob
        if self.pm is None:
            return np.zeros((ng, ng))
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        F = np.zeros((ng, ng))
        n_lat = self.pm.n_lat
        c = np.zeros((n_lat, ng))
        d = np.zeros(n_lat)
        for k0, k1 in self._chunks(16384):
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            Jg = self._jac_global(p0, p1, sb, Gp, dfp, dfdp, w)
            gcol = Gp[p0:p1] * S[p0:p1]
            Jy = np.concatenate([Jg, gcol[:, None]], axis=1)                            # (n_p, ng+1)
            Wc = W[p0:p1]
            F += Jg.T @ (Wc[:, None] * Jg)
            xa = self.xh[p0:p1]
            ya = self.yh[p0:p1]
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

    def _dense_D(self, h, dfp, dfdp):
        """D[k] = ∂I[h_k, c]/∂u (n_k, n_chan, n_glob): diag(∂I/∂u_s) M per site and kind."""
        ng = self.n_grid
        D = np.zeros((len(h), len(self.channel_ev), self.n_glob))
        for t, d in enumerate((dfp, dfdp)):
            for s in range(self.n_ref):
                col = (t * self.n_ref + s) * ng
                D[:, :, col:col + ng] = d[s][:, h].T[:, :, None] * self.M_dense[None]
        return D

    def local_fisher(self, x, chunk=2048, route="auto"):
        """This rank's Fisher information (profiled global block and diagonals).

        Two routes give the same numbers (tested): ``"channel"`` accumulates per-shoebox
        channel-space moments Σ w wᵀ/λ (cost ∝ pixels × channels², fast for the usual
        ≤ 48 channels) and ``"pixel"`` forms ∂λ/∂u per pixel (cost ∝ pixels × n_glob²,
        better for many channels, e.g. 101 channels of 1 eV); ``"auto"`` picks by channels.

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
        if route == "pixel" or (route == "auto" and self.pm.n_chan > 48):
            dglob, dloc = self.local_fisher_diag(x)
            return self.local_fisher_profiled(x), dglob, dloc
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        n_chan = w.shape[1]
        n_lat = self.pm.n_lat
        F = np.zeros((ng, ng))
        dglob = np.zeros(ng)
        c = np.zeros((n_lat, ng))
        dj = np.zeros(n_lat)
        dg = np.zeros(n_lat)
        db = np.zeros((self.pm.n_sb, 3))
        off = np.ascontiguousarray(self.pm.pixel_offset)
        for k0 in range(0, self.pm.n_sb, chunk):
            k1 = min(k0 + chunk, self.pm.n_sb)
            n = k1 - k0
            C = np.zeros((n, n_chan, n_chan))
            V = np.zeros((n, 3, n_chan))
            u = np.zeros((n, n_chan))
            Fbb = np.zeros((n, 3, 3))
            q = np.zeros((n, 3))
            d = np.zeros(n)
            _shoebox_moments(w, W, S, bg, Gp, self.xh, self.yh, off, k0, k1, C, V, u, Fbb, q, d)
            D = self._dense_D(self.pm.sb_h_index[k0:k1], dfp, dfdp)
            CD = C @ D                                                        # (n, n_chan, ng)
            dglob += np.einsum("kci,kci->i", D, CD)
            Finv = np.linalg.pinv(Fbb, hermitian=True)
            X = Finv @ V                                                      # (n, 3, n_chan)
            Cp = C - np.einsum("kac,kae->kce", V, X)
            F += D.reshape(-1, ng).T @ (Cp @ D).reshape(-1, ng)
            up = u - np.einsum("kac,ka->kc", X, q)
            dp = d - np.einsum("ka,kab,kb->k", q, Finv, q)
            lat = self.pm.sb_lattice[k0:k1]
            np.add.at(c, lat, np.einsum("kci,kc->ki", D, up))
            np.add.at(dj, lat, dp)
            np.add.at(dg, lat, d)
            db[k0:k1] = np.diagonal(Fbb, axis1=1, axis2=2)
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


def edge_position(energy_ev, fdp, cov=None):
    """Energy where f″ first crosses half its step, with its standard uncertainty.

    The step is from the first to the last grid point: level L = (f″_0 + f″_last)/2;
    the crossing is interpolated linearly between the two grid points around it.

    Parameters
    ----------
    energy_ev : array (n,)
    fdp : array (n,)
    cov : array (n, n), optional
        Covariance of ``fdp``.

    Returns
    -------
    edge_ev, sigma_ev : float
        NaN when f″ does not rise from the first to the last point.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    f = np.asarray(fdp, dtype=np.float64)
    n = len(f)
    level = 0.5 * (f[0] + f[-1])
    if not f[-1] > f[0]:
        return math.nan, math.nan
    above = np.flatnonzero(f >= level)
    k1 = int(above[0])
    if k1 == 0:
        return math.nan, math.nan
    k = k1 - 1
    de = e[k1] - e[k]
    df = f[k1] - f[k]
    edge = e[k] + (level - f[k]) / df * de
    if cov is None:
        return float(edge), math.nan
    grad = np.zeros(n)
    grad[0] += 0.5 * de / df
    grad[-1] += 0.5 * de / df
    grad[k] += de * (level - f[k1]) / df ** 2
    grad[k1] += -de * (level - f[k]) / df ** 2
    var = float(grad @ np.asarray(cov) @ grad)
    return float(edge), math.sqrt(var) if var >= 0 else math.nan
