"""Smooth simulated background: a radial function of the resolution at the pixel.

The background is a flat part plus a water ring around 3.7 Å, times a
per-lattice level; each shoebox stores its first-order log-linear expansion
``exp(b0 + b1 x̂ + b2 ŷ)`` about the shoebox centre (``docs/formats.md``),
which *is* the background the simulated counts are drawn from.
"""

from __future__ import annotations

import numpy as np

__all__ = ["background_planes", "background_counts"]

# background shape: flat part + water ring (s = 1/d in Å⁻¹)
_RING_S = 1.0 / 3.7
_RING_WIDTH_S = 0.035
_RING_HEIGHT = 1.5


def _pixel_lab_mm(det, panel, x, y):
    """Lab position (mm) of fast/slow pixel coordinates (x, y) on panels."""
    o = det["origin_mm"][panel]
    f = det["fast_axis"][panel]
    s = det["slow_axis"][panel]
    ps = det["pixel_size_mm"][panel]
    return o + f * (x * ps[:, 0])[:, None] + s * (y * ps[:, 1])[:, None]


def _background_level(det, panel, x, y, beam_direction, k_mean):
    """Radial background shape (relative) at pixel coordinates (x, y)."""
    r = _pixel_lab_mm(det, panel, x, y)
    s1 = r / np.linalg.norm(r, axis=1, keepdims=True) * k_mean
    s = np.linalg.norm(s1 + k_mean * beam_direction, axis=1)   # |s1 − s0|, Å⁻¹
    return 1.0 + _RING_HEIGHT * np.exp(-0.5 * ((s - _RING_S) / _RING_WIDTH_S) ** 2)


def background_planes(det, panel, bbox, beam_direction, k_mean, level):
    """Log-linear background (b0, b1, b2) of each shoebox.

    The smooth radial background B(x, y) (flat + water ring, times ``level``)
    is expanded to first order in log space about the shoebox centre:
    b0 = ln B(centre), b1, b2 = central differences of ln B over ±1 pixel in
    fast and slow. The background of pixel p is then exp(b0 + b1 x̂ + b2 ŷ)
    with x̂, ŷ the pixel-centre offsets from the box centre (``docs/formats.md``).

    Parameters
    ----------
    det : dict
        Detector arrays (``origin_mm``, ``fast_axis``, ``slow_axis``, ``pixel_size_mm``).
    panel : numpy.ndarray
        (n,) panel of each shoebox.
    bbox : numpy.ndarray
        (n, 4) x0, x1, y0, y1.
    beam_direction : numpy.ndarray
        (3,) unit vector towards the source.
    k_mean : float
        1/λ (Å⁻¹) used to turn pixel positions into resolution.
    level : numpy.ndarray
        (n,) photons/pixel of the flat part for each shoebox.

    Returns
    -------
    numpy.ndarray
        (n, 3) b0, b1, b2.
    """
    xc = 0.5 * (bbox[:, 0] + bbox[:, 1]).astype(np.float64)
    yc = 0.5 * (bbox[:, 2] + bbox[:, 3]).astype(np.float64)

    def lnB(dx, dy):
        return np.log(level * _background_level(det, panel, xc + dx, yc + dy, beam_direction,
                                                 k_mean))
    b0 = lnB(0.0, 0.0)
    b1 = 0.5 * (lnB(1.0, 0.0) - lnB(-1.0, 0.0))
    b2 = 0.5 * (lnB(0.0, 1.0) - lnB(0.0, -1.0))
    return np.stack([b0, b1, b2], axis=1)


def background_counts(bbox, planes):
    """Background photons of every pixel of the shoeboxes (row-major, slow outer).

    Parameters
    ----------
    bbox : numpy.ndarray
        (n, 4) x0, x1, y0, y1.
    planes : numpy.ndarray
        (n, 3) b0, b1, b2.

    Returns
    -------
    numpy.ndarray
        (n_pix,) float64.
    """
    out = []
    for (x0, x1, y0, y1), (b0, b1, b2) in zip(bbox, planes):
        yy, xx = np.mgrid[y0:y1, x0:x1]
        xh = xx + 0.5 - 0.5 * (x0 + x1)
        yh = yy + 0.5 - 0.5 * (y0 + y1)
        out.append(np.exp(b0 + b1 * xh + b2 * yh).ravel())
    return np.concatenate(out) if out else np.zeros(0)
