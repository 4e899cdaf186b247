"""S1 refinement: per-site f′(E), f″(E) on an energy grid from SPREAD still-shot data.

Objective
---------
For the pixel model of ``docs/formats.md`` (channel weights w computed once by
:mod:`spread_tools.model`)::

    λ_p = G_j Σ_c w[p,c] I(h0_k, E_c) + exp(b0_k + b1_k x̂ + b2_k ŷ)
    f   = Σ_{p unmasked} (λ_p − k_p ln λ_p) − C  +  restraints(f′, f″)

``C = Σ (k − k ln k)`` is a constant (the saturated model), so the data part
is half the Poisson deviance: its value is of order the number of pixels and
relative tolerances mean something. Parameters, in one vector ``x``:

* global: f′_s(E_k), f″_s(E_k) for every refined site s on the grid
  ``grid.min_ev : grid.step_ev : grid.max_ev`` (default: 4 eV steps from the
  first spectrum channel, covering all channels with photons); channel values
  are linear interpolation ``M·u`` (M: n_chan × n_grid, two non-zeros per row,
  ``scipy.sparse``), gradients go back with ``Mᵀ``. Sites of the cache that are
  not refined (``sites=``) keep their reference values;
* per lattice: g_j with G_j = exp(g_j);
* per shoebox: the log-linear background (b0, b1, b2).

Gradient: ∂f/∂I[h,c] from :meth:`spread_tools.model.PixelModel.nll_and_gradients`,
then ∂I/∂f′, ∂I/∂f″ from :func:`spread_tools.structure.intensity_and_gradients`
at the channel energies of the dataset's distinct Miller indices, then Mᵀ.

Optimizer
---------
L-BFGS-B (scipy) on the whole vector (global and local parameters together),
in *macrocycles* of at most ``optimizer.iterations`` iterations. At the start
of each macrocycle every parameter is rescaled by the inverse square root of
the diagonal of the Fisher information (plus the restraints' exact Hessian),
so the variables are in units of their own standard uncertainty. Convergence:
the largest |∂f/∂z| over all rescaled variables z is at most
``optimizer.gtol`` (default 1e-3: a 1σ move changes the objective by less than
0.001), or a macrocycle that no longer lowers the objective (round-off). A
checkpoint is written after every macrocycle; since a macrocycle restarts
L-BFGS from its first point, ``--resume`` from a checkpoint follows exactly the
same path as an uninterrupted run (bit for bit on the same machine and ranks).

MPI
---
Lattices are split over ranks in contiguous blocks of about equal pixel
counts. Rank 0 runs the optimizer; for every evaluation it broadcasts ``x``,
each rank evaluates its lattices, rank 0 gathers the per-rank partial sums and
adds them in rank order (deterministic), restraints are added once on rank 0.
Without mpi4py (or with one rank) everything runs in-process.

Uncertainties
-------------
Gauss–Newton / Fisher information of the Poisson likelihood,
``Jᵀ diag(1/λ) J``, at the solution. The local parameters are profiled out
exactly (per shoebox for (b0,b1,b2), then per lattice for g: Schur complements,
so the global block is the information *after* the scales and backgrounds
have been fitted), the restraints' Hessian (exact: they are quadratic) is
added, and the covariance is its inverse. The same computation gives the
preconditioner of every macrocycle; it runs in channel space (per-shoebox
Σ w wᵀ/λ, Numba) for up to 48 channels, per pixel (∂λ/∂u) above. The edge of each site is the
energy where f″ first crosses half its step ((f″(first) + f″(last))/2, linear
interpolation between grid points) with its uncertainty propagated from the
covariance of that site's f″.

Input policy
------------
Shoeboxes with fewer than ``shoebox.min_pixels`` unmasked pixels (all-masked
ones included) are dropped with a warning (their background would be
undetermined); lattices left without shoeboxes too (their G is NaN in the
result, as are the dropped backgrounds). A dataset whose cell, space group
or Miller indices do not match the SF cache, a grid that does not cover the
channels carrying photons, and unknown site names are InputErrors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
import scipy.optimize
import scipy.sparse

from .config import P
from .errors import InputError
from .restraints import RESTRAINT_SCHEMA, build_restraints

__all__ = ["REFINE_SCHEMA", "RESULT_FORMAT", "RESULT_VERSION", "CHECKPOINT_FORMAT", "Comm",
           "get_comm", "energy_grid", "interpolation_matrix", "edge_position", "prepare_data",
           "S1Problem", "refine", "RefineResult", "write_result", "read_result"]

RESULT_FORMAT = "spread_tools.result"
RESULT_VERSION = 1
CHECKPOINT_FORMAT = "spread_tools.checkpoint"
CHECKPOINT_VERSION = 1

REFINE_SCHEMA = {
    "sites": P([], "sites of the SF cache to refine (empty: all); the others keep their "
               "reference curve", type=list, item_type=str),
    "grid": {
        "step_ev": P(4.0, "energy step of the refined f'/f'' grid", units="eV"),
        "min_ev": P(None, "first grid energy (None: the first spectrum channel)", units="eV",
                    type=float),
        "max_ev": P(None, "last grid energy at most (None: up to the last channel, rounded up "
                    "to a whole step)", units="eV", type=float),
    },
    "reference": P("chantler", "reference tables for the start values, the fixed sites and "
                   "the non-site elements", choices=("chantler", "cromer_liberman")),
    "start": {
        "result": P(None, "start from a previous result (.h5 or .csv) instead of the "
                    "reference table", type=str),
    },
    "restraints": RESTRAINT_SCHEMA,
    "optimizer": {
        "gtol": P(1e-3, "convergence: largest |gradient| in standard-uncertainty units "
                  "(objective change per 1 sigma move)"),
        "iterations": P(100, "L-BFGS iterations per macrocycle (a checkpoint after each)"),
        "max_macrocycles": P(30, "stop after this many macrocycles (the result is then "
                             "marked not converged and the checkpoint kept)"),
        "memory": P(20, "L-BFGS memory (correction pairs)"),
    },
    "shoebox": {
        "min_pixels": P(4, "drop shoeboxes with fewer unmasked pixels (with a warning)"),
    },
    "backend": P("auto", "pixel-model kernels", choices=("auto", "cpu", "cuda")),
    "checkpoint": {
        "path": P(None, "checkpoint file (None: <output>.ckpt.h5)", type=str),
        "keep": P(False, "keep the checkpoint after a converged run"),
    },
}

#: Parameters that do not change the answer (a checkpoint written with other values is accepted).
_OPERATIONAL = ("optimizer.max_macrocycles", "checkpoint.path", "checkpoint.keep", "backend")


# --------------------------------------------------------------------------- MPI

class Comm:
    """Minimal deterministic collectives over an optional mpi4py communicator.

    Parameters
    ----------
    mpi_comm : mpi4py.MPI.Comm, optional
        ``None``: a single in-process rank.
    """

    def __init__(self, mpi_comm=None):
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1

    def bcast_array(self, arr, n, dtype=np.float64):
        """Broadcast a 1-D array of known length from rank 0 (returns a copy on every rank)."""
        buf = np.ascontiguousarray(arr, dtype=dtype).copy() if self.rank == 0 else np.empty(n, dtype)
        if self.size > 1:
            self.comm.Bcast(buf, root=0)
        return buf

    def sum_in_order(self, arr):
        """Sum a float64 array over ranks on rank 0, adding rank 0, 1, 2... in that order.

        Returns the sum on rank 0, ``None`` elsewhere.
        """
        arr = np.ascontiguousarray(arr, dtype=np.float64).ravel()
        if self.size == 1:
            return arr.copy()
        buf = np.empty((self.size, arr.size)) if self.rank == 0 else None
        self.comm.Gather(arr, buf, root=0)
        if self.rank != 0:
            return None
        out = buf[0].copy()
        for r in range(1, self.size):
            out += buf[r]
        return out

    def concat(self, arr, counts):
        """Concatenate per-rank float64 arrays of lengths ``counts`` on rank 0."""
        arr = np.ascontiguousarray(arr, dtype=np.float64).ravel()
        if self.size == 1:
            return arr.copy()
        counts = np.asarray(counts, dtype=np.int64)
        buf = np.empty(int(counts.sum())) if self.rank == 0 else None
        displ = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.comm.Gatherv(arr, [buf, counts, displ, _mpi().DOUBLE] if self.rank == 0 else None, root=0)
        return buf

    def bcast_obj(self, obj):
        """Broadcast a small JSON-able object (strings, numbers) from rank 0."""
        if self.size == 1:
            return obj
        text = json.dumps(obj) if self.rank == 0 else None
        n = self.bcast_array([len(text.encode())] if self.rank == 0 else None, 1, np.int64)[0]
        raw = np.frombuffer(text.encode(), np.uint8) if self.rank == 0 else None
        raw = self.bcast_array(raw, int(n), np.uint8)
        return json.loads(raw.tobytes().decode())

    def barrier(self):
        """Wait for every rank."""
        if self.size > 1:
            self.comm.Barrier()


def _mpi():
    from mpi4py import MPI
    return MPI


def get_comm():
    """The world communicator when running under MPI with mpi4py, else a single rank.

    Returns
    -------
    Comm
    """
    try:
        MPI = _mpi()
    except Exception:  # mpi4py or libmpi missing: single rank
        return Comm(None)
    world = MPI.COMM_WORLD
    return Comm(world if world.Get_size() > 1 else None)


# --------------------------------------------------------------------------- grid

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
        First grid energy, and upper limit (default: the channel range,
        rounded up to a whole number of steps).

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
    lo = float(e[0]) if min_ev is None else float(min_ev)
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


# --------------------------------------------------------------------------- edge

def edge_position(energy_ev, fdp, cov=None):
    """Energy where f″ first crosses half its step, with its standard uncertainty.

    The step is from the first to the last grid point: level L = (f″_0 + f″_last)/2;
    the crossing is interpolated linearly between the two grid points around it.

    Parameters
    ----------
    energy_ev : array (n,)
    fdp : array (n,)
    cov : array (n, n), optional
        Covariance of ``fdp``.

    Returns
    -------
    edge_ev, sigma_ev : float
        NaN when f″ does not rise from the first to the last point.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    f = np.asarray(fdp, dtype=np.float64)
    n = len(f)
    level = 0.5 * (f[0] + f[-1])
    if not f[-1] > f[0]:
        return math.nan, math.nan
    above = np.flatnonzero(f >= level)
    k1 = int(above[0])
    if k1 == 0:
        return math.nan, math.nan
    k = k1 - 1
    de = e[k1] - e[k]
    df = f[k1] - f[k]
    edge = e[k] + (level - f[k]) / df * de
    if cov is None:
        return float(edge), math.nan
    grad = np.zeros(n)
    grad[0] += 0.5 * de / df
    grad[-1] += 0.5 * de / df
    grad[k] += de * (level - f[k1]) / df ** 2
    grad[k1] += -de * (level - f[k]) / df ** 2
    var = float(grad @ np.asarray(cov) @ grad)
    return float(edge), math.sqrt(var) if var >= 0 else math.nan


