"""Exact fit of the local S1 parameters (scale per lattice, background per shoebox) at fixed curves.

With f′, f″ fixed, the Bragg part of every pixel at unit scale ``S_p = Σ_c w[p,c] I(h_p, E_c)``
is fixed too, and the model of pixel p of shoebox k in lattice j is

    λ_p = G_j S_p + exp(b0_k + b1_k x̂_p + b2_k ŷ_p),      G_j = exp(g_j),

so the local parameters of different lattices are independent. For each lattice this
module minimises its Poisson NLL plus the weak prior on ln G,

    Σ_p (λ_p − k_p ln λ_p) + (g_j − μ)² / (2 σ_G²),

by Fisher scoring on (g_j, b_1 … b_m) jointly: the expected information of a lattice is an
arrow matrix (g couples to every shoebox's 3×3 background block), solved exactly by
eliminating the background blocks (Schur complement). Every step is halved per lattice
until that lattice's objective does not increase, and capped (|Δg|, |Δb0| ≤ 2, the
background slopes by 2 across the shoebox), so a start far off (a moment-match G 500 times
too small) is walked in safely. The loop ends when every lattice's Newton decrement is
below ``tol`` (objective change of the step, in the units of the NLL) or after ``max_rounds``.

Used for the start values of S1 and before every macrocycle (a block-coordinate step: the
L-BFGS macrocycle then starts from locals that are optimal for its current curves).
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np

__all__ = ["LocalFit", "fit_locals", "local_objective_per_lattice"]

_MAX_STEP = 2.0


@numba.njit(cache=True, parallel=True)
def _shoebox_terms(S, counts, mask, pix_off, sb_lat, G, b, xh, yh, want, nll, rb, Fb, cb, rg, dg):  # pragma: no cover
    """Per shoebox: NLL and (when ``want``) gradient / expected information of its terms.

    nll[k] = Σ (λ − k ln λ); rb[k] = ∂/∂b; Fb[k] = Σ B² a aᵀ/λ; cb[k] = Σ G S B a/λ;
    rg[k] = ∂/∂g of its pixels; dg[k] = Σ (G S)²/λ. A pixel with λ ≤ 0 or non-finite makes
    nll[k] = inf (never happens for finite parameters: both parts are positive).
    """
    n_sb = len(sb_lat)
    for k in numba.prange(n_sb):
        Gk = G[sb_lat[k]]
        b0, b1, b2 = b[k, 0], b[k, 1], b[k, 2]
        f = 0.0
        r0 = r1 = r2 = 0.0
        f00 = f01 = f02 = f11 = f12 = f22 = 0.0
        c0 = c1 = c2 = 0.0
        gg = 0.0
        d = 0.0
        for p in range(pix_off[k], pix_off[k + 1]):
            if not mask[p]:
                continue
            x = xh[p]
            y = yh[p]
            B = np.exp(b0 + b1 * x + b2 * y)
            gs = Gk * S[p]
            lam = gs + B
            kp = counts[p]
            if not (lam > 0.0) or not np.isfinite(lam):
                f = np.inf
                continue
            f += lam - (kp * np.log(lam) if kp != 0.0 else 0.0)
            if want:
                e = 1.0 - kp / lam
                r0 += e * B
                r1 += e * B * x
                r2 += e * B * y
                gg += e * gs
                wB = B / lam
                bb = B * wB
                f00 += bb
                f01 += bb * x
                f02 += bb * y
                f11 += bb * x * x
                f12 += bb * x * y
                f22 += bb * y * y
                cw = gs * wB
                c0 += cw
                c1 += cw * x
                c2 += cw * y
                d += gs * gs / lam
        nll[k] = f
        if want:
            rb[k, 0] = r0
            rb[k, 1] = r1
            rb[k, 2] = r2
            Fb[k, 0, 0] = f00
            Fb[k, 0, 1] = f01
            Fb[k, 1, 0] = f01
            Fb[k, 0, 2] = f02
            Fb[k, 2, 0] = f02
            Fb[k, 1, 1] = f11
            Fb[k, 1, 2] = f12
            Fb[k, 2, 1] = f12
            Fb[k, 2, 2] = f22
            cb[k, 0] = c0
            cb[k, 1] = c1
            cb[k, 2] = c2
            rg[k] = gg
            dg[k] = d


@dataclasses.dataclass
class LocalFit:
    """Outcome of :func:`fit_locals`.

    Attributes
    ----------
    g : array (n_lat,)
        ln G per lattice.
    b : array (n_sb, 3)
        Background (b0, b1, b2) per shoebox.
    rounds : int
        Fisher-scoring rounds taken.
    decrement : float
        Largest Newton decrement (objective units) of the last round.
    converged : bool
        ``decrement <= tol`` was reached.
    """

    g: np.ndarray
    b: np.ndarray
    rounds: int
    decrement: float
    converged: bool


class _Pixels:
    """The fixed per-pixel arrays of one rank (views, no copies)."""

    def __init__(self, S, counts, mask, pixel_offset, sb_lattice, xh, yh, n_lat):
        self.S = np.ascontiguousarray(S, dtype=np.float64)
        self.counts = np.ascontiguousarray(counts, dtype=np.float32)
        self.mask = np.ascontiguousarray(mask, dtype=np.bool_)
        self.off = np.ascontiguousarray(pixel_offset, dtype=np.int64)
        self.sb_lat = np.ascontiguousarray(sb_lattice, dtype=np.int64)
        self.xh = np.ascontiguousarray(xh, dtype=np.float64)
        self.yh = np.ascontiguousarray(yh, dtype=np.float64)
        self.n_lat = int(n_lat)
        self.n_sb = len(self.sb_lat)
        # half-extent of each shoebox in pixels (caps the slope steps)
        starts = self.off[:-1]
        if self.n_sb and len(self.xh):
            nonempty = np.diff(self.off) > 0
            ext = np.ones(self.n_sb)
            ax = np.abs(self.xh)
            ay = np.abs(self.yh)
            ext[nonempty] = np.maximum(np.maximum.reduceat(ax, starts[nonempty]),
                                       np.maximum.reduceat(ay, starts[nonempty]))
            self.half_extent = np.maximum(ext, 0.5)
        else:
            self.half_extent = np.ones(self.n_sb)

    def terms(self, g, b, want=True):
        n = self.n_sb
        nll = np.zeros(n)
        rb = np.zeros((n if want else 0, 3))
        Fb = np.zeros((n if want else 0, 3, 3))
        cb = np.zeros((n if want else 0, 3))
        rg = np.zeros(n if want else 0)
        dg = np.zeros(n if want else 0)
        if n:
            _shoebox_terms(self.S, self.counts, self.mask, self.off, self.sb_lat,
                           np.ascontiguousarray(np.exp(g)), np.ascontiguousarray(b), self.xh,
                           self.yh, want, nll, rb, Fb, cb, rg, dg)
        return nll, rb, Fb, cb, rg, dg

    def per_lattice(self, values):
        return np.bincount(self.sb_lat, weights=values, minlength=self.n_lat)


def _prior_terms(g, prior):
    if prior is None:
        z = np.zeros_like(g)
        return z, z, z
    mu, sigma = prior
    r = (g - mu) / sigma
    return 0.5 * r * r, r / sigma, np.full_like(g, 1.0 / sigma ** 2)


def _slope_prior(b, slope_sigma):
    """Per shoebox: loss, gradient (n_sb, 3) and curvature (3,) of the slope prior."""
    if slope_sigma is None:
        return np.zeros(len(b)), np.zeros_like(b), np.zeros(3)
    w = 1.0 / slope_sigma ** 2
    loss = 0.5 * w * (b[:, 1] ** 2 + b[:, 2] ** 2)
    grad = np.zeros_like(b)
    grad[:, 1:] = w * b[:, 1:]
    return loss, grad, np.array([0.0, w, w])


def local_objective_per_lattice(S, counts, mask, pixel_offset, sb_lattice, xh, yh, g, b, prior=None,
                                slope_sigma=None):
    """Per-lattice NLL (+ priors) of the local model (the objective :func:`fit_locals` lowers).

    Parameters
    ----------
    S : float64 (n_pix,)
        Bragg counts at G = 1.
    counts, mask : (n_pix,)
    pixel_offset : int (n_sb + 1,)
    sb_lattice : int (n_sb,)
    xh, yh : float64 (n_pix,)
        Pixel offsets from the shoebox centre.
    g : float64 (n_lat,)
    b : float64 (n_sb, 3)
    prior : (mu, sigma), optional
        Gaussian prior on g.
    slope_sigma : float, optional
        Gaussian prior N(0, slope_sigma²) on the background slopes b1, b2.

    Returns
    -------
    float64 (n_lat,)
    """
    g = np.asarray(g, float)
    b = np.asarray(b, float)
    px = _Pixels(S, counts, mask, pixel_offset, sb_lattice, xh, yh, len(g))
    nll = px.terms(g, b, want=False)[0]
    return px.per_lattice(nll + _slope_prior(b, slope_sigma)[0]) + _prior_terms(g, prior)[0]


def fit_locals(S, counts, mask, pixel_offset, sb_lattice, xh, yh, g, b, prior=None, tol=1e-6,
               max_rounds=50, slope_sigma=None, g_bounds=(-np.inf, np.inf), b_bounds=None):
    """Minimise every lattice's NLL (+ priors) over its g and backgrounds, within bounds.

    Parameters
    ----------
    S : float64 (n_pix,)
        Bragg counts of every pixel at G = 1 (fixed curves).
    counts : float32 (n_pix,)
    mask : bool (n_pix,)
    pixel_offset : int (n_sb + 1,)
    sb_lattice : int (n_sb,)
        Lattice (0 … n_lat−1) of every shoebox.
    xh, yh : float64 (n_pix,)
        Pixel-centre offsets from the shoebox centre (pixels).
    g : float64 (n_lat,)
        Start ln G.
    b : float64 (n_sb, 3)
        Start backgrounds.
    prior : (mu, sigma), optional
        Gaussian prior on g (mean, standard deviation); None: no prior (a lattice without
        Bragg signal then walks towards G = 0 by at most 2 per round, down to its bound).
    tol : float
        Newton decrement (objective units) at which a lattice counts as converged.
    max_rounds : int
    slope_sigma : float, optional
        Gaussian prior N(0, slope_sigma²) on b1, b2 (ln background per pixel).
    g_bounds : (lo, hi)
        Bounds of g (scalars or (n_lat,) arrays).
    b_bounds : ((3,), (3,)), optional
        Lower and upper bounds of (b0, b1, b2) (default: none).

    Returns
    -------
    LocalFit
    """
    g = np.array(g, dtype=np.float64)
    b = np.array(b, dtype=np.float64).reshape(-1, 3)
    px = _Pixels(S, counts, mask, pixel_offset, sb_lattice, xh, yh, len(g))
    n_lat = px.n_lat
    if px.n_sb == 0 or n_lat == 0:
        return LocalFit(g, b, 0, 0.0, True)
    g_lo = np.broadcast_to(np.asarray(g_bounds[0], float), g.shape)
    g_hi = np.broadcast_to(np.asarray(g_bounds[1], float), g.shape)
    if b_bounds is None:
        b_lo = np.full(3, -np.inf)
        b_hi = np.full(3, np.inf)
    else:
        b_lo, b_hi = (np.asarray(v, float).reshape(3) for v in b_bounds)
    g = np.clip(g, g_lo, g_hi)
    b = np.clip(b, b_lo, b_hi)
    lat = px.sb_lat
    ridge = 1e-12
    eye = np.eye(3)
    dec = np.inf
    rounds = 0
    active = np.ones(n_lat, bool)

    def objective(gg, bb, nll_sb):
        return px.per_lattice(nll_sb + _slope_prior(bb, slope_sigma)[0]) + _prior_terms(gg, prior)[0]

    nll, rb, Fb, cb, rg, dg = px.terms(g, b)
    for rounds in range(1, max_rounds + 1):
        f_lat = objective(g, b, nll)
        _, pr, pd = _prior_terms(g, prior)
        _, sg, sc = _slope_prior(b, slope_sigma)
        rb_t = rb + sg
        Fb_t = Fb + np.diag(sc)[None]
        grad_g = px.per_lattice(rg) + pr
        step = _newton_step(px, Fb_t, rb_t, cb, dg, rg, pd, pr, lat, ridge, eye, None, None)
        # bounds: fix the components that sit on a bound and step out of it, solve again
        fix_g = ((g <= g_lo) & (step[0] < 0)) | ((g >= g_hi) & (step[0] > 0))
        fix_b = ((b <= b_lo) & (step[1] < 0)) | ((b >= b_hi) & (step[1] > 0))
        if fix_g.any() or fix_b.any():
            step = _newton_step(px, Fb_t, rb_t, cb, dg, rg, pd, pr, lat, ridge, eye, fix_g, fix_b)
        dg_full = np.clip(g + step[0], g_lo, g_hi) - g
        db_full = np.clip(b + step[1], b_lo, b_hi) - b
        # Newton decrement per lattice of the projected step: −(gradient · step) (objective units)
        dec_lat = -(px.per_lattice(np.einsum("ka,ka->k", rb_t, db_full)) + grad_g * dg_full)
        dec = float(np.max(np.where(active, dec_lat, 0.0)))
        if dec <= tol:
            return LocalFit(g, b, rounds - 1, dec, True)
        dgl = np.clip(dg_full, -_MAX_STEP, _MAX_STEP)
        dbk = _cap_background_step(db_full, px.half_extent)
        # step halving per lattice until its objective does not increase
        t = np.where(active, 1.0, 0.0)
        g_new, b_new = g.copy(), b.copy()
        done = ~active
        for _ in range(30):
            g_try = np.where(done, g_new, np.clip(g + t * dgl, g_lo, g_hi))
            b_try = np.where(done[lat][:, None], b_new, np.clip(b + t[lat][:, None] * dbk, b_lo, b_hi))
            f_try = objective(g_try, b_try, px.terms(g_try, b_try, want=False)[0])
            ok = (f_try <= f_lat + 1e-12 * np.abs(f_lat)) & ~done
            g_new = np.where(ok, g_try, g_new)
            b_new = np.where(ok[lat][:, None], b_try, b_new)
            done |= ok
            if done.all():
                break
            t = np.where(done, t, 0.5 * t)
        # lattices whose step could not lower their objective are at their optimum to round-off
        active &= (t > 2.0 ** -29) & (dec_lat > tol)
        g, b = g_new, b_new
        nll, rb, Fb, cb, rg, dg = px.terms(g, b)
        if not active.any():
            return LocalFit(g, b, rounds, dec, True)
    return LocalFit(g, b, rounds, dec, dec <= tol)


def _newton_step(px, Fb, rb, cb, dg, rg, pd, pr, lat, ridge, eye, fix_g, fix_b):
    """Fisher-scoring step (Δg per lattice, Δb per shoebox) of the arrow system, components in
    ``fix_g`` / ``fix_b`` held (their rows replaced by the identity)."""
    if fix_b is not None and fix_b.any():
        keep = (~fix_b).astype(np.float64)
        Fb = Fb * keep[:, :, None] * keep[:, None, :] + fix_b[:, :, None] * eye[None]
        rb = rb * keep
        cb = cb * keep
    F = Fb + ridge * (1.0 + np.trace(Fb, axis1=1, axis2=2))[:, None, None] * eye
    Finv = np.linalg.inv(F)
    Fr = np.einsum("kab,kb->ka", Finv, rb)
    Fc = np.einsum("kab,kb->ka", Finv, cb)
    # Schur complement of the background blocks: Δb_k = −F_k⁻¹ (r_k + c_k Δg)
    d = px.per_lattice(dg - np.einsum("ka,ka->k", cb, Fc)) + pd
    r = px.per_lattice(rg - np.einsum("ka,ka->k", cb, Fr)) + pr
    has_info = d > 1e-300
    if fix_g is not None:
        has_info &= ~fix_g
    dgl = np.where(has_info, -r / np.where(has_info, d, 1.0), 0.0)
    dbk = -(Fr + Fc * dgl[lat][:, None])
    return dgl, dbk


def _cap_background_step(db, half_extent):
    """Scale each shoebox's background step so that no pixel's ln B moves by more than 2."""
    move = np.abs(db[:, 0]) + (np.abs(db[:, 1]) + np.abs(db[:, 2])) * half_extent
    scale = np.minimum(1.0, _MAX_STEP / np.maximum(move, 1e-300))
    return db * scale[:, None]
