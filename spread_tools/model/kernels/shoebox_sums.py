"""Per-shoebox sums of a per-pixel quantity over the unmasked pixels (Numba, host side).

One pass over the pixels without the pixel-sized index arrays (``Dataset.pixel_shoebox``,
``Dataset.pixel_xy``) and masked copies that ``np.bincount`` needs: at LY99 size those
are several GB of temporaries. Sums run in pixel order, as ``np.bincount`` adds, so the
results are the same bits.
"""

import numba
import numpy as np


@numba.njit(cache=True)
def _moments(pix_off, bbox, mask, w, out):
    for k in range(len(pix_off) - 1):
        x0 = bbox[k, 0]
        width = bbox[k, 1] - bbox[k, 0]
        y0 = bbox[k, 2]
        s = 0.0
        sx = 0.0
        sy = 0.0
        for p in range(pix_off[k], pix_off[k + 1]):
            if not mask[p]:
                continue
            loc = p - pix_off[k]
            v = w[p]
            s += v
            sx += v * (x0 + loc % width + 0.5)
            sy += v * (y0 + loc // width + 0.5)
        out[k, 0] = s
        out[k, 1] = sx
        out[k, 2] = sy


def shoebox_moments(ds, w):
    """Σ w, Σ w·x and Σ w·y over the unmasked pixels of every shoebox.

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
        Pixel offsets, boxes and mask.
    w : ndarray (n_pix,)
        The per-pixel quantity.

    Returns
    -------
    ndarray (n_sb, 3)
        With x, y the pixel centres (fast and slow index + 0.5, DIALS convention).
    """
    out = np.zeros((ds.n_shoeboxes, 3))
    _moments(np.ascontiguousarray(ds.pixel_offset, dtype=np.int64),
             np.ascontiguousarray(ds.sb_bbox, dtype=np.int64).reshape(-1, 4),
             np.ascontiguousarray(ds.mask, dtype=np.bool_), np.ascontiguousarray(w, dtype=np.float64), out)
    return out