# --------------------------------------------------------------------------- data

def _subset_shoeboxes(ds, keep):
    """Dataset with only the shoeboxes ``keep`` (bool (n_sb,)), order kept."""
    pix_keep = np.repeat(keep, np.diff(ds.pixel_offset))
    sizes = np.diff(ds.pixel_offset)[keep]
    fields = {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)}
    for name in ("sb_lattice", "sb_panel", "sb_bbox", "sb_miller_index"):
        fields[name] = getattr(ds, name)[keep]
    fields["pixel_offset"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    fields["counts"] = ds.counts[pix_keep]
    fields["mask"] = ds.mask[pix_keep]
    if ds.truth is not None:
        fields["truth"] = dataclasses.replace(ds.truth, background=ds.truth.background[keep])
    return type(ds)(**fields)


@dataclasses.dataclass
class PreparedData:
    """The datasets joined, cleaned and checked against the SF cache (same on every rank).

    Attributes
    ----------
    ds : Dataset
        Usable lattices and shoeboxes, shoeboxes grouped by lattice.
    lattice_orig, shoebox_orig : int arrays
        Index of each lattice / shoebox of ``ds`` in the joined input.
    n_lat_total, n_sb_total : int
        Sizes of the joined input.
    warnings : list of str
    """

    ds: object
    lattice_orig: np.ndarray
    shoebox_orig: np.ndarray
    n_lat_total: int
    n_sb_total: int
    warnings: list


def prepare_data(datasets, cache, min_pixels=4):
    """Join datasets, drop unusable shoeboxes/lattices and check them against the SF cache.

    Parameters
    ----------
    datasets : list of Dataset
    cache : spread_tools.structure.SFCache
    min_pixels : int
        Shoeboxes with fewer unmasked pixels are dropped (warning).

    Returns
    -------
    PreparedData

    Raises
    ------
    InputError
        Cell/space group/Miller indices that do not match the cache, or nothing usable.
    """
    from .dataset import concatenate
    src = getattr(cache, "source", "SF cache")
    for d in datasets:
        if _norm_sg(d.spacegroup) != _norm_sg(cache.spacegroup):
            raise InputError(f"{d.path}: space group {d.spacegroup} differs from {cache.spacegroup} "
                             f"of {src} (dataset and SF cache from different models?)")
        if not np.allclose(np.asarray(d.cell, float), np.asarray(cache.cell, float), rtol=2e-3, atol=0.05):
            raise InputError(f"{d.path}: cell {_fmt_cell(d.cell)} differs from {_fmt_cell(cache.cell)} "
                             f"of {src} (dataset and SF cache from different models or cells)")
    ds = concatenate(list(datasets))
    n_lat, n_sb = ds.n_lattices, ds.n_shoeboxes
    warnings = []
    rows = cache.index_of(ds.sb_miller_index)
    if np.any(rows < 0):
        bad = int(np.sum(rows < 0))
        h = tuple(int(v) for v in ds.sb_miller_index[np.argmax(rows < 0)])
        raise InputError(f"{ds.path}: {bad} shoebox Miller indices (e.g. {h}) are not in {src} "
                         f"(d {cache.d_max_a:g}-{cache.d_min_a:g} Å): dataset and SF cache from "
                         f"different models, cells or resolution ranges")
    n_unmasked = np.add.reduceat(ds.mask.astype(np.int64), ds.pixel_offset[:-1]) if ds.n_pixels else \
        np.zeros(n_sb, np.int64)
    n_unmasked[np.diff(ds.pixel_offset) == 0] = 0
    keep = n_unmasked >= int(min_pixels)
    sb_orig = np.arange(n_sb)
    if not keep.all():
        n_empty = int(np.sum(n_unmasked == 0))
        warnings.append(f"dropped {int(np.sum(~keep))} of {n_sb} shoeboxes with fewer than "
                        f"{int(min_pixels)} unmasked pixels ({n_empty} all masked)")
        ds = _subset_shoeboxes(ds, keep)
        sb_orig = sb_orig[keep]
    has = np.bincount(ds.sb_lattice, minlength=n_lat) > 0
    lat_used = np.flatnonzero(has)
    if len(lat_used) == 0:
        raise InputError(f"{ds.path}: no usable shoebox (every shoebox has fewer than "
                         f"{int(min_pixels)} unmasked pixels)")
    if len(lat_used) < n_lat:
        warnings.append(f"dropped {n_lat - len(lat_used)} of {n_lat} lattices without a usable "
                        f"shoebox (their G is NaN in the result)")
    new_of_old = np.full(n_lat, -1, np.int64)
    new_of_old[lat_used] = np.arange(len(lat_used))
    order = np.argsort(new_of_old[ds.sb_lattice], kind="stable")
    if len(lat_used) < n_lat or np.any(np.diff(order) != 1):
        ds = ds.select_lattices(lat_used)
        sb_orig = sb_orig[order]
    return PreparedData(ds, lat_used, sb_orig, n_lat, n_sb, warnings)


def _norm_sg(sg):
    return str(sg).replace(" ", "").upper()


def _fmt_cell(c):
    return "(" + ", ".join(f"{v:g}" for v in np.asarray(c, float)) + ")"


def rank_blocks(ds, size):
    """Contiguous lattice blocks [start, stop) of about equal pixel counts for ``size`` ranks."""
    pix_per_lat = np.bincount(ds.sb_lattice, weights=np.diff(ds.pixel_offset),
                              minlength=ds.n_lattices)
    cum = np.concatenate([[0.0], np.cumsum(pix_per_lat)])
    cuts = [0]
    for r in range(1, size):
        cuts.append(int(np.searchsorted(cum, cum[-1] * r / size, side="left")))
    cuts.append(ds.n_lattices)
    cuts = np.maximum.accumulate(np.clip(cuts, 0, ds.n_lattices))
    return [(int(cuts[r]), int(cuts[r + 1])) for r in range(size)]


# --------------------------------------------------------------------------- the problem

@numba.njit(cache=True, parallel=True)
def _shoebox_moments(w, W, S, bg, Gp, xh, yh, pix_off, k0, k1, C, V, u, Fbb, q, d):  # pragma: no cover
    """Per-shoebox channel-space sums of shoeboxes k0:k1 (index k - k0 in the outputs).

    C[k] = Σ W G² w wᵀ, V[k, a] = Σ W bg a_a G w, u[k] = Σ W G² S w, Fbb[k] = Σ W bg² a aᵀ,
    q[k] = Σ W bg a G S, d[k] = Σ W (G S)², with a = (1, x̂, ŷ).
    """
    n_chan = w.shape[1]
    for kk in numba.prange(k1 - k0):
        k = k0 + kk
        for p in range(pix_off[k], pix_off[k + 1]):
            wp = W[p]
            if wp == 0.0:
                continue
            g = Gp[p]
            av = (1.0, xh[p], yh[p])
            gs = g * S[p]
            for c in range(n_chan):
                wc = w[p, c]
                if wc == 0.0:
                    continue
                f = wp * g * g * wc
                for e in range(n_chan):
                    C[kk, c, e] += f * w[p, e]
                u[kk, c] += wp * g * gs * wc
                for a in range(3):
                    V[kk, a, c] += wp * bg[p] * av[a] * g * wc
            for a in range(3):
                q[kk, a] += wp * bg[p] * av[a] * gs
                for b in range(3):
                    Fbb[kk, a, b] += wp * bg[p] * bg[p] * av[a] * av[b]
            d[kk] += wp * gs * gs

@numba.njit(cache=True, parallel=True)
def _jacobian_kernel(w, dfp, dfdp, hp, Gp, k0, t, n_grid, out):  # pragma: no cover - numba
    """out[p, s*n_grid + k] (fp) and out[p, n_fp + ...] (fdp): G Σ_c w[p,c] ∂I/∂u[s,c,h_p] M[c,k]."""
    n_p, n_chan = w.shape
    n_ref = dfp.shape[0]
    n_fp = n_ref * n_grid
    for p in numba.prange(n_p):
        h = hp[p]
        g = Gp[p]
        for c in range(n_chan):
            wc = g * w[p, c]
            if wc == 0.0:
                continue
            a = wc * (1.0 - t[c])
            b = wc * t[c]
            k = k0[c]
            for s in range(n_ref):
                base = s * n_grid + k
                v = dfp[s, c, h]
                out[p, base] += a * v
                out[p, base + 1] += b * v
                v = dfdp[s, c, h]
                out[p, n_fp + base] += a * v
                out[p, n_fp + base + 1] += b * v


class S1Problem:
    """The S1 objective of one rank's lattices (plus, on rank 0, the restraints).

    Parameters
    ----------
    prepared : PreparedData
        All usable data (every rank holds the same).
    cache : SFCache
    cfg : Config
        Effective configuration (schema :data:`REFINE_SCHEMA`).
    comm : Comm
    backend : str, optional
        Overrides ``cfg.backend`` (tests).

    Notes
    -----
    Layout of ``x``: ``[fp (n_ref, n_grid), fdp (n_ref, n_grid), g (n_lat), b (n_sb, 3)]``
    over *all* usable lattices and shoeboxes, independent of the number of ranks.
    """

    def __init__(self, prepared, cache, cfg, comm=None, backend=None):
        from .model import PixelModel
        from .scattering import reference_fp_fdp
        self.comm = comm or Comm(None)
        self.cfg = cfg
        self.cache = cache
        ds = prepared.ds
        self.prepared = prepared
        names = list(cache.site_names)
        want = list(cfg.sites) or names
        unknown = [s for s in want if s not in names]
        if unknown:
            raise InputError(f"parameter sites: {', '.join(unknown)} not in the SF cache "
                             f"{getattr(cache, 'source', '')} (sites: {', '.join(names)})")
        if len(set(want)) != len(want):
            raise InputError(f"parameter sites: repeated names in {', '.join(want)}")
        self.ref_sites = [names.index(s) for s in want]
        self.site_names = want
        self.site_elements = [cache.site_elements[i] for i in self.ref_sites]
        self.channel_ev = np.asarray(ds.energy_ev, dtype=np.float64)
        self.grid_ev = energy_grid(self.channel_ev, ds.spectrum_weight, cfg.grid.step_ev,
                                   cfg.grid.min_ev, cfg.grid.max_ev)
        self.M = interpolation_matrix(self.channel_ev, self.grid_ev)
        self.M_dense = self.M.toarray()
        # the two entries of each row of M: columns k0, k0+1 with weights 1-t, t
        e = np.clip(self.channel_ev, self.grid_ev[0], self.grid_ev[-1])
        self._m_k0 = np.clip(np.searchsorted(self.grid_ev, e, side="right") - 1, 0,
                             len(self.grid_ev) - 2).astype(np.int64)
        self._m_t = (e - self.grid_ev[self._m_k0]) / (self.grid_ev[self._m_k0 + 1] - self.grid_ev[self._m_k0])
        ref = cfg.reference
        # all cache sites at the channels: reference values; refined rows are replaced
        self.fp_chan0 = np.zeros((len(names), len(self.channel_ev)))
        self.fdp_chan0 = np.zeros_like(self.fp_chan0)
        for i, el in enumerate(cache.site_elements):
            self.fp_chan0[i], self.fdp_chan0[i] = reference_fp_fdp(el, self.channel_ev, ref)
        self.n_ref = len(self.ref_sites)
        self.n_grid = len(self.grid_ev)
        self.n_glob = 2 * self.n_ref * self.n_grid
        self.n_lat = ds.n_lattices
        self.n_sb = ds.n_shoeboxes
        self.n_x = self.n_glob + self.n_lat + 3 * self.n_sb
        self.restraints = build_restraints(cfg, self.grid_ev, self.site_elements,
                                           reference_source=ref)
        # this rank's lattices / shoeboxes (contiguous blocks of the canonical order)
        blocks = rank_blocks(ds, self.comm.size)
        self.blocks = blocks
        sb_start = np.searchsorted(ds.sb_lattice, [b[0] for b in blocks] + [ds.n_lattices], side="left")
        self.sb_blocks = [(int(sb_start[r]), int(sb_start[r + 1])) for r in range(self.comm.size)]
        a, b = blocks[self.comm.rank]
        self.lat0, self.lat1 = a, b
        self.sb0, self.sb1 = self.sb_blocks[self.comm.rank]
        self.local = ds.select_lattices(np.arange(a, b)) if self.comm.size > 1 else ds
        self.pm = None
        if self.local.n_shoeboxes:
            self.pm = PixelModel.from_dataset(self.local, backend=backend or cfg.backend)
            self.h_rows = cache.index_of(self.pm.hkl)
            self.xh, self.yh = self.pm.pixel_offsets_xy()
            k = self.pm.counts.astype(np.float64)
            m = self.pm.mask
            kk = k[m]
            pos = kk > 0
            self.const = float(np.sum(kk) - np.sum(kk[pos] * np.log(kk[pos])))
        else:
            self.const = 0.0

    # ------------------------------------------------------------------ layout helpers
    def split(self, x):
        """(fp (n_ref, n_grid), fdp, g (n_lat,), b (n_sb, 3)) views of ``x``."""
        n = self.n_ref * self.n_grid
        fp = x[:n].reshape(self.n_ref, self.n_grid)
        fdp = x[n:2 * n].reshape(self.n_ref, self.n_grid)
        g = x[2 * n:2 * n + self.n_lat]
        b = x[2 * n + self.n_lat:].reshape(self.n_sb, 3)
        return fp, fdp, g, b

    def local_slices(self, rank=None):
        """Index arrays into ``x`` of a rank's g and b entries (in that order)."""
        rank = self.comm.rank if rank is None else rank
        a, b = self.blocks[rank]
        s0, s1 = self.sb_blocks[rank]
        off = self.n_glob
        return np.concatenate([np.arange(off + a, off + b),
                               np.arange(off + self.n_lat + 3 * s0, off + self.n_lat + 3 * s1)])

    def channel_values(self, fp, fdp):
        """All cache sites' f′, f″ at the channel energies, (n_site, n_chan) each."""
        fpc = self.fp_chan0.copy()
        fdpc = self.fdp_chan0.copy()
        fpc[self.ref_sites] = (self.M @ fp.T).T
        fdpc[self.ref_sites] = (self.M @ fdp.T).T
        return fpc, fdpc

    def _intensities(self, fp, fdp, grad=True):
        from .structure import intensity_and_gradients, structure_factors
        fpc, fdpc = self.channel_values(fp, fdp)
        if not grad:
            F = structure_factors(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                  reference=self.cfg.reference)
            return np.ascontiguousarray((F.real ** 2 + F.imag ** 2).T), None, None
        I, dfp, dfdp = intensity_and_gradients(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                               reference=self.cfg.reference)
        return np.ascontiguousarray(I.T), dfp[self.ref_sites], dfdp[self.ref_sites]

    def _local_params(self, x):
        fp, fdp, g, b = self.split(x)
        return fp, fdp, g[self.lat0:self.lat1], b[self.sb0:self.sb1]

    # ------------------------------------------------------------------ evaluation
    def local_objective(self, x):
        """This rank's data term and gradients.

        Returns
        -------
        f : float
            NLL − constant of this rank's pixels.
        g_glob : array (n_glob,)
        g_loc : array (n_lat_rank + 3 n_sb_rank,)
            Gradient with respect to this rank's g and b.
        """
        fp, fdp, g, b = self._local_params(x)
        if self.pm is None:
            return 0.0, np.zeros(self.n_glob), np.zeros(0)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        nll, dI, dG, dbg = self.pm.nll_and_gradients(I, G, b)
        # chain rule: ∂f/∂u_chan[s, c] = Σ_h ∂f/∂I[h, c] ∂I[h, c]/∂u[s, c]
        gfp_c = np.einsum("sch,hc->sc", dfp, dI)
        gfdp_c = np.einsum("sch,hc->sc", dfdp, dI)
        gfp = (self.M.T @ gfp_c.T).T
        gfdp = (self.M.T @ gfdp_c.T).T
        g_glob = np.concatenate([gfp.ravel(), gfdp.ravel()])
        g_loc = np.concatenate([dG * G, dbg.ravel()])
        return float(nll) - self.const, g_glob, g_loc

    def evaluate(self, x):
        """Full objective and gradient at ``x`` (single rank only; MPI runs use :func:`refine`).

        Returns
        -------
        f : float
        grad : array (n_x,)
        """
        if self.comm.size != 1:
            raise RuntimeError("S1Problem.evaluate is for single-rank use")
        f, gg, gl = self.local_objective(x)
        fr, gr = self.restraint_terms(x)
        return f + fr, np.concatenate([gg + gr, gl])

    def restraint_terms(self, x):
        """Restraint loss and gradient over ``x``'s global block (rank 0 adds them)."""
        fp, fdp, _, _ = self.split(x)
        f, gp, gd = self.restraints(fp, fdp)
        return float(f), np.concatenate([np.ravel(gp), np.ravel(gd)])

    def restraint_hessian(self, x):
        """Exact Hessian of the (quadratic) restraints over the global block (n_glob²)."""
        H = np.zeros((self.n_glob, self.n_glob))
        if not self.restraints.terms:
            return H
        xg = x[:self.n_glob].copy()
        _, g0 = self.restraint_terms(np.concatenate([xg, x[self.n_glob:]]))
        xt = x.copy()
        for i in range(self.n_glob):
            xt[:self.n_glob] = xg
            xt[i] += 1.0
            _, gi = self.restraint_terms(xt)
            H[:, i] = gi - g0
        return 0.5 * (H + H.T)

    # ------------------------------------------------------------------ curvature
    def _pixel_terms(self, x):
        """Per-pixel arrays at x: W = mask/λ, S (Bragg at G=1), bg, G per pixel, h row per pixel."""
        fp, fdp, g, b = self._local_params(x)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        lam = self.pm.expected_counts(I, G, b)
        b_off = b.copy()
        b_off[:, 0] = -1000.0
        b_off[:, 1:] = 0.0
        S = self.pm.expected_counts(I, np.ones_like(G), b_off)
        sb = self.pm.pixel_shoebox
        bg = np.exp(b[sb, 0] + b[sb, 1] * self.xh + b[sb, 2] * self.yh)
        W = np.where(self.pm.mask, 1.0 / lam, 0.0)
        Gp = G[self.pm.sb_lattice[sb]]
        return W, S, bg, Gp, dfp, dfdp, sb

    def _chunks(self, max_pix=65536):
        off = self.pm.pixel_offset
        k = 0
        while k < self.pm.n_sb:
            stop = int(np.searchsorted(off, off[k] + max_pix, side="right")) - 1
            stop = max(stop, k + 1)
            stop = min(stop, self.pm.n_sb)
            yield k, stop
            k = stop

    def _jac_global(self, p0, p1, sb, Gp, dfp, dfdp, w):
        """∂λ/∂(fp, fdp grid) of pixels p0:p1, (n_p, n_glob) (Numba, M's two entries per channel)."""
        hp = np.ascontiguousarray(self.pm.sb_h_index[sb[p0:p1]])
        out = np.zeros((p1 - p0, self.n_glob))
        _jacobian_kernel(w[p0:p1], np.ascontiguousarray(dfp), np.ascontiguousarray(dfdp), hp,
                         np.ascontiguousarray(Gp[p0:p1]), self._m_k0, self._m_t, self.n_grid, out)
        return out

    def local_fisher_diag(self, x):
        """Diagonal of this rank's Fisher information: (global (n_glob,), local (n_loc,))."""
        if self.pm is None:
            return np.zeros(self.n_glob), np.zeros(0)
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        dglob = np.zeros(self.n_glob)
        for k0, k1 in self._chunks():
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            J = self._jac_global(p0, p1, sb, Gp, dfp, dfdp, w)
            dglob += np.einsum("p,pi,pi->i", W[p0:p1], J, J)
        lat_pix = self.pm.sb_lattice[sb]
        dg = np.bincount(lat_pix, weights=W * (Gp * S) ** 2, minlength=self.pm.n_lat)
        a = np.stack([np.ones_like(self.xh), self.xh, self.yh], axis=1)
        starts = self.pm.pixel_offset[:-1]
        db = np.stack([np.add.reduceat(W * (bg * a[:, i]) ** 2, starts) for i in range(3)], axis=1)
        return dglob, np.concatenate([dg, db.ravel()])

    def local_fisher_profiled(self, x):
        """This rank's global-block Fisher information with its local parameters profiled out.

        Per shoebox the background block is eliminated (Schur complement), then per
        lattice the scale g; the result adds over lattices, hence over ranks.

        Returns
        -------
        array (n_glob, n_glob)
        """
        ng = self.n_glob
        if self.pm is None:
            return np.zeros((ng, ng))
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        F = np.zeros((ng, ng))
        n_lat = self.pm.n_lat
        c = np.zeros((n_lat, ng))
        d = np.zeros(n_lat)
        for k0, k1 in self._chunks(16384):
            p0, p1 = self.pm.pixel_offset[k0], self.pm.pixel_offset[k1]
            Jg = self._jac_global(p0, p1, sb, Gp, dfp, dfdp, w)
            gcol = Gp[p0:p1] * S[p0:p1]
            Jy = np.concatenate([Jg, gcol[:, None]], axis=1)                            # (n_p, ng+1)
            Wc = W[p0:p1]
            F += Jg.T @ (Wc[:, None] * Jg)
            xa = self.xh[p0:p1]
            ya = self.yh[p0:p1]
            Jb = bg[p0:p1, None] * np.stack([np.ones_like(xa), xa, ya], axis=1)        # (n_p, 3)
            starts = self.pm.pixel_offset[k0:k1] - p0
            WJb = Wc[:, None] * Jb
            Fbb = np.add.reduceat(WJb[:, :, None] * Jb[:, None, :], starts, axis=0)   # (n_k, 3, 3)
            Fby = np.stack([np.add.reduceat(WJb[:, a, None] * Jy, starts, axis=0)
                            for a in range(3)], axis=1)                                 # (n_k, 3, ng+1)
            X = np.linalg.pinv(Fbb, hermitian=True) @ Fby                             # (n_k, 3, ng+1)
            F -= np.einsum("kai,kaj->ij", Fby[:, :, :ng], X[:, :, :ng])
            lat = self.pm.sb_lattice[k0:k1]
            # per shoebox: (glob, g) column and (g, g) entry, minus the background-profile terms
            cs = np.add.reduceat(Jg * (Wc * gcol)[:, None], starts, axis=0)
            ds_ = np.add.reduceat(Wc * gcol * gcol, starts)
            cs -= np.einsum("kai,ka->ki", Fby[:, :, :ng], X[:, :, ng])
            ds_ -= np.einsum("ka,ka->k", Fby[:, :, ng], X[:, :, ng])
            np.add.at(c, lat, cs)
            np.add.at(d, lat, ds_)
        ok = d > 1e-300
        F -= (c[ok] / d[ok, None]).T @ c[ok]
        return 0.5 * (F + F.T)

    def _dense_D(self, h, dfp, dfdp):
        """D[k] = ∂I[h_k, c]/∂u (n_k, n_chan, n_glob): diag(∂I/∂u_s) M per site and kind."""
        ng = self.n_grid
        D = np.zeros((len(h), len(self.channel_ev), self.n_glob))
        for t, d in enumerate((dfp, dfdp)):
            for s in range(self.n_ref):
                col = (t * self.n_ref + s) * ng
                D[:, :, col:col + ng] = d[s][:, h].T[:, :, None] * self.M_dense[None]
        return D

    def local_fisher(self, x, chunk=2048, route="auto"):
        """This rank's Fisher information (profiled global block and diagonals).

        Two routes give the same numbers (tested): ``"channel"`` accumulates per-shoebox
        channel-space moments Σ w wᵀ/λ (cost ∝ pixels × channels², fast for the usual
        ≤ 48 channels) and ``"pixel"`` forms ∂λ/∂u per pixel (cost ∝ pixels × n_glob²,
        better for many channels, e.g. 101 channels of 1 eV); ``"auto"`` picks by channels.

        Returns
        -------
        F_prof : (n_glob, n_glob)
            Global block with the local parameters profiled out (b per shoebox, then g
            per lattice).
        diag_glob : (n_glob,)
            Diagonal of the unprofiled global block.
        diag_loc : (n_lat_rank + 3 n_sb_rank,)
            Diagonal of the local block (g, then b0, b1, b2 per shoebox).
        """
        ng = self.n_glob
        if self.pm is None:
            return np.zeros((ng, ng)), np.zeros(ng), np.zeros(0)
        if route == "pixel" or (route == "auto" and self.pm.n_chan > 48):
            dglob, dloc = self.local_fisher_diag(x)
            return self.local_fisher_profiled(x), dglob, dloc
        W, S, bg, Gp, dfp, dfdp, sb = self._pixel_terms(x)
        w = self.pm.w
        n_chan = w.shape[1]
        n_lat = self.pm.n_lat
        F = np.zeros((ng, ng))
        dglob = np.zeros(ng)
        c = np.zeros((n_lat, ng))
        dj = np.zeros(n_lat)
        dg = np.zeros(n_lat)
        db = np.zeros((self.pm.n_sb, 3))
        off = np.ascontiguousarray(self.pm.pixel_offset)
        for k0 in range(0, self.pm.n_sb, chunk):
            k1 = min(k0 + chunk, self.pm.n_sb)
            n = k1 - k0
            C = np.zeros((n, n_chan, n_chan))
            V = np.zeros((n, 3, n_chan))
            u = np.zeros((n, n_chan))
            Fbb = np.zeros((n, 3, 3))
            q = np.zeros((n, 3))
            d = np.zeros(n)
            _shoebox_moments(w, W, S, bg, Gp, self.xh, self.yh, off, k0, k1, C, V, u, Fbb, q, d)
            D = self._dense_D(self.pm.sb_h_index[k0:k1], dfp, dfdp)
            CD = C @ D                                                        # (n, n_chan, ng)
            dglob += np.einsum("kci,kci->i", D, CD)
            Finv = np.linalg.pinv(Fbb, hermitian=True)
            X = Finv @ V                                                      # (n, 3, n_chan)
            Cp = C - np.einsum("kac,kae->kce", V, X)
            F += D.reshape(-1, ng).T @ (Cp @ D).reshape(-1, ng)
            up = u - np.einsum("kac,ka->kc", X, q)
            dp = d - np.einsum("ka,kab,kb->k", q, Finv, q)
            lat = self.pm.sb_lattice[k0:k1]
            np.add.at(c, lat, np.einsum("kci,kc->ki", D, up))
            np.add.at(dj, lat, dp)
            np.add.at(dg, lat, d)
            db[k0:k1] = np.diagonal(Fbb, axis1=1, axis2=2)
        ok = dj > 1e-300
        F -= (c[ok] / dj[ok, None]).T @ c[ok]
        return 0.5 * (F + F.T), dglob, np.concatenate([dg, db.ravel()])

    def predicted(self, x):
        """λ of this rank's pixels at ``x`` (for galleries)."""
        fp, fdp, g, b = self._local_params(x)
        I, _, _ = self._intensities(fp, fdp, grad=False)
        return self.pm.expected_counts(I, np.exp(g), b)

    # ------------------------------------------------------------------ start values
    def start_vector(self, start_curves=None):
        """Start values of ``x`` on this rank's part: reference (or given) curves, G from a
        moment match, backgrounds from each shoebox's border pixels.

        Parameters
        ----------
        start_curves : (fp, fdp) arrays (n_ref, n_grid), optional

        Returns
        -------
        glob : array (n_glob,)
        loc : array (this rank's g and b)
        """
        from .scattering import reference_fp_fdp
        if start_curves is None:
            fp = np.array([reference_fp_fdp(el, self.grid_ev, self.cfg.reference)[0]
                           for el in self.site_elements])
            fdp = np.array([reference_fp_fdp(el, self.grid_ev, self.cfg.reference)[1]
                            for el in self.site_elements])
        else:
            fp, fdp = (np.asarray(a, dtype=np.float64) for a in start_curves)
        glob = np.concatenate([fp.ravel(), fdp.ravel()])
        if self.pm is None:
            return glob, np.zeros(0)
        pm = self.pm
        off = pm.pixel_offset
        sb = pm.pixel_shoebox
        loc = np.arange(pm.n_pix) - off[sb]
        x0, x1, y0, y1 = (pm.bbox[sb, i] for i in range(4))
        width = x1 - x0
        px = x0 + loc % width
        py = y0 + loc // width
        border = (px == x0) | (px == x1 - 1) | (py == y0) | (py == y1 - 1)
        use = pm.mask & border
        nb = np.bincount(sb, weights=use, minlength=pm.n_sb)
        sumb = np.bincount(sb, weights=np.where(use, pm.counts, 0.0), minlength=pm.n_sb)
        nall = np.bincount(sb, weights=pm.mask, minlength=pm.n_sb)
        suma = np.bincount(sb, weights=np.where(pm.mask, pm.counts, 0.0), minlength=pm.n_sb)
        mean = np.where(nb > 0, sumb / np.maximum(nb, 1), suma / np.maximum(nall, 1))
        b = np.zeros((pm.n_sb, 3))
        b[:, 0] = np.log(np.maximum(mean, 0.05))
        I, _, _ = self._intensities(fp, fdp, grad=False)
        b_off = np.zeros_like(b)
        b_off[:, 0] = -1000.0
        S = pm.expected_counts(I, np.ones(pm.n_lat), b_off)
        bgp = np.exp(b[sb, 0])
        lat = pm.sb_lattice[sb]
        excess = np.bincount(lat, weights=np.where(pm.mask, pm.counts - bgp, 0.0), minlength=pm.n_lat)
        ssum = np.bincount(lat, weights=np.where(pm.mask, S, 0.0), minlength=pm.n_lat)
        ratio = np.where((excess > 0) & (ssum > 0), excess / np.where(ssum > 0, ssum, 1.0), 1.0)
        g = np.clip(np.log(ratio), -10.0, 10.0)
        return glob, np.concatenate([g, b.ravel()])


# --------------------------------------------------------------------------- driver

_CMD_STOP, _CMD_EVAL, _CMD_DIAG, _CMD_FISHER, _CMD_START = range(5)


class _Driver:
    """Collective operations; rank 0 calls them, the other ranks serve them in :meth:`serve`."""

    def __init__(self, problem):
        self.p = problem
        self.comm = problem.comm
        self.loc_counts = [len(problem.local_slices(r)) for r in range(self.comm.size)]
        self.loc_index = np.concatenate([problem.local_slices(r) for r in range(self.comm.size)]) \
            if self.comm.size > 1 else None
        self.n_eval = 0

    def _command(self, cmd, x=None):
        """Rank 0: announce a command (and broadcast x for the commands that take one)."""
        c = self.comm
        if c.size > 1:
            c.bcast_array([cmd], 1, np.int64)
        if cmd in (_CMD_EVAL, _CMD_DIAG, _CMD_FISHER):
            x = c.bcast_array(x, self.p.n_x)
        return x

    def _dispatch(self, cmd, x):
        p, c = self.p, self.comm
        if cmd == _CMD_EVAL:
            f, gg, gl = p.local_objective(x)
            tot = c.sum_in_order(np.concatenate([[f], gg]))
            loc = c.concat(gl, self.loc_counts)
            if c.rank != 0:
                return None
            grad = np.empty(p.n_x)
            grad[:p.n_glob] = tot[1:]
            self._scatter_local(grad, loc)
            fr, gr = p.restraint_terms(x)
            grad[:p.n_glob] += gr
            return tot[0] + fr, grad
        if cmd == _CMD_DIAG:
            _, dg, dl = p.local_fisher(x)
            tot = c.sum_in_order(dg)
            loc = c.concat(dl, self.loc_counts)
            if c.rank != 0:
                return None
            diag = np.empty(p.n_x - p.n_glob)
            full = np.empty(p.n_x)
            self._scatter_local(full, loc)
            diag[:] = full[p.n_glob:]
            Hg = np.diag(tot) + p.restraint_hessian(x)
            return Hg, diag
        if cmd == _CMD_FISHER:
            F = c.sum_in_order(p.local_fisher(x)[0].ravel())
            if c.rank != 0:
                return None
            return F.reshape(p.n_glob, p.n_glob) + p.restraint_hessian(x)
        if cmd == _CMD_START:
            glob, loc = p.start_vector(x)
            loc = c.concat(loc, self.loc_counts)
            if c.rank != 0:
                return None
            out = np.empty(p.n_x)
            out[:p.n_glob] = glob
            self._scatter_local(out, loc)
            return out
        raise RuntimeError(f"unknown command {cmd}")

    def _scatter_local(self, full, loc):
        p = self.p
        if self.comm.size == 1:
            full[p.n_glob:] = loc
        else:
            full[self.loc_index] = loc

    def call(self, cmd, x):
        """Run a collective command (EVAL, DIAG, FISHER) from rank 0."""
        x = self._command(cmd, x)
        if cmd == _CMD_EVAL:
            self.n_eval += 1
        return self._dispatch(cmd, x)

    def start(self, curves):
        """Start vector (collective; ``curves`` is the same on every rank)."""
        if self.comm.rank == 0:
            self._command(_CMD_START)
        return self._dispatch(_CMD_START, curves)

    def stop(self):
        """Release the serving ranks."""
        if self.comm.size > 1 and self.comm.rank == 0:
            self._command(_CMD_STOP)

    def serve(self, curves=None):
        """Loop of the ranks > 0: execute rank 0's commands until told to stop."""
        c = self.comm
        while True:
            cmd = int(c.bcast_array(None, 1, np.int64)[0])
            if cmd == _CMD_STOP:
                return
            if cmd == _CMD_START:
                self._dispatch(cmd, curves)
                continue
            x = c.bcast_array(None, self.p.n_x)
            self._dispatch(cmd, x)


class _Preconditioner:
    """Variables z of the optimizer: x_glob = L⁻ᵀ z_glob (H_glob = L Lᵀ), x_loc = z_loc / sqrt(diag).

    ``H_glob`` is the Fisher diagonal of the global parameters plus the restraints' full
    (exact) Hessian, so stiff restraints such as Kramers-Kronig are whitened exactly.
    """

    def __init__(self, H_glob, diag_loc, n_glob):
        import scipy.linalg
        self.n_glob = n_glob
        H = 0.5 * (H_glob + H_glob.T)
        d = np.diag(H).copy()
        ridge = 1e-10 * max(float(d.max(initial=0.0)), 1e-300)
        H = H + np.diag(np.where(d > ridge, 0.0, 1.0) + ridge)   # no information: unit scale
        self.L = scipy.linalg.cholesky(H, lower=True)
        self.s = 1.0 / np.sqrt(np.where(diag_loc > 0, diag_loc, 1.0))
        self._solve = scipy.linalg.solve_triangular

    def to_x(self, z):
        x = np.empty_like(z)
        x[:self.n_glob] = self._solve(self.L, z[:self.n_glob], lower=True, trans="T")
        x[self.n_glob:] = z[self.n_glob:] * self.s
        return x

    def to_z(self, x):
        z = np.empty_like(x)
        z[:self.n_glob] = self.L.T @ x[:self.n_glob]
        z[self.n_glob:] = x[self.n_glob:] / self.s
        return z

    def grad_z(self, g):
        out = np.empty_like(g)
        out[:self.n_glob] = self._solve(self.L, g[:self.n_glob], lower=True)
        out[self.n_glob:] = g[self.n_glob:] * self.s
        return out


# --------------------------------------------------------------------------- checkpoints

def _fingerprint(prepared, cache, cfg):
    """Hash of what determines the answer: data, cache, effective non-operational parameters."""
    h = hashlib.sha256()
    ds = prepared.ds
    for arr in (ds.counts, ds.mask, ds.sb_miller_index, ds.spectrum_weight, ds.A, ds.energy_ev,
                prepared.lattice_orig, prepared.shoebox_orig):
        h.update(np.ascontiguousarray(arr).tobytes())
    for arr in (cache.hkl, cache.F_base, cache.S_site):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _answer_config(cfg):
    flat = cfg.flat()
    return {k: v for k, v in sorted(flat.items()) if k not in _OPERATIONAL}


def _write_checkpoint(path, state):
    from .h5io import atomic_writer, write_strings
    with atomic_writer(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, overwrite=True) as h5:
        h5.attrs["config"] = json.dumps(state["config"], sort_keys=True)
        h5.attrs["fingerprint"] = state["fingerprint"]
        h5.attrs["macrocycle"] = int(state["macrocycle"])
        h5.attrs["converged"] = bool(state["converged"])
        h5.attrs["message"] = state["message"]
        h5.create_dataset("x", data=state["x"])
        for k in ("objective", "gradient_norm", "time_s"):
            h5.create_dataset(f"history/{k}", data=np.asarray(state["history"][k], dtype=np.float64))
        write_strings(h5, "site_names", state["site_names"])


def _read_checkpoint(path, config, fingerprint, n_x):
    from .h5io import open_checked, read_array
    with open_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION) as h5:
        saved = json.loads(str(h5.attrs.get("config", "{}")))
        if saved != config:
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k, "?") != config.get(k, "?"))
            raise InputError(f"{path}: checkpoint was written with another configuration "
                             f"(differs in: {', '.join(diff)}); remove it or drop --resume")
        if str(h5.attrs.get("fingerprint", "")) != fingerprint:
            raise InputError(f"{path}: checkpoint was written for other input data (datasets or "
                             f"SF cache differ); remove it or drop --resume")
        x = read_array(h5, "x", np.float64)
        if x.shape != (n_x,):
            raise InputError(f"{path}: checkpoint holds {x.size} parameters, expected {n_x}")
        hist = {k: list(read_array(h5, f"history/{k}", np.float64))
                for k in ("objective", "gradient_norm", "time_s")}
        return {"x": x, "macrocycle": int(h5.attrs["macrocycle"]), "history": hist,
                "converged": bool(h5.attrs.get("converged", False)),
                "message": str(h5.attrs.get("message", ""))}


