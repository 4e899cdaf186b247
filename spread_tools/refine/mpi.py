"""MPI helpers of the S1 refinement: deterministic collectives, rank blocks, GPU per rank.

Everything works without mpi4py (or with one rank): :func:`get_comm` then returns a
single in-process rank and the collectives are copies. See :mod:`spread_tools.refine.s1`
(section *MPI*) for how the refinement uses them.
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["Comm", "get_comm", "rank_blocks", "select_device_for_rank"]


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
    return _world_comm(_mpi)


def _world_comm(load_mpi):
    """:func:`get_comm` with mpi4py's ``MPI`` module obtained from ``load_mpi()``."""
    try:
        MPI = load_mpi()
    except Exception:  # mpi4py or libmpi missing: single rank
        return Comm(None)
    world = MPI.COMM_WORLD
    return Comm(world if world.Get_size() > 1 else None)


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
