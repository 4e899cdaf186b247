"""CUDA kernels of the channel-banded pixel model (``@numba.cuda.jit``).

Same layout, physics, cut and algebra as :mod:`spread_tools.model.kernels.bands_cpu`
(read its docstring first); importing needs no GPU, and under ``NUMBA_ENABLE_CUDASIM=1``
the kernels run in Numba's CUDA simulator.

Work split: one block of :data:`TPB` threads per shoebox. Building the bands, a thread
per pixel evaluates its window (the terms are recomputed where the CPU keeps them in a
scratch array: no per-thread arrays on the GPU), a first kernel stores the band
lengths, the host adds them up into shoebox offsets, a second kernel writes the values
(each chunk of TPB pixels finds its threads' offsets by a serial scan of thread 0). In
the model pass a thread handles one active pixel of a chunk of TPB, then thread c
adds the chunk's contributions to channel c of the shoebox's span in pixel order and
keeps the running sum in the shoebox's own slots of ``dI_span``; every other sum is
finished per block in a fixed order and over shoeboxes by fixed-order kernels. No
atomics: results are bit-identical on every call.
"""

import math

import numpy as np
from numba import cuda, float32, float64, int64

from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2
from spread_tools.model.kernels.cuda import (  # noqa: F401  (the shared reductions, used from here)
    TPB,
    blocks_for,
    reduce_by_csr,
    sum_fixed_order,
    to_device,
)

__all__ = ["band_lengths", "band_values", "model_pass", "expected_counts", "reduce_spans_by_h", "build_bands"]

_TWO_OVER_C = 2.0 / GAUSS_SHAPE_CONST
_F32_ZERO = 5e-46
_N_RED = 9


@cuda.jit(device=True)
def _geom(ix, iy, a, b, inv_os, pn, j, area, f, peak, porig, pfast, pslow, pnorm, ppix, pol_n, s0hat):
    """(ω·P·peak, ŝ − ŝ0) of one sub-pixel."""
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
    return omega * pol * peak, u0 - s0hat[j, 0], u1 - s0hat[j, 1], u2 - s0hat[j, 2]


@cuda.jit(device=True)
def _pixel_xy(k, p, bbox, pix_off):
    width = bbox[k, 1] - bbox[k, 0]
    loc = p - pix_off[k]
    return bbox[k, 0] + loc % width, bbox[k, 2] + loc // width


@cuda.jit(device=True)
def _terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig, pfast, pslow, pnorm,
           ppix, bbox, pix_off, h0, cut, want_window):
    """(Q_min, Σ_s ω P peak) of a pixel, or with ``want_window`` the hull (il_lo, il_hi) of Q ≤ cut."""
    inv_os = 1.0 / oversample
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    peak = (nabc[j, 0] * nabc[j, 1] * nabc[j, 2]) ** 2
    area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
    ix, iy = _pixel_xy(k, p, bbox, pix_off)
    g0 = h0[k, 0]
    g1 = h0[k, 1]
    g2 = h0[k, 2]
    q_min = math.inf
    wsum = 0.0
    il_lo = math.inf
    il_hi = -math.inf
    for a in range(oversample):
        for b in range(oversample):
            wgt, e0, e1, e2 = _geom(ix, iy, a, b, inv_os, pn, j, area, pol_f[j], peak, porig, pfast, pslow, pnorm,
                                    ppix, pol_n, s0hat)
            wsum += wgt
            for d in range(n_dom):
                dd = d0 + d
                v0 = minv[dd, 0, 0] * e0 + minv[dd, 0, 1] * e1 + minv[dd, 0, 2] * e2
                v1 = minv[dd, 1, 0] * e0 + minv[dd, 1, 1] * e1 + minv[dd, 1, 2] * e2
                v2 = minv[dd, 2, 0] * e0 + minv[dd, 2, 1] * e1 + minv[dd, 2, 2] * e2
                al = _TWO_OVER_C * (na2 * v0 * v0 + nb2 * v1 * v1 + nc2 * v2 * v2)
                be = _TWO_OVER_C * (na2 * v0 * g0 + nb2 * v1 * g1 + nc2 * v2 * g2)
                ils = be / al if al > 0.0 else 0.0
                dh0 = v0 * ils - g0
                dh1 = v1 * ils - g1
                dh2 = v2 * ils - g2
                qs = _TWO_OVER_C * (na2 * dh0 * dh0 + nb2 * dh1 * dh1 + nc2 * dh2 * dh2)
                q_min = min(q_min, qs)
                if want_window and qs <= cut:
                    if al > 0.0:
                        half = math.sqrt((cut - qs) / al)
                        il_lo = min(il_lo, ils - half)
                        il_hi = max(il_hi, ils + half)
                    else:
                        il_lo = -math.inf
                        il_hi = math.inf
    if want_window:
        return il_lo, il_hi
    return q_min, wsum


