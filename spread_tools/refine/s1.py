"""S1 refinement: per-site f′(E), f″(E) on an energy grid from SPREAD still-shot data.

Objective
---------
For the pixel model of ``docs/formats.md`` (channel weights w computed once by
:mod:`spread_tools.model.pixel`)::

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

Gradient: ∂f/∂I[h,c] from :meth:`spread_tools.model.pixel.PixelModel.nll_and_gradients`,
then ∂I/∂f′, ∂I/∂f″ from :func:`spread_tools.structure.factors.intensity_and_gradients`
at the channel energies of the dataset's distinct Miller indices, then Mᵀ.

Optimizer
---------
L-BFGS-B (scipy) on the whole vector (global and local parameters together),
in *macrocycles* of at most ``optimizer.iterations`` iterations. Each macrocycle
starts with an exact fit of the local parameters at the current curves
(:func:`spread_tools.refine.local_fit.fit_locals`: Fisher scoring per lattice on its g
and backgrounds, a block-coordinate step that never raises the objective); then every
parameter is rescaled by the inverse square root of the diagonal of the Fisher
information (plus the restraints' exact Hessian and the ln G prior's curvature), so the
variables are in units of their own standard uncertainty. Convergence: the largest
|∂f/∂z| over all rescaled variables z (projected on the bounds) is at most
``optimizer.gtol`` (default 1e-3: a 1σ move changes the objective by less than
0.001). A run also stops when a whole macrocycle (local fit and L-BFGS) no longer lowers
the objective by more than 1e-12 of its value: round-off, reported as such with the
gradient reached. Every macrocycle is recorded in the result (``convergence/``: objective
before and after, the drop of the local fit, largest gradient, iterations, evaluations,
L-BFGS-B status, time); ``plot_curves --convergence`` draws the trace. A
checkpoint is written after every macrocycle and, inside a macrocycle, every
``checkpoint.interval_s`` of wall time and on a stop request (SIGTERM/SIGINT through
:class:`~spread_tools.refine.checkpoint.StopSignals`); it holds the preconditioner
and the whole state of the L-BFGS-B routine (:mod:`spread_tools.refine.lbfgsb`, scipy's
own code driven step by step, bounds included), so ``--resume`` from any checkpoint follows exactly the
same path as an uninterrupted run (bit for bit on the same machine and ranks).

Scales and backgrounds are kept well-posed, so that every trial point is finite:

* a weak Gaussian prior on ln G per lattice, ``(g_j − μ)² / (2 σ_G²)`` with
  ``lattice.ln_G_sigma`` = σ_G (default 2: a factor 7 in G at 1σ) and μ the median over
  all lattices of ln G fitted at the start curves. For a lattice with Bragg signal it is
  negligible (its curvature 1/σ_G² = 0.25 against a data information of 10²–10⁴); a
  lattice without signal (whose likelihood alone drives G to 0 with a gradient that never
  falls in σ units) stays near μ instead. ``lattice.ln_G_sigma=None`` switches it off;
* a weak Gaussian prior N(0, σ_s²) on the background slopes b1, b2 of every shoebox
  (``shoebox.slope_sigma`` = σ_s, default 0.1 per pixel: a factor 2.5 across a 19-pixel
  shoebox at 1σ, where the water ring changes the background by ~1.4). A shoebox with a
  few photons otherwise puts its whole background into one corner (slopes → ±∞);
* bounds (L-BFGS-B box constraints): |g − μ| ≤ 30, |b0| ≤ 15 (3·10⁻⁷ to 3·10⁶ photons
  per pixel), |b1|, |b2| ≤ 2 per pixel, so that G and the backgrounds cannot overflow
  (λ stays positive and finite by construction; no pixel is ever dropped). An empty
  shoebox's background (likelihood optimum 0) stops on its lower bound instead of
  walking to −∞; other points on a bound at the end are named in the log and the
  result's warnings;
* lattices with fewer than ``lattice.min_shoeboxes`` usable shoeboxes are left out
  (warning; counted in the log and the result's ``dropped``).

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
added, and the posterior covariance is its inverse. By default
(``uncertainty.calibrate``) the reported covariance adds the restraints' bias, a
rank-one term (:mod:`spread_tools.refine.calibration`): the posterior alone counts
the restraints as information and is too small where they dominate the data
(errors of 1.8σ rms at 40 lattices). For datasets written by ``refine_geometry``
(``uncertainty.geometry``) every lattice's crystal model is profiled out of the
information as well (:mod:`spread_tools.refine.geometry_uncertainty`): those models
are estimates from the same pixels. The same Fisher computation gives the
preconditioner of every macrocycle; it runs in channel space (per-shoebox
Σ w wᵀ/λ over the shoebox's span of channel bands, Numba), whatever the number of
channels. The edge of each site is the
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

Modules
-------
:mod:`spread_tools.refine.s1` holds the entry point :func:`refine` (and the optimizer
loop) and the result files; the parts live in :mod:`spread_tools.refine.grid` (energy grid,
interpolation matrix), :mod:`spread_tools.refine.prepare` (input checks),
:mod:`spread_tools.refine.objective` (:class:`S1Problem`: layout, objective, gradient),
:mod:`spread_tools.refine.uncertainty` (Fisher information, covariance, edge),
:mod:`spread_tools.refine.driver` (collective commands, preconditioner),
:mod:`spread_tools.refine.checkpoint` and :mod:`spread_tools.refine.mpi`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from spread_tools.config import P
from spread_tools.errors import InputError
from spread_tools.model.bands import DEFAULT_FLOOR, DEFAULT_RTOL
from spread_tools.refine.calibration import calibrated_covariance, restraint_parts
from spread_tools.refine.checkpoint import (
    Checkpointer,
    answer_config,
    s1_fingerprint,
    s1_from_checkpoint,
    s1_state,
)
from spread_tools.refine.driver import (
    _CMD_DIAG,
    _CMD_EVAL,
    _CMD_FISHER,
    _CMD_GEOMETRY,
    _CMD_LOCALS,
    _Driver,
    _Preconditioner,
)
from spread_tools.refine.lbfgsb import LbfgsbRun
from spread_tools.refine.mpi import get_comm
from spread_tools.refine.kk_constrained import make_problem
from spread_tools.refine.objective import BOUND_B0, BOUND_LN_G, BOUND_SLOPE
from spread_tools.refine.prepare import prepare_data
from spread_tools.refine.restraints import RESTRAINT_SCHEMA
from spread_tools.refine.geometry_uncertainty import geometry_profile_for
from spread_tools.refine.uncertainty import EDGE_POST_GAP_EV, EDGE_PRE_GAP_EV, _invert, edge_position

__all__ = ["REFINE_SCHEMA", "RESULT_FORMAT", "RESULT_VERSION", "refine", "RefineResult",
           "write_result", "read_result"]

RESULT_FORMAT = "spread_tools.result"
RESULT_VERSION = 1

REFINE_SCHEMA = {
    "sites": P([], "sites of the SF cache to refine (empty: all); the others keep their "
               "reference curve", type=list, item_type=str),
    "grid": {
        "step_ev": P(4.0, "energy step of the refined f'/f'' grid", units="eV"),
        "min_ev": P(None, "first grid energy (None: the first spectrum channel, rounded down to "
                    "a whole eV)", units="eV",
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
        "slope_sigma": P(0.1, "sigma of the weak Gaussian prior N(0, sigma^2) on the background "
                         "slopes b1, b2 (ln background per pixel; None: no prior)", optional=True),
    },
    "uncertainty": {
        "calibrate": P(True, "include the restraints' bias in sigma (the restraints' pull at "
                       "the curve the data ask for, spread_tools.refine.calibration); False: "
                       "the posterior sigma (F + H)^-1 alone, which counts the restraints as "
                       "information"),
        "geometry": P("auto", "count each lattice's crystal model as an estimate in sigma "
                      "(profile out the families refine_geometry refined: "
                      "spread_tools.refine.geometry_uncertainty); auto: when every dataset was "
                      "written by refine_geometry; on: also otherwise (refine_geometry's default "
                      "families); off: the crystal models are taken as exact",
                      choices=("auto", "on", "off")),
    },
    "lattice": {
        "min_shoeboxes": P(3, "drop lattices with fewer usable shoeboxes (with a warning; "
                           "counted in the result)"),
        "ln_G_sigma": P(2.0, "sigma of the weak Gaussian prior on ln G of every lattice, about "
                        "the median ln G fitted at the start curves (None: no prior)",
                        optional=True),
    },
    "control": P(None, "negative control: permute_miller (the sites' anomalous terms moved to "
                 "randomly permuted Miller indices; must erase the edge) or shuffle_channels "
                 "(each lattice's channel energies shuffled in the f′/f″ lookup; must erase the "
                 "edge) (None: the normal refinement)", type=str,
                 choices=("permute_miller", "shuffle_channels"), optional=True),
    "control_seed": P(1, "random seed of the control's permutations"),
    "backend": P("auto", "pixel-model kernels", choices=("auto", "cpu", "cuda")),
    "pixel_model": {
        "band_rtol": P(DEFAULT_RTOL, "channel band cut: relative tolerance on lambda per pixel (times "
                       "max I / min I over its channels)"),
        "band_floor": P(DEFAULT_FLOOR, "no channel band for a pixel whose weight is below this fraction "
                        "of its shoebox's brightest pixel; band_rtol=0 and band_floor=0 keep the exact "
                        "dense result"),
    },
    "checkpoint": {
        "path": P(None, "checkpoint file (None: <output>.ckpt.h5)", type=str),
        "keep": P(False, "keep the checkpoint after a converged run"),
        "interval_s": P(300.0, "also write a checkpoint inside a macrocycle when this much "
                        "wall time has passed since the last one (a SIGKILL loses at most "
                        "this much work; 0: after every objective evaluation)", units="s"),
    },
}


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
    fp_sigma_posterior: np.ndarray = None
    fdp_sigma_posterior: np.ndarray = None
    uncertainty: str = "posterior"
    geometry_in_sigma: str = ""
    restraint_scales: dict = dataclasses.field(default_factory=dict)
    convergence: dict = dataclasses.field(default_factory=dict)
    dropped: dict = dataclasses.field(default_factory=dict)
    control: str = None
    edge_step: np.ndarray = None
    edge_step_sigma: np.ndarray = None
    edge_window_ev: np.ndarray = None


def _start_curves(cfg, problem):
    """Start curves from a previous result/table, or None for the reference."""
    path = cfg.start.result
    if path is None:
        return None
    from spread_tools.physics.scattering import detect_format, read_table
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
           backend=None, dataset_names=(), cache_name="", stop=None):
    """Run the S1 refinement (collective: call it on every rank).

    Parameters
    ----------
    datasets : list of Dataset
        Read on every rank (each rank then keeps its own lattices).
    cache : SFCache
    cfg : Config
        Effective parameters (schema :data:`REFINE_SCHEMA`).
    comm : Comm, optional
        Default :func:`spread_tools.refine.mpi.get_comm`.
    checkpoint : str or Path, optional
        Checkpoint file (rank 0), written after every macrocycle and, inside a
        macrocycle, every ``checkpoint.interval_s`` seconds of wall time.
    resume : bool
        Continue from ``checkpoint`` when it exists (refused when it was written
        for other data or another configuration); the result is the same as that of
        an uninterrupted run, bit for bit on the same machine and number of ranks.
    log : callable, optional
        Receives log lines (rank 0 only).
    quiet : bool
        No progress bar.
    backend : str, optional
        Overrides ``cfg.backend``.
    dataset_names, cache_name : for the result's metadata.
    stop : spread_tools.refine.checkpoint.StopSignals, optional
        When it reports a signal (rank 0), the refinement writes a checkpoint at the
        next evaluation boundary and raises
        :class:`~spread_tools.refine.checkpoint.Interrupted` (the other ranks return
        ``None``).

    Returns
    -------
    RefineResult or None
        The result on rank 0, ``None`` on the other ranks.
    """
    from spread_tools.progress import progress
    from spread_tools.refine.controls import apply_control
    _check_settings(cfg)
    comm = comm or get_comm()
    root = comm.rank == 0
    say = (log or (lambda s: None)) if root else (lambda s: None)
    t_start = time.perf_counter()
    check_optimizer_config(cfg)
    datasets, cache = apply_control(datasets, cache, cfg.control, cfg.control_seed)
    if cfg.control is not None:
        say(f"control {cfg.control} (seed {cfg.control_seed}): the edge must vanish")
    prepared = prepare_data(datasets, cache, cfg.shoebox.min_pixels, cfg.lattice.min_shoeboxes)
    for w in prepared.warnings:
        say(f"warning: {w}")
    problem = make_problem(prepared, cache, cfg, comm, backend=backend)
    problem.geometry_profile = geometry_profile_for(datasets, prepared.ds, cfg.uncertainty.geometry)
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
                         prepared, dataset_names, cache_name, stop)
    finally:
        drv.stop()


_REFUSED_OBJECTIVE = 1e300


def _check_settings(cfg):
    """InputError for optimizer, checkpoint and lattice settings that cannot work (one line each)."""
    o = cfg.optimizer
    for key, v in (("iterations", o.iterations), ("max_macrocycles", o.max_macrocycles),
                   ("memory", o.memory)):
        if v < 1:
            raise InputError(f"parameter optimizer.{key}: must be at least 1, got {v}")
    if not (o.gtol > 0 and np.isfinite(o.gtol)):
        raise InputError(f"parameter optimizer.gtol: must be a positive number, got {o.gtol:g}")
    if not cfg.checkpoint.interval_s >= 0:
        raise InputError(f"parameter checkpoint.interval_s: must be >= 0 s, got "
                         f"{cfg.checkpoint.interval_s}")
    if cfg.lattice.min_shoeboxes < 1:
        raise InputError(f"parameter lattice.min_shoeboxes: must be at least 1, got "
                         f"{cfg.lattice.min_shoeboxes}")
    sg = cfg.lattice.ln_G_sigma
    if sg is not None and not (sg > 0 and np.isfinite(sg)):
        raise InputError(f"parameter lattice.ln_G_sigma: must be positive (or None: no prior), "
                         f"got {sg:g}")
    ss = cfg.shoebox.slope_sigma
    if ss is not None and not (ss > 0 and np.isfinite(ss)):
        raise InputError(f"parameter shoebox.slope_sigma: must be positive (or None: no prior), "
                         f"got {ss:g}")
    if cfg.shoebox.min_pixels < 1:
        raise InputError(f"parameter shoebox.min_pixels: must be at least 1, got {cfg.shoebox.min_pixels}")


#: kept for callers of the former name
check_optimizer_config = _check_settings


def _projected(gz, z, zlo, zhi):
    """Gradient with the components that push out of an active bound set to 0."""
    out = gz.copy()
    out[(z <= zlo) & (gz > 0)] = 0.0
    out[(z >= zhi) & (gz < 0)] = 0.0
    return out


def _is_finite(f, g):
    """True when the objective and every gradient component are finite numbers."""
    return bool(np.isfinite(f)) and bool(np.all(np.isfinite(g)))


CONVERGENCE_KEYS = ("objective_start", "objective_end", "local_fit_drop", "gradient_max",
                    "iterations", "evaluations", "lbfgs_status", "time_s")


def _z_bounds(pre, x_lo, x_hi, n_glob):
    z_lo = np.full(len(x_lo), -np.inf)
    z_hi = np.full(len(x_hi), np.inf)
    z_lo[n_glob:] = x_lo[n_glob:] / pre.s
    z_hi[n_glob:] = x_hi[n_glob:] / pre.s
    return z_lo, z_hi


def _at_bounds(p, x, x_lo, x_hi):
    """Short text naming the parameters that sit on a bound ('' when none)."""
    on = (x <= x_lo) | (x >= x_hi)
    ng, nl = p.n_glob, p.n_lat
    n_g = int(on[ng:ng + nl].sum())
    b = x[ng + nl:].reshape(-1, 3)
    on_b = on[ng + nl:].reshape(-1, 3)
    empty = int(np.sum(on_b[:, 0] & (b[:, 0] <= x_lo[ng + nl])))
    other = int(on_b.sum()) - empty
    parts = ([f"{n_g} ln G"] if n_g else []) + \
        ([f"{empty} shoebox background levels at the lower bound (shoeboxes without photons to "
          f"speak of)"] if empty else []) + ([f"{other} other background parameters"] if other else [])
    return ", ".join(parts)


def _optimize(problem, drv, cfg, curves, checkpoint, resume, say, quiet, progress, prepared,
              dataset_names, cache_name, stop=None):
    p = problem
    ck = Checkpointer(checkpoint, "s1", answer_config(cfg), s1_fingerprint(prepared, p.cache),
                      interval_s=cfg.checkpoint.interval_s, stop=stop)
    history = {"objective": [], "gradient_norm": [], "time_s": [], "macrocycle": []}
    conv = {k: [] for k in CONVERGENCE_KEYS}
    inner = None
    if resume and ck.exists():
        state = s1_from_checkpoint(ck.load(), p.n_x, checkpoint)
        drv.start(curves)          # collective; sets the ln G prior's centre (x is the checkpoint's)
        x, history, macro = state["x"], state["history"], state["macrocycle"]
        history.setdefault("macrocycle", [])
        conv = {k: list(state["convergence"].get(k, [])) for k in CONVERGENCE_KEYS}
        done, message, inner = state["converged"], state["message"], state["inner"]
        drv.n_eval = state["n_evaluations"]
        where = f"macrocycle {macro} done" + (
            f", {len(history['objective'])} iterations in all" if inner is not None else "")
        say(f"resuming from {checkpoint}: {where}")
    else:
        if resume:
            say(f"no checkpoint {checkpoint}: starting from the beginning")
        x = drv.start(curves)
        macro = 0
        done = False
        message = ""
    mu = float(p.lnG_mu)
    prior = p.lnG_prior()
    say("ln G prior: " + (f"centre {mu:.4f} (median of the start fit), sigma {prior[1]:g}"
                           if prior is not None else "off") +
        f"; bounds |g - centre| <= {BOUND_LN_G:g}, |b0| <= {BOUND_B0:g}, |b1|,|b2| <= {BOUND_SLOPE:g}")
    t0 = time.perf_counter() - (history["time_s"][-1] if history["time_s"] else 0.0)
    gtol = float(cfg.optimizer.gtol)
    last = {}
    x_lo, x_hi = p.local_bounds()
    x = np.clip(x, x_lo, x_hi)

    def fun(z, pre):
        xx = pre.to_x(z)
        f, g = drv.call(_CMD_EVAL, xx)
        if not _is_finite(f, g):
            # cannot happen inside the bounds; refused rather than fatal if it ever does
            return _REFUSED_OBJECTIVE, np.zeros_like(z)
        last["f"], last["g"], last["z"] = f, g, z
        return f, pre.grad_z(g)

    def after_iteration(pre, z_lo, z_hi, macrocycle):
        gn = float(np.max(np.abs(_projected(pre.grad_z(last["g"]), last["z"], z_lo, z_hi))))
        history["objective"].append(float(last["f"]))
        history["gradient_norm"].append(gn)
        history["time_s"].append(time.perf_counter() - t0)
        history["macrocycle"].append(float(macrocycle))
        it = len(history["objective"])
        bar.update(1)
        say(f"iter {it:5d}  objective {last['f']:.10e}  |grad|max {gn:.3e} (sigma units)  "
            f"time {history['time_s'][-1]:.2f} s")

    bar = progress(total=None, desc="S1", quiet=quiet, unit="it")
    gmax = float("nan")
    while not done and macro < cfg.optimizer.max_macrocycles:
        if inner is not None:                      # resume inside a macrocycle, exactly
            hd = (np.asarray(inner["H_glob"]), np.asarray(inner["diag_loc"]))
            f_before, f_loc, n_eval0 = inner["f_before"], inner["f_loc"], inner["n_eval0"]
            t_mc = time.perf_counter() - inner["elapsed_s"]
            run = LbfgsbRun.from_state(inner["lbfgs"])
            if np.isfinite(inner["last_f"]):
                last["f"], last["g"], last["z"] = inner["last_f"], inner["last_g"], inner["last_z"]
            inner = None
        else:
            # exact local fit (scales, backgrounds) at the current curves, kept if it helps
            t_mc = time.perf_counter()
            n_eval0 = drv.n_eval
            f_before, _ = drv.call(_CMD_EVAL, x)
            x_loc = np.clip(drv.call(_CMD_LOCALS, x), x_lo, x_hi)
            f_loc, _ = drv.call(_CMD_EVAL, x_loc)
            if f_loc <= f_before:
                x = x_loc
            else:
                f_loc = f_before
            hd = drv.call(_CMD_DIAG, x)
            run = None
        pre = _Preconditioner(*hd, p.n_glob)
        z_lo, z_hi = _z_bounds(pre, x_lo, x_hi, p.n_glob)
        if run is None:
            run = LbfgsbRun(np.clip(pre.to_z(x), z_lo, z_hi), maxiter=int(cfg.optimizer.iterations),
                            maxcor=int(cfg.optimizer.memory), gtol=gtol, ftol=1e-15, maxls=40,
                            lower=z_lo, upper=z_hi)

        def state_now(_pre=pre, _hd=hd, _run=run, _f_before=f_before, _f_loc=f_loc,
                      _n_eval0=n_eval0, _t_mc=t_mc):
            return s1_state(macro, False, message, _pre.to_x(_run.x), history, p.site_names,
                            drv.n_eval, convergence=conv,
                            inner={"H_glob": _hd[0], "diag_loc": _hd[1], "f_before": _f_before,
                                   "f_loc": _f_loc, "n_eval0": _n_eval0,
                                   "elapsed_s": time.perf_counter() - _t_mc,
                                   "last_f": last.get("f", np.nan),
                                   "last_g": last.get("g", np.zeros(0)),
                                   "last_z": last.get("z", np.zeros(0)),
                                   "lbfgs": _run.state()})

        while not run.done:
            # a consistent point: everything needed to continue is in run, pre, history
            ck.maybe_save(state_now, detail=f"macrocycle {macro + 1}, "
                                            f"{len(history['objective'])} iterations in all")
            if run.wants_evaluation:
                run.give(*fun(run.x_requested, pre))
            run.advance()
            if run.new_iteration:
                after_iteration(pre, z_lo, z_hi, macro + 1)
        z = np.clip(run.x, z_lo, z_hi)
        x = pre.to_x(z)
        macro += 1
        f_after, g_after = drv.call(_CMD_EVAL, x)
        gmax = float(np.max(np.abs(_projected(pre.grad_z(g_after), z, z_lo, z_hi))))
        say(f"macrocycle {macro}: objective {f_before:.10e} -> {f_after:.10e} (local fit "
            f"{f_before - f_loc:.4g}), |grad|max {gmax:.3e}, {run.nit} iterations ({run.message})")
        for k, v in (("objective_start", f_before), ("objective_end", f_after),
                     ("local_fit_drop", f_before - f_loc), ("gradient_max", gmax),
                     ("iterations", run.nit), ("evaluations", drv.n_eval - n_eval0),
                     ("lbfgs_status", run.status), ("time_s", time.perf_counter() - t_mc)):
            conv[k].append(float(v))
        if gmax <= gtol:
            done, message = True, f"converged: |grad|max {gmax:.3e} <= gtol {gtol:g}"
        elif not f_after < f_before - 1e-12 * max(1.0, abs(f_before)):
            done, message = True, (f"stopped: objective no longer decreases (round-off), "
                                   f"|grad|max {gmax:.3e}")
        else:
            message = f"not converged after {macro} macrocycles: |grad|max {gmax:.3e} > gtol {gtol:g}"
        if checkpoint is not None:
            ck.save(s1_state(macro, done, message, x, history, p.site_names, drv.n_eval,
                             convergence=conv))
    # a stop that came during the last macrocycle's end: the checkpoint is current
    ck.raise_if_stopped(f"macrocycle {macro} done")
    bar.close()
    say(message)
    at_bound = _at_bounds(p, x, x_lo, x_hi)
    if at_bound:
        prepared.warnings.append(f"parameters on a bound at the end: {at_bound}")
        say(f"warning: parameters on a bound at the end: {at_bound}")
    f_final, _ = drv.call(_CMD_EVAL, x)
    t_unc = time.perf_counter()
    F = drv.call(_CMD_FISHER, x)
    geometry_in_sigma = ""
    if p.geometry_profile is not None:
        t_geo = time.perf_counter()
        dF, worst = drv.call(_CMD_GEOMETRY, x)
        F = F - dF
        geometry_in_sigma = p.geometry_profile.describe()
        say(f"crystal models profiled out of sigma (uncertainty.geometry): {geometry_in_sigma}; "
            f"pixel models agree to {worst:.1e}; {time.perf_counter() - t_geo:.1f} s")
    cov, cov_post, calibration = reported_covariance(p, x, F, cfg.uncertainty.calibrate)
    uncertainty = "calibrated" if cov is not cov_post else "posterior"
    if cov is not cov_post:
        scales = ", ".join(f"{name} x{t:.2f}" for name, t, scalable in
                           zip(calibration["names"], calibration["tau"], calibration["scalable"]) if scalable)
        say(f"restraint bias included in sigma (uncertainty.calibrate): the data ask for "
            f"restraint sigmas {scales or '(none scaled)'}; largest pull "
            f"{float(np.max(np.abs(calibration['pull']), initial=0.0)):.3f} e-")
    say(f"uncertainties from the profiled Fisher information in {time.perf_counter() - t_unc:.2f} s")
    _, _, g, b = p.split(x)
    fp, fdp, cov, fp_sigma, fdp_sigma, edges, edge_s = curve_uncertainties(p, x, cov)
    fp_sigma_post, fdp_sigma_post = curve_uncertainties(p, x, cov_post)[3:5]
    steps, step_s = _edge_steps(p, fdp, cov)
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
        warnings=list(prepared.warnings), x=x, fp_sigma_posterior=fp_sigma_post,
        fdp_sigma_posterior=fdp_sigma_post,
        uncertainty=uncertainty, geometry_in_sigma=geometry_in_sigma,
        restraint_scales=dict(zip(calibration["names"], calibration["tau"])),
        convergence={k: np.asarray(v, dtype=np.float64) for k, v in conv.items()},
        dropped=dict(prepared.dropped), control=cfg.control,
        edge_step=np.array(steps), edge_step_sigma=np.array(step_s),
        edge_window_ev=edge_windows(p.grid_ev, reference_edges(p)))


def reported_covariance(p, x, F, calibrate):
    """Covariances of S1's global parameters from their information at the solution.

    Parameters
    ----------
    p : S1Problem or KKConstrainedProblem
    x : array (n_x,)
    F : array (n_glob, n_glob)
        Information with the local parameters profiled out, restraints' Hessian included.
    calibrate : bool
        ``uncertainty.calibrate``: add the restraints' bias (:mod:`spread_tools.refine.calibration`).

    Returns
    -------
    cov : the reported covariance (``cov_post`` itself when not calibrated)
    cov_post : (F)⁻¹
    calibration : dict
        ``tau``, ``pull``, ``names``, ``scalable`` of the restraint terms (empty without calibration).
    """
    cov_post = _invert(F)
    calibration = {"tau": [], "pull": np.zeros(p.n_glob), "names": [], "scalable": []}
    if not (calibrate and p.restraints.terms):
        return cov_post, cov_post, calibration
    parts = restraint_parts(p, x)
    calibration = calibrated_covariance(F - p.restraint_hessian(x), parts, x[:p.n_glob], cov_post)
    calibration["names"] = [q.name for q in parts]
    calibration["scalable"] = [q.scalable for q in parts]
    return calibration["covariance"], cov_post, calibration


def reference_edges(p):
    """Each site's edge in its reference table on the grid (eV; NaN where the table has none in range)."""
    from spread_tools.refine.restraints import reference_edges_on_grid
    return reference_edges_on_grid(p.grid_ev, p.site_elements, p.cfg.reference)


