"""CPU kernel of the geometry refinement: λ, Poisson NLL, gradient and Fisher information
per shoebox with respect to the crystal-model parameters (Numba, parallel over shoeboxes).

The per-pixel physics is :func:`spread_tools.model.kernels.pixel_terms.pixel_terms`,
compiled here with ``numba.njit``; :mod:`.geometry_cuda` compiles the same function for
the GPU. For pixel p of shoebox k (lattice j)::

    λ_p = G_j S_p + exp(b0 + b1 x̂ + b2 ŷ)

and the Jacobian row of λ_p over the *local* parameters of the shoebox is, in this order,

    [∂λ/∂q_0 … ∂λ/∂q_{n_q−1}, ∂λ/∂ln N_a, ∂λ/∂ln N_b, ∂λ/∂ln N_c, ∂λ/∂δ, ∂λ/∂g, ∂λ/∂b0, ∂λ/∂b1, ∂λ/∂b2]

(g = ln G). Per shoebox the kernel writes the NLL Σ (λ − k ln λ) over unmasked pixels,
the gradient Σ (1 − k/λ) J and the expected (Fisher) information Σ J Jᵀ/λ, each summed
in pixel order, so results are bit-identical on every call and independent of the
thread count.
"""

import math

import numba
import numpy as np

from spread_tools.model.kernels.pixel_terms import MAX_Q, N_TERMS, pixel_terms

#: Local parameters per shoebox besides the matrix parameters (ln N ×3, δ, g, b0, b1, b2).
N_EXTRA = 8

_terms = numba.njit(cache=True)(pixel_terms)


@numba.njit(parallel=True, cache=True)
def lattice_model(minv, dminv, dom_off, s0hat, pol_n, pol_f, nabc, il, phi, porig, pfast, pslow,
                  pnorm, ppix, pix_off, bbox, sb_lat, sb_panel, h0, I_sb, dI_sb, G, bg, counts, mask,
                  sb_list, oversample, cut, want_lam, lam_out, bragg_out, want_jac, jac_out, nll_sb, grad_sb,
                  fisher_sb):
    """Per-shoebox NLL, gradient and Fisher information (see the module docstring).

    ``minv`` (n_dom_total, 3, 3) and ``dminv`` (n_dom_total, n_q, 3, 3) are (R_d A)⁻¹ and
    its derivatives, ``il`` (n_lat, n_chan) the inverse wavelengths (Å⁻¹) of each lattice's
    channels, ``I_sb``/``dI_sb`` (n_sb, n_chan) the intensity of each shoebox's reflection at
    those energies and its slope per eV. Only the shoeboxes in ``sb_list`` are evaluated;
    their rows are written in ``nll_sb`` (n_sb,), ``grad_sb`` (n_sb, n_loc),
    ``fisher_sb`` (n_sb, n_loc, n_loc) with n_loc = n_q + 8, and, when ``want_lam``,
    ``lam_out``/``bragg_out`` (n_pix,): λ and its Bragg part G·S, and when ``want_jac``
    ``jac_out`` (n_pix, n_loc): the Jacobian row of λ of every pixel, masked or not.
    """
    n_q = dminv.shape[1]
    n_loc = n_q + N_EXTRA
    i_n = 1 + MAX_Q
    for t in numba.prange(len(sb_list)):
        k = sb_list[t]
        j = sb_lat[k]
        pn = sb_panel[k]
        d0 = dom_off[j]
        n_dom = dom_off[j + 1] - d0
        out = np.zeros(N_TERMS)
        jr = np.zeros(n_loc)
        grad = np.zeros(n_loc)
        fis = np.zeros((n_loc, n_loc))
        nll = 0.0
        gj = G[j]
        b0 = bg[k, 0]
        b1 = bg[k, 1]
        b2 = bg[k, 2]
        x0 = bbox[k, 0]
        width = bbox[k, 1] - bbox[k, 0]
        y0 = bbox[k, 2]
        xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
        yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
        for p in range(pix_off[k], pix_off[k + 1]):
            loc = p - pix_off[k]
            ix = x0 + loc % width
            iy = y0 + loc // width
            _terms(ix, iy, k, j, pn, oversample, porig, pfast, pslow, pnorm, ppix, s0hat, pol_n, pol_f,
                   minv, dminv, d0, n_dom, n_q, nabc, il, phi, I_sb, dI_sb, h0, cut, out)
            xh = ix + 0.5 - xc
            yh = iy + 0.5 - yc
            bgp = math.exp(b0 + b1 * xh + b2 * yh)
            bragg = gj * out[0]
            lam = bragg + bgp
            if want_lam:
                lam_out[p] = lam
                bragg_out[p] = bragg
            if not (mask[p] or want_jac):
                continue
            for q in range(n_q):
                jr[q] = gj * out[1 + q]
            jr[n_q] = gj * out[i_n]
            jr[n_q + 1] = gj * out[i_n + 1]
            jr[n_q + 2] = gj * out[i_n + 2]
            jr[n_q + 3] = gj * out[i_n + 3]
            jr[n_q + 4] = bragg
            jr[n_q + 5] = bgp
            jr[n_q + 6] = bgp * xh
            jr[n_q + 7] = bgp * yh
            if want_jac:
                for a in range(n_loc):
                    jac_out[p, a] = jr[a]
            if not mask[p]:
                continue
            kk = np.float64(counts[p])
            nll += lam - kk * math.log(lam) if kk != 0.0 else lam
            r = 1.0 - kk / lam
            inv = 1.0 / lam
            # a pixel outside every domain's band has only background derivatives (exact zeros
            # elsewhere): skip the zero rows, most pixels of a background-dominated shoebox
            a0 = 0 if (out[0] != 0.0 or out[i_n + 3] != 0.0) else n_q + 5
            for a in range(a0, n_loc):
                grad[a] += r * jr[a]
                wa = jr[a] * inv
                for b in range(a0, a + 1):
                    fis[a, b] += wa * jr[b]
        nll_sb[k] = nll
        for a in range(n_loc):
            grad_sb[k, a] = grad[a]
            for b in range(a + 1):
                fisher_sb[k, a, b] = fis[a, b]
                fisher_sb[k, b, a] = fis[a, b]