@cuda.jit(device=True)
def _value(c, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow,
           pnorm, ppix, bbox, pix_off, h0, inv_lam):
    """w[p, c] rounded to float32 (as float64); every term, the dense kernel's order."""
    if phi[j, c] == 0.0:
        return 0.0
    inv_os = 1.0 / oversample
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    peak = (nabc[j, 0] * nabc[j, 1] * nabc[j, 2]) ** 2
    area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
    ix, iy = _pixel_xy(k, p, bbox, pix_off)
    il = inv_lam[c]
    acc = 0.0
    for a in range(oversample):
        for b in range(oversample):
            wgt, e0, e1, e2 = _geom(ix, iy, a, b, inv_os, pn, j, area, pol_f[j], peak, porig, pfast, pslow, pnorm,
                                    ppix, pol_n, s0hat)
            s = 0.0
            for d in range(n_dom):
                dd = d0 + d
                v0 = minv[dd, 0, 0] * e0 + minv[dd, 0, 1] * e1 + minv[dd, 0, 2] * e2
                v1 = minv[dd, 1, 0] * e0 + minv[dd, 1, 1] * e1 + minv[dd, 1, 2] * e2
                v2 = minv[dd, 2, 0] * e0 + minv[dd, 2, 1] * e1 + minv[dd, 2, 2] * e2
                dh0 = v0 * il - h0[k, 0]
                dh1 = v1 * il - h0[k, 1]
                dh2 = v2 * il - h0[k, 2]
                s += math.exp(-_TWO_OVER_C * (na2 * dh0 * dh0 + nb2 * dh1 * dh1 + nc2 * dh2 * dh2))
            acc += wgt * s
    return float64(float32(R_E2_A2 * phi[j, c] * acc / n_dom))


@cuda.jit(device=True)
def _lower(a, x):
    """First index i with a[i] ≥ x (a ascending)."""
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _upper(a, x):
    """First index i with a[i] > x (a ascending)."""
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _screen_margin(rtol, n_chan, n_terms):
    return math.log(1.0 / rtol) + math.log(max(1.0, float64(n_chan * n_terms))) + 5.0


