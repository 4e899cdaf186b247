"""CPU kernels of the pixel model (Numba ``@njit(parallel=True, cache=True)``).

Argument conventions are described in :mod:`spread_tools.model.kernels`. All kernels
parallelise over shoeboxes and write per-shoebox results; sums over shoeboxes
are then done serially in a fixed order (:func:`reduce_per_shoebox`), so a
result never depends on the number of threads or their scheduling: evaluating
twice gives bit-identical values.

Channel weights ``w`` are float32 ``(n_pix, n_chan)`` row-major; every
accumulation is float64.
"""

import math

import numba
import numpy as np

from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2

_TWO_OVER_C = 2.0 / GAUSS_SHAPE_CONST
# Only reassociation and FMA contraction (lets LLVM vectorise the channel sums); no
# finite-math assumptions, so NaN/inf still propagate. Same code → same order → deterministic.
_REASSOC = {"reassoc", "contract"}


@numba.njit(parallel=True, cache=True)
def channel_weights(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                    pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, w):
    """Fill ``w[p, c] = r_e² φ_jc Σ_sub ω P (1/n_dom) Σ_d L`` for every pixel and channel.

    For each (sub-)pixel centre r: ŝ = r/|r|, ω = (pixel area/oversample²)·|ŝ·n|/|r|²,
    P = (1−2f)(1−(n_pol·ŝ)²) + f(1+(ŝ·ŝ0)²), and for each domain d, v_d = (R_d A)⁻¹ (ŝ − ŝ0)
    so that h = v_d/λ_c; L = (N_aN_bN_c)² exp(−2 Σ_k N_k² (h_k − h0_k)²/0.63).
    Sub-pixels sit at (i + (a + 0.5)/oversample, j + (b + 0.5)/oversample).
    """
    n_sb = len(sb_lat)
    n_chan = len(inv_lam)
    inv_os = 1.0 / oversample
    for k in numba.prange(n_sb):
        j = sb_lat[k]
        pn = sb_panel[k]
        d0 = dom_off[j]
        n_dom = dom_off[j + 1] - d0
        acc = np.empty(n_chan)
        v = np.empty((n_dom, 3))
        na2 = nabc[j, 0] * nabc[j, 0]
        nb2 = nabc[j, 1] * nabc[j, 1]
        nc2 = nabc[j, 2] * nabc[j, 2]
        peak = (nabc[j, 0] * nabc[j, 1] * nabc[j, 2]) ** 2
        area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
        f = pol_f[j]
        x0 = bbox[k, 0]
        width = bbox[k, 1] - bbox[k, 0]
        y0 = bbox[k, 2]
        for p in range(pix_off[k], pix_off[k + 1]):
            loc = p - pix_off[k]
            ix = x0 + loc % width
            iy = y0 + loc // width
            for c in range(n_chan):
                acc[c] = 0.0
            for a in range(oversample):
                for b in range(oversample):
                    fx = (ix + (a + 0.5) * inv_os) * ppix[pn, 0]
                    sy = (iy + (b + 0.5) * inv_os) * ppix[pn, 1]
                    r0 = porig[pn, 0] + fx * pfast[pn, 0] + sy * pslow[pn, 0]
                    r1 = porig[pn, 1] + fx * pfast[pn, 1] + sy * pslow[pn, 1]
                    r2 = porig[pn, 2] + fx * pfast[pn, 2] + sy * pslow[pn, 2]
                    dist2 = r0 * r0 + r1 * r1 + r2 * r2
                    dist = math.sqrt(dist2)
                    u0 = r0 / dist
                    u1 = r1 / dist
                    u2 = r2 / dist
                    omega = area * abs(u0 * pnorm[pn, 0] + u1 * pnorm[pn, 1] + u2 * pnorm[pn, 2]) / dist2
                    cpn = u0 * pol_n[j, 0] + u1 * pol_n[j, 1] + u2 * pol_n[j, 2]
                    c2t = u0 * s0hat[j, 0] + u1 * s0hat[j, 1] + u2 * s0hat[j, 2]
                    pol = (1.0 - 2.0 * f) * (1.0 - cpn * cpn) + f * (1.0 + c2t * c2t)
                    wgt = omega * pol * peak
                    e0 = u0 - s0hat[j, 0]
                    e1 = u1 - s0hat[j, 1]
                    e2 = u2 - s0hat[j, 2]
                    for d in range(n_dom):
                        m = minv[d0 + d]
                        v[d, 0] = m[0, 0] * e0 + m[0, 1] * e1 + m[0, 2] * e2
                        v[d, 1] = m[1, 0] * e0 + m[1, 1] * e1 + m[1, 2] * e2
                        v[d, 2] = m[2, 0] * e0 + m[2, 1] * e1 + m[2, 2] * e2
                    for c in range(n_chan):
                        il = inv_lam[c]
                        s = 0.0
                        for d in range(n_dom):
                            dh0 = v[d, 0] * il - h0[k, 0]
                            dh1 = v[d, 1] * il - h0[k, 1]
                            dh2 = v[d, 2] * il - h0[k, 2]
                            s += math.exp(-_TWO_OVER_C * (na2 * dh0 * dh0 + nb2 * dh1 * dh1 + nc2 * dh2 * dh2))
                        acc[c] += wgt * s
            for c in range(n_chan):
                w[p, c] = np.float32(R_E2_A2 * phi[j, c] * acc[c] / n_dom)


