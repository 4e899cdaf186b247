"""Is the reported σ of refine_fdp honest? Bias and noise of the S1 result against its σ; JSON lines.

For a simulated dataset that stores its ground truth (``truth/``: curves at the channel
energies, G per lattice, background per shoebox), the script computes the expected
counts λ_true of every pixel (the pixel model at the truth, which is exactly how
``simulate_data`` made the counts) and then refines, for each setting (``key=value``
words of ``refine_fdp``):

* ``data``: the dataset's own counts (what a user gets);
* ``noise_free``: counts = λ_true (no noise): its error against the truth is the
  *bias* of the estimator (restraints, grid discretisation), to first order;
* ``replicates``: ``--replicates N`` fresh Poisson draws of λ_true: the scatter of the
  refined values over the draws is the *noise* the σ should describe.

One JSON line per setting and site, over the grid points inside ``--window`` (default
7090–7150 eV, where every SASE envelope covers the grid), for f′ and f″:

Each figure is given for the reported σ (``reported``: with ``uncertainty.calibrate``, the
default, the restraints' bias is included, :mod:`spread_tools.refine.calibration`) and for the
posterior σ alone (``posterior``, (F + H)⁻¹):

* ``rms_z_data``: rms of (refined − truth)/σ on the dataset's counts (1 = honest σ), also over
  the whole grid (``rms_z_data_full_grid``, ``frac_beyond_1sigma_data_full_grid``);
* ``rms_z_bias``: rms of (noise-free − truth)/σ (the bias in units of σ);
* ``sd_ratio``: rms over points of (scatter over replicates)/(mean reported σ)
  (1 = the σ describes the noise; it tests the Fisher information with the profiled
  scales and backgrounds at low counts);
* ``rms_z_replicates``: rms of (refined − truth)/σ over all replicates and points
  (noise and bias together: the coverage a user sees on average);
* ``frac_within_1sigma``: the fraction of |refined − truth| ≤ σ over the replicates
  (0.683 for an honest Gaussian σ).

"truth" is the truth curve at the grid energies. Usage::

    python benchmarks/sigma_calibration.py test_data/dataset.h5 [-s test_data/sf_cache.h5] \\
        [--replicates 20] [--setting "label:key=value key=value"] ... > calibration.jsonl

Default settings: ``defaults`` (the refine_fdp defaults), ``kk`` (f″ Sauter off, KK on)
and ``no_restraints`` (both Sauter terms off). Wall times depend on the machine's load.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = [
    ("defaults", []),
    ("kk", ["restraints.fdp.mean=None", "restraints.kramers_kronig.use=True"]),
    ("no_restraints", ["restraints.fp.mean=None", "restraints.fdp.mean=None"]),
]


def expected_counts(ds, cache, reference="chantler"):
    """λ_true of every pixel of ``ds`` from its truth/ group (the simulator's pixel model)."""
    from spread_tools.model.pixel import PixelModel
    from spread_tools.structure.factors import structure_factors
    t = ds.truth
    e = ds.energy_ev
    if not np.allclose(t.energy_ev, e):
        raise SystemExit("truth curves are not at the channel energies")
    names = list(cache.site_names)
    fpc = np.array([t.fp[t.site_names.index(n)] for n in names])
    fdpc = np.array([t.fdp[t.site_names.index(n)] for n in names])
    pm = PixelModel.from_dataset(ds, backend="cpu")
    F = structure_factors(cache, e, fpc, fdpc, cache.index_of(pm.hkl), reference=reference)
    I = np.ascontiguousarray((np.abs(F) ** 2).T)
    return pm.expected_counts(I, np.asarray(t.G, float), np.asarray(t.background, float))


def with_counts(ds, counts):
    import dataclasses
    return dataclasses.replace(ds, counts=np.asarray(counts, dtype=np.float32))


def refine_once(ds, cache, words):
    from spread_tools.config import resolve
    from spread_tools.refine.s1 import REFINE_SCHEMA, refine
    cfg = resolve(REFINE_SCHEMA, overrides=list(words))
    return refine([ds], cache, cfg, backend="cpu")


def truth_on_grid(ds, res):
    t = ds.truth
    out = {}
    for s, name in enumerate(res.site_names):
        i = t.site_names.index(name)
        out[name] = (np.interp(res.energy_ev, t.energy_ev, t.fp[i]),
                     np.interp(res.energy_ev, t.energy_ev, t.fdp[i]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("-s", "--sf-cache", default=str(REPO / "test_data" / "sf_cache.h5"))
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--window", type=float, nargs=2, default=(7090.0, 7150.0))
    ap.add_argument("--setting", action="append", default=None,
                    help='"label:key=value key=value" (repeatable; replaces the defaults)')
    args = ap.parse_args(argv)
    from spread_tools.io.dataset import Dataset
    from spread_tools.structure.cache import SFCache
    ds = Dataset.read(args.dataset)
    cache = SFCache.read(args.sf_cache)
    if ds.truth is None:
        raise SystemExit(f"{args.dataset}: no truth/ group")
    settings = SETTINGS if not args.setting else [
        (s.split(":", 1)[0], s.split(":", 1)[1].split() if ":" in s else []) for s in args.setting]
    lam = expected_counts(ds, cache)
    m = ds.mask
    k = ds.counts.astype(float)
    # the stored counts are Poisson draws of λ_true: the mean deviance per pixel is about 1
    pos = k[m] > 0
    dev = 2 * np.sum(lam[m] - k[m]) + 2 * np.sum(k[m][pos] * np.log(k[m][pos] / lam[m][pos]))
    head = {"dataset": str(args.dataset), "lattices": ds.n_lattices, "shoeboxes": ds.n_shoeboxes,
            "pixels": int(m.sum()), "mean_counts": float(k[m].mean()),
            "deviance_per_pixel_at_truth": float(dev / m.sum()), "machine": machine()}
    print(json.dumps({"what": "dataset", **head}), flush=True)
    rng = np.random.default_rng(args.seed)
    draws = [rng.poisson(lam).astype(np.float32) for _ in range(args.replicates)]
    for label, words in settings:
        t0 = time.perf_counter()
        res_data = refine_once(ds, cache, words)
        res_free = refine_once(with_counts(ds, lam), cache, words)
        reps = [refine_once(with_counts(ds, c), cache, words) for c in draws]
        wall = time.perf_counter() - t0
        tg = truth_on_grid(ds, res_data)
        e = res_data.energy_ev
        w = (e >= args.window[0]) & (e <= args.window[1])
        for s, name in enumerate(res_data.site_names):
            line = {"what": "calibration", "setting": label, "words": words, "site": name,
                    "replicates": len(reps), "window_ev": list(args.window)}
            for kind, key in (("fp", "fp"), ("fdp", "fdp")):
                truth_all = tg[name][0 if key == "fp" else 1]
                truth = truth_all[w]
                est = getattr(res_data, key)[s]
                vals = np.array([getattr(r, key)[s][w] for r in reps])
                sd = vals.std(axis=0, ddof=1) if len(reps) > 1 else np.full(w.sum(), np.nan)
                line[kind] = {}
                for which, attr in (("reported", key + "_sigma"), ("posterior", key + "_sigma_posterior")):
                    sig_all = getattr(res_data, attr)[s]
                    sig = sig_all[w]
                    z_data = (est[w] - truth) / sig
                    z_bias = (getattr(res_free, key)[s][w] - truth) / getattr(res_free, attr)[s][w]
                    sigs = np.array([getattr(r, attr)[s][w] for r in reps])
                    z_rep = (vals - truth) / sigs
                    line[kind][which] = {
                        "rms_z_data": float(np.sqrt(np.mean(z_data ** 2))),
                        "rms_z_data_full_grid": float(np.sqrt(np.mean(((est - truth_all) / sig_all) ** 2))),
                        "frac_beyond_1sigma_data_full_grid": float(np.mean(np.abs(est - truth_all) > sig_all)),
                        "median_sigma": float(np.median(sig)),
                        "rms_z_bias": float(np.sqrt(np.mean(z_bias ** 2))),
                        "sd_ratio": float(np.sqrt(np.mean((sd / sigs.mean(axis=0)) ** 2))),
                        "rms_z_replicates": float(np.sqrt(np.mean(z_rep ** 2))),
                        "frac_within_1sigma": float(np.mean(np.abs(z_rep) <= 1.0)),
                    }
                line[kind]["rms_err_data"] = float(np.sqrt(np.mean((est[w] - truth) ** 2)))
            line["restraint_scales"] = res_data.restraint_scales
            line["converged"] = [bool(res_data.converged), bool(res_free.converged),
                                 int(sum(r.converged for r in reps))]
            line["wall_s"] = round(wall, 1)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
