"""Structure factors and intensities from the structure-factor cache.

The cache (``format = "spread_tools.sf_cache"``, see ``docs/formats.md``)
lets any later step evaluate, at any energy E and for any site values
(f′_s, f″_s),

    F(h,E) = F_base(h) + Σ_e (f′_e(E) + i f″_e(E)) S_el(e,h)
             + Σ_s (f0_s(h) + f′_s + i f″_s) S_site(s,h)

exactly, where the non-site elements take their reference f′/f″ from
:func:`spread_tools.physics.scattering.reference_fp_fdp`.

The cache itself (:class:`~spread_tools.structure.cache.SFCache`) is built by
:mod:`spread_tools.structure.build`.
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError

__all__ = ["structure_factors", "intensity_and_gradients", "intensity_site_derivatives"]


# --------------------------------------------------------------------------- evaluation

_REF_MEMO = {}


def _reference_el(elements, energy_ev, source):
    from spread_tools.physics.scattering import reference_fp_fdp
    key = (tuple(elements), energy_ev.tobytes(), source)
    hit = _REF_MEMO.get(key)
    if hit is None:
        fp = np.zeros((len(elements), len(energy_ev)))
        fdp = np.zeros_like(fp)
        for i, el in enumerate(elements):
            fp[i], fdp[i] = reference_fp_fdp(el, energy_ev, source)
        if len(_REF_MEMO) > 64:
            _REF_MEMO.clear()
        hit = _REF_MEMO[key] = (fp, fdp)
    return hit


def _check_site_values(cache, energy_ev, fp_site, fdp_site):
    e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
    if e.ndim != 1:
        raise InputError(f"energy_ev: expected a 1-D array, got shape {e.shape}")
    n_site = len(cache.site_names)
    fp = np.asarray(fp_site, dtype=np.float64)
    fdp = np.asarray(fdp_site, dtype=np.float64)
    for name, a in (("fp_site", fp), ("fdp_site", fdp)):
        if a.shape != (n_site, len(e)):
            raise InputError(f"{name}: expected shape (n_site={n_site}, n_E={len(e)}), "
                             f"got {a.shape}")
    return e, fp, fdp


def structure_factors(cache, energy_ev, fp_site, fdp_site, h_index=None, reference="chantler"):
    """Complex structure factors F(h, E) from the cache.

    Parameters
    ----------
    cache : SFCache
        The cache.
    energy_ev : array_like
        Energies (eV), shape (n_E,); the non-site elements take their
        reference f′/f″ (:func:`~spread_tools.physics.scattering.reference_fp_fdp`) here.
    fp_site, fdp_site : array_like
        Site f′ and f″ (e⁻), shape (n_site, n_E).
    h_index : array_like of int, optional
        Rows of the cache to evaluate (default: all).
    reference : str or None
        Reference table for the non-site elements (``"chantler"`` or
        ``"cromer_liberman"``); ``None`` gives them f′ = f″ = 0 (f0 only).

    Returns
    -------
    numpy.ndarray
        complex128 (n_E, n_h).
    """
    e, fp, fdp = _check_site_values(cache, energy_ev, fp_site, fdp_site)
    sl = slice(None) if h_index is None else np.asarray(h_index, dtype=np.int64)
    F0 = cache.F_base[sl]
    if len(cache.site_names):
        S = cache.S_site[:, sl]
        F0 = F0 + np.sum(cache.f0_site[:, sl] * S, axis=0)
    F = np.broadcast_to(F0, (len(e), len(F0))).copy()
    if len(cache.elements) and reference is not None:
        fpe, fdpe = _reference_el(cache.elements, e, reference)
        F += (fpe + 1j * fdpe).T @ cache.S_el[:, sl]
    if len(cache.site_names):
        F += (fp + 1j * fdp).T @ S
    return F


def intensity_and_gradients(cache, energy_ev, fp_site, fdp_site, h_index=None,
                            reference="chantler"):
    """I(h, E) = |F|² and its derivatives with respect to the site f′ and f″.

    Parameters
    ----------
    cache : SFCache
        The cache.
    energy_ev : array_like
        Energies (eV), shape (n_E,).
    fp_site, fdp_site : array_like
        Site f′ and f″ (e⁻), shape (n_site, n_E).
    h_index : array_like of int, optional
        Rows of the cache (default: all).
    reference : str or None
        Reference table for the non-site elements; ``None``: f′ = f″ = 0.

    Returns
    -------
    I : numpy.ndarray
        (n_E, n_h), e⁻².
    dI_dfp, dI_dfdp : numpy.ndarray
        (n_site, n_E, n_h): 2 Re(F̄ S_site) and 2 Re(F̄ · i S_site).
    """
    F = structure_factors(cache, energy_ev, fp_site, fdp_site, h_index, reference)
    sl = slice(None) if h_index is None else np.asarray(h_index, dtype=np.int64)
    dfp, dfdp = intensity_site_derivatives(F, cache.S_site[:, sl])
    return F.real * F.real + F.imag * F.imag, dfp, dfdp


def intensity_site_derivatives(F, S_site):
    """∂|F|²/∂f′ and ∂|F|²/∂f″ of sites entering F as (f′ + i f″) S_site.

    Parameters
    ----------
    F : complex array (n_E, n_h)
    S_site : complex array (n_site, n_h)

    Returns
    -------
    dI_dfp, dI_dfdp : arrays (n_site, n_E, n_h)
        2 Re(F̄ S_site) and 2 Re(F̄ · i S_site).
    """
    Fr, Fi = F.real[None], F.imag[None]
    Sr, Si = S_site.real[:, None, :], S_site.imag[:, None, :]
    return 2.0 * (Fr * Sr + Fi * Si), 2.0 * (Fi * Sr - Fr * Si)
