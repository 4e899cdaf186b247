"""Per-group structure-factor sums of atom copies: direct summation and gemmi FFT.

Used by :mod:`spread_tools.structure.build` (conventions in its docstring):

* :func:`direct_sums` sums every P1 atom copy for every h (numba, parallel over h);
* :func:`fft_structure` puts the atoms on a density grid with gemmi and
  Fourier-transforms it (F_base and the per-element sums S_el);
* :func:`solvent_mask_f` is the transform of gemmi's flat bulk-solvent mask;
* :func:`f0_it92` is the IT92 form factor used on both routes.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["f0_it92", "direct_sums", "fft_structure", "solvent_mask_f"]


def f0_it92(element, inv_d2):
    """IT92 (International Tables Vol. C) 4-Gaussian + c form factor of a neutral atom.

    Parameters
    ----------
    element : str
        Element symbol.
    inv_d2 : array_like
        1/d² (Å⁻²).

    Returns
    -------
    numpy.ndarray
        f0 (e⁻), same shape as ``inv_d2``.
    """
    import gemmi
    coefs = gemmi.Element(element).it92.get_coefs()
    a, b, c = coefs[0:4], coefs[4:8], coefs[8]
    stol2 = np.asarray(inv_d2) / 4.0
    out = np.full(stol2.shape, c, dtype=np.float64)
    for ai, bi in zip(a, b):
        out += ai * np.exp(-bi * stol2)
    return out


@numba.njit(parallel=True, cache=True)
def _direct_kernel(hkl, xyz, q6, w, group, out):
    n_h = hkl.shape[0]
    n_c = xyz.shape[0]
    two_pi = 2.0 * np.pi
    for i in numba.prange(n_h):
        h = float(hkl[i, 0])
        k = float(hkl[i, 1])
        l = float(hkl[i, 2])  # noqa: E741
        hh, kk, ll = h * h, k * k, l * l
        hk, hl, kl = 2.0 * h * k, 2.0 * h * l, 2.0 * k * l
        for j in range(n_c):
            arg = two_pi * (h * xyz[j, 0] + k * xyz[j, 1] + l * xyz[j, 2])
            e = (hh * q6[j, 0] + kk * q6[j, 1] + ll * q6[j, 2]
                 + hk * q6[j, 3] + hl * q6[j, 4] + kl * q6[j, 5])
            a = w[j] * np.exp(-e)
            g = group[j]
            out[g, i] += complex(a * np.cos(arg), a * np.sin(arg))


def direct_sums(hkl, xyz, q6, w, group, n_group, chunk=20000, quiet=True, desc=None):
    """S[g, h] = Σ_{copies j in group g} w_j exp(−hᵀQ_j h) exp(2πi h·x_j), summed directly.

    Parameters
    ----------
    hkl : numpy.ndarray
        (n_h, 3) Miller indices.
    xyz : numpy.ndarray
        (n_copy, 3) fractional coordinates of the atom copies.
    q6 : numpy.ndarray
        (n_copy, 6) Debye–Waller quadratic form (Q11, Q22, Q33, Q12, Q13, Q23).
    w : numpy.ndarray
        (n_copy,) weights (occupancies).
    group : numpy.ndarray
        (n_copy,) int64 group of each copy, in [0, n_group).
    n_group : int
        Number of groups.
    chunk : int
        Miller indices per kernel call (progress granularity).
    quiet : bool
        No progress bar.
    desc : str, optional
        Progress-bar label.

    Returns
    -------
    numpy.ndarray
        complex128 (n_group, n_h).
    """
    from spread_tools.progress import progress
    out = np.zeros((n_group, len(hkl)), dtype=np.complex128)
    if len(xyz) == 0 or len(hkl) == 0:
        return out
    hkl = np.ascontiguousarray(hkl, dtype=np.int64)
    starts = range(0, len(hkl), chunk)
    for s in progress(starts, total=len(starts), desc=desc, quiet=quiet, unit="chunk"):
        part = np.zeros((n_group, min(chunk, len(hkl) - s)), dtype=np.complex128)
        _direct_kernel(hkl[s:s + chunk], xyz, q6, w, group, part)
        out[:, s:s + chunk] = part
    return out


def fft_structure(st, keep_mask, atoms, elements, hkl, inv_d2, d_min_a, rate, cutoff):
    """F_base (n_h,) and S_el (n_el, n_h) of the non-site atoms by gemmi's density + FFT.

    Parameters
    ----------
    st : gemmi.Structure
        The model (first model used; it is cloned, not changed).
    keep_mask : numpy.ndarray
        (n_atom,) bool, True for the atoms to put on the grid.
    atoms : object
        Atom table with ``refs``: (chain, residue, atom) indices of every atom.
    elements : list of str
        Elements of the S_el rows.
    hkl : numpy.ndarray
        (n_h, 3) Miller indices.
    inv_d2 : numpy.ndarray
        (n_h,) 1/d² (Å⁻²).
    d_min_a : float
        High-resolution limit (Å) of the grid.
    rate : float
        Grid oversampling (spacing d_min/(2·rate)).
    cutoff : float
        gemmi's relative density cutoff for the atom radius.

    Returns
    -------
    F_base : numpy.ndarray
        complex128 (n_h,), f0 only.
    S_el : numpy.ndarray
        complex128 (n_el, n_h), from the constant (c = 1) term alone.
    """
    import gemmi
    st2 = st.clone()
    # first model only, no site atoms, charges ignored (neutral IT92 as on the direct route)
    while len(st2) > 1:
        del st2[len(st2) - 1]
    model = st2[0]
    drop = {ref for ref, k in zip(atoms.refs, keep_mask) if not k}
    for ch_i, ch in enumerate(model):
        for r_i, res in enumerate(ch):
            for a_i in reversed(range(len(res))):
                if (ch_i, r_i, a_i) in drop:
                    del res[a_i]
                else:
                    res[a_i].charge = 0
    dc = gemmi.DensityCalculatorX()
    dc.d_min = d_min_a
    dc.rate = rate
    dc.cutoff = cutoff
    dc.set_refmac_compatible_blur(model)
    dc.set_grid_cell_and_spacegroup(st2)
    dc.put_model_density_on_grid(model)

    def transform():
        # blurred F on the grid, looked up at hkl, blur undone: exp(+blur s²/4)
        f = gemmi.transform_map_to_f_phi(dc.grid)
        return _lookup(f.array, hkl).astype(np.complex128) * mult

    mult = np.exp(dc.blur * inv_d2 / 4.0)
    F_base = transform()
    S_el = np.zeros((len(elements), len(hkl)), dtype=np.complex128)
    for i, el in enumerate(elements):
        dc.initialize_grid()
        for ch in model:
            for res in ch:
                for atom in res:
                    if atom.element.name == el or (el == "H" and atom.element.name == "D"):
                        dc.add_c_contribution_to_grid(atom, 1.0)
        dc.grid.symmetrize_sum()
        S_el[i] = transform()
    return F_base, S_el


def _lookup(grid, hkl):
    nu, nv, nw = grid.shape
    return grid[hkl[:, 0] % nu, hkl[:, 1] % nv, hkl[:, 2] % nw]


def solvent_mask_f(st, hkl, d_min_a, rate):
    """Fourier transform (Å³) of gemmi's flat-solvent mask at hkl.

    Parameters
    ----------
    st : gemmi.Structure
        Model (first model, sites included); Refmac radii, probe and shrink.
    hkl : numpy.ndarray
        (n_h, 3) Miller indices.
    d_min_a : float
        High-resolution limit (Å) of the grid.
    rate : float
        Grid oversampling (spacing d_min/(2·rate)).

    Returns
    -------
    numpy.ndarray
        complex128 (n_h,).
    """
    import gemmi
    grid = gemmi.FloatGrid()
    grid.setup_from(st, spacing=d_min_a / (2.0 * rate))
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Refmac)
    masker.put_mask_on_float_grid(grid, st[0])
    fm = gemmi.transform_map_to_f_phi(grid)
    return _lookup(fm.array, hkl).astype(np.complex128)
