"""CPU kernels of the channel-banded pixel model (Numba ``@njit(parallel=True, cache=True)``).

Layout (see :mod:`spread_tools.model.bands`): pixel p keeps the channels
``lo[p] : lo[p] + length[p]`` of its weights; the values of shoebox k are stored
contiguously from ``sb_offset[k]`` in pixel order (float32).

Building the bands (:func:`band_lengths`, then :func:`band_values`): the lattice
transform of sub-pixel s and domain d is, as a function of the inverse wavelength
il = E/hc, ``exp(−Q(il))`` with the quadratic

    Q(il) = (2/0.63) Σ_k N_k² (v_k il − h0_k)² = α (il − il*)² + Q*,    v = (R_d A)⁻¹ (ŝ − ŝ0),

so its centre il* and curvature α are known in closed form. With Q_min the smallest
Q* of the pixel and a cut level Q_min + T (:func:`screen_margin`), only the channels
inside the hull of the terms' intervals {Q ≤ cut} are evaluated (every term, in the
dense kernel's order and arithmetic, so the values are the dense float32 weights bit
for bit). Outside, every term is below exp(−cut), so the weight there is at most
``B = r_e² Φ Σ_s ω_s P_s peak exp(−cut)`` (Φ = Σ_c φ_c), and exactly 0 in float32 when
``r_e² max φ Σ_s ω_s P_s peak exp(−cut)`` is below half the smallest subnormal. B is
charged to the cut's budget; when it does not fit (the peak sits in a gap of a spiky
spectrum, or off the channel range) the cut is moved to where it does, from the weight
found so far, and as a last resort every channel is evaluated. A pixel whose every
weight rounds to float32 0 is recognised from Q_min alone. ``rtol = 0`` evaluates every
channel: only exact zeros are left out.

The cut (:func:`_trim`): starting from the evaluated window, the smaller end value is
dropped while the dropped sum stays within ``rtol · Σ_c w[p, c] − B``. The floor
(:func:`apply_floor`) then empties the bands of the pixels far below their shoebox's
brightest (most of them recognised from Q_min without being evaluated).

The model pass (:func:`model_pass`) uses per-shoebox constants of the fixed data
(:func:`setup_shoeboxes`): for the Poisson NLL Σ_unmasked (λ − k ln λ) with
λ = G S + bg, S = Σ_c w I, bg = exp(b0 + b1 x̂ + b2 ŷ),

    Σ λ          = Σ bg + G Σ_c Wsum_c I_c,              Wsum_c = Σ_unmasked w[p, c]
    Σ k ln λ     = b0 K0 + b1 K1 + b2 K2 + Σ_active k ln(1 + G S/bg),   K = Σ_unmasked k (1, x̂, ŷ)
    ∂/∂I_c       = G (Wsum_c − Σ_active k w[p, c]/λ_p)
    ∂/∂G         = Σ_c Wsum_c I_c − Σ_active k S/λ
    ∂/∂(b0,b1,b2) = Σ bg (1, x̂, ŷ) − K + Σ_active k (1, x̂, ŷ) G S/λ

where the *active* pixels are the unmasked ones with k ≠ 0 and a non-empty band:
only they are read channel by channel; the background sums are separable per row, a
row with masked pixels costs their mask bytes. All of this is exact algebra (the
logarithm and 1/(1 + t) of a pixel with t = G S/bg < 1e-4 are short series, exact to
1e-20 relative).
Shoeboxes run in parallel, each writes its own results; sums over shoeboxes are
serial in shoebox order (:func:`reduce_spans`), so results are bit-identical on
every call and for any number of threads.
"""

import math

import numba
import numpy as np

from spread_tools.model.kernels import GAUSS_SHAPE_CONST, R_E2_A2

_TWO_OVER_C = 2.0 / GAUSS_SHAPE_CONST
_REASSOC = {"reassoc", "contract"}
#: Below half the smallest float32 subnormal a weight rounds to exactly 0.
_F32_ZERO = 5e-46


@numba.njit(cache=True)
def screen_margin(rtol, n_chan, n_terms):
    """Margin T of the analytic screen: terms more than T below the brightest are skipped.

    T = ln(1/rtol) + ln(n_chan · n_terms) + 5, so that the skipped mass is far below
    the cut's budget except when the peak falls in a gap of the spectrum.
    """
    return math.log(1.0 / rtol) + math.log(max(1.0, n_chan * n_terms)) + 5.0


