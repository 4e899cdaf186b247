"""Recovery of the truth curves by the S1 refinement under a list of restraint settings; JSON lines.

For each restraint setting (a list of ``key=value`` words of ``refine_fdp``) the
script runs :func:`spread_tools.refine.s1.refine` on a simulated dataset that stores
its ground truth under ``truth/`` (``simulate_data``) and prints one JSON line:

* ``settings``: the words (on top of the ``refine_fdp`` defaults) and their label;
* per site: ``rms_fp`` / ``rms_fdp`` (e-), the rms error of the refined curve
  against the truth interpolated to the refined grid, over 7090–7150 eV (the
  energies that every SASE envelope centre range covers well);
  ``median_sigma_fp`` / ``median_sigma_fdp`` (e-), the median reported standard
  uncertainty over the same points; ``rms_z_fp`` / ``rms_z_fdp``, the rms of
  (refined − truth) / sigma (1 when the reported sigmas describe the error);
  ``edge_ev`` ± ``edge_sigma_ev`` and ``truth_edge_ev`` (the edge of
  :func:`spread_tools.refine.uncertainty.edge_position` applied to the truth on the same grid,
  with the result's pre-/post-edge windows ``edge_window_ev``);
* ``edge_shift_ev`` (FE1 − FE2, or first − second site) ± ``edge_shift_sigma_ev``
  against ``truth_edge_shift_ev``; ``difference_projection``: the refined
  difference of the two sites projected on the true difference (1: recovered in
  full, 0: the sites are not told apart);
* ``wall_s`` (the whole refinement incl. setup and uncertainties), ``converged``,
  ``n_evaluations``, and the machine.

The metric is the one of ``tests/refine/test_s1.py::test_recovery_and_negative_control``
(same window, same edge definition), computed here without importing the test.

The default list of settings is the restraint sweep of the S1 reference setup:
``reference_s1`` (the reference run's Sauter f' mean 0 σ 0.04, f'' mean 0.03 σ 0.08,
no KK), ``fdp_mean0``, ``loose`` (σ 0.2 / 0.3, the same as today's ``refine_fdp``
defaults), ``very_loose`` (σ 1 / 1), ``kk`` (f' σ 0.04, f'' Sauter off, KK weight
1e5 without a free offset: the reference KK run), ``defaults`` (whatever ``refine_fdp``
defaults to), ``kk_weak`` (KK weight 100, f' σ 1), ``kk_penalty`` (the defaults plus the
KK restraint with its default weight 1/(2 floor²) and a free f' offset),
``kk_constrained`` (f'' refined on the 4 eV grid, f' = KK[f''] + offset) and
``kk_constrained_1ev`` (the same with f'' on a 1 eV grid). The issue-11 comparison
(Sauter defaults vs KK penalty vs KK-constrained) is
``--only defaults,kk_penalty,kk_constrained,kk_constrained_1ev`` on datasets simulated
from KK-consistent truth curves (``benchmarks/make_kk_truth.py``,
``test_data/spectra/pf-rd-{ox,red}_kk.out``).

Usage::

    simulate_data test_data/sf_cache.h5 -o sweep/dataset.h5 \\
        truth=FE1=test_data/spectra/pf-rd-ox_fftkk.out,FE2=test_data/spectra/pf-rd-red_fftkk.out \\
        lattices=400 seed=1 shoebox_size=9 d_min=2.5 d_max=4.0 spectrum.step_ev=4
    python benchmarks/recovery_sweep.py sweep/dataset.h5 [-s test_data/sf_cache.h5] \\
        [--only defaults,kk] [--setting "label:key=value key=value"] ... \\
        [--results-dir DIR] [--backend cpu|cuda|auto] [--guard-nonfinite] [> sweep.jsonl]

``--setting`` (repeatable) replaces the default list; ``--only`` keeps the named
default settings (in the default order). ``--results-dir`` also writes each
result as ``DIR/<label>.h5`` (+ ``.csv``), for ``plot_curves``. A setting whose
refinement raises gives a line with ``error`` instead of the figures, and the
sweep goes on. ``refine_fdp`` now refuses such trial points itself; ``--guard-nonfinite`` (diagnostic) turns a NaN data term at an
L-BFGS trial point (a wild line-search step, seen with the default and the KK
settings on the seed-1 400-lattice dataset) into a huge finite value, so that the
line search backs off instead of scipy raising; the lines then carry
``n_guarded`` (0: the run never hit such a point and is the plain refinement).
Wall times depend on the machine's load (2 shared cores here).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
WINDOW_EV = (7090.0, 7150.0)

REFERENCE_S1 = ["restraints.fp.sigma=0.04", "restraints.fdp.mean=0.03", "restraints.fdp.sigma=0.08"]

SETTINGS = [
    ("reference_s1", REFERENCE_S1),
    ("fdp_mean0", ["restraints.fp.sigma=0.04", "restraints.fdp.mean=0.0", "restraints.fdp.sigma=0.08"]),
    ("loose", ["restraints.fp.sigma=0.2", "restraints.fdp.mean=0.0", "restraints.fdp.sigma=0.3"]),
    ("very_loose", ["restraints.fp.sigma=1.0", "restraints.fdp.mean=0.0",
                    "restraints.fdp.sigma=1.0"]),
    ("kk", ["restraints.fp.sigma=0.04", "restraints.fdp.mean=None", "restraints.kramers_kronig.use=True",
            "restraints.kramers_kronig.weight=1e5", "restraints.kramers_kronig.offset=False"]),
    ("defaults", []),
    ("kk_weak", ["restraints.fdp.mean=None", "restraints.kramers_kronig.use=True",
                 "restraints.kramers_kronig.weight=100", "restraints.fp.sigma=1.0"]),
    ("kk_penalty", ["restraints.kramers_kronig.use=True"]),
    ("kk_constrained", ["restraints.kramers_kronig.use=True", "restraints.kramers_kronig.mode=constrained"]),
    ("kk_constrained_1ev", ["restraints.kramers_kronig.use=True",
                            "restraints.kramers_kronig.mode=constrained",
                            "restraints.kramers_kronig.fdp_step_ev=1"]),
]


def parse_setting(text):
    """``"label:key=value key=value"`` (or without ``label:``) -> (label, words).

    Parameters
    ----------
    text : str

    Returns
    -------
    label : str
    words : list of str
    """
    head, sep, rest = text.partition(":")
    if sep and "=" not in head:
        label, body = head.strip(), rest
    else:
        label, body = None, text
    words = body.split()
    return label or (" ".join(words) or "defaults"), words


def recovery(truth, res, window_ev=WINDOW_EV):
    """Errors of a refined result against the simulation truth.

    Parameters
    ----------
    truth : spread_tools.io.dataset.Truth
        ``energy_ev`` (channel energies), ``site_names``, ``fp``, ``fdp`` (sites × channels).
    res : spread_tools.refine.s1.RefineResult
    window_ev : (float, float)
        Energy window (eV, inclusive) of the rms and median sigma.

    Returns
    -------
    dict
        Per site name: ``rms_fp``, ``rms_fdp``, ``median_sigma_fp``, ``median_sigma_fdp``,
        ``rms_z_fp``, ``rms_z_fdp``, ``edge_ev``, ``edge_sigma_ev``, ``truth_edge_ev``;
        and ``edge_shift_ev``, ``edge_shift_sigma_ev``, ``truth_edge_shift_ev``,
        ``difference_projection`` for the first two sites.
    """
    from spread_tools.refine.s1 import edge_shifts
    from spread_tools.refine.uncertainty import edge_position
    e = np.asarray(res.energy_ev, dtype=np.float64)
    windows = res.edge_window_ev if res.edge_window_ev is not None else np.tile([e[0], e[-1]], (len(res.site_names), 1))
    m = (e >= window_ev[0]) & (e <= window_ev[1])
    out, tf = {}, {}
    for s, name in enumerate(res.site_names):
        t = list(truth.site_names).index(name)
        tfp = np.interp(e, truth.energy_ev, truth.fp[t])
        tfdp = np.interp(e, truth.energy_ev, truth.fdp[t])
        tf[name] = (tfp, tfdp)
        dfp = (res.fp[s] - tfp)[m]
        dfdp = (res.fdp[s] - tfdp)[m]
        sfp = np.asarray(res.fp_sigma[s])[m]
        sfdp = np.asarray(res.fdp_sigma[s])[m]
        out[name] = {
            "rms_fp": float(np.sqrt(np.mean(dfp ** 2))),
            "rms_fdp": float(np.sqrt(np.mean(dfdp ** 2))),
            "median_sigma_fp": float(np.median(sfp)),
            "median_sigma_fdp": float(np.median(sfdp)),
            "rms_z_fp": float(np.sqrt(np.mean((dfp / sfp) ** 2))),
            "rms_z_fdp": float(np.sqrt(np.mean((dfdp / sfdp) ** 2))),
            "edge_ev": float(res.edge_ev[s]),
            "edge_sigma_ev": float(res.edge_sigma_ev[s]),
            "truth_edge_ev": float(edge_position(e, tfdp, None, *windows[s])[0]),
        }
    names = list(res.site_names)
    if len(names) >= 2:
        a, b = names[0], names[1]
        out["edge_shift_ev"] = out[a]["edge_ev"] - out[b]["edge_ev"]
        # σ from the joint covariance (edge_shifts gives site 1 − site 0)
        out["edge_shift_sigma_ev"] = float(edge_shifts(res)[0][3])
        out["truth_edge_shift_ev"] = out[a]["truth_edge_ev"] - out[b]["truth_edge_ev"]
        d_ref = np.concatenate([res.fp[0] - res.fp[1], res.fdp[0] - res.fdp[1]])
        d_true = np.concatenate([tf[a][0] - tf[b][0], tf[a][1] - tf[b][1]])
        out["difference_projection"] = float(d_ref @ d_true / (d_true @ d_true))
    return out


GUARDED = [0]


def guard_nonfinite(problem_class):
    """Diagnostic patch of ``problem_class.local_objective``: non-finite -> 1e30, zero gradient.

    At a trial point far outside the physical range (e.g. a negative pixel model)
    the Poisson data term is NaN, which stops scipy's L-BFGS-B. A huge finite
    value makes its line search back off instead. Counted in ``GUARDED[0]``.

    Parameters
    ----------
    problem_class : type
        :class:`spread_tools.refine.s1.S1Problem`.
    """
    orig = problem_class.local_objective

    def local_objective(self, x):
        f, g_glob, g_loc = orig(self, x)
        if np.isfinite(f) and np.all(np.isfinite(g_glob)) and np.all(np.isfinite(g_loc)):
            return f, g_glob, g_loc
        GUARDED[0] += 1
        return 1e30, np.zeros_like(g_glob), np.zeros_like(g_loc)

    problem_class.local_objective = local_objective


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, help="simulated dataset with truth/ (simulate_data)")
    ap.add_argument("-s", "--sf-cache", type=Path, default=REPO / "test_data" / "sf_cache.h5")
    ap.add_argument("--setting", action="append", default=None,
                    help='"label:key=value key=value" (repeatable; replaces the default list)')
    ap.add_argument("--only", default=None,
                    help="comma-separated labels of the default list to run")
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="also write each result as DIR/<label>.h5 (+ .csv)")
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--guard-nonfinite", action="store_true",
                    help="diagnostic: a non-finite data term at an L-BFGS trial point is returned "
                         "as a huge finite value with zero gradient (the line search backs off) "
                         "instead of stopping the run; marked in every JSON line")
    args = ap.parse_args(argv)

    from spread_tools import refine as R
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.model.pixel import resolve_backend
    from spread_tools.structure.cache import SFCache

    if args.setting:
        settings = [parse_setting(t) for t in args.setting]
    else:
        settings = SETTINGS
        if args.only:
            keep = [k.strip() for k in args.only.split(",") if k.strip()]
            unknown = set(keep) - {label for label, _ in SETTINGS}
            if unknown:
                ap.error(f"--only: unknown setting(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(label for label, _ in SETTINGS)}")
            settings = [s for s in SETTINGS if s[0] in keep]
    if args.guard_nonfinite:
        guard_nonfinite(R.S1Problem)
    backend = resolve_backend(args.backend)
    info = machine(backend)
    ds = Dataset.read(args.dataset)
    if ds.truth is None:
        ap.error(f"{args.dataset}: no truth/ group (not a simulated dataset)")
    cache = SFCache.read(args.sf_cache)
    size = {"n_lattices": int(ds.n_lattices), "n_shoeboxes": int(ds.n_shoeboxes),
            "n_pixels": int(ds.n_pixels)}
    if args.results_dir is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    for label, words in settings:
        cfg = resolve(R.REFINE_SCHEMA, overrides=list(words))
        t0 = time.perf_counter()
        GUARDED[0] = 0
        try:
            res = R.refine([ds], cache, cfg, backend=backend, quiet=True,
                           dataset_names=[str(args.dataset)], cache_name=str(args.sf_cache))
        except Exception as exc:       # report the failure of this setting, go on with the next
            print(json.dumps({"figure": "recovery_sweep",
                              "settings": {"label": label, "words": list(words)},
                              "error": f"{type(exc).__name__}: {exc}",
                              "wall_s": round(time.perf_counter() - t0, 2), "problem": size,
                              "guard_nonfinite": bool(args.guard_nonfinite),
                              "machine": info}), flush=True)
            continue
        wall = time.perf_counter() - t0
        rec = recovery(ds.truth, res)
        if args.results_dir is not None:
            R.write_result(args.results_dir / f"{label}.h5", res, overwrite=True)
        line = {"figure": "recovery_sweep", "settings": {"label": label, "words": list(words)},
                **rec, "wall_s": round(wall, 2), "converged": bool(res.converged),
                "message": res.message, "n_evaluations": int(res.n_evaluations),
                "guard_nonfinite": bool(args.guard_nonfinite), "n_guarded": GUARDED[0],
                "window_ev": list(WINDOW_EV), "problem": size, "machine": info}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