# --------------------------------------------------------------------------- refine

@dataclasses.dataclass
class RefineResult:
    """What :func:`refine` returns on rank 0 (``None`` elsewhere). Arrays as in the result file."""

    energy_ev: np.ndarray
    site_names: list
    site_elements: list
    fp: np.ndarray
    fdp: np.ndarray
    fp_sigma: np.ndarray
    fdp_sigma: np.ndarray
    edge_ev: np.ndarray
    edge_sigma_ev: np.ndarray
    lattice_G: np.ndarray
    shoebox_background: np.ndarray
    history: dict
    covariance: np.ndarray
    converged: bool
    message: str
    objective: float
    n_ranks: int
    n_evaluations: int
    restraints: list
    config_json: str = "{}"
    datasets: list = dataclasses.field(default_factory=list)
    sf_cache: str = ""
    warnings: list = dataclasses.field(default_factory=list)
    x: np.ndarray = None


def _start_curves(cfg, problem):
    """Start curves from a previous result/table, or None for the reference."""
    path = cfg.start.result
    if path is None:
        return None
    from .scattering import detect_format, read_table
    fmt = detect_format(path)
    fp, fdp = [], []
    for name in problem.site_names:
        table = read_table(path, site=name if fmt in ("result", "csv") else None)
        lo, hi = table.energy_range_ev
        if problem.grid_ev[0] < lo - 1e-6 or problem.grid_ev[-1] > hi + 1e-6:
            raise InputError(f"{path}: start curve of {name} covers {lo:g}-{hi:g} eV, the grid "
                             f"{problem.grid_ev[0]:g}-{problem.grid_ev[-1]:g} eV")
        a, b = table.interpolate(np.clip(problem.grid_ev, lo, hi))
        fp.append(a)
        fdp.append(b)
    return np.array(fp), np.array(fdp)


