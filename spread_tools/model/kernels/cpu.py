"""CPU kernels of the pixel model (Numba ``@njit(parallel=True, cache=True)``).

Argument conventions are described in :mod:`spread_tools.model.kernels`. This module
holds the dense channel-weight kernel (the simulator's, and the reference the banded
kernels of :mod:`spread_tools.model.kernels.bands_cpu` reproduce bit for bit at
``rtol = 0``); the model itself is channel-banded. Shoeboxes run in parallel and each
writes only its own pixels, so the result does not depend on the number of threads.

Channel weights ``w`` are float32 ``(n_pix, n_chan)`` row-major; every
accumulation is float64.
"""

import math

import numba
import numpy as np

from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2

_TWO_OVER_C = 2.0 / GAUSS_SHAPE_CONST


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