@cuda.jit
def band_lengths(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                 pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, rtol, lo, length, ptotal):
    """First pass (as :func:`bands_cpu.band_lengths`): band and weight Σ_c w of every pixel."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    j = sb_lat[k]
    pn = sb_panel[k]
    d0 = dom_off[j]
    n_dom = dom_off[j + 1] - d0
    n_chan = inv_lam.shape[0]
    n_terms = oversample * oversample * n_dom
    phi_max = 0.0
    phi_tot = 0.0
    for c in range(n_chan):
        phi_tot += phi[j, c]
        phi_max = max(phi_max, phi[j, c])
    p = pix_off[k] + t
    while p < pix_off[k + 1]:
        q_min, wsum = _terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig, pfast,
                             pslow, pnorm, ppix, bbox, pix_off, h0, 0.0, False)
        if phi_max <= 0.0 or R_E2_A2 * phi_max * wsum * math.exp(-q_min) < _F32_ZERO:
            lo[p] = 0
            length[p] = 0
            ptotal[p] = 0.0
            p += TPB
            continue
        scale = R_E2_A2 * phi_tot * wsum
        ca = 0
        cb = n_chan
        budget = 0.0
        total = 0.0
        done = False
        if rtol > 0.0:
            margin = _screen_margin(rtol, n_chan, n_terms)
            cut = q_min + margin
            for attempt in range(8):
                il_lo, il_hi = _terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig,
                                      pfast, pslow, pnorm, ppix, bbox, pix_off, h0, cut, True)
                if il_lo > il_hi:
                    ca = 0
                    cb = 0
                else:
                    ca = _lower(inv_lam, il_lo)
                    cb = _upper(inv_lam, il_hi)
                if ca == 0 and cb == n_chan:
                    break
                total = 0.0
                for c in range(ca, cb):
                    total += _value(c, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi,
                                    porig, pfast, pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam)
                outside = scale * math.exp(-cut)
                if R_E2_A2 * phi_max * wsum * math.exp(-cut) < _F32_ZERO:
                    outside = 0.0
                budget = rtol * total - outside
                if budget >= 0.0:
                    done = True
                    break
                if total > 0.0:
                    cut = max(cut + 1.0, math.log(scale) - math.log(0.5 * rtol * total))
                else:
                    cut += margin
        if not done:
            ca = 0
            cb = n_chan
            total = 0.0
            for c in range(n_chan):
                total += _value(c, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi,
                                porig, pfast, pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam)
            budget = rtol * total
        # trim: drop the smaller end while it fits in the budget (exact zeros always)
        a = ca
        b = cb
        left = budget
        x = 0.0
        y = 0.0
        if a < b:
            x = _value(a, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi, porig, pfast,
                       pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam)
            y = _value(b - 1, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi, porig,
                       pfast, pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam)
        while a < b:
            if x <= y:
                if x == 0.0 or x <= left:
                    left -= x
                    a += 1
                    if a < b:
                        x = y if a == b - 1 else _value(a, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n,
                                                        pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix, bbox,
                                                        pix_off, h0, inv_lam)
                else:
                    break
            else:
                if y == 0.0 or y <= left:
                    left -= y
                    b -= 1
                    if a < b:
                        y = x if a == b - 1 else _value(b - 1, k, p, j, pn, d0, n_dom, oversample, minv, s0hat,
                                                        pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                                                        bbox, pix_off, h0, inv_lam)
                else:
                    break
        if a == b:
            a = 0
            b = 0
        lo[p] = a
        length[p] = b - a
        ptotal[p] = total
        p += TPB


@cuda.jit
def band_values(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, lo, length, sb_offset, values):
    """Second pass: the values of every band (offsets by a serial scan per chunk of TPB pixels)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    sh_off = cuda.shared.array(TPB, int64)
    sh_base = cuda.shared.array(1, int64)
    j = sb_lat[k]
    pn = sb_panel[k]
    d0 = dom_off[j]
    n_dom = dom_off[j + 1] - d0
    if t == 0:
        sh_base[0] = sb_offset[k]
    start = pix_off[k]
    while start < pix_off[k + 1]:
        n_here = min(TPB, pix_off[k + 1] - start)
        cuda.syncthreads()
        if t == 0:
            o = sh_base[0]
            for i in range(n_here):
                sh_off[i] = o
                o += int64(length[start + i])
            sh_base[0] = o
        cuda.syncthreads()
        p = start + t
        if t < n_here:
            o = sh_off[t]
            a = int64(lo[p])
            for i in range(int64(length[p])):
                values[o + i] = _value(a + i, k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc,
                                       phi, porig, pfast, pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam)
        start += TPB