def edge_windows(grid_ev, reference_edges_ev):
    """The pre-edge upper and post-edge lower ends (n_site, 2) of :func:`edge_position` (eV).

    From each site's reference edge (:data:`EDGE_PRE_GAP_EV` below, :data:`EDGE_POST_GAP_EV`
    above), clipped to the grid; the grid's end points where a site has no reference edge.
    """
    e = np.asarray(grid_ev, dtype=np.float64)
    out = np.empty((len(reference_edges_ev), 2))
    for s, e0 in enumerate(reference_edges_ev):
        if np.isfinite(e0):
            out[s] = max(e0 - EDGE_PRE_GAP_EV, e[0]), min(e0 + EDGE_POST_GAP_EV, e[-1])
        else:
            out[s] = e[0], e[-1]
    return out


def curve_uncertainties(p, x, cov):
    """f′, f″ on the result grid with their covariance, σ and each site's edge.

    Returns
    -------
    fp, fdp : (n_ref, n_grid)
    cov_curves : covariance of (fp site-major, then fdp site-major)
    fp_sigma, fdp_sigma : (n_ref, n_grid)
    edges, edge_sigmas : lists (n_ref,) of :func:`~spread_tools.refine.uncertainty.edge_position`
        with the windows of :func:`edge_windows`
    """
    fp, fdp, c = p.curves_and_covariance(x, cov)
    n = p.n_ref * p.n_grid
    d = np.diag(c)
    sg = np.sqrt(np.where(d >= 0, d, np.nan))
    windows = edge_windows(p.grid_ev, reference_edges(p))
    edges, edge_s = [], []
    for s in range(p.n_ref):
        idx = n + s * p.n_grid + np.arange(p.n_grid)
        e, es = edge_position(p.grid_ev, fdp[s], c[np.ix_(idx, idx)], *windows[s])
        edges.append(e)
        edge_s.append(es)
    return fp, fdp, c, sg[:n].reshape(p.n_ref, p.n_grid), sg[n:].reshape(p.n_ref, p.n_grid), edges, edge_s