@numba.njit(cache=True)
def _subpixel(ix, iy, a, b, inv_os, pn, j, area, f, peak, porig, pfast, pslow, pnorm, ppix, pol_n, s0hat, out):
    """ω·P·peak and ŝ − ŝ0 of one sub-pixel into out[0:4] (same arithmetic as the dense kernel)."""
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
    out[0] = omega * pol * peak
    out[1] = u0 - s0hat[j, 0]
    out[2] = u1 - s0hat[j, 1]
    out[3] = u2 - s0hat[j, 2]


@numba.njit(cache=True)
def _pixel_terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig, pfast, pslow,
                 pnorm, ppix, bbox, pix_off, h0, sub, v, tmp):
    """Sub-pixel weights ω·P·peak into ``sub`` and, for every (sub-pixel s, domain d) term
    t = s·n_dom + d, v (3), curvature α, centre il*, minimum Q* into ``v[t]``.

    Returns (Q_min, Σ_s sub[s]).
    """
    inv_os = 1.0 / oversample
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    peak = (nabc[j, 0] * nabc[j, 1] * nabc[j, 2]) ** 2
    area = ppix[pn, 0] * ppix[pn, 1] * inv_os * inv_os
    f = pol_f[j]
    width = bbox[k, 1] - bbox[k, 0]
    loc = p - pix_off[k]
    ix = bbox[k, 0] + loc % width
    iy = bbox[k, 2] + loc // width
    g0 = h0[k, 0]
    g1 = h0[k, 1]
    g2 = h0[k, 2]
    q_min = math.inf
    wsum = 0.0
    for a in range(oversample):
        for b in range(oversample):
            s = a * oversample + b
            _subpixel(ix, iy, a, b, inv_os, pn, j, area, f, peak, porig, pfast, pslow, pnorm, ppix, pol_n,
                      s0hat, tmp)
            sub[s] = tmp[0]
            wsum += tmp[0]
            for d in range(n_dom):
                m = minv[d0 + d]
                t = s * n_dom + d
                v0 = m[0, 0] * tmp[1] + m[0, 1] * tmp[2] + m[0, 2] * tmp[3]
                v1 = m[1, 0] * tmp[1] + m[1, 1] * tmp[2] + m[1, 2] * tmp[3]
                v2 = m[2, 0] * tmp[1] + m[2, 1] * tmp[2] + m[2, 2] * tmp[3]
                al = _TWO_OVER_C * (na2 * v0 * v0 + nb2 * v1 * v1 + nc2 * v2 * v2)
                be = _TWO_OVER_C * (na2 * v0 * g0 + nb2 * v1 * g1 + nc2 * v2 * g2)
                ils = be / al if al > 0.0 else 0.0
                dh0 = v0 * ils - g0
                dh1 = v1 * ils - g1
                dh2 = v2 * ils - g2
                qs = _TWO_OVER_C * (na2 * dh0 * dh0 + nb2 * dh1 * dh1 + nc2 * dh2 * dh2)
                v[t, 0] = v0
                v[t, 1] = v1
                v[t, 2] = v2
                v[t, 3] = al
                v[t, 4] = ils
                v[t, 5] = qs
                q_min = min(q_min, qs)
    return q_min, wsum


@numba.njit(cache=True)
def _window(v, n_terms, cut, inv_lam):
    """Channels ca:cb where some term has Q ≤ cut (the hull of the terms' intervals)."""
    il_lo = math.inf
    il_hi = -math.inf
    for t in range(n_terms):
        if v[t, 5] <= cut:
            if v[t, 3] > 0.0:
                half = math.sqrt((cut - v[t, 5]) / v[t, 3])
                il_lo = min(il_lo, v[t, 4] - half)
                il_hi = max(il_hi, v[t, 4] + half)
            else:
                il_lo = -math.inf
                il_hi = math.inf
    if il_lo > il_hi:
        return 0, 0
    ca = np.searchsorted(inv_lam, il_lo)                 # first channel >= il_lo
    cb = np.searchsorted(inv_lam, il_hi, side="right")   # after the last channel <= il_hi
    return ca, cb