@cuda.jit
def expected_counts(values, lo, length, sb_offset, pix_off, bbox, sb_lat, sb_h, I, G, bg, lam_out):
    """λ of every pixel (as :func:`bands_cpu.expected_counts`)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    sh_off = cuda.shared.array(TPB, int64)
    sh_base = cuda.shared.array(1, int64)
    j = sb_lat[k]
    h = sb_h[k]
    g = G[j]
    x0 = bbox[k, 0]
    width = bbox[k, 1] - bbox[k, 0]
    y0 = bbox[k, 2]
    xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
    yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
    if t == 0:
        sh_base[0] = sb_offset[k]
    start = pix_off[k]
    while start < pix_off[k + 1]:
        n_here = min(TPB, pix_off[k + 1] - start)
        cuda.syncthreads()
        if t == 0:
            o = sh_base[0]
            for i in range(n_here):
                sh_off[i] = o
                o += int64(length[start + i])
            sh_base[0] = o
        cuda.syncthreads()
        p = start + t
        if t < n_here:
            loc = p - pix_off[k]
            xh = (x0 + loc % width) + 0.5 - xc
            yh = (y0 + loc // width) + 0.5 - yc
            o = sh_off[t]
            a = int64(lo[p])
            s = 0.0
            for q in range(int64(length[p])):
                s += float64(values[o + q]) * I[h, a + q]
            lam_out[p] = g * s + math.exp(bg[k, 0] + bg[k, 1] * xh + bg[k, 2] * yh)
        start += TPB


@cuda.jit
def model_pass(values, sb_offset, mask, pix_off, bbox, sb_lat, sb_h, span_lo, span_off, wsum, kmom,
               act_off, act_row, act_col, act_woff, act_lo, act_len, act_k, I, G, bg, want_grad,
               nll_sb, dG_sb, dbg_sb, dI_span):
    """NLL and gradients per shoebox (the algebra of :func:`bands_cpu.model_pass`)."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    sh_red = cuda.shared.array((_N_RED, TPB), float64)
    sh_r = cuda.shared.array(TPB, float64)
    sh_lo = cuda.shared.array(TPB, int64)
    sh_len = cuda.shared.array(TPB, int64)
    sh_o = cuda.shared.array(TPB, int64)
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
    c0 = span_lo[k]
    wo = span_off[k]
    nspan = span_off[k + 1] - wo
    # Σ_unmasked bg (1, x̂, ŷ)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    p = pix_off[k] + t
    while p < pix_off[k + 1]:
        if mask[p]:
            loc = p - pix_off[k]
            xh = (x0 + loc % width) + 0.5 - xc
            yh = (y0 + loc // width) + 0.5 - yc
            e = math.exp(b0 + b1 * xh + b2 * yh)
            s0 += e
            s1 += e * xh
            s2 += e * yh
        p += TPB
    # Σ_unmasked S = Σ_c Wsum_c I_c; the dI slots start at 0
    ssum = 0.0
    c = t
    while c < nspan:
        ssum += wsum[wo + c] * I[h, c0 + c]
        if want_grad:
            dI_span[wo + c] = 0.0
        c += TPB
    nll = 0.0
    gq = 0.0
    q0 = 0.0
    q1 = 0.0
    q2 = 0.0
    base = sb_offset[k]
    start = act_off[k]
    while start < act_off[k + 1]:
        i = start + t
        n_here = min(TPB, act_off[k + 1] - start)
        if t < n_here:
            row = int64(act_row[i])
            col = int64(act_col[i])
            o = base + act_woff[i]
            l0 = int64(act_lo[i])
            n = int64(act_len[i])
            s = 0.0
            for q in range(n):
                s += float64(values[o + q]) * I[h, l0 + q]
            kk = float64(act_k[i])
            xh = (x0 + col) + 0.5 - xc
            yh = (y0 + row) + 0.5 - yc
            lnbg = b0 + b1 * xh + b2 * yh
            bgp = math.exp(lnbg)
            gs = g * s
            lam = gs + bgp
            inv = 1.0 / lam
            if bgp > 0.0 and gs < 1e300 * bgp:
                lg = math.log1p(gs / bgp)
            else:
                lg = math.log(lam) - lnbg
            nll -= kk * lg
            kq = kk * gs * inv
            gq += kk * s * inv
            q0 += kq
            q1 += kq * xh
            q2 += kq * yh
            sh_r[t] = kk * inv
            sh_lo[t] = l0
            sh_len[t] = n
            sh_o[t] = o
        cuda.syncthreads()
        if want_grad:
            c = t
            while c < nspan:
                cc = c0 + c
                acc = dI_span[wo + c]
                for m in range(n_here):
                    d = cc - sh_lo[m]
                    if d >= 0 and d < sh_len[m]:
                        acc += sh_r[m] * float64(values[sh_o[m] + d])
                dI_span[wo + c] = acc
                c += TPB
        cuda.syncthreads()
        start += TPB
    if want_grad:
        c = t
        while c < nspan:
            dI_span[wo + c] = g * (wsum[wo + c] - dI_span[wo + c])
            c += TPB
    sh_red[0, t] = nll
    sh_red[1, t] = gq
    sh_red[2, t] = q0
    sh_red[3, t] = q1
    sh_red[4, t] = q2
    sh_red[5, t] = s0
    sh_red[6, t] = s1
    sh_red[7, t] = s2
    sh_red[8, t] = ssum
    cuda.syncthreads()
    if t < _N_RED:
        tot = 0.0
        for i in range(TPB):
            tot += sh_red[t, i]
        sh_r[t] = tot
    cuda.syncthreads()
    if t == 0:
        nll_sb[k] = sh_r[5] + g * sh_r[8] - (b0 * kmom[k, 0] + b1 * kmom[k, 1] + b2 * kmom[k, 2]) + sh_r[0]
        if want_grad:
            dG_sb[k, 0] = sh_r[8] - sh_r[1]
            dbg_sb[k, 0] = sh_r[5] - kmom[k, 0] + sh_r[2]
            dbg_sb[k, 1] = sh_r[6] - kmom[k, 1] + sh_r[3]
            dbg_sb[k, 2] = sh_r[7] - kmom[k, 2] + sh_r[4]


@cuda.jit
def reduce_spans_by_h(h_order, h_off, span_lo, span_off, dI_span, out):
    """``out[h, c]`` = Σ over the shoeboxes of h (shoebox order) of their span entry of channel c."""
    i = cuda.grid(1)
    n_chan = out.shape[1]
    n_h = h_off.shape[0] - 1
    if i < n_h * n_chan:
        hi = i // n_chan
        c = i % n_chan
        tot = 0.0
        for q in range(h_off[hi], h_off[hi + 1]):
            k = h_order[q]
            d = c - span_lo[k]
            if d >= 0 and d < span_off[k + 1] - span_off[k]:
                tot += dI_span[span_off[k] + d]
        out[hi, c] = tot


def build_bands(kin, n_pix, n_chan, oversample, rtol, floor=0.0):
    """Bands computed on the GPU (:func:`spread_tools.model.bands.build_bands` with ``backend="cuda"``);
    ``values`` stay on the device (the floor is applied on the host between the passes)."""
    from spread_tools.model.bands import ChannelBands, _sb_offsets
    from spread_tools.model.kernels import bands_cpu
    from spread_tools.model.pixel import _CW_ORDER
    lo = np.zeros(n_pix, np.uint16)
    length = np.zeros(n_pix, np.uint16)
    n_sb = len(kin["sb_lat"])
    if n_sb == 0 or n_pix == 0:
        sb_off = np.zeros(n_sb + 1, np.int64)
        return ChannelBands(n_chan, lo, length, sb_off, cuda.device_array(1, np.float32), rtol, floor)
    args = [to_device(kin[name]) for name in _CW_ORDER]
    lo_d = cuda.device_array(n_pix, np.uint16)
    len_d = cuda.device_array(n_pix, np.uint16)
    tot_d = cuda.device_array(n_pix, np.float64)
    band_lengths[n_sb, TPB](*args, oversample, rtol, lo_d, len_d, tot_d)
    lo = lo_d.copy_to_host()
    length = len_d.copy_to_host()
    n_floor = 0
    if floor > 0:
        n_floor = int(bands_cpu.apply_floor(kin["pix_off"], tot_d.copy_to_host(), floor, lo, length))
        lo_d = to_device(lo)
        len_d = to_device(length)
    del tot_d
    sb_off = _sb_offsets(kin["pix_off"], lo, length)
    values = cuda.device_array(max(1, int(sb_off[-1])), np.float32)
    band_values[n_sb, TPB](*args, oversample, lo_d, len_d, to_device(sb_off), values)
    cuda.synchronize()
    return ChannelBands(n_chan, lo, length, sb_off, values, rtol, floor, {"pixels_floored": n_floor})
