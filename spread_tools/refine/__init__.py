"""Refinement stages: S1 (global f′/f″ per site) and the pieces it is built from.

* :mod:`spread_tools.refine.s1` — the S1 entry point :func:`refine`, the optimizer loop, result files;
* :mod:`spread_tools.refine.grid` — the refined energy grid and its interpolation to channels;
* :mod:`spread_tools.refine.prepare` — input checks and the per-rank data;
* :mod:`spread_tools.refine.objective` — :class:`S1Problem`: parameter layout, objective, gradient;
* :mod:`spread_tools.refine.restraints` — Sauter and Kramers–Kronig restraints;
* :mod:`spread_tools.refine.uncertainty` — Fisher information, covariance, edge position;
* :mod:`spread_tools.refine.driver` — collective commands, the preconditioner;
* :mod:`spread_tools.refine.mpi` — the communicator (mpi4py or one process);
* :mod:`spread_tools.refine.calibration` — σ that include the restraints' bias;
* :mod:`spread_tools.refine.lbfgsb` — L-BFGS-B with a state that can be saved and resumed;
* :mod:`spread_tools.refine.checkpoint` — signals, timed checkpoints and resume (for every long stage).
"""

from spread_tools.refine.checkpoint import Checkpointer, Interrupted, StopSignals
from spread_tools.refine.grid import energy_grid, interpolation_matrix
from spread_tools.refine.mpi import Comm, get_comm, rank_blocks
from spread_tools.refine.objective import S1Problem
from spread_tools.refine.prepare import prepare_data
from spread_tools.refine.restraints import RESTRAINT_SCHEMA, build_restraints
from spread_tools.refine.s1 import (
           REFINE_SCHEMA,
           RefineResult,
           read_result,
           refine,
           write_result,
)
from spread_tools.refine.uncertainty import edge_position

__all__ = ["energy_grid", "interpolation_matrix", "Comm", "get_comm", "rank_blocks", "S1Problem",
           "prepare_data", "RESTRAINT_SCHEMA", "build_restraints", "REFINE_SCHEMA", "RefineResult",
           "read_result", "refine", "write_result", "edge_position", "Checkpointer", "Interrupted",
           "StopSignals"]
