"""Negative controls of S1 (``refine_fdp control=...``) and the edge step that judges them.

The reference workflow asks for two controls that must erase the anomalous signal:

* ``permute_miller``: the Miller indices of the metal sites' anomalous terms are randomly
  permuted: every reflection is modelled with its own structure factor at f′ = f″ = 0
  (protein, solvent and the sites' f0), but with the site sums S_s of another, random
  reflection multiplying f′ + i f″. The data's site-specific energy dependence then has
  nothing to correlate with: no edge, f″ flat within σ. (Permuting the whole structure
  factor instead makes the model wrong by 100 % of |F|; f′/f″ then absorb that misfit,
  f″ of ±30 e⁻ with structure far beyond σ: a test of nothing.)
* ``shuffle_channels``: the spectrum channels of every lattice are shuffled (one random
  permutation of its channel weights per lattice), so that the photons of a shot are
  credited to the wrong energies: same expectation.

Both are applied to the inputs before anything else (the checkpoint fingerprint, the pixel
model and the start values all see the controlled data) and are reproducible
(``control_seed``). :func:`edge_step` measures what is left: the mean f″ above the
element's edge minus the mean below it, with its standard uncertainty from the covariance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.errors import InputError

__all__ = ["CONTROLS", "apply_control", "permute_miller", "shuffle_channels", "edge_step"]

#: Values of the ``control`` parameter (None: no control).
CONTROLS = ("permute_miller", "shuffle_channels")


def permute_miller(cache, rng):
    """The SF cache with the sites' anomalous terms moved to randomly permuted Miller indices.

    Parameters
    ----------
    cache : SFCache
    rng : numpy.random.Generator

    Returns
    -------
    SFCache
        Same indices; ``S_site`` and ``f0_site`` of row i are those of row ``perm[i]``, and
        ``F_base`` absorbs the difference of the sites' f0 contributions, so that the
        structure factor of every reflection at f′ = f″ = 0 is unchanged
        (F = F_base + Σ_el S_el (f′ + i f″) + Σ_s S_s (f0_s + f′_s + i f″_s)).
    """
    perm = rng.permutation(cache.n_h)
    S = np.ascontiguousarray(cache.S_site[:, perm])
    f0 = np.ascontiguousarray(cache.f0_site[:, perm])
    F_base = cache.F_base + np.sum(cache.S_site * cache.f0_site, axis=0) - np.sum(S * f0, axis=0)
    return dataclasses.replace(cache, F_base=F_base, S_site=S, f0_site=f0)


def shuffle_channels(ds, rng):
    """The dataset with every lattice's spectrum channel weights randomly permuted.

    Parameters
    ----------
    ds : Dataset
    rng : numpy.random.Generator

    Returns
    -------
    Dataset
        Same channels (energies), each lattice's weights in a random order of its own.
    """
    w = np.asarray(ds.spectrum_weight)
    out = np.empty_like(w)
    for j in range(w.shape[0]):
        out[j] = w[j, rng.permutation(w.shape[1])]
    return dataclasses.replace(ds, spectrum_weight=out)


def apply_control(datasets, cache, control, seed):
    """Apply a negative control to the S1 inputs.

    Parameters
    ----------
    datasets : list of Dataset
    cache : SFCache
    control : {None, "permute_miller", "shuffle_channels"}
    seed : int
        Seed of the permutations (the same on every MPI rank: every rank reads the same data).

    Returns
    -------
    datasets, cache
        The controlled inputs (the originals for ``None``).
    """
    if control is None:
        return list(datasets), cache
    if control not in CONTROLS:
        raise InputError(f"parameter control: {control!r} is not one of {', '.join(CONTROLS)}")
    rng = np.random.default_rng(int(seed))
    if control == "permute_miller":
        return list(datasets), permute_miller(cache, rng)
    return [shuffle_channels(d, rng) for d in datasets], cache


def edge_step(energy_ev, fdp, cov, edge_ev, half_gap_ev=10.0):
    """Fitted f″ edge step and its standard uncertainty.

    step = mean f″ over grid points with E ≥ edge + half_gap − mean f″ over E ≤ edge − half_gap.

    Parameters
    ----------
    energy_ev : array (n,)
        Grid energies.
    fdp : array (n,)
        Refined f″ of one site.
    cov : array (n, n)
        Covariance of ``fdp``.
    edge_ev : float
        Where the edge is expected (e.g. the reference table's edge).
    half_gap_ev : float
        Points closer than this to ``edge_ev`` are left out (the edge itself, white line).

    Returns
    -------
    step, sigma : float
        e⁻; NaN when one side has no grid point.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    hi = e >= edge_ev + half_gap_ev
    lo = e <= edge_ev - half_gap_ev
    if not hi.any() or not lo.any():
        return float("nan"), float("nan")
    a = np.where(hi, 1.0 / hi.sum(), 0.0) - np.where(lo, 1.0 / lo.sum(), 0.0)
    step = float(a @ np.asarray(fdp, dtype=np.float64))
    var = float(a @ np.asarray(cov, dtype=np.float64) @ a)
    return step, (float(np.sqrt(var)) if var >= 0 else float("nan"))