@numba.njit(cache=True)
def _evaluate(ca, cb, k, j, n_sub, n_dom, nabc, phi, h0, inv_lam, sub, v, buf):
    """w of channels ca:cb into ``buf`` (float32-rounded, as float64; every term, the dense
    kernel's order and arithmetic, so the values are the dense ones bit for bit). Returns Σ."""
    na2 = nabc[j, 0] * nabc[j, 0]
    nb2 = nabc[j, 1] * nabc[j, 1]
    nc2 = nabc[j, 2] * nabc[j, 2]
    g0 = h0[k, 0]
    g1 = h0[k, 1]
    g2 = h0[k, 2]
    total = 0.0
    for c in range(ca, cb):
        buf[c] = 0.0
        if phi[j, c] == 0.0:
            continue
        il = inv_lam[c]
        acc = 0.0
        for s in range(n_sub):
            ssum = 0.0
            for d in range(n_dom):
                t = s * n_dom + d
                dh0 = v[t, 0] * il - g0
                dh1 = v[t, 1] * il - g1
                dh2 = v[t, 2] * il - g2
                ssum += math.exp(-_TWO_OVER_C * (na2 * dh0 * dh0 + nb2 * dh1 * dh1 + nc2 * dh2 * dh2))
            acc += sub[s] * ssum
        val = np.float64(np.float32(R_E2_A2 * phi[j, c] * acc / n_dom))
        buf[c] = val
        total += val
    return total


@numba.njit(cache=True)
def _trim(buf, ca, cb, budget):
    """Smallest band lo:hi inside ca:cb obtained by dropping the smaller end value while
    the dropped sum stays ≤ budget (exact zeros are always dropped); an empty band is (0, 0)."""
    lo = ca
    hi = cb
    left = budget
    while lo < hi:
        x = buf[lo]
        y = buf[hi - 1]
        if x <= y:
            if x == 0.0 or x <= left:
                left -= x
                lo += 1
            else:
                break
        else:
            if y == 0.0 or y <= left:
                left -= y
                hi -= 1
            else:
                break
    if lo == hi:
        return 0, 0                 # an empty band starts at channel 0
    return lo, hi


@numba.njit(cache=True)
def _phi_stats(phi, j):
    mx = 0.0
    tot = 0.0
    for c in range(phi.shape[1]):
        tot += phi[j, c]
        if phi[j, c] > mx:
            mx = phi[j, c]
    return mx, tot


@numba.njit(cache=True)
def _pixel_band(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, phi, phi_max, phi_tot,
                porig, pfast, pslow, pnorm, ppix, bbox, pix_off, h0, inv_lam, rtol, sub, v, tmp, buf):
    """Band (lo, hi) of one pixel and the number of channels evaluated; ``buf[lo:hi]`` holds its values.

    The window of the analytic screen starts at Q ≤ Q_min + T; the weight outside it is at
    most B = r_e² Φ Σ_s sub[s] exp(−cut), and exactly 0 in float32 when
    r_e² max φ Σ_s sub[s] exp(−cut) is below half the smallest subnormal. When B does not fit in the budget rtol·Σ, the
    window is widened to the cut where it does (from the Σ found so far; by another T when
    the window held only φ = 0 channels), at most 8 times, then every channel is evaluated.
    """
    n_chan = inv_lam.shape[0]
    n_sub = oversample * oversample
    q_min, wsum = _pixel_terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig,
                               pfast, pslow, pnorm, ppix, bbox, pix_off, h0, sub, v, tmp)
    # every weight below half the smallest float32 subnormal: all exactly 0
    if phi_max <= 0.0 or R_E2_A2 * phi_max * wsum * math.exp(-q_min) < _F32_ZERO:
        return 0, 0, 0, 0.0
    scale = R_E2_A2 * phi_tot * wsum
    ca = 0
    cb = n_chan
    budget = 0.0
    done = False
    if rtol > 0.0:
        margin = screen_margin(rtol, n_chan, n_sub * n_dom)
        cut = q_min + margin
        for attempt in range(8):
            ca, cb = _window(v, n_sub * n_dom, cut, inv_lam)
            if ca == 0 and cb == n_chan:
                break
            total = _evaluate(ca, cb, k, j, n_sub, n_dom, nabc, phi, h0, inv_lam, sub, v, buf)
            outside = scale * math.exp(-cut)
            if R_E2_A2 * phi_max * wsum * math.exp(-cut) < _F32_ZERO:
                outside = 0.0               # every weight outside the window rounds to float32 0
            budget = rtol * total - outside
            if budget >= 0.0:
                done = True
                break
            if total > 0.0:
                # the cut at which the bound is half the budget of the weight found so far
                cut = max(cut + 1.0, math.log(scale) - math.log(0.5 * rtol * total))
            else:
                cut += margin          # the window fell into a gap of the spectrum: widen
    if not done:
        ca = 0
        cb = n_chan
        total = _evaluate(ca, cb, k, j, n_sub, n_dom, nabc, phi, h0, inv_lam, sub, v, buf)
        budget = rtol * total
    a, b = _trim(buf, ca, cb, budget)
    return a, b, cb - ca, total