def refine(datasets, cache, cfg, comm=None, checkpoint=None, resume=False, log=None, quiet=True,
           backend=None, dataset_names=(), cache_name=""):
    """Run the S1 refinement (collective: call it on every rank).

    Parameters
    ----------
    datasets : list of Dataset
        Read on every rank (each rank then keeps its own lattices).
    cache : SFCache
    cfg : Config
        Effective parameters (schema :data:`REFINE_SCHEMA`).
    comm : Comm, optional
        Default :func:`get_comm`.
    checkpoint : str or Path, optional
        Checkpoint file written after every macrocycle (rank 0).
    resume : bool
        Continue from ``checkpoint`` when it exists (refused when it was written
        for other data or another configuration).
    log : callable, optional
        Receives log lines (rank 0 only).
    quiet : bool
        No progress bar.
    backend : str, optional
        Overrides ``cfg.backend``.
    dataset_names, cache_name : for the result's metadata.

    Returns
    -------
    RefineResult or None
        The result on rank 0, ``None`` on the other ranks.
    """
    from .progress import progress
    comm = comm or get_comm()
    root = comm.rank == 0
    say = (log or (lambda s: None)) if root else (lambda s: None)
    t_start = time.perf_counter()
    prepared = prepare_data(datasets, cache, cfg.shoebox.min_pixels)
    for w in prepared.warnings:
        say(f"warning: {w}")
    problem = S1Problem(prepared, cache, cfg, comm, backend=backend)
    drv = _Driver(problem)
    curves = _start_curves(cfg, problem)
    pm_pix = problem.pm.n_pix if problem.pm is not None else 0
    say(f"{prepared.ds.n_lattices} lattices, {prepared.ds.n_shoeboxes} shoeboxes, "
        f"{prepared.ds.n_pixels} pixels ({int(prepared.ds.mask.sum())} unmasked), "
        f"{len(problem.channel_ev)} channels; {comm.size} rank(s), rank 0 holds {pm_pix} pixels")
    say(f"grid {problem.grid_ev[0]:g}-{problem.grid_ev[-1]:g} eV step {cfg.grid.step_ev:g} eV "
        f"({problem.n_grid} points), sites {', '.join(problem.site_names)}; "
        f"{problem.n_x} parameters ({problem.n_glob} global)")
    for line in problem.restraints.describe():
        say(f"restraint: {line}")
    say(f"setup {time.perf_counter() - t_start:.2f} s (channel weights on {problem.pm.backend if problem.pm else '-'})")
    if not root:
        drv.serve(curves)
        return None
    try:
        return _optimize(problem, drv, cfg, curves, checkpoint, resume, say, quiet, progress,
                         prepared, dataset_names, cache_name)
    finally:
        drv.stop()


