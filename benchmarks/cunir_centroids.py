"""Real stills: spot centroids of the pixel model against DIALS's on CuNiR (5 stills, Pilatus).

For every experiment of ``test_data/dials/CuNiR_integrated.expt/.refl`` (reflections flagged
``integrated_sum``), the model spot of each reflection is the Bragg part of the pixel model
over its DIALS bounding box (monochromatic beam at the experiment's wavelength, the crystal's
ML domain size and mosaic spread), its centroid mapped to DIALS pixel coordinates with DIALS'
parallax correction. The orientation and cell are then refined to the observed centroids
(``xyzobs.px.value``) by :func:`spread_tools.refine.centroid_fit.fit_centroids`. Printed per
experiment and in all (one JSON line each): the RMSD of DIALS's own ``xyzcal.px``, of the
model at the stored crystal and after refinement, against ``xyzobs.px``, over all
reflections and over those DIALS used in refinement (flag 32).

Usage::

    python benchmarks/cunir_centroids.py [--weights uniform|variance] [--experiments 0 1 ...]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
EXPT = REPO / "test_data" / "dials" / "CuNiR_integrated.expt"
REFL = REPO / "test_data" / "dials" / "CuNiR_integrated.refl"


def experiment_data(el, table, k):
    """Dataset of experiment k's integrated reflections (bboxes, no pixels) and its columns."""
    from spread_tools.io.dials.importer import ImportSettings, Shot, build_dataset
    from spread_tools.model.geometry import HC_EV_A
    e = HC_EV_A / el.beams[el.experiments[k].beam].wavelength_a
    ds, _ = build_dataset([Shot(EXPT, REFL, None, k)],
                          ImportSettings(predictions_only=True, cell_tolerance=0.1,
                                         channels_min_ev=e, channels_max_ev=e))
    rows = np.flatnonzero(np.asarray(table["id"]) == k)
    flags = np.asarray(table["flags"])[rows]
    rows = rows[(flags & 256) > 0]
    assert len(rows) == ds.n_shoeboxes
    cols = {name: np.asarray(table[name])[rows, :2] for name in ("xyzobs.px.value", "xyzobs.px.variance",
                                                                  "xyzcal.px")}
    cols["used"] = (np.asarray(table["flags"])[rows] & 32) > 0
    return ds, cols


def rmsd(a, b, m=None):
    """RMSD (px) of the rows where both are finite (and ``m``)."""
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    if m is not None:
        ok &= m
    return float(np.sqrt(np.mean(np.sum((a[ok] - b[ok]) ** 2, axis=1)))), int(ok.sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", choices=("uniform", "variance"), default="uniform")
    ap.add_argument("--experiments", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    from spread_tools.io.dials.expt import read_expt
    from spread_tools.io.dials.refl import read_refl
    from spread_tools.refine.centroid_fit import fit_centroids, parallax_map
    el, table = read_expt(EXPT), read_refl(REFL)
    info = machine("cpu")
    exps = args.experiments if args.experiments is not None else list(range(len(el)))
    pooled = {k: [] for k in ("obs", "cal", "start", "refined", "used")}
    for k in exps:
        t0 = time.perf_counter()
        ds, c = experiment_data(el, table, k)
        obs = c["xyzobs.px.value"]
        w = np.ones_like(obs) if args.weights == "uniform" else 1.0 / (np.maximum(c["xyzobs.px.variance"], 0) + 0.01)
        det = el.detectors[el.experiments[k].detector]
        fit = fit_centroids(ds, obs, w, to_dials=parallax_map(ds, det.detector, det.info))
        row = {"figure": "cunir_centroid_rmsd", "experiment": k, "reflections": ds.n_shoeboxes,
               "weights": args.weights, "time_s": time.perf_counter() - t0}
        for name, pred in (("dials_xyzcal", c["xyzcal.px"]), ("model_stored", fit.centroid_start_px),
                           ("model_refined", fit.centroid_px)):
            row[f"{name}_px"], row["n_compared"] = rmsd(pred, obs)
            row[f"{name}_used_px"], row["n_used"] = rmsd(pred, obs, c["used"])
        print(json.dumps({**row, "machine": info}), flush=True)
        for key, val in (("obs", obs), ("cal", c["xyzcal.px"]), ("start", fit.centroid_start_px),
                         ("refined", fit.centroid_px), ("used", c["used"])):
            pooled[key].append(val)
    p = {k: np.concatenate(v) for k, v in pooled.items()}
    row = {"figure": "cunir_centroid_rmsd_all", "experiments": exps, "weights": args.weights}
    for name in ("cal", "start", "refined"):
        row[f"{name}_px"], row["n_compared"] = rmsd(p[name], p["obs"])
        row[f"{name}_used_px"], row["n_used"] = rmsd(p[name], p["obs"], p["used"])
    print(json.dumps({**row, "machine": info}), flush=True)


if __name__ == "__main__":
    main()
