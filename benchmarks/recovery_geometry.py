"""S1 after refine_geometry on beamtime-like data: recovery against the unperturbed run; JSON lines.

A ``simulate_data preset=ly99`` dataset stores crystal models with indexing-size errors
(orientation 0.05° rms, per-lattice cells 0.2 % off, domain size and mosaic spread ±20 %)
and a 2 eV spectrometer offset. S1 (``refine_fdp`` defaults) is run three times:

* ``true_models``: the dataset with the true crystal models and spectra put back (what S1
  would see with perfect indexing and calibration: the unperturbed run);
* ``stored_models``: the dataset as stored (what S1 sees without refine_geometry);
* ``refined_models``: after ``refine_geometry`` (defaults). With ``--rounds K`` (K > 1) the
  chain goes on as the README's macrocycles do: ``refine_geometry`` again from the refined
  dataset with f′/f″ held at the previous S1 result (``curves.result=``), then S1; a line
  per round.

Every round's S1 result (``RUN_roundK.h5``) and refined dataset (``refined_models_roundK_dataset.h5``)
are kept in ``--workdir``.

For each: f′ and f″ rms against the truth over 7090–7150 eV and rms error/σ per site, the
edge of each site and the edge shift between the two sites, convergence, wall time.

Usage::

    python benchmarks/recovery_geometry.py --dataset ly99.h5 [--refined refined.h5] [--words ...] \
        [--rounds 2] [--workdir DIR]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine
from recovery_sweep import recovery

REPO = Path(__file__).resolve().parents[1]


def true_models(ds):
    """The dataset with its true crystal models and true spectra on the true channel energies."""
    t = ds.truth
    out = ds.select_lattices(np.arange(ds.n_lattices))
    out.A = t.A.copy()
    out.domain_size_cells = t.domain_size_cells.copy()
    out.mosaic_spread_deg = t.mosaic_spread_deg.copy()
    out.energy_ev = t.energy_ev.copy()
    out.spectrum_weight = t.spectrum_weight.copy()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="a simulate_data preset=ly99 dataset")
    ap.add_argument("--refined", type=Path, default=None, help="its refine_geometry output (else: run it)")
    ap.add_argument("--words", nargs="*", default=[], help="refine_fdp key=value parameters")
    ap.add_argument("--runs", nargs="*", default=["true_models", "stored_models", "refined_models"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="refined_models: refine_geometry → S1 rounds (later ones hold the previous S1 curves)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the rounds' S1 results go (default: a temp dir)")
    args = ap.parse_args(argv)
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.refine import REFINE_SCHEMA, refine
    from spread_tools.refine.s1 import write_result
    from spread_tools.refine.crystal_models import GEOMETRY_SCHEMA, refine_geometry, refined_dataset
    from spread_tools.structure.cache import SFCache
    info = machine("cpu")
    cache = SFCache.read(REPO / "test_data" / "sf_cache.h5")
    ds = Dataset.read(args.dataset)
    truth = ds.truth
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="recovery_geometry_"))
    workdir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        rounds = args.rounds if run == "refined_models" else 1
        data_in, curves_result = ds, None
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            extra = {}
            if run == "true_models":
                data = true_models(ds)
            elif run == "stored_models":
                data = ds
            elif args.refined is not None and rnd == 1:
                data = Dataset.read(args.refined)
            else:
                words = [] if curves_result is None else [f"curves.result={curves_result}"]
                res = refine_geometry(data_in, cache, resolve(GEOMETRY_SCHEMA, overrides=words))
                data = refined_dataset(data_in, res)
                data.write(workdir / f"{run}_round{rnd}_dataset.h5", overwrite=True)
                extra = {"round": rnd, "geometry_s": time.perf_counter() - t0,
                         "energy_offset_ev": float(np.mean(data.energy_ev - ds.energy_ev)),
                         "geometry_kept": len(res.kept), "geometry_curves": str(curves_result or "reference")}
            t1 = time.perf_counter()
            cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu", *args.words])
            result = refine([data], cache, cfg)
            rec = recovery(truth, result)
            print(json.dumps({"figure": "recovery_geometry", "run": run, "n_lattices": data.n_lattices,
                              "n_pixels": data.n_pixels, "n_channels": data.n_channels, "words": args.words,
                              "converged": bool(result.converged), "message": result.message,
                              "s1_s": time.perf_counter() - t1, **extra, "recovery": rec, "machine": info}),
                  flush=True)
            curves_result = workdir / f"{run}_round{rnd}.h5"
            write_result(curves_result, result, overwrite=True)
            data_in = data


if __name__ == "__main__":
    main()
