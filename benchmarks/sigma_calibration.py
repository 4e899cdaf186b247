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

and one ``recovery`` line per setting: rms error (e⁻), σ and edges of every site and the
edge shift between the first two (``recovery_sweep.recovery``), for the dataset's counts
(``data``) and the noise-free counts (``noise_free``, the bias in e⁻).

"truth" is the truth curve at the grid energies. With several datasets (independent
simulations, e.g. other seeds) a last ``pooled`` line per setting gives the rms z and the
fraction within 1σ over every dataset, replicate, site and window point: one dataset's
rms z over its 16 correlated window points scatters by ±0.3 about 1 even when σ is right,
so only the pooled figure says whether σ is honest. ``--true-models`` puts the true crystal
models and spectra back (``preset=ly99`` datasets store perturbed ones, and S1 holds the
models fixed); Poisson replicates lack the preset's gain and read noise, so several
simulated datasets with ``--replicates 0`` are the realistic test. Usage::

    python benchmarks/sigma_calibration.py test_data/dataset.h5 [more.h5 ...] [-s test_data/sf_cache.h5] \\
        [--replicates 20] [--true-models] [--no-noise-free] \\
        [--setting "label:key=value key=value"] ... > calibration.jsonl

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
from recovery_sweep import recovery

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


def block_figures(est, truth, sig, reps_vals, reps_sig, free_est, free_sig):
    """The figures of one site's f′ or f″ over the window (module docstring) and the squared z."""
    z_data = (est - truth) / sig
    z_rep = (reps_vals - truth) / reps_sig if len(reps_vals) else np.zeros((0, len(truth)))
    sd = reps_vals.std(axis=0, ddof=1) if len(reps_vals) > 1 else np.full(len(truth), np.nan)
    out = {"rms_z_data": float(np.sqrt(np.mean(z_data ** 2))), "median_sigma": float(np.median(sig))}
    if free_est is not None:
        out["rms_z_bias"] = float(np.sqrt(np.mean(((free_est - truth) / free_sig) ** 2)))
    if len(reps_vals):
        out.update(sd_ratio=float(np.sqrt(np.mean((sd / reps_sig.mean(axis=0)) ** 2))),
                   rms_z_replicates=float(np.sqrt(np.mean(z_rep ** 2))),
                   frac_within_1sigma=float(np.mean(np.abs(z_rep) <= 1.0)))
    return out, np.concatenate([z_data, z_rep.ravel()])


def pooled(z_lists):
    """rms z, fraction within 1σ and the number of values of a list of z arrays."""
    z = np.concatenate(z_lists) if z_lists else np.zeros(0)
    return {"rms_z": float(np.sqrt(np.mean(z ** 2))) if z.size else float("nan"),
            "frac_within_1sigma": float(np.mean(np.abs(z) <= 1.0)) if z.size else float("nan"),
            "n": int(z.size)}


