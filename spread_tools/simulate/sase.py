"""SASE-like XFEL spectra on a common channel grid (for ``simulate_data``).

Every shot has ``n_spikes`` Gaussian spikes (FWHM ``spike_fwhm_ev``) with
exponentially distributed heights and centres drawn from a Gaussian envelope
(FWHM ``envelope_fwhm_ev``) whose centre is uniform in
[``centre_min_ev``, ``centre_max_ev``]; every spike is integrated exactly over
each channel's bin and the spectrum is scaled to ``fluence`` photons/Å² in the
channel window.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr

from spread_tools.errors import InputError

__all__ = ["sase_spectra"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def sase_spectra(rng, n_lattices, energy_ev, fluence, centre_min_ev, centre_max_ev,
                 envelope_fwhm_ev, n_spikes, spike_fwhm_ev, min_relative_weight=1e-4):
    """Spiky SASE-like spectra on a common channel grid.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random stream.
    n_lattices : int
        Number of shots.
    energy_ev : numpy.ndarray
        (n_chan,) increasing channel energies (eV); channel c collects the photons
        between the midpoints to its neighbours (half a step beyond the ends).
    fluence : float
        Photons per Å² per shot in the channel window (each row sums to this).
    centre_min_ev, centre_max_ev : float
        Envelope centres are uniform in this range (eV).
    envelope_fwhm_ev : float
        Gaussian envelope FWHM (eV).
    n_spikes : int
        Spikes per shot, heights exponential with mean 1.
    spike_fwhm_ev : float
        Gaussian spike FWHM (eV).
    min_relative_weight : float
        Channels below this fraction of the row's maximum are set to exactly 0.

    Returns
    -------
    weight : numpy.ndarray
        (n_lattices, n_chan) photons/Å² per channel.
    centre_ev : numpy.ndarray
        (n_lattices,) envelope centres (eV).

    Raises
    ------
    InputError
        A shot puts no photon into the channel window (fluence 0 or envelope outside).
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    if len(e) > 1:
        mid = 0.5 * (e[1:] + e[:-1])
        edges = np.concatenate([[e[0] - (mid[0] - e[0])], mid, [e[-1] + (e[-1] - mid[-1])]])
    else:
        edges = np.array([e[0] - 0.5, e[0] + 0.5])
    centre = rng.uniform(centre_min_ev, centre_max_ev, n_lattices)
    pos = centre[:, None] + envelope_fwhm_ev * _FWHM_TO_SIGMA * rng.standard_normal((n_lattices, n_spikes))
    height = rng.exponential(1.0, (n_lattices, n_spikes))
    sig = spike_fwhm_ev * _FWHM_TO_SIGMA
    weight = np.zeros((n_lattices, len(e)))
    for k in range(n_spikes):
        cdf = ndtr((edges[None, :] - pos[:, k, None]) / sig)
        weight += height[:, k, None] * np.diff(cdf, axis=1)
    peak = weight.max(axis=1, keepdims=True)
    weight[weight < min_relative_weight * peak] = 0.0
    total = weight.sum(axis=1)
    if not fluence > 0 or np.any(total <= 0):
        bad = int(np.argmax(total <= 0)) if np.any(total <= 0) else 0
        raise InputError(f"spectrum: zero photons in the channel window "
                         f"{e[0]:g}-{e[-1]:g} eV for lattice {bad} (fluence={fluence:g} "
                         f"photons/Å², envelope centre {centre[bad]:.1f} eV)")
    weight *= fluence / total[:, None]
    return weight, centre
