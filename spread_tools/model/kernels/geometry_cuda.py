"""CUDA kernel of the geometry refinement: the same results as :mod:`.geometry_cpu`.

The per-pixel physics is :func:`spread_tools.model.kernels.pixel_terms.pixel_terms`,
compiled with ``numba.cuda.jit(device=True)``. One block of :data:`TPB` threads per
shoebox walks the shoebox in chunks of TPB pixels: each thread computes its pixel's
λ and Jacobian row into shared memory, then thread t sums entries t, t + TPB, … of the
packed list [gradient (n_loc), lower triangle of the Fisher information] over the chunk's
pixels in pixel order, and thread 0 sums the NLL in order. No atomics: the results are
deterministic and, up to the order of the per-pixel sums (pixel order here and on the
CPU), the CPU results. Shared memory: TPB × 20 × 8 bytes ≈ 20 KB per block.
"""

import math

from numba import cuda, float64

from spread_tools.model.kernels.geometry_cpu import N_EXTRA
from spread_tools.model.kernels.pixel_terms import MAX_Q, N_TERMS, pixel_terms

#: Threads per block (one block per shoebox).
TPB = 128
_MAX_LOC = MAX_Q + N_EXTRA
_MAX_ENTRIES = _MAX_LOC + _MAX_LOC * (_MAX_LOC + 1) // 2
_PER_THREAD = (_MAX_ENTRIES + TPB - 1) // TPB

_terms = cuda.jit(device=True)(pixel_terms)


@cuda.jit
def lattice_model(minv, dminv, dom_off, s0hat, pol_n, pol_f, nabc, il, phi, porig, pfast, pslow,
                  pnorm, ppix, pix_off, bbox, sb_lat, sb_panel, h0, I_sb, dI_sb, G, bg, counts, mask,
                  sb_list, oversample, cut, want_lam, lam_out, bragg_out, want_jac, jac_out, nll_sb, grad_sb,
                  fisher_sb):
    """Per-shoebox NLL, gradient and Fisher information; arguments as the CPU kernel
    (one block per entry of ``sb_list``)."""
    k = sb_list[cuda.blockIdx.x]
    t = cuda.threadIdx.x
    sh_j = cuda.shared.array((TPB, _MAX_LOC), float64)
    sh_r = cuda.shared.array(TPB, float64)
    sh_inv = cuda.shared.array(TPB, float64)
    sh_nll = cuda.shared.array(TPB, float64)
    out = cuda.local.array(N_TERMS, float64)
    acc = cuda.local.array(_PER_THREAD, float64)
    n_q = dminv.shape[1]
    n_loc = n_q + N_EXTRA
    n_entries = n_loc + n_loc * (n_loc + 1) // 2
    i_n = 1 + MAX_Q
    for e in range(_PER_THREAD):
        acc[e] = 0.0
    nll_total = 0.0
    j = sb_lat[k]
    pn = sb_panel[k]
    d0 = dom_off[j]
    n_dom = dom_off[j + 1] - d0
    gj = G[j]
    x0 = bbox[k, 0]
    width = bbox[k, 1] - bbox[k, 0]
    y0 = bbox[k, 2]
    xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
    yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
    start = pix_off[k]
    end = pix_off[k + 1]
    while start < end:
        p = start + t
        sh_r[t] = 0.0
        sh_inv[t] = 0.0
        sh_nll[t] = 0.0
        for a in range(_MAX_LOC):
            sh_j[t, a] = 0.0
        if p < end:
            loc = p - pix_off[k]
            ix = x0 + loc % width
            iy = y0 + loc // width
            _terms(ix, iy, k, j, pn, oversample, porig, pfast, pslow, pnorm, ppix, s0hat, pol_n, pol_f,
                   minv, dminv, d0, n_dom, n_q, nabc, il, phi, I_sb, dI_sb, h0, cut, out)
            xh = ix + 0.5 - xc
            yh = iy + 0.5 - yc
            bgp = math.exp(bg[k, 0] + bg[k, 1] * xh + bg[k, 2] * yh)
            bragg = gj * out[0]
            lam = bragg + bgp
            if want_lam:
                lam_out[p] = lam
                bragg_out[p] = bragg
            if mask[p] or want_jac:
                for q in range(n_q):
                    sh_j[t, q] = gj * out[1 + q]
                sh_j[t, n_q] = gj * out[i_n]
                sh_j[t, n_q + 1] = gj * out[i_n + 1]
                sh_j[t, n_q + 2] = gj * out[i_n + 2]
                sh_j[t, n_q + 3] = gj * out[i_n + 3]
                sh_j[t, n_q + 4] = bragg
                sh_j[t, n_q + 5] = bgp
                sh_j[t, n_q + 6] = bgp * xh
                sh_j[t, n_q + 7] = bgp * yh
                if want_jac:
                    for a in range(n_loc):
                        jac_out[p, a] = sh_j[t, a]
            if mask[p]:
                kk = float64(counts[p])
                sh_nll[t] = lam - kk * math.log(lam) if kk != 0.0 else lam
                sh_r[t] = 1.0 - kk / lam
                sh_inv[t] = 1.0 / lam
        cuda.syncthreads()
        n_here = min(TPB, end - start)
        for e in range(_PER_THREAD):
            idx = t + e * TPB
            if idx < n_entries:
                s = 0.0
                if idx < n_loc:
                    for i in range(n_here):
                        s += sh_r[i] * sh_j[i, idx]
                else:
                    a, b = _unpack(idx - n_loc)
                    for i in range(n_here):
                        s += sh_j[i, a] * sh_inv[i] * sh_j[i, b]
                acc[e] += s
        if t == 0:
            for i in range(n_here):
                nll_total += sh_nll[i]
        cuda.syncthreads()
        start += TPB
    if t == 0:
        nll_sb[k] = nll_total
    for e in range(_PER_THREAD):
        idx = t + e * TPB
        if idx < n_loc:
            grad_sb[k, idx] = acc[e]
        elif idx < n_entries:
            a, b = _unpack(idx - n_loc)
            fisher_sb[k, a, b] = acc[e]
            fisher_sb[k, b, a] = acc[e]


@cuda.jit(device=True)
def _unpack(m):
    """Row a and column b (b <= a) of entry m of a packed lower triangle."""
    a = int((math.sqrt(8.0 * m + 1.0) - 1.0) * 0.5)
    while a * (a + 1) // 2 > m:
        a -= 1
    while (a + 1) * (a + 2) // 2 <= m:
        a += 1
    return a, m - a * (a + 1) // 2
