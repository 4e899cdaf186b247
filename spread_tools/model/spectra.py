"""Spectrum channels: the common energy grid on which every lattice's spectrum is given.

SASE-like simulated spectra are in :mod:`spread_tools.simulate.sase`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["channel_grid"]


def channel_grid(min_ev, max_ev, step_ev):
    """Channel energies min, min+step, ... up to max (included within 1e-9 steps).

    Parameters
    ----------
    min_ev, max_ev, step_ev : float
        Window and step (eV).

    Returns
    -------
    numpy.ndarray
        (n_chan,) energies in eV.
    """
    n = int(math.floor((max_ev - min_ev) / step_ev + 1e-9)) + 1
    return min_ev + step_ev * np.arange(n)
