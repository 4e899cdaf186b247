"""Per-pixel physics shared by the CPU and CUDA geometry kernels.

The functions here are plain Python on scalars and arrays. :mod:`.geometry_cpu`
compiles them with ``numba.njit`` and :mod:`.geometry_cuda` with
``numba.cuda.jit(device=True)``, so both backends run the same arithmetic in the same
order. It allocates nothing and calls nothing but ``math``: scratch and output arrays are
passed in.

For pixel p of shoebox k (lattice j) the Bragg part of the expected counts at unit scale,

    S_p = (r_e²/n_dom) Σ_sub ω P (N_aN_bN_c)² Σ_d Σ_c φ_jc I_kc exp(−(2/0.63) Σ_i N_i² Δh_i²),
    Δh = v_d·il_c − h0,    v_d = (R_d A)⁻¹ (ŝ − ŝ0),    il_c = (E_c + δ_j)/hc,

is written to ``out[0]`` and its derivatives to ``out[1:]`` in the order

    ∂S/∂q_0 … ∂S/∂q_{n_q−1}  (the matrix parameters: ∂v_d/∂q = (∂(R_d A)⁻¹/∂q)(ŝ − ŝ0)),
    ∂S/∂ln N_a, ∂S/∂ln N_b, ∂S/∂ln N_c,  ∂S/∂δ  (I_kc taken at E_c + δ, dI_kc its energy slope).

Only the channels where the domain's Gaussian in il exceeds exp(−``cut``) of its peak are
visited: the exponent is a quadratic in il with a closed-form minimum, so the band
[il* − w, il* + w] is found by binary search on the increasing ``il`` row, and a domain
whose minimum exponent already exceeds ``cut`` costs nothing beyond v_d.
"""

import math

from spread_tools.model.geometry import HC_EV_A
from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2

#: Largest number of matrix parameters (3 rotations, 6 cell constants, mosaic spread).
MAX_Q = 10
#: Entries of ``out``: S, ∂S/∂q (MAX_Q), ∂S/∂ln N (3), ∂S/∂δ.
N_TERMS = 1 + MAX_Q + 4
_K = 2.0 / GAUSS_SHAPE_CONST
_INV_HC = 1.0 / HC_EV_A


def pixel_terms(ix, iy, k, j, pn, oversample, porig, pfast, pslow, pnorm, ppix, s0hat, pol_n, pol_f,
                minv, dminv, d0, n_dom, n_q, nabc, il, phi, I_sb, dI_sb, h0, cut, out):
    """S and its derivatives for pixel (ix, iy) of shoebox k; see the module docstring.

    ``out`` receives N_TERMS floats (entries of unused matrix parameters are left 0).
    """
    for t in range(N_TERMS):
        out[t] = 0.0
    n_chan = il.shape[1]
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    peak = na2 * nb2 * nc2
    h00 = h0[k, 0]
    h01 = h0[k, 1]
    h02 = h0[k, 2]
    inv_os = 1.0 / oversample
    area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
    f = pol_f[j]
    cc = _K * (na2 * h00 * h00 + nb2 * h01 * h01 + nc2 * h02 * h02)
    i_n = 1 + MAX_Q
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
                dd = d0 + d
                v0 = minv[dd, 0, 0] * e0 + minv[dd, 0, 1] * e1 + minv[dd, 0, 2] * e2
                v1 = minv[dd, 1, 0] * e0 + minv[dd, 1, 1] * e1 + minv[dd, 1, 2] * e2
                v2 = minv[dd, 2, 0] * e0 + minv[dd, 2, 1] * e1 + minv[dd, 2, 2] * e2
                # exponent K Σ N_i² (v_i il − h0_i)² = qa il² − 2 qb il + cc
                qa = _K * (na2 * v0 * v0 + nb2 * v1 * v1 + nc2 * v2 * v2)
                qb = _K * (na2 * v0 * h00 + nb2 * v1 * h01 + nc2 * v2 * h02)
                if qa <= 0.0:
                    continue
                il_star = qb / qa
                qmin = cc - qb * il_star
                if qmin > cut:
                    continue
                half = math.sqrt((cut - qmin) / qa)
                # band of channels: first c with il >= il* − half, first with il >= il* + half
                lo = 0
                hi = n_chan
                while lo < hi:
                    mid = (lo + hi) // 2
                    if il[j, mid] < il_star - half:
                        lo = mid + 1
                    else:
                        hi = mid
                c_lo = lo
                hi = n_chan
                while lo < hi:
                    mid = (lo + hi) // 2
                    if il[j, mid] < il_star + half:
                        lo = mid + 1
                    else:
                        hi = mid
                c_hi = lo
                if c_lo >= c_hi:
                    continue
                # Σ over the band of −2K·t·I·il·N_i²Δh_i: contracted with ∂v/∂q once per domain
                dq0 = 0.0
                dq1 = 0.0
                dq2 = 0.0
                for c in range(c_lo, c_hi):
                    ilc = il[j, c]
                    dh0 = v0 * ilc - h00
                    dh1 = v1 * ilc - h01
                    dh2 = v2 * ilc - h02
                    g0 = na2 * dh0
                    g1 = nb2 * dh1
                    g2 = nc2 * dh2
                    e0h = g0 * dh0
                    e1h = g1 * dh1
                    e2h = g2 * dh2
                    t = wgt * phi[j, c] * math.exp(-_K * (e0h + e1h + e2h))
                    ti = t * I_sb[k, c]
                    out[0] += ti
                    common = -2.0 * _K * ti
                    cil = common * ilc
                    dq0 += cil * g0
                    dq1 += cil * g1
                    dq2 += cil * g2
                    out[i_n] += 2.0 * ti + common * e0h
                    out[i_n + 1] += 2.0 * ti + common * e1h
                    out[i_n + 2] += 2.0 * ti + common * e2h
                    out[i_n + 3] += t * dI_sb[k, c] + common * _INV_HC * (g0 * v0 + g1 * v1 + g2 * v2)
                for q in range(n_q):
                    dvq0 = dminv[dd, q, 0, 0] * e0 + dminv[dd, q, 0, 1] * e1 + dminv[dd, q, 0, 2] * e2
                    dvq1 = dminv[dd, q, 1, 0] * e0 + dminv[dd, q, 1, 1] * e1 + dminv[dd, q, 1, 2] * e2
                    dvq2 = dminv[dd, q, 2, 0] * e0 + dminv[dd, q, 2, 1] * e1 + dminv[dd, q, 2, 2] * e2
                    out[1 + q] += dq0 * dvq0 + dq1 * dvq1 + dq2 * dvq2
    scale = R_E2_A2 / n_dom
    for t in range(N_TERMS):
        out[t] *= scale
