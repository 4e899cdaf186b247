"""Pool recovery figures over independent datasets: one JSON line per run label.

One simulated dataset tells little about whether σ is honest: the rms of error/σ over
the 16 window points of one site scatters by about ±0.3 around 1 when σ is right,
because neighbouring grid points are correlated. This script reads the JSON lines of
``recovery_geometry.py`` (``"figure": "recovery_geometry"``) or ``recovery_sweep.py``
(the figures at the top level) from several runs on datasets of other seeds,
groups them by run label (``run`` or ``label``), and prints per label:

* ``datasets``, ``converged``: how many lines, how many S1 runs converged;
* per site and curve (``fp``, ``fdp``): ``rms_error`` (rms over the datasets of the
  per-dataset rms error, e⁻), ``rms_error_min`` / ``rms_error_max``, and ``rms_z``: the
  pooled rms of error/σ, sqrt(mean of the per-dataset rms z²) (every dataset has the same
  window points, so this is the rms over all points);
* ``rms_z_pooled_all``: the same over every site and both curves;
* ``edge_shift``: mean error of the edge shift against the truth, its rms, and the rms of
  (shift − truth)/σ.

Usage::

    python benchmarks/pool_recovery.py rg_seed31.jsonl rg_seed32.jsonl ... > pooled.jsonl
"""

import argparse
import json
import sys

import numpy as np


def recovery_lines(paths):
    """(label, recovery dict, converged) of every recovery line in the files ``paths``."""
    out = []
    for path in paths:
        with open(path) as fh:
            for n, text in enumerate(fh, 1):
                text = text.strip()
                if not text.startswith("{"):
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{n}: not JSON ({exc})")
                rec = line.get("recovery")
                if not isinstance(rec, dict) and line.get("figure") == "recovery_sweep" and "error" not in line:
                    rec = line                      # recovery_sweep.py writes the figures at the top level
                if not isinstance(rec, dict):
                    continue
                label = line.get("run") or line.get("label") or line.get("settings", {}).get("label", "?")
                out.append((str(label), rec, bool(line.get("converged", False))))
    return out


def pool(entries):
    """The pooled figures (module docstring) of the ``(recovery, converged)`` pairs of one label."""
    sites = [k for k, v in entries[0][0].items() if isinstance(v, dict) and "rms_fdp" in v]
    res = {"datasets": len(entries), "converged": int(sum(c for _, c in entries))}
    all_z2 = []
    for site in sites:
        res[site] = {}
        for kind in ("fp", "fdp"):
            err = np.array([r[site][f"rms_{kind}"] for r, _ in entries])
            z = np.array([r[site][f"rms_z_{kind}"] for r, _ in entries])
            all_z2.extend(z ** 2)
            res[site][kind] = {"rms_error": float(np.sqrt(np.mean(err ** 2))), "rms_error_min": float(err.min()),
                               "rms_error_max": float(err.max()), "rms_z": float(np.sqrt(np.mean(z ** 2))),
                               "rms_z_each": [round(float(v), 3) for v in z]}
    res["rms_z_pooled_all"] = float(np.sqrt(np.mean(all_z2))) if all_z2 else float("nan")
    if all("edge_shift_ev" in r for r, _ in entries):
        d = np.array([r["edge_shift_ev"] - r["truth_edge_shift_ev"] for r, _ in entries])
        s = np.array([r["edge_shift_sigma_ev"] for r, _ in entries])
        res["edge_shift"] = {"mean_error_ev": float(np.mean(d)), "rms_error_ev": float(np.sqrt(np.mean(d ** 2))),
                             "rms_z": float(np.sqrt(np.mean((d / s) ** 2))),
                             "median_sigma_ev": float(np.median(s)),
                             "errors_ev": [round(float(v), 2) for v in d]}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON-lines outputs of recovery_geometry.py / recovery_sweep.py")
    args = ap.parse_args(argv)
    lines = recovery_lines(args.files)
    if not lines:
        raise SystemExit(f"{', '.join(args.files)}: no recovery lines")
    labels = list(dict.fromkeys(label for label, _, _ in lines))
    for label in labels:
        entries = [(r, c) for lab, r, c in lines if lab == label]
        print(json.dumps({"what": "pooled_recovery", "run": label, **pool(entries)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
