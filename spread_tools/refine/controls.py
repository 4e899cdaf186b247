"""Negative controls of S1 (``refine_fdp control=...``) and the edge step that judges them.

The reference workflow asks for two controls that must erase the anomalous signal:

* ``permute_miller``: the Miller indices of the metal sites' anomalous terms are randomly
  permuted: every reflection is modelled with its own structure factor at f′ = f″ = 0
  (protein, solvent and the sites' f0), but with the site sums S_s of another, random
  reflection multiplying f′ + i f″. The data's site-specific energy dependence then has
  nothing to correlate with: no edge, f″ flat within σ. (Permuting the whole structure
  factor instead makes the model wrong by 100 % of |F|; f′/f″ then absorb that misfit,
  f″ of ±30 e⁻ with structure far beyond σ: a test of nothing.)
* ``shuffle_channels``: the energies of every lattice's channels are shuffled in the f′/f″
  lookup (one random permutation π_j of the channels per lattice): the photons of channel c
  of lattice j are modelled with the sites' f′, f″ at E_{π_j(c)}, while the spectrum, and so
  every spot's position and profile, stays right. The data's energy dependence then reaches
  the grid through a different random map for every lattice: same expectation. (Shuffling
  the spectrum weights themselves, as a first version did, also makes every spot's
  predicted profile wrong; f′/f″ absorb part of that misfit and one site kept an edge step
  of 3–16σ: a test of the spot model, not of the anomalous signal.)

``permute_miller`` is applied to the SF cache before anything else (the checkpoint
fingerprint, the pixel model and the start values all see it); ``shuffle_channels`` lives in
the S1 objective (:class:`~spread_tools.refine.objective.S1Problem`, which takes one row of
intensities per shoebox and maps its channels through :func:`channel_permutations`). Both are
reproducible (``control_seed``) and do not depend on the number of MPI ranks.
:func:`edge_step` measures what is left: the mean f″ above the element's edge minus the
mean below it, with its standard uncertainty from the covariance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.errors import InputError

__all__ = ["CONTROLS", "apply_control", "permute_miller", "channel_permutations", "edge_step"]

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


def channel_permutations(n_lattices, n_channels, seed):
    """The per-lattice channel permutations of the ``shuffle_channels`` control.

    Parameters
    ----------
    n_lattices, n_channels : int
    seed : int
        ``control_seed``; the permutations of lattice j depend on it and on j only (not on
        how the lattices are split over MPI ranks).

    Returns
    -------
    int64 array (n_lattices, n_channels)
        Row j: the channel whose energy channel c of lattice j is looked up at.
    """
    rng = np.random.default_rng(int(seed))
    out = np.empty((int(n_lattices), int(n_channels)), dtype=np.int64)
    for j in range(out.shape[0]):
        out[j] = rng.permutation(int(n_channels))
    return out


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
        The controlled inputs: the cache permuted for ``permute_miller``; the originals for
        ``None`` and ``shuffle_channels`` (which the objective applies).
    """
    if control is None:
        return list(datasets), cache
    if control not in CONTROLS:
        raise InputError(f"parameter control: {control!r} is not one of {', '.join(CONTROLS)}")
    if control == "permute_miller":
        return list(datasets), permute_miller(cache, np.random.default_rng(int(seed)))
    return list(datasets), cache


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
