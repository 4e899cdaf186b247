"""Energy grid of the refined f′/f″ curves and its channel interpolation matrix.

Channel values of a curve sampled on the grid are ``M·u`` (linear interpolation, two
non-zeros per row); gradients go back to the grid with ``Mᵀ``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse

from spread_tools.errors import InputError

__all__ = ["energy_grid", "interpolation_matrix"]


def energy_grid(channel_ev, channel_weight, step_ev=4.0, min_ev=None, max_ev=None):
    """The refinement grid, checked to cover every channel that carries photons.

    Parameters
    ----------
    channel_ev : array (n_chan,)
        Channel energies (eV), increasing.
    channel_weight : array (n_lat, n_chan)
        Photons per channel per lattice.
    step_ev : float
        Grid step (eV), > 0.
    min_ev, max_ev : float, optional
        First grid energy, and upper limit (default: the first channel rounded down to a
        whole eV, so that channels shifted by a refined energy offset keep a grid on round
        energies, and the last channel rounded up to a whole number of steps).

    Returns
    -------
    numpy.ndarray
        Grid energies (eV).

    Raises
    ------
    InputError
        Step not positive, or channels with photons outside the grid.
    """
    e = np.asarray(channel_ev, dtype=np.float64)
    if not (np.isfinite(step_ev) and step_ev > 0):
        raise InputError(f"parameter grid.step_ev: must be > 0 eV, got {step_ev}")
    lo = float(math.floor(e[0] + 1e-9)) if min_ev is None else float(min_ev)
    hi = float(e[-1]) if max_ev is None else float(max_ev)
    if hi < lo:
        raise InputError(f"parameter grid.max_ev: {hi:g} eV is below grid.min_ev {lo:g} eV")
    n = int(math.floor((hi - lo) / step_ev + 1e-9)) + 1
    if max_ev is None and lo + (n - 1) * step_ev < hi - 1e-9:
        n += 1
    grid = lo + step_ev * np.arange(n)
    used = np.asarray(channel_weight).reshape(-1, len(e)).sum(axis=0) > 0
    if used.any():
        e_used = e[used]
        tol = 1e-6
        if e_used[0] < grid[0] - tol or e_used[-1] > grid[-1] + tol:
            raise InputError(
                f"parameter grid: the grid {grid[0]:g}-{grid[-1]:g} eV does not cover the spectrum "
                f"channels with photons ({e_used[0]:g}-{e_used[-1]:g} eV); widen grid.min_ev/grid.max_ev")
    if len(grid) < 2:
        raise InputError(f"parameter grid: needs at least 2 points, got {len(grid)} "
                         f"({lo:g}-{hi:g} eV in {step_ev:g} eV steps)")
    return grid


def interpolation_matrix(channel_ev, grid_ev):
    """Sparse linear-interpolation matrix M (n_chan × n_grid): channel values = M·u.

    Channels outside the grid take the nearest end value (they carry no photons,
    see :func:`energy_grid`).

    Parameters
    ----------
    channel_ev : array (n_chan,)
    grid_ev : array (n_grid,), increasing

    Returns
    -------
    scipy.sparse.csr_array
    """
    e = np.clip(np.asarray(channel_ev, dtype=np.float64), grid_ev[0], grid_ev[-1])
    k = np.clip(np.searchsorted(grid_ev, e, side="right") - 1, 0, len(grid_ev) - 2)
    t = (e - grid_ev[k]) / (grid_ev[k + 1] - grid_ev[k])
    rows = np.repeat(np.arange(len(e)), 2)
    cols = np.stack([k, k + 1], axis=1).ravel()
    vals = np.stack([1.0 - t, t], axis=1).ravel()
    return scipy.sparse.csr_array((vals, (rows, cols)), shape=(len(e), len(grid_ev)))