def _optimize(problem, drv, cfg, curves, checkpoint, resume, say, quiet, progress, prepared,
              dataset_names, cache_name):
    p = problem
    config = _answer_config(cfg)
    fingerprint = _fingerprint(prepared, p.cache, cfg)
    history = {"objective": [], "gradient_norm": [], "time_s": []}
    state = None
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = _read_checkpoint(checkpoint, config, fingerprint, p.n_x)
        say(f"resuming from {checkpoint}: macrocycle {state['macrocycle']} done")
        x = state["x"]
        history = state["history"]
        macro = state["macrocycle"]
        done = state["converged"]
        message = state["message"]
    else:
        if resume:
            say(f"no checkpoint {checkpoint}: starting from the beginning")
        x = drv.start(curves)
        macro = 0
        done = False
        message = ""
    t0 = time.perf_counter() - (history["time_s"][-1] if history["time_s"] else 0.0)
    gtol = float(cfg.optimizer.gtol)
    last = {}

    def fun(z, pre):
        xx = pre.to_x(z)
        f, g = drv.call(_CMD_EVAL, xx)
        last["f"], last["g"] = f, g
        return f, pre.grad_z(g)

    bar = progress(total=None, desc="S1", quiet=quiet, unit="it")
    while not done and macro < cfg.optimizer.max_macrocycles:
        pre = _Preconditioner(*drv.call(_CMD_DIAG, x), p.n_glob)
        f_before, _ = drv.call(_CMD_EVAL, x)

        def callback(intermediate_result=None, _pre=pre):
            gn = float(np.max(np.abs(_pre.grad_z(last["g"]))))
            history["objective"].append(float(last["f"]))
            history["gradient_norm"].append(gn)
            history["time_s"].append(time.perf_counter() - t0)
            it = len(history["objective"])
            bar.update(1)
            say(f"iter {it:5d}  objective {last['f']:.10e}  |grad|max {gn:.3e} (sigma units)  "
                f"time {history['time_s'][-1]:.2f} s")

        res = scipy.optimize.minimize(
            fun, pre.to_z(x), args=(pre,), jac=True, method="L-BFGS-B", callback=callback,
            options={"maxiter": int(cfg.optimizer.iterations), "maxcor": int(cfg.optimizer.memory),
                     "gtol": gtol, "ftol": 1e-15, "maxls": 40})
        x = pre.to_x(res.x)
        macro += 1
        f_after, g_after = drv.call(_CMD_EVAL, x)
        gmax = float(np.max(np.abs(pre.grad_z(g_after))))
        say(f"macrocycle {macro}: objective {f_before:.10e} -> {f_after:.10e}, |grad|max {gmax:.3e}, "
            f"{res.nit} iterations ({res.message if isinstance(res.message, str) else res.message})")
        if gmax <= gtol:
            done, message = True, f"converged: |grad|max {gmax:.3e} <= gtol {gtol:g}"
        elif not f_after < f_before - 1e-12 * max(1.0, abs(f_before)):
            done, message = True, (f"stopped: objective no longer decreases (round-off), "
                                        f"|grad|max {gmax:.3e}")
        else:
            message = f"not converged after {macro} macrocycles: |grad|max {gmax:.3e} > gtol {gtol:g}"
        if checkpoint is not None:
            _write_checkpoint(checkpoint, {"config": config, "fingerprint": fingerprint,
                                           "macrocycle": macro, "converged": done,
                                           "message": message, "x": x, "history": history,
                                           "site_names": p.site_names})
    bar.close()
    say(message)
    f_final, _ = drv.call(_CMD_EVAL, x)
    t_unc = time.perf_counter()
    F = drv.call(_CMD_FISHER, x)
    cov = _invert(F)
    say(f"uncertainties from the profiled Fisher information in {time.perf_counter() - t_unc:.2f} s")
    fp, fdp, g, b = p.split(x)
    n = p.n_ref * p.n_grid
    sig = np.sqrt(np.where(np.diag(cov) >= 0, np.diag(cov), np.nan))
    fp_sigma = sig[:n].reshape(p.n_ref, p.n_grid)
    fdp_sigma = sig[n:].reshape(p.n_ref, p.n_grid)
    edges, edge_s = [], []
    for s in range(p.n_ref):
        idx = n + s * p.n_grid + np.arange(p.n_grid)
        e, es = edge_position(p.grid_ev, fdp[s], cov[np.ix_(idx, idx)])
        edges.append(e)
        edge_s.append(es)
    lattice_G = np.full(prepared.n_lat_total, np.nan)
    lattice_G[prepared.lattice_orig] = np.exp(g)
    bgs = np.full((prepared.n_sb_total, 3), np.nan)
    bgs[prepared.shoebox_orig] = b
    return RefineResult(
        energy_ev=p.grid_ev.copy(), site_names=list(p.site_names), site_elements=list(p.site_elements),
        fp=fp.copy(), fdp=fdp.copy(), fp_sigma=fp_sigma, fdp_sigma=fdp_sigma,
        edge_ev=np.array(edges), edge_sigma_ev=np.array(edge_s), lattice_G=lattice_G,
        shoebox_background=bgs, history={k: np.asarray(v) for k, v in history.items()},
        covariance=cov, converged=message.startswith("converged"), message=message,
        objective=float(f_final), n_ranks=p.comm.size, n_evaluations=drv.n_eval,
        restraints=p.restraints.active, config_json=p.cfg.to_json(),
        datasets=[str(d) for d in dataset_names], sf_cache=str(cache_name),
        warnings=list(prepared.warnings), x=x)