def edge_shifts(result):
    """Edge shift of every site against the first one, with σ from the joint covariance.

    Parameters
    ----------
    result : RefineResult

    Returns
    -------
    list of (name, first_name, shift_ev, sigma_ev)
        ``shift_ev`` = edge of ``name`` − edge of ``first_name``
        (:func:`~spread_tools.refine.uncertainty.edge_shift`, the windows of the result).
    """
    from spread_tools.refine.uncertainty import edge_shift
    n_site, n_grid = np.shape(result.fdp)
    windows = result.edge_window_ev if result.edge_window_ev is not None else \
        np.tile([result.energy_ev[0], result.energy_ev[-1]], (n_site, 1))
    off = n_site * n_grid
    out = []
    for s in range(1, n_site):
        idx = np.concatenate([off + s * n_grid + np.arange(n_grid), off + np.arange(n_grid)])
        shift, sig = edge_shift(result.energy_ev, result.fdp[s], result.fdp[0],
                                np.asarray(result.covariance)[np.ix_(idx, idx)], windows[s], windows[0])
        out.append((result.site_names[s], result.site_names[0], shift, sig))
    return out


def _edge_steps(p, fdp, cov):
    """Fitted f'' edge step of every site about its reference table's edge, with sigma."""
    from spread_tools.refine.controls import edge_step
    n = p.n_ref * p.n_grid
    steps, sig = [], []
    for s, e0 in enumerate(reference_edges(p)):
        idx = n + s * p.n_grid + np.arange(p.n_grid)
        st, ss = edge_step(p.grid_ev, fdp[s], cov[np.ix_(idx, idx)], e0) if np.isfinite(e0) else \
            (float("nan"), float("nan"))
        steps.append(st)
        sig.append(ss)
    return steps, sig


