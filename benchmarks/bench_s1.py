"""Benchmark of the whole S1 refinement at LY99 size (or a fraction); JSON lines.

The problem: a simulated 6lk1 dataset shaped like the reference LY99 S1 job
(≈23M pixels in shoeboxes of 19 × 19 pixels, 26 channels at 4 eV, two Fe
sites on the 4 eV grid: 104 global parameters), or ``--fraction`` of its
pixels. The 6lk1 cell puts ~2.4× more shoeboxes on each lattice than LY99's
MMO data, so the same pixel count comes with ~1200 lattices and ~64,000
shoeboxes instead of 3044 and 66,069; the pixel count is what sets the cost.
The structure-factor cache is ``test_data/sf_cache.h5`` (4.0–2.5 Å).

Figures:

* ``s1_simulate``: time to make the dataset (not part of S1; for context).
* ``s1_objective``: one objective + full gradient evaluation (data term through
  the pixel-model kernel, the structure-factor chain rule, restraints), median
  of ``--repeat``; compared with the memory-bandwidth limit: a numpy copy of
  the channel weights' bytes measured in the same run
  (``bandwidth_fraction = copy_time / objective_time``, 1 = at the limit).
  Two evaluations at the same point are checked to be bit-identical.
  ``setup_s`` is the data preparation with the channel weights, ``fisher_s``
  one profiled Fisher information (preconditioner and uncertainties).
* ``s1_refine``: the whole refinement (setup incl. channel weights, L-BFGS
  macrocycles, profiled Fisher uncertainties): wall time, iterations,
  evaluations, time per evaluation, peak resident memory, and the error of the
  refined curves against the simulation truth.

Usage::

    python benchmarks/bench_s1.py [--fraction 0.25] [--backend cpu|cuda|auto] [--repeat 3]
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
LY99 = {"n_lat": 3044, "n_sb": 66_069, "n_pix": 23_121_402, "n_chan": 26}


def emit(figure, info, **values):
    """Print one JSON line."""
    print(json.dumps({"figure": figure, **values, "machine": info}), flush=True)


def peak_rss_mb():
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="fraction of LY99's 23.1M pixels (lattices scaled to match)")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=None, help="keep the simulated dataset here")
    args = ap.parse_args(argv)

    from spread_tools import refine as R
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.model.pixel import resolve_backend
    from spread_tools.physics.scattering import read_table
    from spread_tools.simulate.simulator import (
        SimulationSettings,
        make_detector,
        simulate_dataset,
    )
    from spread_tools.structure.cache import SFCache

    backend = resolve_backend(args.backend)
    info = machine(backend)
    # simulated lattices of this model carry ~2.4x LY99's shoeboxes per lattice (19.2k pixels
    # each): scale the lattice count so that the pixel count matches the asked fraction
    n_lat = max(2, int(round(LY99["n_pix"] / 19_200 * args.fraction)))
    cache = SFCache.read(REPO / "test_data" / "sf_cache.h5")
    spectra = REPO / "test_data" / "spectra"
    truth = {"FE1": read_table(spectra / "pf-rd-ox_fftkk.out"),
             "FE2": read_table(spectra / "pf-rd-red_fftkk.out")}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "ly99_like.h5"
        t0 = time.perf_counter()
        settings = SimulationSettings(n_lattices=n_lat, seed=args.seed, shoebox_size=19,
                                      channel_step_ev=4.0, chunk_lattices=64)
        simulate_dataset(cache, truth, make_detector(), settings, path, overwrite=True)
        ds = Dataset.read(path)
        size = {"n_lattices": ds.n_lattices, "n_shoeboxes": ds.n_shoeboxes, "n_pixels": ds.n_pixels,
                "n_channels": ds.n_channels, "fraction_of_ly99_pixels": ds.n_pixels / LY99["n_pix"]}
        emit("s1_simulate", info, time_s=time.perf_counter() - t0, **size)

    cfg = resolve(R.REFINE_SCHEMA)
    # objective evaluation against the memory-bandwidth limit
    t0 = time.perf_counter()
    prep = R.prepare_data([ds], cache, cfg.shoebox.min_pixels)
    prob = R.S1Problem(prep, cache, cfg, backend=backend)
    t_setup = time.perf_counter() - t0
    glob, loc = prob.start_vector()
    x = np.concatenate([glob, loc])
    f1, g1 = prob.evaluate(x)
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        f2, g2 = prob.evaluate(x)
        times.append(time.perf_counter() - t)
    identical = bool(f1 == f2 and np.array_equal(g1, g2))
    w = prob.pm.w if backend == "cpu" else None
    n_bytes = ds.n_pixels * ds.n_channels * 4
    if w is None:
        w = np.ones((ds.n_pixels, ds.n_channels), np.float32)
    dst = np.empty_like(w)
    copies = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        np.copyto(dst, w)
        copies.append(time.perf_counter() - t)
    del dst, w
    t_obj = float(np.median(times))
    t_copy = float(np.median(copies))
    t = time.perf_counter()
    prob.local_fisher(x)
    t_fisher = time.perf_counter() - t
    emit("s1_objective", info, backend=backend, time_s=t_obj, setup_s=t_setup, fisher_s=t_fisher,
         w_bytes=n_bytes, numpy_copy_s=t_copy, bandwidth_fraction=t_copy / t_obj,
         bit_identical=identical, **size)
    del prob, prep

    # the whole refinement
    t0 = time.perf_counter()
    res = R.refine([ds], cache, cfg, backend=backend)
    wall = time.perf_counter() - t0
    e = res.energy_ev
    m = (e >= 7090) & (e <= 7150)
    err = {}
    for s, name in enumerate(res.site_names):
        tfp = np.interp(e, ds.truth.energy_ev, ds.truth.fp[s])
        tfdp = np.interp(e, ds.truth.energy_ev, ds.truth.fdp[s])
        err[name] = {"rms_fp": float(np.sqrt(np.mean((res.fp[s] - tfp)[m] ** 2))),
                     "rms_fdp": float(np.sqrt(np.mean((res.fdp[s] - tfdp)[m] ** 2))),
                     "edge_ev": float(res.edge_ev[s]), "edge_sigma_ev": float(res.edge_sigma_ev[s])}
    n_it = len(res.history["objective"])
    emit("s1_refine", info, backend=backend, wall_s=wall, iterations=n_it,
         evaluations=res.n_evaluations, time_per_evaluation_s=t_obj, converged=bool(res.converged),
         message=res.message, peak_rss_mb=peak_rss_mb(), errors_vs_truth=err,
         reference_gpu_minutes=192 * 78, **size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
