"""CUDA kernels of the pixel model (``@numba.cuda.jit``).

Importing this module needs no GPU (kernels compile on first launch); under
``NUMBA_ENABLE_CUDASIM=1`` they run in Numba's CUDA simulator.

Argument conventions are those of :mod:`spread_tools.model.kernels`. The dense
channel weights (:func:`channel_weights`, used by the simulator through
:func:`spread_tools.model.pixel.channel_weights`) are a flat float32 array indexed
``p*stride_p + c*stride_c``, one block of :data:`TPB` threads per shoebox. The model
itself is channel-banded: :mod:`spread_tools.model.kernels.bands_cuda`, which also
uses the fixed-order reductions :func:`reduce_by_csr` and :func:`sum_fixed_order`
here (no atomics: results are deterministic on the GPU as well).
"""

import math

import numpy as np
from numba import cuda, float64

from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2

#: Threads per block (one block per shoebox).
TPB = 128
_TWO_OVER_C = 2.0 / GAUSS_SHAPE_CONST


@cuda.jit
def channel_weights(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                    pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, w, stride_p, stride_c):
    """Same physics and summation order as :func:`spread_tools.model.kernels.cpu.channel_weights`."""
    k = cuda.blockIdx.x
    t = cuda.threadIdx.x
    j = sb_lat[k]
    pn = sb_panel[k]
    d0 = dom_off[j]
    n_dom = dom_off[j + 1] - d0
    n_chan = inv_lam.shape[0]
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    peak = (nabc[j, 0] * nabc[j, 1] * nabc[j, 2]) ** 2
    inv_os = 1.0 / oversample
    area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
    f = pol_f[j]
    x0 = bbox[k, 0]
    width = bbox[k, 1] - bbox[k, 0]
    y0 = bbox[k, 2]
    p = pix_off[k] + t
    while p < pix_off[k + 1]:
        loc = p - pix_off[k]
        ix = x0 + loc % width
        iy = y0 + loc // width
        for c in range(n_chan):
            il = inv_lam[c]
            acc = 0.0
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
            w[p * stride_p + c * stride_c] = R_E2_A2 * phi[j, c] * acc / n_dom
        p += TPB


@cuda.jit
def reduce_by_csr(order, off, per_sb, out):
    """``out[g, c] = Σ per_sb[order[i], c]`` for i in ``off[g]:off[g+1]`` (fixed order); thread per (g, c)."""
    i = cuda.grid(1)
    n_chan = per_sb.shape[1]
    n_g = off.shape[0] - 1
    if i < n_g * n_chan:
        gi = i // n_chan
        c = i % n_chan
        tot = 0.0
        for q in range(off[gi], off[gi + 1]):
            tot += per_sb[order[q], c]
        out[gi, c] = tot


@cuda.jit
def sum_fixed_order(x, out):
    """``out[0] = Σ x`` in a fixed order: one block of TPB threads, strided partials then serial."""
    sh = cuda.shared.array(TPB, float64)
    t = cuda.threadIdx.x
    tot = 0.0
    i = t
    while i < x.shape[0]:
        tot += x[i]
        i += TPB
    sh[t] = tot
    cuda.syncthreads()
    if t == 0:
        s = 0.0
        for q in range(TPB):
            s += sh[q]
        out[0] = s


def blocks_for(n, tpb=TPB):
    """Number of blocks of ``tpb`` threads covering n items (at least 1)."""
    return max(1, (int(n) + tpb - 1) // tpb)


def to_device(a):
    """Copy a host array to the device (contiguous)."""
    return cuda.to_device(np.ascontiguousarray(a))