@numba.njit(parallel=True, cache=True, fastmath=_REASSOC)
def model_per_shoebox(w, counts, mask, pix_off, bbox, sb_lat, sb_h, I, G, bg, want_grad, want_lam,
                      lam_out, nll_sb, dG_sb, dbg_sb, dI_sb):
    """λ_p = G_j Σ_c w[p,c] I[h,c] + exp(b0 + b1 x̂ + b2 ŷ), NLL and gradients per shoebox.

    Pixels of a shoebox are row-major (slow outer, fast inner); the background is
    evaluated separably as exp(b0 + b2 ŷ)·exp(b1 x̂) (one exp per row and per column).

    Writes per shoebox k: ``nll_sb[k]`` = Σ_unmasked (λ − k ln λ) (a zero count contributes λ),
    ``dG_sb[k]`` = ∂/∂G_j, ``dbg_sb[k]`` = ∂/∂(b0, b1, b2), ``dI_sb[k, c]`` = ∂/∂I[h_k, c];
    and ``lam_out[p]`` when ``want_lam``. Gradients only when ``want_grad``.
    """
    n_sb = len(sb_lat)
    n_chan = w.shape[1]
    for k in numba.prange(n_sb):
        j = sb_lat[k]
        h = sb_h[k]
        g = G[j]
        b0 = bg[k, 0]
        b1 = bg[k, 1]
        b2 = bg[k, 2]
        x0 = bbox[k, 0]
        width = bbox[k, 1] - bbox[k, 0]
        y0 = bbox[k, 2]
        xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
        yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
        nll = 0.0
        dg = 0.0
        db0 = 0.0
        db1 = 0.0
        db2 = 0.0
        acc = np.zeros(n_chan)
        Ih = I[h]
        height = bbox[k, 3] - bbox[k, 2]
        # separable background: exp(b0 + b1 x̂ + b2 ŷ) = exp(b0 + b2 ŷ) · exp(b1 x̂)
        ex = np.empty(width)
        for col in range(width):
            ex[col] = math.exp(b1 * ((x0 + col) + 0.5 - xc))
        p = pix_off[k]
        for row in range(height):
            yh = (y0 + row) + 0.5 - yc
            ey = math.exp(b0 + b2 * yh)
            for col in range(width):
                xh = (x0 + col) + 0.5 - xc
                wp = w[p]
                s = 0.0
                for c in range(n_chan):
                    s += np.float64(wp[c]) * Ih[c]
                bgp = ey * ex[col]
                lam = g * s + bgp
                if want_lam:
                    lam_out[p] = lam
                if mask[p]:
                    kk = np.float64(counts[p])
                    if kk != 0.0:
                        nll += lam - kk * math.log(lam)
                    else:
                        nll += lam
                    if want_grad:
                        r = 1.0 - kk / lam
                        dg += r * s
                        rb = r * bgp
                        db0 += rb
                        db1 += rb * xh
                        db2 += rb * yh
                        rg = r * g
                        for c in range(n_chan):
                            acc[c] += rg * np.float64(wp[c])
                p += 1
        nll_sb[k] = nll
        if want_grad:
            dG_sb[k] = dg
            dbg_sb[k, 0] = db0
            dbg_sb[k, 1] = db1
            dbg_sb[k, 2] = db2
            for c in range(n_chan):
                dI_sb[k, c] = acc[c]


@numba.njit(cache=True)
def reduce_per_shoebox(nll_sb, dG_sb, dI_sb, sb_lat, sb_h, n_lat, n_h, want_grad):
    """Sum per-shoebox results in shoebox order (serial, deterministic).

    Returns
    -------
    nll : float
    dG : (n_lat,)
    dI : (n_h, n_chan)
    """
    nll = 0.0
    for k in range(len(nll_sb)):
        nll += nll_sb[k]
    n_chan = dI_sb.shape[1]
    dG = np.zeros(n_lat)
    dI = np.zeros((n_h, n_chan))
    if want_grad:
        for k in range(len(nll_sb)):
            dG[sb_lat[k]] += dG_sb[k]
            h = sb_h[k]
            for c in range(n_chan):
                dI[h, c] += dI_sb[k, c]
    return nll, dG, dI