# --------------------------------------------------------------------------- result IO

def write_result(path, result, overwrite=False):
    """Write a result file (``docs/formats.md``) and its CSV ``<output>.csv`` as one unit.

    Both are written to temporary files and renamed into place together at the end
    (:func:`spread_tools.io.h5io.atomic_files`): a failure leaves neither changed.

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
    import h5py

    from spread_tools.io.h5io import atomic_files, init_h5, write_strings
    path = Path(path)
    csv_path = path.with_suffix(".csv")
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
    with atomic_files([path, csv_path], overwrite, [".h5.tmp", ".tmp"]) as (tmp_h5, tmp_csv):
        with h5py.File(tmp_h5, "w") as h5:
            init_h5(h5, RESULT_FORMAT, RESULT_VERSION)
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
            for k in ("fp_sigma_posterior", "fdp_sigma_posterior"):
                if getattr(result, k, None) is not None:
                    h5.create_dataset(k, data=np.asarray(getattr(result, k), dtype=np.float64))
            h5.attrs["uncertainty"] = str(getattr(result, "uncertainty", "posterior"))
            h5.attrs["geometry_in_sigma"] = str(getattr(result, "geometry_in_sigma", "") or "")
            h5.attrs["restraint_scales"] = json.dumps(getattr(result, "restraint_scales", {}) or {})
            for k, v in (result.convergence or {}).items():
                h5.create_dataset(f"convergence/{k}", data=np.asarray(v, dtype=np.float64))
            for k in ("edge_step", "edge_step_sigma", "edge_window_ev"):
                if getattr(result, k, None) is not None:
                    h5.create_dataset(k, data=np.asarray(getattr(result, k), dtype=np.float64))
            h5.attrs["dropped"] = json.dumps(result.dropped or {})
            h5.attrs["control"] = str(result.control or "")
        with open(tmp_csv, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
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
    from spread_tools.io.h5io import open_checked, read_array
    out = {"path": str(path)}
    with open_checked(path, RESULT_FORMAT, RESULT_VERSION) as h5:
        out["energy_ev"] = read_array(h5, "energy_ev", np.float64)
        out["site_names"] = [str(s) for s in np.atleast_1d(read_array(h5, "site_names"))]
        out["site_elements"] = [str(s) for s in np.atleast_1d(read_array(h5, "site_elements"))] \
            if "site_elements" in h5 else [""] * len(out["site_names"])
        n = (len(out["site_names"]), len(out["energy_ev"]))
        for k in ("fp", "fdp"):
            out[k] = read_array(h5, k, np.float64, shape=n)
        for k in ("fp_sigma", "fdp_sigma", "fp_sigma_posterior", "fdp_sigma_posterior"):
            out[k] = read_array(h5, k, np.float64, shape=n) if k in h5 else np.full(n, np.nan)
        for k in ("edge_ev", "edge_sigma_ev", "lattice_G", "shoebox_background", "covariance"):
            if k in h5:
                out[k] = read_array(h5, k, np.float64)
        out["history"] = {k: read_array(h5, f"history/{k}", np.float64)
                          for k in ("objective", "gradient_norm", "time_s", "macrocycle")
                          if f"history/{k}" in h5}
        out["convergence"] = {k: read_array(h5, f"convergence/{k}", np.float64)
                              for k in CONVERGENCE_KEYS if f"convergence/{k}" in h5}
        for k in ("edge_step", "edge_step_sigma", "edge_window_ev"):
            if k in h5:
                out[k] = read_array(h5, k, np.float64)
        try:
            out["dropped"] = json.loads(str(h5.attrs.get("dropped", "{}")))
        except json.JSONDecodeError:
            out["dropped"] = {}
        try:
            out["config"] = json.loads(str(h5.attrs.get("config", "{}")))
        except json.JSONDecodeError:
            out["config"] = {}
        for k in ("converged", "message", "objective", "datasets", "sf_cache", "n_ranks",
                  "uncertainty", "geometry_in_sigma", "restraint_scales", "control"):
            if k in h5.attrs:
                v = h5.attrs[k]
                out[k] = v.decode() if isinstance(v, bytes) else v
    return out


def log_to_stderr(line):
    """Default log sink of the script (rank 0): one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)
