"""Miller indices of a unit cell: enumeration in a d range, systematic absences, 1/d².

Conventions: M is gemmi's fractionalisation matrix of the cell and B = Mᵀ, so
the Cartesian reciprocal vector of h is s = B·h (Å⁻¹) and |s| = 1/d.
"""

from __future__ import annotations

import math

import numpy as np

from spread_tools.errors import InputError

__all__ = ["frac_matrix", "b_matrix", "inv_d2", "miller_indices", "systematically_absent",
           "pack_hkl"]


def b_matrix(cell):
    """Reciprocal-space B matrix of a cell (DIALS/cctbx convention).

    Parameters
    ----------
    cell : gemmi.UnitCell or sequence of 6 float
        As for :func:`frac_matrix` (which raises InputError for a bad cell).

    Returns
    -------
    numpy.ndarray
        (3, 3) B = Mᵀ with M gemmi's fractionalisation matrix, so that the
        Cartesian reciprocal vector of h is B·h (Å⁻¹) and |B·h| = 1/d.
    """
    return frac_matrix(cell).T


def frac_matrix(cell):
    """Fractionalisation matrix M of a cell (gemmi/PDB convention), x_frac = M·r.

    Parameters
    ----------
    cell : gemmi.UnitCell or sequence of 6 float
        A gemmi cell, or a, b, c (Å), α, β, γ (°).

    Returns
    -------
    numpy.ndarray
        (3, 3) C-contiguous M (Å⁻¹); the reciprocal vector of h is Mᵀh.

    Raises
    ------
    InputError
        Six numbers that do not make a unit cell.
    """
    import gemmi
    if not isinstance(cell, gemmi.UnitCell):
        try:
            cell = gemmi.UnitCell(*[float(x) for x in cell])
        except (RuntimeError, ValueError, TypeError):
            raise InputError(f"cell: {list(cell)} is not a unit cell") from None
    return np.array(cell.frac.mat.tolist(), dtype=np.float64)


def inv_d2(cell, hkl):
    """1/d² (Å⁻²) of Miller indices.

    Parameters
    ----------
    cell : gemmi.UnitCell or sequence of 6 float
        Unit cell.
    hkl : array_like
        (n, 3) Miller indices.

    Returns
    -------
    numpy.ndarray
        (n,) float64.
    """
    s = np.asarray(hkl, dtype=np.float64) @ frac_matrix(cell)
    return np.einsum("ij,ij->i", s, s)


def pack_hkl(hkl):
    """One int64 key per Miller index (|h|, |k|, |l| < 2²⁰), for sorting and lookups.

    Parameters
    ----------
    hkl : array_like
        (n, 3) integer indices.

    Returns
    -------
    numpy.ndarray
        (n,) int64, distinct for distinct indices.
    """
    h = np.asarray(hkl, dtype=np.int64)
    off = 1 << 20
    return ((h[:, 0] + off) << 42) | ((h[:, 1] + off) << 21) | (h[:, 2] + off)


def miller_indices(cell, spacegroup, d_min_a, d_max_a=None):
    """P1 Miller indices with d_min ≤ d ≤ d_max, both Friedel mates, absences removed.

    Parameters
    ----------
    cell : gemmi.UnitCell
        Unit cell.
    spacegroup : gemmi.SpaceGroup
        Space group (its absences are left out).
    d_min_a : float
        High-resolution limit (Å).
    d_max_a : float, optional
        Low-resolution limit (Å); ``None`` keeps every h ≠ 0.

    Returns
    -------
    hkl : numpy.ndarray
        int32 (n_h, 3), sorted by h, k, l.
    """
    M = frac_matrix(cell)
    hmax = [int(math.floor(p / d_min_a)) + 1 for p in (cell.a, cell.b, cell.c)]
    hs = [np.arange(-m, m + 1) for m in hmax]
    inv_d2_max = 1.0 / d_min_a ** 2
    inv_d2_min = 0.0 if not d_max_a else 1.0 / d_max_a ** 2
    out = []
    kk, ll = np.meshgrid(hs[1], hs[2], indexing="ij")
    kk, ll = kk.ravel(), ll.ravel()
    for h in hs[0]:
        hkl = np.stack([np.full_like(kk, h), kk, ll], axis=1).astype(np.float64)
        s = hkl @ M
        d2 = np.einsum("ij,ij->i", s, s)
        keep = (d2 <= inv_d2_max * (1 + 1e-12)) & (d2 >= inv_d2_min * (1 - 1e-12)) & (d2 > 0)
        out.append(hkl[keep].astype(np.int64))
    hkl = np.concatenate(out)
    hkl = hkl[~systematically_absent(hkl, spacegroup)]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    return np.ascontiguousarray(hkl[order].astype(np.int32))


def systematically_absent(hkl, spacegroup):
    """True where h is a systematic absence of the space group.

    h is absent when some operation (R, t) has Rᵀh = h and h·t not integer.

    Parameters
    ----------
    hkl : numpy.ndarray
        (n, 3) integer indices.
    spacegroup : gemmi.SpaceGroup

    Returns
    -------
    numpy.ndarray of bool
    """
    hkl = np.asarray(hkl, dtype=np.int64)
    absent = np.zeros(len(hkl), dtype=bool)
    for op in spacegroup.operations():
        R = np.array(op.rot, dtype=np.int64)          # × DEN
        t = np.array(op.tran, dtype=np.int64)         # × DEN
        fixed = np.all(hkl @ R == hkl * op.DEN, axis=1)
        shift = (hkl @ t) % op.DEN != 0
        absent |= fixed & shift
    return absent

