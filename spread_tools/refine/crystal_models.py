"""``refine_geometry``: per-lattice crystal models before S1, so that S1 works on indexed data.

For every lattice of a dataset the Poisson likelihood of its shoebox pixels is maximised
with respect to its orientation (three small rotations), its unit cell (the constants its
crystal system allows, restrained to the dataset's cell), its mosaic domain size and
spread, its scale G and the background of every shoebox, with f′/f″ of the sites held at
reference curves or at a previous ``refine_fdp`` result (:mod:`spread_tools.refine.lattice_fit`
holds the objective and the solver). A global energy offset of the spectrometer (and
optionally one per shot) is refined with them: it is shared by all lattices and updated
between per-lattice fits by a profiled Newton step summed over lattices (and MPI ranks).

Macrocycles: a per-lattice fit of every lattice, then the offset step; the lattices follow
the step by their linear response (:meth:`~spread_tools.refine.lattice_fit.LatticeProblem.follow_offset`)
and the next fit starts there, from the step's own evaluation. When the step moved the
offset by less than ``optimizer.offset_tol_ev`` one last ("final") fit is made of only the
lattices that had not converged: a converged lattice that followed so small a step is off
its optimum by the second order of the step only (at LY99 size the whole objective then
changes by ~0.1 over 60M pixels). Which lattices are refitted depends only on their own
convergence flags, which the checkpoint holds, so a resumed run and any number of MPI
ranks give the same answer. Every macrocycle's entry of the history (``macrocycles`` of the
result, the checkpoint and ``geometry_refinement/history_json``) records its wall time
(``fit_s``, ``offset_s``, of the rank-0 process and of this run only when resumed), the
lattices refitted, their LM iterations and the evaluations of the offset step.

An energy offset and a common scale of all cells are the same thing for the diffraction
geometry (scaling every q and 1/λ alike leaves every spot in place), so the offset is
only determined through the cell restraint (the dataset cell is the mean of the crystal
cells) and, weakly, through the edge of the held f″: refining the offset with the cells
free and unrestrained is refused.

Quality control: for every lattice the spots, NLL before and after, rotation change, the
refined cell, N, mosaic spread, G and the centroid RMSD between model and observed spots
before and after; lattices with too few shoeboxes, no convergence, a cell far from the
dataset cell or a large rotation are flagged and left out of the refined dataset.

MPI: lattices are split over the ranks in blocks of about equal pixel counts; a lattice's
refinement does not depend on the others but through δ, whose sums run over lattices in
index order on rank 0, so the answer does not depend on the number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from spread_tools.config import P
from spread_tools.errors import InputError
from spread_tools.model.crystal_params import (CELL_NAMES, CellParameterization, domain_matrices,
                                               rotation_angle_deg, split_orientation)
from spread_tools.model.kernels.shoebox_sums import shoebox_moments
from spread_tools.model.lattice_batch import DEFAULT_CUT, LatticeBatch
from spread_tools.refine.lattice_fit import FitSettings, LatticeProblem
from spread_tools.refine.mpi import get_comm, rank_blocks
from spread_tools.refine.site_curves import SiteCurves, intensities_with_slope

__all__ = ["GEOMETRY_SCHEMA", "QC_COLUMNS", "GeometryResult", "refine_geometry", "fit_settings",
           "lattice_table_csv", "refined_dataset"]

GEOMETRY_SCHEMA = {
    "refine": {
        "rotation": P(True, "refine the orientation (three small rotations about the lab axes)"),
        "cell": P(True, "refine the cell constants the crystal system allows"),
        "domain_size": P("isotropic", "refine the mosaic domain size: off, isotropic (one factor on "
                                      "N_a, N_b, N_c) or anisotropic",
                         choices=("off", "isotropic", "anisotropic")),
        "mosaic_spread": P(True, "refine the mosaic spread (needs n_domains >= 2)"),
        "energy_offset": P("global", "refine the spectrometer's energy offset: off, global (one for "
                                     "the dataset) or per_lattice (global plus one per shot)",
                           choices=("off", "global", "per_lattice")),
    },
    "cell": {
        "restrain": P(True, "restrain the cell constants to the dataset cell"),
        "sigma_fraction": P(0.002, "sigma of the cell edges' restraint as a fraction of the edge "
                                   "(the crystal-to-crystal spread; 0.2 %)"),
        "sigma_edges_a": P(None, "sigma of the restraint on a, b, c in Å instead (the reference "
                                 "workflow's joint refinement: 0.04,0.04,0.15)", units="Å",
                           type=list, item_type=float),
        "sigma_angles_deg": P(0.1, "sigma of the restraint on the free cell angles", units="deg"),
    },
    "domain_size": {
        "min_cells": P(3.0, "lower bound of N_a, N_b, N_c", units="cells"),
        "max_cells": P(2000.0, "upper bound of N_a, N_b, N_c", units="cells"),
        "log_sigma": P(0.3, "weak prior: sigma of ln N about the dataset's value (None: none)",
                       type=float, optional=True),
    },
    "mosaic": {
        "min_deg": P(0.001, "lower bound of the mosaic spread", units="deg"),
        "max_deg": P(2.0, "upper bound of the mosaic spread", units="deg"),
        "log_sigma": P(0.3, "weak prior: sigma of ln(mosaic spread) about the dataset's value "
                            "(None: none)", type=float, optional=True),
    },
    "energy_offset": {
        "start_ev": P(0.0, "start value of the global offset (true photon energy minus the "
                           "dataset's channel energy)", units="eV"),
        "per_lattice_sigma_ev": P(0.5, "sigma of the per-shot offsets about the global one "
                                       "(energy_offset=per_lattice)", units="eV"),
        "moves_intensity": P(False, "let the offset also move the energies at which the held f'/f'' "
                                    "enter the intensities (off: the offset comes from the geometry "
                                    "alone, so the held curves' edge cannot pull it)"),
    },
    "curves": {
        "reference": P("chantler", "f'/f'' of the sites without a table or result",
                       choices=("chantler", "cromer_liberman")),
        "result": P(None, "hold f'/f'' at a refine_fdp result (.h5/.csv) for its sites", type=str),
        "tables": P([], "SITE=TABLE entries (E f' f'' text, Henke .nff, CSV, result) for sites",
                    type=list, item_type=str),
    },
    "lattice": {
        "min_shoeboxes": P(5, "lattices with fewer usable shoeboxes are left out (flagged)"),
    },
    "shoebox": {
        "min_pixels": P(4, "shoeboxes with fewer unmasked pixels are not used"),
    },
    "optimizer": {
        "max_iterations": P(40, "Levenberg-Marquardt iterations per lattice and macrocycle"),
        "tol": P(1e-3, "convergence: the Newton decrement g'F^-1 g of a lattice (twice the NLL "
                       "change the full step predicts)"),
        "max_macrocycles": P(8, "per-lattice fits alternated with the global energy-offset step"),
        "offset_tol_ev": P(0.01, "stop the macrocycles when the offset moves less", units="eV"),
    },
    "qc": {
        "max_cell_change_fraction": P(0.01, "flag lattices whose cell edge moved further from the "
                                            "dataset cell (fraction)"),
        "max_rotation_change_deg": P(0.5, "flag lattices whose orientation moved further", units="deg"),
    },
    "backend": P("auto", "kernels", choices=("auto", "cpu", "cuda")),
    "oversample": P(1, "sub-pixels per pixel edge"),
    "checkpoint": {
        "path": P(None, "checkpoint file (None: <output stem>.ckpt.h5)", type=str),
        "interval_s": P(300.0, "also write the checkpoint this often during the per-lattice fits "
                               "(0: after every iteration)", units="s"),
        "keep": P(False, "keep the checkpoint after a finished run"),
    },
}

#: Columns of the per-lattice table (CSV and ``geometry_refinement/`` in the output).
QC_COLUMNS = ("lattice", "identifier", "status", "n_shoeboxes", "converged", "iterations",
              "nll_start", "nll_final", "rotation_change_deg", "rotation_sigma_deg",
              "a", "b", "c", "alpha", "beta", "gamma", "N_a", "N_b", "N_c", "mosaic_deg",
              "energy_offset_ev", "G", "centroid_rmsd_start_px", "centroid_rmsd_final_px",
              "n_centroid_spots")


@dataclasses.dataclass
class GeometryResult:
    """What :func:`refine_geometry` returns on rank 0 (``None`` elsewhere)."""

    table: dict
    kept: np.ndarray                 # original lattice indices kept in the refined dataset
    A: np.ndarray                    # (n_lat_input, 3, 3) refined (NaN for lattices not refined)
    domain_size_cells: np.ndarray    # (n_lat_input, 3)
    mosaic_spread_deg: np.ndarray    # (n_lat_input,)
    energy_offset_ev: float
    energy_offset_sigma_ev: float    # from the profiled curvature (NaN when not refined)
    lattice_offset_ev: np.ndarray    # (n_lat_input,) per-shot offsets on top of the global one
    macrocycles: list
    messages: list
    time_s: float


def fit_settings(cfg, param, ds_cell, n_domains):
    """:class:`~spread_tools.refine.lattice_fit.FitSettings` from the parameters.

    Raises
    ------
    InputError
        σ ≤ 0, bounds that make no sense, mosaic refinement with a single domain, or an
        energy offset that the cell (free and unrestrained) would absorb.
    """
    r = cfg.refine
    target = param.free(ds_cell)
    sigma = None
    if r.cell and cfg.cell.restrain:
        if cfg.cell.sigma_edges_a is not None:
            if len(cfg.cell.sigma_edges_a) != 3:
                raise InputError("parameter cell.sigma_edges_a: needs three numbers (a, b, c) in Å")
            edges = np.asarray(cfg.cell.sigma_edges_a, dtype=np.float64)
        else:
            if not cfg.cell.sigma_fraction > 0:
                raise InputError(f"parameter cell.sigma_fraction: must be positive, got "
                                 f"{cfg.cell.sigma_fraction}")
            edges = cfg.cell.sigma_fraction * np.asarray(ds_cell[:3], dtype=np.float64)
        if np.any(edges <= 0) or not cfg.cell.sigma_angles_deg > 0:
            raise InputError("parameter cell.sigma_edges_a/sigma_angles_deg: every restraint sigma "
                             "must be positive")
        per_constant = np.concatenate([edges, np.full(3, cfg.cell.sigma_angles_deg)])
        sigma = per_constant[param.cell_index]
    if r.energy_offset != "off" and r.cell and sigma is None:
        raise InputError("parameter refine.energy_offset: with the cells refined and unrestrained "
                         "the energy offset and the cell scale are one parameter; set "
                         "cell.restrain=True, refine.cell=False or refine.energy_offset=off")
    if r.mosaic_spread and np.any(np.asarray(n_domains) < 2):
        raise InputError("parameter refine.mosaic_spread: the dataset has lattices with one mosaic "
                         "domain (no spread to refine); set refine.mosaic_spread=False")
    opt = cfg.optimizer
    for key, v in (("optimizer.max_iterations", opt.max_iterations),
                   ("optimizer.max_macrocycles", opt.max_macrocycles)):
        if v < 1:
            raise InputError(f"parameter {key}: must be at least 1, got {v}")
    if not opt.tol > 0 or not opt.offset_tol_ev > 0:
        raise InputError("parameter optimizer.tol/offset_tol_ev: must be positive")
    return FitSettings(
        rotation=r.rotation, cell=r.cell, domain_size=r.domain_size, mosaic=r.mosaic_spread,
        offset=r.energy_offset, cell_sigma=sigma, cell_target=target,
        offset_sigma_ev=cfg.energy_offset.per_lattice_sigma_ev,
        mosaic_log_sigma=cfg.mosaic.log_sigma, domain_size_log_sigma=cfg.domain_size.log_sigma,
        domain_size_bounds=(cfg.domain_size.min_cells, cfg.domain_size.max_cells),
        mosaic_bounds_deg=(cfg.mosaic.min_deg, cfg.mosaic.max_deg),
        max_iterations=opt.max_iterations, tol=opt.tol, max_macrocycles=opt.max_macrocycles,
        offset_tol_ev=opt.offset_tol_ev, cut=DEFAULT_CUT,
        offset_moves_intensity=cfg.energy_offset.moves_intensity).check()


def _site_curves(cfg, cache):
    from spread_tools.physics.scattering import read_table
    tables = {}
    for spec in cfg.curves.tables:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise InputError(f"parameter curves.tables: {spec!r} is not SITE=TABLE")
        tables[name.strip()] = read_table(path.strip())
    return SiteCurves(cache, tables=tables, result=cfg.curves.result, reference=cfg.curves.reference)


class _Intensity:
    """I and ∂I/∂E of every shoebox's reflection at its lattice's photon energies."""

    def __init__(self, cache, curves, ds):
        self.cache, self.curves = cache, curves
        rows = cache.index_of(ds.sb_miller_index)
        self.uniq, self.inv = np.unique(rows, return_inverse=True)
        self.sb_lat = np.asarray(ds.sb_lattice)

    def __call__(self, energies):
        e = np.asarray(energies)
        if np.all(e == e[:1]):
            I, dI = intensities_with_slope(self.cache, self.curves, self.uniq, e[0])
            return I[self.inv], dI[self.inv]
        I = np.empty((len(self.inv), e.shape[1]))
        dI = np.empty_like(I)
        for j in range(len(e)):
            sbs = np.flatnonzero(self.sb_lat == j)
            u, inv = np.unique(self.uniq[self.inv[sbs]], return_inverse=True)
            a, b = intensities_with_slope(self.cache, self.curves, u, e[j])
            I[sbs], dI[sbs] = a[inv], b[inv]
        return I, dI


def _centroids(ds, ev_model, ev_final):
    """Per shoebox: model spot centroid (from ``ev_model``'s Bragg part), observed centroid of
    counts − background (background of ``ev_final``), and whether the spot is significant."""
    bg = ev_final.lam - ev_final.bragg
    out = {}
    for name, w in (("model", ev_model.bragg), ("observed", np.asarray(ds.counts, np.float64) - bg)):
        mom = shoebox_moments(ds, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = mom[:, 1:] / mom[:, :1]
        out[name + "_total"] = mom[:, 0]
    bg_tot = shoebox_moments(ds, bg)[:, 0]
    out["significant"] = (out["observed_total"] > 3.0 * np.sqrt(np.maximum(bg_tot, 1.0))) & \
        (out["model_total"] > 0)
    return out


def _rmsd_per_lattice(prob, cen_model, cen_obs, sig):
    d2 = np.sum((cen_model - cen_obs) ** 2, axis=1)
    d2 = np.where(sig, d2, 0.0)
    n = prob._per_lattice(sig.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(prob._per_lattice(d2) / n), n


def _lattices(ds, index):
    """``ds.select_lattices(index)``, or ``ds`` itself when that would be the same dataset (all
    lattices in order, shoeboxes grouped by lattice): no copy of every pixel on one rank."""
    index = np.asarray(index, dtype=np.int64)
    if np.array_equal(index, np.arange(ds.n_lattices)) and not np.any(np.diff(ds.sb_lattice) < 0):
        return ds
    return ds.select_lattices(index)


def _ordered_sum(comm, values, counts):
    """Σ over all lattices (in lattice order, whatever the rank split) of per-lattice values."""
    full = comm.concat(np.asarray(values, np.float64), counts)
    total = float(np.sum(full)) if comm.rank == 0 else 0.0
    return float(comm.bcast_array([total], 1)[0])


def refine_geometry(ds, cache, cfg, comm=None, log=None, backend=None, checkpoint=None, resume=False,
                    stop=None):
    """Refine the crystal model of every lattice of a dataset (collective: call on every rank).

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
        Read on every rank.
    cache : spread_tools.structure.cache.SFCache
    cfg : spread_tools.config.Config
        Parameters (:data:`GEOMETRY_SCHEMA`).
    comm : spread_tools.refine.mpi.Comm, optional
    log : callable, optional
        Receives log lines (rank 0).
    backend : str, optional
        Overrides ``cfg.backend``.
    checkpoint : str or Path, optional
        Checkpoint file (written by rank 0) after every per-lattice fit and energy-offset
        step, and every ``checkpoint.interval_s`` seconds and on a stop request within a fit.
    resume : bool
        Continue from ``checkpoint`` when it exists (refused when it was written for other
        data or other answer-changing parameters). The resumed run reaches the answer of an
        uninterrupted one bit for bit, also with another number of ranks.
    stop : spread_tools.refine.checkpoint.StopSignals, optional
        A stop request (SIGTERM, SIGINT) makes the run write a checkpoint and raise
        :class:`~spread_tools.refine.checkpoint.Interrupted`; rank 0's request stops every rank.

    Returns
    -------
    GeometryResult or None
        On rank 0; ``None`` elsewhere.
    """
    from spread_tools.refine.prepare import prepare_data
    t0 = time.perf_counter()
    comm = comm or get_comm()
    root = comm.rank == 0
    say = (log if (log and root) else (lambda s: None))
    empty = np.flatnonzero(np.bincount(ds.sb_lattice, minlength=ds.n_lattices) == 0)
    if len(empty):
        j = int(empty[0])
        raise InputError(f"{ds.path}: lattice {j} ({ds.identifier[j]}) has no shoeboxes ({len(empty)} "
                         f"such lattices): a lattice needs its spots; drop it from the dataset")
    param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
    fs = fit_settings(cfg, param, np.asarray(ds.cell, float), ds.n_domains)
    curves = _site_curves(cfg, cache)
    start = float(cfg.energy_offset.start_ev)
    # the held curves enter at the channel energies (+ start); only an offset that moves the
    # intensities can take them further (so a refine_fdp result over the channels is enough)
    margin = 20.0 if (fs.offset != "off" and fs.offset_moves_intensity) else 0.05
    curves.check_covers(ds.energy_ev[0] + start - margin, ds.energy_ev[-1] + start + margin)
    prep = prepare_data([ds], cache, min_pixels=cfg.shoebox.min_pixels)
    for w in prep.warnings:
        say(f"warning: {w}")
    pds = prep.ds
    n_sb_lat = np.bincount(pds.sb_lattice, minlength=pds.n_lattices)
    candidate = np.flatnonzero(n_sb_lat >= cfg.lattice.min_shoeboxes)
    messages = list(prep.warnings)
    if len(candidate) < pds.n_lattices:
        messages.append(f"left out {pds.n_lattices - len(candidate)} lattices with fewer than "
                        f"{cfg.lattice.min_shoeboxes} usable shoeboxes")
        say(f"warning: {messages[-1]}")
    if len(candidate) == 0:
        raise InputError(f"{ds.path}: no lattice has {cfg.lattice.min_shoeboxes} usable shoeboxes "
                         f"(lattice.min_shoeboxes)")
    cds = _lattices(pds, candidate)
    blocks = rank_blocks(cds, comm.size)
    counts = [b - a for a, b in blocks]
    lo, hi = blocks[comm.rank]
    mine = np.arange(lo, hi)
    rds = _lattices(cds, mine)
    say(f"{ds.path}: {len(candidate)} lattices, {cds.n_shoeboxes} shoeboxes, {cds.n_pixels} pixels on "
        f"{comm.size} rank(s); cell parameters {', '.join(param.names)} ({param.system}); "
        f"refining {_describe(fs)}; curves {'; '.join(curves.describe())}")
    if hi > lo:
        batch = LatticeBatch(rds, backend=backend or cfg.backend, oversample=cfg.oversample, cut=fs.cut)
        prob = LatticeProblem(batch, rds, param, fs, _Intensity(cache, curves, rds))
        U0, p0 = zip(*[split_orientation(rds.A[j], param) for j in range(rds.n_lattices)])
        st = prob.initial_state(np.array(U0), np.array(p0), delta=start)
        ev0 = prob.evaluate(st, want_lam=True)
        st0 = st.copy()
        # the first fit starts from this evaluation (its rows are updated in place); the
        # start's NLL and Bragg part stay for the table
        ev_start = dataclasses.replace(ev0, nll_sb=ev0.nll_sb.copy(), f_lat=ev0.f_lat.copy(),
                                       lam=None, bragg=None)
        ev0 = dataclasses.replace(ev0, grad_sb=None, fisher_sb=None, lam=None)
    ck = _checkpointer(checkpoint if root else None, cfg, ds, cache, stop)
    saved = _load_checkpoint(ck, comm, resume)
    pos = {"mc": 0, "phase": "fit", "final": False, "delta": start, "history": []}
    converged = np.zeros(len(mine), bool)
    iterations = np.zeros(len(mine), np.int64)
    fit_resume = None
    if saved is not None:
        pos = json.loads(saved["attrs"]["position"])
        if hi > lo:
            st, converged, iterations, fit_resume = _unpack_state(prob, st, saved, lo, hi, pos)
            prob.prepare_intensities(st)
        say(f"resuming from {checkpoint}: macrocycle {pos['mc'] + 1}, {pos['phase']} step")
    delta, history = pos["delta"], pos["history"]
    ev = ev_start if (saved is None and hi > lo) else None
    say(f"setup {time.perf_counter() - t0:.1f} s")

    def pack(fit_progress=None):
        return _pack_state(comm, prob if hi > lo else None, st if hi > lo else None, counts,
                           converged, iterations, fit_progress, dict(pos, delta=delta, history=history))

    def hook(progress):
        _sync_checkpoint(comm, ck, lambda: pack(progress()),
                         detail=f"macrocycle {pos['mc'] + 1}, in the per-lattice fits")

    while True:
        mc = pos["mc"]
        if pos["phase"] == "fit":
            t_fit = time.perf_counter()
            # the final pass (the offset moved less than offset_tol_ev) refits only the lattices
            # that had not converged; the others keep their linear response to the offset step
            refit = ~converged if pos["final"] else np.ones(len(mine), bool)
            if hi > lo:
                st, ev, info = prob.fit(st, ev=ev, resume=fit_resume, on_iteration=hook,
                                        lattices=np.flatnonzero(refit))
                converged = info["converged"] | ~refit
                iterations = iterations + info["iterations"]
                f_total = _ordered_sum(comm, ev.f_lat, counts)
                pass_its = _ordered_sum(comm, info["iterations"].astype(float), counts)
            else:
                f_total = _ordered_sum(comm, [], counts)
                pass_its = _ordered_sum(comm, [], counts)
            fit_resume = None
            n_conv = int(_ordered_sum(comm, converged.astype(float), counts))
            n_refit = int(_ordered_sum(comm, refit.astype(float), counts))
            history.append({"macrocycle": mc + 1, "objective": f_total, "energy_offset_ev": delta,
                            "converged_lattices": n_conv, "refitted_lattices": n_refit,
                            "iterations": int(pass_its), "fit_s": time.perf_counter() - t_fit})
            say(f"macrocycle {mc + 1}: objective {f_total:.3f}, {n_conv} of {len(candidate)} lattices "
                f"converged, energy offset {delta:+.3f} eV; {n_refit} lattices fitted, "
                f"{int(pass_its)} iterations, {history[-1]['fit_s']:.1f} s")
            if fs.offset == "off" or mc == fs.max_macrocycles - 1 or pos["final"]:
                break
            pos["phase"] = "offset"
            _sync_checkpoint(comm, ck, pack, force=True, detail=f"macrocycle {mc + 1} done")
            continue
        # the global energy offset: a profiled Newton step, halved until the objective falls
        t_off = time.perf_counter()
        if hi > lo:
            ev = ev or prob.evaluate(st)
            h, c = prob.offset_terms(st, ev)
        else:
            h, c = np.zeros(0), np.zeros(0)
        H, C = _ordered_sum(comm, h, counts), _ordered_sum(comm, c, counts)
        step = -H / C if C > 0 else 0.0
        accepted = 0.0
        trials = 0
        for t in (1.0, 0.5, 0.25, 0.125):
            trials += 1
            # the change of the objective as a sum of per-lattice changes: the difference of
            # the totals (~1e7) would lose the last steps' changes (~0.01) to rounding
            if hi > lo:
                trial = prob.follow_offset(st, t * step)
                prob.prepare_intensities(trial)
                ev_t = prob.evaluate(trial)
                change = _ordered_sum(comm, ev_t.f_lat - ev.f_lat, counts)
            else:
                change = _ordered_sum(comm, [], counts)
            if change < 0:
                accepted = t * step
                if hi > lo:
                    st, ev = trial, ev_t
                break
        if accepted == 0.0 and hi > lo:
            prob.prepare_intensities(st)
        delta += accepted
        history[-1]["offset_step_ev"] = accepted
        history[-1]["offset_trials"] = trials
        history[-1]["offset_s"] = time.perf_counter() - t_off
        say(f"energy offset step {accepted:+.3f} eV ({trials} evaluations), {history[-1]['offset_s']:.1f} s")
        pos.update(mc=mc + 1, phase="fit", final=abs(accepted) < fs.offset_tol_ev)
        _sync_checkpoint(comm, ck, pack, force=True, detail=f"energy offset step {mc + 1} done")
    delta_sigma = float("nan")
    if fs.offset != "off":
        c = prob.offset_terms(st, ev)[1] if hi > lo else np.zeros(0)
        C = _ordered_sum(comm, c, counts)
        delta_sigma = 1.0 / math.sqrt(C) if C > 0 else float("inf")
        say(f"energy offset {delta:+.3f} ± {delta_sigma:.3f} eV")
        if delta_sigma > 0.5:
            messages.append(f"the energy offset is poorly determined by {len(candidate)} lattices "
                            f"(± {delta_sigma:.2f} eV); with a calibrated spectrometer use "
                            f"refine.energy_offset=off")
            say(f"warning: {messages[-1]}")
    t_table = time.perf_counter()
    table_local = _lattice_rows(prob, st0, ev0, st, ev, converged, iterations, cfg) if hi > lo else None
    say(f"lattice table {time.perf_counter() - t_table:.1f} s")
    result = _collect(comm, ds, prep, candidate, counts, table_local, param, delta, history, messages,
                      t0, cfg, say)
    if result is not None:
        result.energy_offset_sigma_ev = delta_sigma
    return result


# --------------------------------------------------------------------------- checkpoints

#: Parameters that do not change the answer (left out of the checkpoint's configuration check).
OPERATIONAL = ("backend", "checkpoint.path", "checkpoint.keep", "checkpoint.interval_s",
               "optimizer.max_macrocycles")


def _checkpointer(path, cfg, ds, cache, stop):
    from spread_tools.refine.checkpoint import Checkpointer, answer_config, fingerprint
    return Checkpointer(path, "refine_geometry", answer_config(cfg, OPERATIONAL),
                        fingerprint([ds.counts, ds.mask, ds.A, ds.energy_ev, ds.spectrum_weight,
                                     cache.hkl, cache.F_base]),
                        interval_s=cfg.checkpoint.interval_s, stop=stop)


def _load_checkpoint(ck, comm, resume):
    """The saved state on every rank (rank 0 reads, then broadcasts), or None."""
    saved = ck.load() if (resume and comm.rank == 0) else None
    if comm.size == 1:
        return saved
    have = int(comm.bcast_obj(saved is not None))
    if not have:
        return None
    attrs = comm.bcast_obj({"position": saved["attrs"]["position"]} if comm.rank == 0 else None)
    arrays = {}
    for name in ("lattice", "shoebox"):
        shape = comm.bcast_obj(list(saved["arrays"][name].shape) if comm.rank == 0 else None)
        flat = comm.bcast_array(saved["arrays"][name].ravel() if comm.rank == 0 else None, int(np.prod(shape)))
        arrays[name] = flat.reshape(shape)
    return {"attrs": attrs, "arrays": arrays}


_LATTICE_FIELDS = ("theta", "p", "mosaic_deg", "N", "u_mosaic", "u_N", "dlat", "g")
_FIT_FIELDS = ("mu", "active", "converged", "iterations", "decrement")


def _lattice_columns(st):
    return [np.asarray(getattr(st, f), np.float64).reshape(st.n_lat, -1) for f in _LATTICE_FIELDS]


def _pack_state(comm, prob, st, counts, converged, iterations, fit_progress, position):
    """The whole run's state, gathered in lattice order on rank 0 (collective; None elsewhere).

    ``lattice`` rows: the state fields, the fit progress, converged, iterations and the
    lattice's number of shoeboxes (last column); ``shoebox`` rows: the background planes.
    """
    if st is not None:
        fit = fit_progress or {}
        extra = [np.asarray(fit[f], np.float64).reshape(-1, 1) if f in fit else np.full((st.n_lat, 1), np.nan)
                 for f in _FIT_FIELDS]
        local = np.concatenate(_lattice_columns(st) + extra + [
            converged.reshape(-1, 1).astype(float), iterations.reshape(-1, 1).astype(float),
            np.diff(prob.lat_sb_off).reshape(-1, 1).astype(float)], axis=1)
        bg = st.bg
    width = local.shape[1] if st is not None else None
    if comm.size > 1:
        widths = comm.concat(np.array([width or 0], float), [1] * comm.size)
        width = int(comm.bcast_array([widths.max()] if comm.rank == 0 else None, 1)[0])
    if st is None:
        local, bg = np.zeros((0, width)), np.zeros((0, 3))
    rows = comm.concat(local.ravel(), [c * width for c in counts])
    sb_counts = None
    if comm.rank == 0:
        rows = rows.reshape(-1, width)
        edges = np.concatenate([[0], np.cumsum(counts)])
        sb_counts = [3 * int(rows[a:b, -1].sum()) for a, b in zip(edges[:-1], edges[1:])]
    bgs = comm.concat(bg.ravel(), sb_counts if sb_counts is not None else [0] * comm.size)  # counts: root only
    if comm.rank != 0:
        return None
    pos = dict(position, fit_it=int(fit_progress["it"]) if fit_progress else None,
               fit_n_eval=int(fit_progress["n_eval"]) if fit_progress else None)
    return {"attrs": {"position": json.dumps(pos)},
            "arrays": {"lattice": rows, "shoebox": bgs.reshape(-1, 3)}}


def _unpack_state(prob, st, saved, lo, hi, pos):
    """This rank's lattices' state from a checkpoint (rows ``lo:hi`` in lattice order)."""
    table = saved["arrays"]["lattice"]
    rows = table[lo:hi]
    sb0 = int(table[:lo, -1].sum())
    st = st.copy()
    c = 0
    for f, col in zip(_LATTICE_FIELDS, _lattice_columns(st)):
        k = col.shape[1]
        getattr(st, f)[...] = rows[:, c:c + k].reshape(getattr(st, f).shape)
        c += k
    fit = {f: rows[:, c + i] for i, f in enumerate(_FIT_FIELDS)}
    c += len(_FIT_FIELDS)
    converged = rows[:, c].astype(bool)
    iterations = rows[:, c + 1].astype(np.int64)
    st.bg[...] = saved["arrays"]["shoebox"][sb0:sb0 + len(st.bg)]
    st.delta = float(pos["delta"])
    prob._update_physical(st)
    fit_resume = None
    if pos.get("fit_it") is not None:
        fit_resume = dict(fit, it=pos["fit_it"], n_eval=pos["fit_n_eval"])
    return st, converged, iterations, fit_resume


def _sync_checkpoint(comm, ck, make_state, force=False, detail=""):
    """Collective: rank 0 decides whether to write (interval, stop request) and whether to stop."""
    from spread_tools.refine.checkpoint import Interrupted
    flags = np.array([float(force or ck.due()), float(ck.stop_requested or 0)]) if comm.rank == 0 else None
    flags = comm.bcast_array(flags, 2) if comm.size > 1 else flags
    if flags[0] and (ck.path is not None or comm.size > 1):
        state = make_state()
        if comm.rank == 0:
            ck.save(state)
    if flags[1]:
        raise Interrupted(int(flags[1]), ck.path, detail)


def crystal_families(fs):
    """Names of the per-lattice crystal-model families that ``fs`` refines (rotation, cell,
    mosaic spread, domain size); the energy offset, G and backgrounds not included."""
    bits = [b for b, on in (("rotation", fs.rotation), ("cell", fs.cell), ("mosaic spread", fs.mosaic))
            if on]
    if fs.domain_size != "off":
        bits.append(f"domain size ({fs.domain_size})")
    return bits


def _describe(fs):
    bits = crystal_families(fs)
    if fs.offset != "off":
        bits.append(f"energy offset ({fs.offset})")
    return ", ".join(bits + ["G", "backgrounds"])


_NUMERIC = [c for c in QC_COLUMNS if c not in ("lattice", "identifier", "status")]


def _lattice_rows(prob, st0, ev0, st, ev, converged, iterations, cfg):
    """This rank's per-lattice numbers (the columns of QC_COLUMNS but lattice/identifier/status)
    plus the refined A (9) and the per-shot offset; ``ev`` is the full evaluation at ``st``
    (computed when None)."""
    ds, param = prob.ds, prob.param
    ev = ev or prob.evaluate(st)
    fwd = prob.forward(st)
    cen0 = _centroids(ds, ev0, fwd)
    cen1 = _centroids(ds, fwd, fwd)
    sig = cen1["significant"]
    rmsd0, n_spots = _rmsd_per_lattice(prob, cen0["model"], cen0["observed"], sig)
    rmsd1, _ = _rmsd_per_lattice(prob, cen1["model"], cen1["observed"], sig)
    cov = prob.covariance(st, ev)
    n = st.n_lat
    rot_sigma = np.full(n, np.nan)
    if "theta" in prob.layout.cols:
        c = prob.layout.cols["theta"]
        rot_sigma = np.degrees(np.sqrt(np.mean(cov[:, c, c], axis=1)))
    A = np.empty((n, 3, 3))
    rot_change = np.empty(n)
    for j in range(n):
        _, _, A[j] = domain_matrices(st.U0[j], st.theta[j], param, st.p[j], st.mosaic_deg[j], 1,
                                     False, False, False)
        rot_change[j] = rotation_angle_deg(ds.A[j], A[j])
    cells = np.array([param.cell(st.p[j]) for j in range(n)])
    cols = {"n_shoeboxes": np.diff(prob.lat_sb_off).astype(float), "converged": converged.astype(float),
            "iterations": iterations.astype(float),
            "nll_start": prob._per_lattice(ev0.nll_sb), "nll_final": prob._per_lattice(fwd.nll_sb),
            "rotation_change_deg": rot_change, "rotation_sigma_deg": rot_sigma}
    for i, name in enumerate(CELL_NAMES):
        cols[name] = cells[:, i]
    for i, name in enumerate(("N_a", "N_b", "N_c")):
        cols[name] = st.N[:, i]
    cols.update({"mosaic_deg": st.mosaic_deg, "energy_offset_ev": st.delta + st.dlat, "G": np.exp(st.g),
                 "centroid_rmsd_start_px": rmsd0, "centroid_rmsd_final_px": rmsd1,
                 "n_centroid_spots": n_spots})
    numeric = np.stack([cols[c] for c in _NUMERIC], axis=1)
    return np.concatenate([numeric, A.reshape(n, 9), st.dlat[:, None]], axis=1)


def _collect(comm, ds, prep, candidate, counts, local, param, delta, history, messages, t0, cfg, say):
    """Gather the per-lattice rows on rank 0 and decide which lattices to keep."""
    width = len(_NUMERIC) + 10
    flat = comm.concat(local.ravel() if local is not None else np.zeros(0),
                       [c * width for c in counts])
    if comm.rank != 0:
        return None
    rows = flat.reshape(-1, width)
    n_in = ds.n_lattices
    orig = prep.lattice_orig[candidate]
    table = {c: np.full(n_in, np.nan) for c in _NUMERIC}
    for i, c in enumerate(_NUMERIC):
        table[c][orig] = rows[:, i]
    n_sb_all = np.bincount(ds.sb_lattice, minlength=n_in).astype(float)
    table["n_shoeboxes"] = np.where(np.isnan(table["n_shoeboxes"]), n_sb_all, table["n_shoeboxes"])
    A = np.full((n_in, 3, 3), np.nan)
    A[orig] = rows[:, len(_NUMERIC):len(_NUMERIC) + 9].reshape(-1, 3, 3)
    dlat = np.zeros(n_in)
    dlat[orig] = rows[:, -1]
    status = np.array(["too_few_shoeboxes"] * n_in, dtype=object)
    ok = np.zeros(n_in, bool)
    ok[orig] = True
    status[orig] = "ok"
    cell0 = np.asarray(ds.cell, float)
    edge_change = np.max(np.abs(np.stack([table[c] for c in ("a", "b", "c")], 1) / cell0[:3] - 1), axis=1)
    for name, bad in (("not_converged", table["converged"] == 0),
                      ("cell_far", edge_change > cfg.qc.max_cell_change_fraction),
                      ("rotation_far", table["rotation_change_deg"] > cfg.qc.max_rotation_change_deg)):
        hit = ok & bad
        status[hit] = name
        ok &= ~hit
    for name in ("not_converged", "cell_far", "rotation_far"):
        k = int(np.sum(status == name))
        if k:
            messages.append(f"left out {k} lattices flagged {name}")
            say(f"warning: {messages[-1]}")
    table["lattice"] = np.arange(n_in)
    table["identifier"] = np.asarray(ds.identifier).astype(str)
    table["status"] = status.astype(str)
    kept = np.flatnonzero(ok)
    if len(kept) == 0:
        raise InputError(f"{ds.path}: every lattice was flagged ({', '.join(sorted(set(status)))}); "
                         f"nothing to write")
    N = np.stack([table[c] for c in ("N_a", "N_b", "N_c")], 1)
    return GeometryResult(table=table, kept=kept, A=A, domain_size_cells=N,
                          mosaic_spread_deg=table["mosaic_deg"], energy_offset_ev=float(delta),
                          energy_offset_sigma_ev=float("nan"),
                          lattice_offset_ev=dlat, macrocycles=history, messages=messages,
                          time_s=time.perf_counter() - t0)


def refined_dataset(ds, result, cfg_json="{}"):
    """The input dataset with the kept lattices' refined crystal models and spectra.

    The global energy offset is added to the channel energies; a per-shot offset moves
    that shot's spectrum onto the common channels (photons conserved).

    Returns
    -------
    Dataset
        Lattices ``result.kept`` of ``ds`` (renumbered in that order).
    """
    from spread_tools.io.dials.spectra import rebin_spectrum
    out = ds.select_lattices(result.kept)
    k = result.kept
    out.A = result.A[k].copy()
    out.domain_size_cells = result.domain_size_cells[k].copy()
    out.mosaic_spread_deg = result.mosaic_spread_deg[k].copy()
    out.energy_ev = ds.energy_ev + result.energy_offset_ev
    w = np.asarray(out.spectrum_weight, dtype=np.float64).copy()
    for i, j in enumerate(k):
        if result.lattice_offset_ev[j] != 0.0:
            w[i] = rebin_spectrum(ds.energy_ev + result.lattice_offset_ev[j], w[i], ds.energy_ev)[0]
    out.spectrum_weight = w
    out.source = "refine_geometry"
    out.config_json = cfg_json
    return out


def lattice_table_csv(table):
    """The per-lattice table as CSV text (one row per input lattice)."""
    lines = [",".join(QC_COLUMNS)]
    n = len(table["lattice"])
    for i in range(n):
        vals = []
        for c in QC_COLUMNS:
            v = table[c][i]
            if c in ("lattice", "n_shoeboxes", "iterations", "n_centroid_spots", "converged"):
                vals.append("" if isinstance(v, float) and math.isnan(v) else str(int(v)))
            elif c in ("identifier", "status"):
                vals.append(str(v))
            else:
                vals.append("" if math.isnan(float(v)) else f"{float(v):.6g}")
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def table_extras(result):
    """``geometry_refinement/…`` datasets of the refined file: the per-lattice table and the
    macrocycle history."""
    extra = {f"geometry_refinement/{c}": np.asarray(result.table[c]) for c in QC_COLUMNS}
    extra["geometry_refinement/energy_offset_ev"] = np.array([result.energy_offset_ev])
    extra["geometry_refinement/energy_offset_sigma_ev"] = np.array([result.energy_offset_sigma_ev])
    extra["geometry_refinement/history_json"] = np.array([json.dumps(result.macrocycles)])
    return extra