def _invert(F):
    """Covariance from an information matrix (pseudo-inverse when singular)."""
    try:
        evals, evecs = np.linalg.eigh(F)
    except np.linalg.LinAlgError:
        return np.full_like(F, np.nan)
    tol = max(evals.max(initial=0.0), 0.0) * 1e-13
    inv = np.where(evals > tol, 1.0 / np.where(evals > tol, evals, 1.0), 0.0)
    cov = (evecs * inv) @ evecs.T
    bad = np.abs(evecs[:, evals <= tol]).max(axis=1, initial=0.0) > 1e-6
    cov[bad, :] = np.nan
    cov[:, bad] = np.nan
    return cov


# --------------------------------------------------------------------------- result IO

def write_result(path, result, overwrite=False):
    """Write a result file (``docs/formats.md``) and its CSV ``<output>.csv`` atomically.

    Parameters
    ----------
    path : str or Path
        Output ``.h5``.
    result : RefineResult
    overwrite : bool

    Returns
    -------
    Path
        The CSV written next to it.
    """
    from .h5io import atomic_write_text, atomic_writer, check_writable, write_strings
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    check_writable(csv_path, overwrite)
    with atomic_writer(path, RESULT_FORMAT, RESULT_VERSION, overwrite=overwrite) as h5:
        h5.create_dataset("energy_ev", data=result.energy_ev)
        write_strings(h5, "site_names", result.site_names)
        write_strings(h5, "site_elements", result.site_elements)
        for k in ("fp", "fdp", "fp_sigma", "fdp_sigma", "edge_ev", "edge_sigma_ev", "lattice_G",
                  "shoebox_background", "covariance"):
            h5.create_dataset(k, data=np.asarray(getattr(result, k), dtype=np.float64))
        for k, v in result.history.items():
            h5.create_dataset(f"history/{k}", data=np.asarray(v, dtype=np.float64))
        h5.attrs["config"] = result.config_json
        h5.attrs["datasets"] = json.dumps(result.datasets)
        h5.attrs["sf_cache"] = result.sf_cache
        h5.attrs["converged"] = bool(result.converged)
        h5.attrs["message"] = result.message
        h5.attrs["objective"] = float(result.objective)
        h5.attrs["n_ranks"] = int(result.n_ranks)
        h5.attrs["n_evaluations"] = int(result.n_evaluations)
        h5.attrs["restraints"] = json.dumps(result.restraints)
        h5.attrs["warnings"] = json.dumps(result.warnings)
        h5.attrs["covariance_order"] = "fp (site-major, grid), then fdp (site-major, grid)"
    cols = ["energy_ev"]
    for s in result.site_names:
        cols += [f"{s}_fp", f"{s}_fp_sigma", f"{s}_fdp", f"{s}_fdp_sigma"]
    lines = [",".join(cols)]
    for k, e in enumerate(result.energy_ev):
        row = [f"{e:.4f}"]
        for i in range(len(result.site_names)):
            row += [f"{v:.6f}" for v in (result.fp[i, k], result.fp_sigma[i, k],
                                         result.fdp[i, k], result.fdp_sigma[i, k])]
        lines.append(",".join(row))
    atomic_write_text(csv_path, "\n".join(lines) + "\n", overwrite=overwrite)
    return csv_path