@numba.njit(parallel=True, cache=True)
def band_lengths(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                 pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, rtol, floor, lo, length, evaluated,
                 total):
    """First pass: ``lo[p]``, ``length[p]`` of every pixel's band (uint16), the number of
    channels evaluated for it (``evaluated``, a diagnostic) and its weight Σ_c w (``total``).

    With a floor, the pixels of a shoebox that it must empty are mostly recognised without
    evaluating them: U_p = r_e² Φ Σ_s ω_s P_s peak exp(−Q_min) bounds Σ_c w[p, c]; the pixel
    of largest U is evaluated first, and a pixel with U_p below ``floor`` × its weight is skipped
    (:func:`apply_floor` would empty it anyway, so the bands are the same).
    """
    n_sb = len(sb_lat)
    n_chan = inv_lam.shape[0]
    for k in numba.prange(n_sb):
        j = sb_lat[k]
        pn = sb_panel[k]
        d0 = dom_off[j]
        n_dom = dom_off[j + 1] - d0
        phi_max, phi_tot = _phi_stats(phi, j)
        sub = np.empty(oversample * oversample)
        v = np.empty((oversample * oversample * n_dom, 6))
        tmp = np.empty(4)
        buf = np.zeros(n_chan)
        p0 = pix_off[k]
        n_p = pix_off[k + 1] - p0
        first = p0
        bound = np.zeros(n_p)
        if floor > 0.0:
            best = -1.0
            for p in range(p0, p0 + n_p):
                q_min, wsum = _pixel_terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc,
                                           porig, pfast, pslow, pnorm, ppix, bbox, pix_off, h0, sub, v, tmp)
                bound[p - p0] = R_E2_A2 * phi_tot * wsum * math.exp(-q_min) * (1.0 + 1e-6)   # float32 rounding
                if bound[p - p0] > best:
                    best = bound[p - p0]
                    first = p
        lim = -1.0
        for m in range(n_p):
            p = first if m == 0 else (p0 + m - 1 if p0 + m - 1 < first else p0 + m)
            if bound[p - p0] < lim:
                lo[p] = 0
                length[p] = 0
                evaluated[p] = 0
                total[p] = -1.0                 # emptied by the floor unevaluated (apply_floor counts it)
                continue
            a, b, n_ev, tot = _pixel_band(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc,
                                          phi, phi_max, phi_tot, porig, pfast, pslow, pnorm, ppix, bbox, pix_off,
                                          h0, inv_lam, rtol, sub, v, tmp, buf)
            lo[p] = a
            length[p] = b - a
            evaluated[p] = n_ev
            total[p] = tot
            if m == 0 and floor > 0.0:
                lim = floor * tot


@numba.njit(parallel=True, cache=True)
def band_values(minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
                pix_off, bbox, sb_lat, sb_panel, h0, inv_lam, oversample, lo, length, sb_offset, values):
    """Second pass: the band values (float32), shoebox k's from ``sb_offset[k]`` in pixel order
    (only the band's channels are evaluated; the values are those of the first pass)."""
    n_sb = len(sb_lat)
    n_chan = inv_lam.shape[0]
    for k in numba.prange(n_sb):
        j = sb_lat[k]
        pn = sb_panel[k]
        d0 = dom_off[j]
        n_dom = dom_off[j + 1] - d0
        n_sub = oversample * oversample
        sub = np.empty(n_sub)
        v = np.empty((n_sub * n_dom, 6))
        tmp = np.empty(4)
        buf = np.zeros(n_chan)
        o = sb_offset[k]
        for p in range(pix_off[k], pix_off[k + 1]):
            n = np.int64(length[p])
            if n == 0:
                continue
            a = np.int64(lo[p])
            _pixel_terms(k, p, j, pn, d0, n_dom, oversample, minv, s0hat, pol_n, pol_f, nabc, porig, pfast, pslow,
                         pnorm, ppix, bbox, pix_off, h0, sub, v, tmp)
            _evaluate(a, a + n, k, j, n_sub, n_dom, nabc, phi, h0, inv_lam, sub, v, buf)
            for i in range(n):
                values[o + i] = np.float32(buf[a + i])
            o += n


