"""f′/f″ σ of a finished refine_fdp run with and without the crystal models profiled out; JSON lines.

``refine_fdp`` profiles out each lattice's crystal model (``uncertainty.geometry``, default
``auto``: on for datasets written by ``refine_geometry``; :mod:`spread_tools.refine.geometry_uncertainty`).
This script recomputes, at a stored result, σ both ways (the posterior, and the calibrated
σ that refine_fdp reports by default) and the recovery figures against the simulation
truth with each, so that a run made with the crystal models taken as exact can be judged
without re-running S1, and the size of the effect read off. It also prints the time of
the correction and the agreement of the two pixel models (λ, relative).

Usage::

    python benchmarks/geometry_sigma.py --dataset refined.h5 --result s1.h5 [--words grid.step_ev=2 ...]
"""

import argparse
import json
import time
import types
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="the dataset S1 ran on (refine_geometry output)")
    ap.add_argument("--result", type=Path, required=True, help="its refine_fdp result")
    ap.add_argument("--words", nargs="*", default=[], help="the refine_fdp key=value parameters of that run")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.refine import REFINE_SCHEMA
    from spread_tools.refine.geometry_uncertainty import geometry_profile_for, local_geometry_correction
    from spread_tools.refine.objective import S1Problem
    from spread_tools.refine.prepare import prepare_data
    from spread_tools.refine.s1 import curve_uncertainties, read_result, reported_covariance
    from spread_tools.structure.cache import SFCache
    from recovery_sweep import recovery
    cache = SFCache.read(REPO / "test_data" / "sf_cache.h5")
    ds_in = Dataset.read(args.dataset)
    res = read_result(args.result)
    cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu", *args.words])
    prepared = prepare_data([ds_in], cache, cfg.shoebox.min_pixels, cfg.lattice.min_shoeboxes)
    p = S1Problem(prepared, cache, cfg)
    # the solution vector from the result: f′/f″ on the grid, ln G per lattice, background planes
    x = np.concatenate([np.asarray(res["fp"]).ravel(), np.asarray(res["fdp"]).ravel(),
                        np.log(res["lattice_G"][prepared.lattice_orig]),
                        res["shoebox_background"][prepared.shoebox_orig].ravel()])
    if len(x) != p.n_x or not np.allclose(res["energy_ev"], p.grid_ev):
        raise SystemExit(f"{args.result}: not a result of this dataset with these parameters (--words)")
    res = types.SimpleNamespace(**res)
    ds = p.local
    profile = geometry_profile_for([ds_in], ds, "on")
    F_data = p.local_fisher(x)[0]
    t0 = time.perf_counter()
    dF, agreement = local_geometry_correction(p, x, profile)
    t_corr = time.perf_counter() - t0
    H = p.restraint_hessian(x)
    out = {}
    for name, Fd in (("crystal_models_exact", F_data), ("crystal_models_profiled", F_data - dF)):
        cov = reported_covariance(p, x, Fd + H, cfg.uncertainty.calibrate)[0]
        _, _, _, res.fp_sigma, res.fdp_sigma, edges, edge_s = curve_uncertainties(p, x, cov)
        res.edge_ev, res.edge_sigma_ev = np.array(edges), np.array(edge_s)
        out[name] = recovery(ds_in.truth, res)
    print(json.dumps({"figure": "geometry_sigma", "label": args.label, "n_lattices": int(p.n_lat),
                      "families": profile.describe(), "correction_s": t_corr,
                      "pixel_models_agree_to": agreement,
                      "n_pixels": int(ds.n_pixels), "words": args.words, "runs": out,
                      "machine": machine("cpu")}), flush=True)


if __name__ == "__main__":
    main()