def calibrate_dataset(path, cache, settings, args, rng, pool):
    """The JSON lines of one dataset; the z values are appended to ``pool[(setting, kind, which)]``."""
    from spread_tools.io.dataset import Dataset
    ds = Dataset.read(path)
    if ds.truth is None:
        raise SystemExit(f"{path}: no truth/ group")
    if args.true_models:
        from recovery_geometry import true_models
        ds = true_models(ds)
    lam = expected_counts(ds, cache)
    m = ds.mask
    k = ds.counts.astype(float)
    # Poisson draws of λ_true have a mean deviance per pixel of about 1 (more: gain and read noise)
    pos = k[m] > 0
    dev = 2 * np.sum(lam[m] - k[m]) + 2 * np.sum(k[m][pos] * np.log(k[m][pos] / lam[m][pos]))
    head = {"dataset": str(path), "lattices": ds.n_lattices, "shoeboxes": ds.n_shoeboxes,
            "pixels": int(m.sum()), "mean_counts": float(k[m].mean()), "true_models": bool(args.true_models),
            "deviance_per_pixel_at_truth": float(dev / m.sum()), "machine": machine()}
    print(json.dumps({"what": "dataset", **head}), flush=True)
    draws = [rng.poisson(lam).astype(np.float32) for _ in range(args.replicates)]
    for label, words in settings:
        t0 = time.perf_counter()
        res_data = refine_once(ds, cache, words)
        res_free = None if args.no_noise_free else refine_once(with_counts(ds, lam), cache, words)
        reps = [refine_once(with_counts(ds, c), cache, words) for c in draws]
        wall = time.perf_counter() - t0
        tg = truth_on_grid(ds, res_data)
        e = res_data.energy_ev
        w = (e >= args.window[0]) & (e <= args.window[1])
        for s, name in enumerate(res_data.site_names):
            line = {"what": "calibration", "dataset": str(path), "setting": label, "words": words, "site": name,
                    "replicates": len(reps), "window_ev": list(args.window)}
            for kind, key in (("fp", "fp"), ("fdp", "fdp")):
                truth_all = tg[name][0 if key == "fp" else 1]
                truth = truth_all[w]
                est = getattr(res_data, key)[s]
                vals = np.array([getattr(r, key)[s][w] for r in reps]).reshape(len(reps), w.sum())
                line[kind] = {}
                for which, attr in (("reported", key + "_sigma"), ("posterior", key + "_sigma_posterior")):
                    sig_all = getattr(res_data, attr)[s]
                    sigs = np.array([getattr(r, attr)[s][w] for r in reps]).reshape(len(reps), w.sum())
                    free = (None, None) if res_free is None else \
                        (getattr(res_free, key)[s][w], getattr(res_free, attr)[s][w])
                    fig, z = block_figures(est[w], truth, sig_all[w], vals, sigs, *free)
                    fig["rms_z_data_full_grid"] = float(np.sqrt(np.mean(((est - truth_all) / sig_all) ** 2)))
                    fig["frac_beyond_1sigma_data_full_grid"] = float(np.mean(np.abs(est - truth_all) > sig_all))
                    line[kind][which] = fig
                    pool.setdefault((label, kind, which), []).append(z)
                line[kind]["rms_err_data"] = float(np.sqrt(np.mean((est[w] - truth) ** 2)))
            line["restraint_scales"] = res_data.restraint_scales
            line["converged"] = [bool(res_data.converged), None if res_free is None else bool(res_free.converged),
                                 int(sum(r.converged for r in reps))]
            line["wall_s"] = round(wall, 1)
            print(json.dumps(line), flush=True)
        # rms errors (e-) and edge shifts of the dataset's own counts and of the noise-free
        # counts side by side: the noise-free error is the estimator's bias
        rec = {"what": "recovery", "dataset": str(path), "setting": label, "words": words,
               "window_ev": list(args.window), "data": recovery(ds.truth, res_data, tuple(args.window))}
        if res_free is not None:
            rec["noise_free"] = recovery(ds.truth, res_free, tuple(args.window))
        print(json.dumps(rec), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", help="simulated datasets with a truth/ group (pooled at the end)")
    ap.add_argument("-s", "--sf-cache", default=str(REPO / "test_data" / "sf_cache.h5"))
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--window", type=float, nargs=2, default=(7090.0, 7150.0))
    ap.add_argument("--true-models", action="store_true",
                    help="put the true crystal models and spectra back (preset=ly99 datasets store perturbed ones)")
    ap.add_argument("--no-noise-free", action="store_true", help="skip the noise-free refinement (the bias)")
    ap.add_argument("--setting", action="append", default=None,
                    help='"label:key=value key=value" (repeatable; replaces the defaults)')
    args = ap.parse_args(argv)
    from spread_tools.structure.cache import SFCache
    cache = SFCache.read(args.sf_cache)
    settings = SETTINGS if not args.setting else [
        (s.split(":", 1)[0], s.split(":", 1)[1].split() if ":" in s else []) for s in args.setting]
    rng = np.random.default_rng(args.seed)
    pool = {}
    for path in args.datasets:
        calibrate_dataset(path, cache, settings, args, rng, pool)
    for label, _ in settings:
        line = {"what": "pooled", "setting": label, "datasets": len(args.datasets), "replicates": args.replicates}
        for kind in ("fp", "fdp"):
            line[kind] = {which: pooled(pool.get((label, kind, which), [])) for which in ("reported", "posterior")}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