@numba.njit(parallel=True, cache=True)
def apply_floor(pix_off, total, floor, lo, length):
    """Empty the band of every pixel whose weight Σ_c w is below ``floor`` × the largest of its shoebox.

    Returns the number of bands emptied (with those :func:`band_lengths` emptied unevaluated,
    marked by a negative total)."""
    n_sb = len(pix_off) - 1
    out = np.zeros(n_sb, np.int64)
    for k in numba.prange(n_sb):
        top = 0.0
        for p in range(pix_off[k], pix_off[k + 1]):
            top = max(top, total[p])
        lim = floor * top
        for p in range(pix_off[k], pix_off[k + 1]):
            if total[p] < 0.0:
                out[k] += 1
            elif length[p] > 0 and total[p] < lim:
                lo[p] = 0
                length[p] = 0
                out[k] += 1
    return out.sum()


@numba.njit(parallel=True, cache=True)
def bands_from_dense(w, pix_off, rtol, lo, length, total):
    """``lo``, ``length`` of dense weights ``w`` (n_pix, n_chan) under the cut (no screen: B = 0)
    and each pixel's Σ_c w (``total``)."""
    n_chan = w.shape[1]
    n_sb = len(pix_off) - 1
    for k in numba.prange(n_sb):
        buf = np.empty(n_chan)
        for p in range(pix_off[k], pix_off[k + 1]):
            tot = 0.0
            for c in range(n_chan):
                buf[c] = np.float64(w[p, c])
                tot += buf[c]
            total[p] = tot
            a, b = _trim(buf, 0, n_chan, rtol * tot)
            lo[p] = a
            length[p] = b - a


@numba.njit(parallel=True, cache=True)
def pack_dense(w, pix_off, lo, length, sb_offset, values):
    """Copy the bands of dense ``w`` into ``values``."""
    for k in numba.prange(len(pix_off) - 1):
        o = sb_offset[k]
        for p in range(pix_off[k], pix_off[k + 1]):
            for i in range(length[p]):
                values[o + i] = w[p, lo[p] + i]
            o += length[p]


@numba.njit(parallel=True, cache=True)
def unpack_dense(values, pix_off, lo, length, sb_offset, w):
    """Dense ``w`` (n_pix, n_chan), zero outside the bands."""
    for k in numba.prange(len(pix_off) - 1):
        o = sb_offset[k]
        for p in range(pix_off[k], pix_off[k + 1]):
            for c in range(w.shape[1]):
                w[p, c] = 0.0
            for i in range(length[p]):
                w[p, lo[p] + i] = values[o + i]
            o += length[p]


@numba.njit(cache=True)
def shoebox_sizes(pix_off, lo, length):
    """Per shoebox: number of values, and the channel span (first, count) of its pixels' bands."""
    n_sb = len(pix_off) - 1
    n_val = np.zeros(n_sb, np.int64)
    span_lo = np.zeros(n_sb, np.int64)
    span_len = np.zeros(n_sb, np.int64)
    for k in range(n_sb):
        a = 1 << 30
        b = -1
        tot = 0
        for p in range(pix_off[k], pix_off[k + 1]):
            n = np.int64(length[p])
            tot += n
            if n > 0:
                a = min(a, np.int64(lo[p]))
                b = max(b, np.int64(lo[p]) + n)
        n_val[k] = tot
        if b > a:
            span_lo[k] = a
            span_len[k] = b - a
    return n_val, span_lo, span_len


