"""Still-shot prediction: crystal orientations, spots on Ewald spheres, shoeboxes.

A reflection h of a lattice with orientation matrix A (q = A·h, Å⁻¹) is in
diffraction condition when, for some channel carrying photons, the distance of
q from that channel's Ewald sphere is within ``n_sigma`` times the
reflection's width (domain-size Gaussian along the sphere normal, combined
with |q| × mosaic spread). The weighted mean diffracted direction s1 is the
expected spot centre; :func:`cut_shoeboxes` places a square box around it.
"""

from __future__ import annotations

import math

import numpy as np

from spread_tools.model.geometry import HC_EV_A

__all__ = ["random_rotations", "predict_reflections", "cut_shoeboxes"]


def random_rotations(rng, n):
    """Rotation matrices uniform over SO(3) (normalised Gaussian quaternions).

    Parameters
    ----------
    rng : numpy.random.Generator
        Random stream.
    n : int
        Number of rotations.

    Returns
    -------
    numpy.ndarray
        (n, 3, 3) proper rotations.
    """
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _reflection_sigma(A, s1_hat, q_len, domain_size_cells, mosaic_spread_deg):
    """Width (Å⁻¹) of each reflection along the Ewald-sphere normal s1_hat.

    The domain-size transform exp(−2 Σ N_k² Δh_k² / 0.63) is a Gaussian with
    σ_h,k² = 0.63 / (4 N_k²) in h; in q = A·h its variance along n̂ is
    Σ_k (n̂·A[:, k])² σ_h,k². Mosaic spread adds |q| × spread (radians).
    """
    var_h = 0.63 / (4.0 * np.asarray(domain_size_cells, dtype=np.float64) ** 2)
    proj = s1_hat @ A          # (n, 3): n̂·A[:, k]
    var = (proj ** 2) @ var_h
    var += (q_len * math.radians(mosaic_spread_deg)) ** 2
    return np.sqrt(var)


def predict_reflections(A, hkl, beam_direction, energy_ev, weight, domain_size_cells,
                        mosaic_spread_deg, n_sigma=3.0):
    """Reflections in diffraction condition for some channel carrying photons.

    Parameters
    ----------
    A : numpy.ndarray
        (3, 3) orientation matrix, q = A·h (Å⁻¹).
    hkl : numpy.ndarray
        (n_h, 3) candidate Miller indices (already cut to the annulus).
    beam_direction : numpy.ndarray
        (3,) unit vector from the sample towards the source.
    energy_ev, weight : numpy.ndarray
        (n_chan,) channel energies (eV) and this shot's photons per channel.
    domain_size_cells : sequence of 3 float
        N_a, N_b, N_c.
    mosaic_spread_deg : float
        Mosaic spread (°).
    n_sigma : float
        Accept |excitation error| ≤ n_sigma × width for some channel.

    Returns
    -------
    index : numpy.ndarray
        (n_pred,) rows of ``hkl`` in diffraction condition.
    s1 : numpy.ndarray
        (n_pred, 3) unit diffracted directions, mean over channels weighted by
        photons × exp(−ε²/2σ²) (the expected spot centre).
    """
    d_hat = np.asarray(beam_direction, dtype=np.float64)
    d_hat = d_hat / np.linalg.norm(d_hat)
    active = np.flatnonzero(weight > 0)
    if len(active) == 0 or len(hkl) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    k_c = energy_ev[active] / HC_EV_A                   # 1/λ, Å⁻¹
    phi = weight[active]
    q = np.asarray(hkl, dtype=np.float64) @ A.T
    q2 = np.einsum("ij,ij->i", q, q)
    qd = q @ d_hat
    # coarse filter: the wavelength that puts h exactly on the sphere, k_h = q²/(2 q·d̂),
    # must lie within the channels ± a generous margin (|dε/dk| = q²/(2k²) at Bragg)
    ok = qd > 0
    k_h = np.where(ok, q2 / (2.0 * np.where(ok, qd, 1.0)), np.inf)
    # upper bound of the width along any normal: max σ_h² × (largest singular value of A)²
    var_dom = 0.63 / (4.0 * min(domain_size_cells) ** 2) * np.linalg.norm(A, 2) ** 2
    sig_max = np.sqrt(var_dom + q2 * math.radians(mosaic_spread_deg) ** 2)
    k_hi = k_c.max()
    margin = 4.0 * n_sigma * sig_max * 2.0 * k_hi ** 2 / np.maximum(q2, 1e-12)
    keep = np.flatnonzero(ok & (k_h >= k_c.min() - margin) & (k_h <= k_hi + margin))
    if len(keep) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3))
    qk = q[keep]
    s1 = qk[:, None, :] - k_c[None, :, None] * d_hat           # (n, c, 3)
    s1_len = np.linalg.norm(s1, axis=2)
    eps = s1_len - k_c[None, :]
    best = np.argmin(np.abs(eps), axis=1)
    n_hat = s1[np.arange(len(keep)), best] / s1_len[np.arange(len(keep)), best, None]
    sig = _reflection_sigma(A, n_hat, np.sqrt(q2[keep]), domain_size_cells, mosaic_spread_deg)
    z = eps / sig[:, None]
    inside = np.any(np.abs(z) <= n_sigma, axis=1)
    u = phi[None, :] * np.exp(-0.5 * np.minimum(z * z, 700.0))
    u = u[inside]
    s1_hat = s1[inside] / s1_len[inside][:, :, None]
    mean = np.einsum("nc,nci->ni", u, s1_hat) / u.sum(axis=1, keepdims=True)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    return keep[inside], mean


def cut_shoeboxes(panel, x_px, y_px, image_size, shoebox_size):
    """Square shoeboxes around predicted spots; which fall off the detector or on an edge.

    Parameters
    ----------
    panel : numpy.ndarray
        (n,) panel hit by each ray, −1 for none.
    x_px, y_px : numpy.ndarray
        (n,) predicted spot position in fast/slow pixels (pixel i spans [i, i+1)).
    image_size : numpy.ndarray
        (n_panel, 2) (n_fast, n_slow).
    shoebox_size : int
        Box edge in pixels; the spot lies in the centre pixel (odd sizes) or
        within half a pixel of the centre (even sizes).

    Returns
    -------
    bbox : numpy.ndarray
        (n, 4) int32 x0, x1, y0, y1 (half-open).
    status : numpy.ndarray
        (n,) int8: 0 kept, 1 off the detector, 2 crossing a panel edge.
    """
    n = len(panel)
    status = np.zeros(n, dtype=np.int8)
    off = (panel < 0) | ~np.isfinite(x_px) | ~np.isfinite(y_px)
    status[off] = 1
    xs = np.where(off, 0.0, x_px)
    ys = np.where(off, 0.0, y_px)
    x0 = np.floor(xs + 0.5 - shoebox_size / 2.0).astype(np.int64)
    y0 = np.floor(ys + 0.5 - shoebox_size / 2.0).astype(np.int64)
    x1, y1 = x0 + shoebox_size, y0 + shoebox_size
    img = np.asarray(image_size)[np.where(off, 0, panel)]
    edge = ~off & ((x0 < 0) | (y0 < 0) | (x1 > img[:, 0]) | (y1 > img[:, 1]))
    status[edge] = 2
    bbox = np.stack([x0, x1, y0, y1], axis=1).astype(np.int32)
    return bbox, status