def read_result(path):
    """Read a result file into a dict of arrays and attributes.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    dict
        Keys of ``docs/formats.md`` (``history`` a dict), plus ``config`` (dict) and ``path``.
    """
    from .h5io import open_checked, read_array
    out = {"path": str(path)}
    with open_checked(path, RESULT_FORMAT, RESULT_VERSION) as h5:
        out["energy_ev"] = read_array(h5, "energy_ev", np.float64)
        out["site_names"] = [str(s) for s in np.atleast_1d(read_array(h5, "site_names"))]
        out["site_elements"] = [str(s) for s in np.atleast_1d(read_array(h5, "site_elements"))] \
            if "site_elements" in h5 else [""] * len(out["site_names"])
        n = (len(out["site_names"]), len(out["energy_ev"]))
        for k in ("fp", "fdp"):
            out[k] = read_array(h5, k, np.float64, shape=n)
        for k in ("fp_sigma", "fdp_sigma"):
            out[k] = read_array(h5, k, np.float64, shape=n) if k in h5 else np.full(n, np.nan)
        for k in ("edge_ev", "edge_sigma_ev", "lattice_G", "shoebox_background", "covariance"):
            if k in h5:
                out[k] = read_array(h5, k, np.float64)
        out["history"] = {k: read_array(h5, f"history/{k}", np.float64)
                          for k in ("objective", "gradient_norm", "time_s") if f"history/{k}" in h5}
        try:
            out["config"] = json.loads(str(h5.attrs.get("config", "{}")))
        except json.JSONDecodeError:
            out["config"] = {}
        for k in ("converged", "message", "objective", "datasets", "sf_cache", "n_ranks"):
            if k in h5.attrs:
                v = h5.attrs[k]
                out[k] = v.decode() if isinstance(v, bytes) else v
    return out


def log_to_stderr(line):
    """Default log sink of the script (rank 0): one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def select_device_for_rank(comm):
    """With the cuda backend under MPI, give each rank of a node its own GPU (round robin)."""
    try:
        from numba import cuda
        if not cuda.is_available():
            return
        n = len(cuda.gpus)
        local = None
        for var in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
            if var in os.environ:
                local = int(os.environ[var])
                break
        if local is None:
            local = comm.rank
        if n > 1:
            cuda.select_device(local % n)
    except Exception:
        return