@numba.njit(parallel=True, cache=True)
def setup_shoeboxes(values, lo, length, sb_offset, pix_off, bbox, counts, mask, span_lo, span_off, row_off,
                    act_off, wsum, kmom, row_full, act_row, act_col, act_woff, act_lo, act_len, act_k):
    """Constants of the fixed data for :func:`model_pass`.

    ``wsum[span_off[k] + c − span_lo[k]]`` = Σ_unmasked w[p, c]; ``kmom[k]`` = Σ_unmasked k (1, x̂, ŷ);
    ``row_full[row_off[k] + r]`` = 1 when row r of shoebox k has no masked pixel; the active
    pixels of shoebox k (unmasked, k ≠ 0, non-empty band) at ``act_off[k]:act_off[k+1]``:
    row and column in the shoebox, local value offset, band, count, ordered by band length (a stable
    sort: loops of equal length follow each other, which the branch predictor likes).
    """
    for k in numba.prange(len(pix_off) - 1):
        width = bbox[k, 1] - bbox[k, 0]
        height = bbox[k, 3] - bbox[k, 2]
        xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
        yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
        o = 0
        i = act_off[k]
        so = span_off[k] - span_lo[k]
        for c in range(span_off[k], span_off[k + 1]):
            wsum[c] = 0.0
        for r in range(height):
            row_full[row_off[k] + r] = 1
        k0 = 0.0
        k1 = 0.0
        k2 = 0.0
        p0 = pix_off[k]
        for p in range(p0, pix_off[k + 1]):
            n = np.int64(length[p])
            loc = p - p0
            if mask[p]:
                kk = np.float64(counts[p])
                xh = (bbox[k, 0] + loc % width) + 0.5 - xc
                yh = (bbox[k, 2] + loc // width) + 0.5 - yc
                k0 += kk
                k1 += kk * xh
                k2 += kk * yh
                base = sb_offset[k] + o
                for q in range(n):
                    wsum[so + lo[p] + q] += np.float64(values[base + q])
                if kk != 0.0 and n > 0:
                    act_row[i] = loc // width
                    act_col[i] = loc % width
                    act_woff[i] = o
                    act_lo[i] = lo[p]
                    act_len[i] = length[p]
                    act_k[i] = counts[p]
                    i += 1
            else:
                row_full[row_off[k] + loc // width] = 0
            o += n
        kmom[k, 0] = k0
        kmom[k, 1] = k1
        kmom[k, 2] = k2
        # stable insertion sort of the shoebox's active pixels by band length
        a = act_off[k]
        for m in range(a + 1, act_off[k + 1]):
            key = act_len[m]
            ar = act_row[m]
            ac = act_col[m]
            wof = act_woff[m]
            l0 = act_lo[m]
            kc = act_k[m]
            q = m - 1
            while q >= a and act_len[q] > key:
                act_len[q + 1] = act_len[q]
                act_row[q + 1] = act_row[q]
                act_col[q + 1] = act_col[q]
                act_woff[q + 1] = act_woff[q]
                act_lo[q + 1] = act_lo[q]
                act_k[q + 1] = act_k[q]
                q -= 1
            act_len[q + 1] = key
            act_row[q + 1] = ar
            act_col[q + 1] = ac
            act_woff[q + 1] = wof
            act_lo[q + 1] = l0
            act_k[q + 1] = kc


@numba.njit(cache=True)
def count_active(pix_off, length, counts, mask):
    """Active pixels (unmasked, k ≠ 0, non-empty band) per shoebox."""
    n_sb = len(pix_off) - 1
    out = np.zeros(n_sb, np.int64)
    for k in range(n_sb):
        n = 0
        for p in range(pix_off[k], pix_off[k + 1]):
            if mask[p] and counts[p] != 0.0 and length[p] > 0:
                n += 1
        out[k] = n
    return out


#: Below this G S / bg the logarithm and the reciprocal are short series (error < 1e-20 relative).
_T_SERIES = 1e-4


@numba.njit(cache=True)
def _geometric(out, inv, n, start, lead, step):
    """out[i] = exp(lead + step·(start + i)) and inv[i] = exp(−lead − step·(start + i)) for i < n,
    by four exps and running products (drift below 1e-15 relative for a shoebox edge of a few
    hundred pixels; no division, so an underflow gives 0 and inf, not an error)."""
    f = math.exp(step)
    v = math.exp(lead + step * start)
    fi = math.exp(-step)
    vi = math.exp(-(lead + step * start))
    for i in range(n):
        out[i] = v
        inv[i] = vi
        v *= f
        vi *= fi


@numba.njit(parallel=True, cache=True, fastmath=_REASSOC)
def model_pass(values, sb_offset, mask, pix_off, bbox, sb_lat, sb_h, span_lo, span_off, wsum, kmom, row_off,
               row_full, act_off, act_row, act_col, act_woff, act_lo, act_len, act_k, I, G, bg, want_grad,
               n_chunks, max_edge, max_span, max_active, nll_sb, dG_sb, dbg_sb, dI_span):
    """NLL and gradients per shoebox (module docstring); ``dI_span`` over each shoebox's channel span.

    Shoeboxes are processed in ``n_chunks`` fixed ranges (scratch arrays of ``max_edge``,
    ``max_span`` and ``max_active`` entries allocated once per range); every shoebox writes only
    its own results. Per shoebox: the Bragg sums of its active pixels, then ln(1 + t) and k/λ
    for all of them as short series (t = G S/bg < 1e-4: errors below 1e-20 relative; no branch,
    so the loop vectorises), then the exact forms where t is larger, then the gradient sums.
    """
    n_sb = len(sb_lat)
    per = (n_sb + n_chunks - 1) // n_chunks
    for chunk in numba.prange(n_chunks):
        ex = np.empty(max_edge)
        iex = np.empty(max_edge)
        ey = np.empty(max_edge)
        iey = np.empty(max_edge)
        acc = np.empty(max_span)
        sv = np.empty(max_active)
        tv = np.empty(max_active)
        lv = np.empty(max_active)
        kv = np.empty(max_active)
        for k in range(chunk * per, min(n_sb, (chunk + 1) * per)):
            j = sb_lat[k]
            h = sb_h[k]
            g = G[j]
            b0 = bg[k, 0]
            b1 = bg[k, 1]
            b2 = bg[k, 2]
            width = bbox[k, 1] - bbox[k, 0]
            height = bbox[k, 3] - bbox[k, 2]
            xs = 0.5 - 0.5 * width           # x̂ of the first column (pixel centre − shoebox centre)
            ys = 0.5 - 0.5 * height
            _geometric(ex, iex, width, xs, 0.0, b1)
            _geometric(ey, iey, height, ys, b0, b2)
            f0 = 0.0
            f1 = 0.0
            for col in range(width):
                f0 += ex[col]
                f1 += ex[col] * (xs + col)
            # Σ_unmasked bg·(1, x̂, ŷ), separable per row; rows without masked pixels use the full sums
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            p = pix_off[k]
            for row in range(height):
                if row_full[row_off[k] + row]:
                    r0 = f0
                    r1 = f1
                else:
                    r0 = 0.0
                    r1 = 0.0
                    for col in range(width):
                        if mask[p + col]:
                            r0 += ex[col]
                            r1 += ex[col] * (xs + col)
                s0 += ey[row] * r0
                s1 += ey[row] * r1
                s2 += ey[row] * (ys + row) * r0
                p += width
            # Σ_unmasked S = Σ_c Wsum_c I_c
            c0 = span_lo[k]
            nspan = span_off[k + 1] - span_off[k]
            wo = span_off[k]
            ssum = 0.0
            for c in range(nspan):
                ssum += wsum[wo + c] * I[h, c0 + c]
                acc[c] = 0.0
            nll = s0 + g * ssum - (b0 * kmom[k, 0] + b1 * kmom[k, 1] + b2 * kmom[k, 2])
            gq = 0.0
            q0 = 0.0
            q1 = 0.0
            q2 = 0.0
            base = sb_offset[k]
            Ih = I[h]
            a_0 = act_off[k]
            n_a = act_off[k + 1] - a_0
            # per-shoebox views: indices from loop counters only (numba then needs no
            # negative-index wraparound test in the inner loops, and they vectorise)
            a_row = act_row[a_0:a_0 + n_a]
            a_col = act_col[a_0:a_0 + n_a]
            a_woff = act_woff[a_0:a_0 + n_a]
            a_lo = act_lo[a_0:a_0 + n_a]
            a_len = act_len[a_0:a_0 + n_a]
            a_k = act_k[a_0:a_0 + n_a]
            # 1) Bragg sums of the active pixels (their bands only)
            for ii in range(n_a):
                o = base + a_woff[ii]
                l0 = np.int64(a_lo[ii])
                n = np.int64(a_len[ii])
                vw = values[o:o + n]
                vi = Ih[l0:l0 + n]
                s = 0.0
                for q in range(n):
                    s += np.float64(vw[q]) * vi[q]
                sv[ii] = s
            # 2) t = G S / bg, ln(1 + t) and k/λ: branch-free short series (vectorised) ...
            big = 0
            for ii in range(n_a):
                ibg = iey[a_row[ii]] * iex[a_col[ii]]
                t = g * sv[ii] * ibg
                kk = np.float64(a_k[ii])
                tv[ii] = t
                lv[ii] = kk * (t * (1.0 - t * (0.5 - t * (1.0 / 3.0 - t * (0.25 - t * 0.2)))))
                kv[ii] = kk * (ibg * (1.0 - t * (1.0 - t * (1.0 - t * (1.0 - t)))))     # k (1/bg)/(1 + t)
                big += 1 if t >= _T_SERIES else 0
            # ... and the exact forms where t is not small (or not finite)
            if big:
                for ii in range(n_a):
                    t = tv[ii]
                    if not t < _T_SERIES:
                        row = np.int64(a_row[ii])
                        col = np.int64(a_col[ii])
                        kk = np.float64(a_k[ii])
                        lam = g * sv[ii] + ey[row] * ex[col]
                        kv[ii] = kk / lam
                        if t < 1e300:
                            lv[ii] = kk * math.log(1.0 + t)
                        else:                                          # the background underflowed
                            lv[ii] = kk * (math.log(lam) - (b0 + b1 * (xs + col) + b2 * (ys + row)))
            for ii in range(n_a):
                nll -= lv[ii]
            if want_grad:
                # 3) gradient sums and the channel accumulation (k/λ) w
                for ii in range(n_a):
                    ki = kv[ii]
                    kq = ki * g * sv[ii]
                    gq += ki * sv[ii]
                    q0 += kq
                    q1 += kq * (xs + np.int64(a_col[ii]))
                    q2 += kq * (ys + np.int64(a_row[ii]))
                    o = base + a_woff[ii]
                    a0 = np.int64(a_lo[ii]) - c0
                    n = np.int64(a_len[ii])
                    vw = values[o:o + n]
                    va = acc[a0:a0 + n]
                    for q in range(n):
                        va[q] += ki * np.float64(vw[q])
            nll_sb[k] = nll
            if want_grad:
                dG_sb[k] = ssum - gq
                dbg_sb[k, 0] = s0 - kmom[k, 0] + q0
                dbg_sb[k, 1] = s1 - kmom[k, 1] + q1
                dbg_sb[k, 2] = s2 - kmom[k, 2] + q2
                for c in range(nspan):
                    dI_span[wo + c] = g * (wsum[wo + c] - acc[c])


@numba.njit(parallel=True, cache=True, fastmath=_REASSOC)
def expected_counts(values, lo, length, sb_offset, pix_off, bbox, sb_lat, sb_h, I, G, bg, lam_out):
    """λ_p = G_j Σ_band w I + exp(b0 + b1 x̂ + b2 ŷ) of every pixel (masked ones too)."""
    for k in numba.prange(len(sb_lat)):
        j = sb_lat[k]
        h = sb_h[k]
        g = G[j]
        x0 = bbox[k, 0]
        width = bbox[k, 1] - bbox[k, 0]
        y0 = bbox[k, 2]
        xc = 0.5 * (bbox[k, 0] + bbox[k, 1])
        yc = 0.5 * (bbox[k, 2] + bbox[k, 3])
        o = sb_offset[k]
        p0 = pix_off[k]
        for p in range(p0, pix_off[k + 1]):
            loc = p - p0
            xh = (x0 + loc % width) + 0.5 - xc
            yh = (y0 + loc // width) + 0.5 - yc
            l0 = np.int64(lo[p])
            n = np.int64(length[p])
            vw = values[o:o + n]
            Ip = I[h, l0:l0 + n]
            s = 0.0
            for q in range(n):
                s += np.float64(vw[q]) * Ip[q]
            o += n
            lam_out[p] = g * s + math.exp(bg[k, 0] + bg[k, 1] * xh + bg[k, 2] * yh)


@numba.njit(cache=True)
def reduce_spans(nll_sb, dG_sb, dI_span, sb_lat, sb_h, span_lo, span_off, n_lat, n_h, n_chan, want_grad):
    """Sums over shoeboxes in shoebox order (serial, deterministic): nll, dG (n_lat,), dI (n_h, n_chan)."""
    nll = 0.0
    for k in range(len(nll_sb)):
        nll += nll_sb[k]
    dG = np.zeros(n_lat)
    dI = np.zeros((n_h, n_chan))
    if want_grad:
        for k in range(len(nll_sb)):
            dG[sb_lat[k]] += dG_sb[k]
            h = sb_h[k]
            c0 = span_lo[k]
            for c in range(span_off[k + 1] - span_off[k]):
                dI[h, c0 + c] += dI_span[span_off[k] + c]
    return nll, dG, dI
