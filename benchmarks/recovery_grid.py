"""Positive control of S1 over lattice count × energy granularity on beamtime-like data; JSON lines.

The reference workflow asks for "a positive control as a function of lattice count and
energy granularity, to see where the breaking point is". For every energy step S (the
channel width of the simulated spectra and the step of the refined grid, e.g. 2/4/8 eV)
a ``simulate_data preset=ly99`` dataset is made once (seed 11, FE1 = oxidised, FE2 = reduced
ferredoxin, truth edge shift 2.4 eV); each cell (S, N) refines its first N lattices
(``refine_fdp`` defaults, ``grid.step_ev=S``) and prints one JSON line with the recovery
figures of ``recovery_sweep.recovery`` (f′/f″ rms over 7090–7150 eV, rms error/σ, edges,
edge shift, difference projection), convergence and wall time. With ``--controls`` the
largest N of every step is refined again with ``control=permute_miller`` and
``control=shuffle_channels`` and the fitted edge step of each site is reported against
its σ.

Crystal models (``--models``): ``true`` (default) puts the simulation's true crystal
models and spectra back (``recovery_geometry.true_models``): the control of S1 itself;
``stored`` refines with the models as stored (what S1 sees without refine_geometry).

A cell counts as *recovered* when the refinement converged, the refined FE1 − FE2
difference projects on the true one with a factor above 0.5 and the f″ rms of both sites
is at most 0.3 e⁻; the breaking point of a step is the smallest N from which every larger
N is recovered.

Memory: S1 on channel bands peaks at about 0.6 GB plus 150 bytes per pixel plus 0.5 bytes
per pixel and channel (the band values; measured 1.1 GB at 5.8M px × 26 channels, 3.8 GB at
23.4M px × 101, 4.8 GB at 23.4M px × 201, ``benchmarks/RESULTS.md``); cells estimated above
``--max-gb`` are skipped with a line saying so. Every cell runs
in its own process (``--lock FILE`` runs it under ``flock FILE``, so that big jobs on a shared
machine never overlap).

Usage::

    python benchmarks/recovery_grid.py --workdir grid/ --steps 2,4,8 --lattices 125,250,500,1000 \\
        [--dataset 4=ly99_3044_4ev.h5] [--controls] [--lock FILE] [--max-gb 8] > grid.jsonl
    python benchmarks/recovery_grid.py --plot grid.jsonl -o grid.png       # figure + table
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
SEED = 11
BYTES_PER_PIXEL = 150.0
FIXED_GB = 0.6
RECOVERED_FDP_RMS = 0.3
RECOVERED_PROJECTION = 0.5


def simulate(step_ev, n_lattices, out, seed=SEED):
    """Simulate a ``preset=ly99`` dataset with channels of ``step_ev`` (7070–7170 eV)."""
    from spread_tools.cli.simulate_data import (
        PRESETS,
        SCHEMA,
        detector_from_config,
        read_truth,
        settings_from_config,
    )
    from spread_tools.config import resolve
    from spread_tools.simulate.simulator import simulate_dataset
    from spread_tools.structure.cache import SFCache
    spectra = REPO / "test_data" / "spectra"
    words = ["preset=ly99", f"lattices={n_lattices}", f"seed={seed}", f"spectrum.step_ev={step_ev:g}",
             f"truth=FE1={spectra / 'pf-rd-ox_fftkk.out'},FE2={spectra / 'pf-rd-red_fftkk.out'}"]
    cfg = resolve(SCHEMA, overrides=words, presets=PRESETS)
    t0 = time.perf_counter()
    summary = simulate_dataset(SFCache.read(REPO / "test_data" / "sf_cache.h5"), read_truth(cfg.truth),
                               detector_from_config(cfg), settings_from_config(cfg), out,
                               quiet=True, config_json=cfg.to_json(), weights_backend="cpu")
    return {"step_ev": step_ev, "n_lattices": n_lattices, "path": str(out),
            "n_pixels": int(summary.n_pixels), "simulate_s": round(time.perf_counter() - t0, 1)}


def estimate_gb(n_pixels, n_channels):
    """Peak memory of one S1 cell on channel bands (per-pixel arrays, band values), GB."""
    return FIXED_GB + n_pixels * (0.5 * n_channels + BYTES_PER_PIXEL) / 1e9


def run_cell(path, step_ev, n_lattices, models, control=None, words=()):
    """Refine the first ``n_lattices`` lattices of a dataset; the JSON-able figures."""
    from recovery_geometry import true_models
    from recovery_sweep import recovery

    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.refine import REFINE_SCHEMA, refine
    from spread_tools.structure.cache import SFCache
    ds = Dataset.read(path)
    if n_lattices < ds.n_lattices:
        ds = ds.select_lattices(np.arange(n_lattices))
    truth = ds.truth
    data = true_models(ds) if models == "true" else ds
    cache = SFCache.read(REPO / "test_data" / "sf_cache.h5")
    cfg = resolve(REFINE_SCHEMA, overrides=["backend=cpu", f"grid.step_ev={step_ev:g}",
                                            f"control={control}", *words])
    t0 = time.perf_counter()
    res = refine([data], cache, cfg)
    wall = time.perf_counter() - t0
    rec = recovery(truth, res)
    return {"figure": "recovery_grid", "step_ev": step_ev, "n_lattices": int(data.n_lattices),
            "n_pixels": int(data.n_pixels), "n_channels": int(data.n_channels), "models": models,
            "control": control, "words": list(words), "converged": bool(res.converged),
            "message": res.message, "macrocycles": int(len(res.convergence["objective_end"])),
            "iterations": int(len(res.history["objective"])), "n_evaluations": int(res.n_evaluations),
            "wall_s": round(wall, 1), "edge_step": [float(v) for v in res.edge_step],
            "edge_step_sigma": [float(v) for v in res.edge_step_sigma],
            "fdp_range": f"{np.min(res.fdp):.1f} .. {np.max(res.fdp):.1f}",
            "dropped": res.dropped, "recovery": rec, "machine": machine("cpu")}


def recovered(line):
    """The positive-control criterion of a cell (see the module docstring)."""
    rec = line.get("recovery", {})
    if not line.get("converged") or "difference_projection" not in rec:
        return False
    rms = [rec[s]["rms_fdp"] for s in ("FE1", "FE2")]
    return rec["difference_projection"] > RECOVERED_PROJECTION and max(rms) <= RECOVERED_FDP_RMS


def breaking_points(lines):
    """Per step: the smallest N from which every larger N is recovered (None: never)."""
    out = {}
    for step in sorted({ln["step_ev"] for ln in lines}):
        cells = sorted((ln["n_lattices"], recovered(ln)) for ln in lines if ln["step_ev"] == step)
        bp = None
        for n, ok in reversed(cells):
            if not ok:
                break
            bp = n
        out[step] = bp
    return out


def table(lines):
    """Markdown table of the positive-control cells and the controls."""
    rows = ["| step eV | lattices | pixels | f″ rms FE1/FE2 e⁻ | f′ rms FE1/FE2 e⁻ | rms err/σ f″ | "
            "edge shift eV (truth) | diff. proj. | converged | S1 s |", "|" + "---|" * 10]
    for ln in sorted((ln for ln in lines if not ln.get("control")), key=lambda x: (x["step_ev"], x["n_lattices"])):
        r = ln["recovery"]
        rows.append(f"| {ln['step_ev']:g} | {ln['n_lattices']} | {ln['n_pixels'] / 1e6:.1f}M | "
                    f"{r['FE1']['rms_fdp']:.2f} / {r['FE2']['rms_fdp']:.2f} | "
                    f"{r['FE1']['rms_fp']:.2f} / {r['FE2']['rms_fp']:.2f} | "
                    f"{r['FE1']['rms_z_fdp']:.2f} / {r['FE2']['rms_z_fdp']:.2f} | "
                    f"{r['edge_shift_ev']:.2f} ± {r['edge_shift_sigma_ev']:.2f} ({r['truth_edge_shift_ev']:.2f}) | "
                    f"{r['difference_projection']:.2f} | {'yes' if ln['converged'] else 'NO'} | {ln['wall_s']:.0f} |")
    ctrl = [ln for ln in lines if ln.get("control")]
    if ctrl:
        rows += ["", "| step eV | lattices | control | edge step FE1 e⁻ (z) | edge step FE2 e⁻ (z) | f″ range e⁻ | converged |",
                 "|" + "---|" * 7]
        for ln in sorted(ctrl, key=lambda x: (x["step_ev"], x["control"])):
            st, ss = ln["edge_step"], ln["edge_step_sigma"]
            rows.append(f"| {ln['step_ev']:g} | {ln['n_lattices']} | {ln['control']} | "
                        f"{st[0]:.2f} ± {ss[0]:.2f} ({st[0] / ss[0]:.1f}) | {st[1]:.2f} ± {ss[1]:.2f} "
                        f"({st[1] / ss[1]:.1f}) | {ln.get('fdp_range', '')} | {'yes' if ln['converged'] else 'NO'} |")
    bp = breaking_points([ln for ln in lines if not ln.get("control")])
    rows += ["", "Breaking point (smallest N from which every larger N is recovered): " +
             ", ".join(f"{s:g} eV: {('N ≥ ' + str(n)) if n else 'not reached'}" for s, n in bp.items())]
    return "\n".join(rows)


def plot(lines, output):
    """Figure of the grid: f″ rms, edge-shift error and rms error/σ against lattices per step."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    pos = [ln for ln in lines if not ln.get("control")]
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    bp = breaking_points(pos)
    for step in sorted({ln["step_ev"] for ln in pos}):
        cells = sorted((ln for ln in pos if ln["step_ev"] == step), key=lambda x: x["n_lattices"])
        n = np.array([c["n_lattices"] for c in cells])
        rec = [c["recovery"] for c in cells]
        fdp = np.array([max(r["FE1"]["rms_fdp"], r["FE2"]["rms_fdp"]) for r in rec])
        shift = np.array([abs(r["edge_shift_ev"] - r["truth_edge_shift_ev"]) for r in rec])
        shift_sig = np.array([r["edge_shift_sigma_ev"] for r in rec])
        z = np.array([max(r["FE1"]["rms_z_fdp"], r["FE2"]["rms_z_fdp"]) for r in rec])
        conv = np.array([c["converged"] for c in cells])
        label = f"{step:g} eV" + (f" (recovered from N={bp[step]})" if bp[step] else " (not recovered)")
        for ax, y in zip(axes, (fdp, shift, z)):
            (line,) = ax.plot(n, y, marker="o", label=label)
            if (~conv).any():
                ax.plot(n[~conv], y[~conv], "x", color="k", ms=9)
        axes[1].errorbar(n, shift, yerr=shift_sig, fmt="none", color=line.get_color(), alpha=0.5)
    axes[0].axhline(0.2, color="k", ls="--", lw=0.8, label="aim 0.2 e⁻")
    axes[0].axhline(RECOVERED_FDP_RMS, color="k", ls=":", lw=0.8, label="recovered ≤ 0.3 e⁻")
    axes[1].axhline(0.5, color="k", ls="--", lw=0.8, label="aim 0.5 eV")
    axes[2].axhspan(0.8, 1.25, color="0.85", label="aim 0.8–1.25")
    axes[0].set_ylabel("f″ rms error, worse site (e⁻)")
    axes[1].set_ylabel("|edge shift − truth| (eV), bars: σ")
    axes[2].set_ylabel("f″ rms error/σ, worse site")
    all_n = [ln["n_lattices"] for ln in pos]
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlim(min(all_n) / 1.3, max(all_n) * 1.3)
        ax.set_xlabel("lattices")
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    fig.suptitle("S1 positive control on simulate_data preset=ly99 (true crystal models), "
                 "refine_fdp defaults; x: not converged")
    fig.savefig(output, dpi=130)


def _locked(args, cmd):
    return ["flock", str(args.lock), *cmd] if args.lock else cmd


def _self_cmd(args, extra):
    return _locked(args, [sys.executable, str(Path(__file__).resolve()), *extra])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("recovery_grid"))
    ap.add_argument("--steps", default="2,4,8", help="energy steps in eV (channels and grid)")
    ap.add_argument("--lattices", default="125,250,500,1000")
    ap.add_argument("--dataset", action="append", default=[],
                    help="STEP=PATH: use this preset=ly99 dataset for that step (else simulated)")
    ap.add_argument("--models", default="true", choices=("true", "stored"))
    ap.add_argument("--controls", action="store_true",
                    help="also run both controls at the largest N of every step")
    ap.add_argument("--words", nargs="*", default=[], help="further refine_fdp key=value words")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--lock", type=Path, default=None, help="run every cell under flock FILE")
    ap.add_argument("--cell", nargs=4, metavar=("PATH", "STEP", "N", "CONTROL"), help=argparse.SUPPRESS)
    ap.add_argument("--plot", type=Path, default=None, help="JSON lines of a grid run: draw and tabulate")
    ap.add_argument("-o", "--output", type=Path, default=Path("recovery_grid.png"))
    args = ap.parse_args(argv)

    if args.plot is not None:
        lines = [json.loads(t) for t in args.plot.read_text().splitlines() if t.strip().startswith("{")]
        lines = [ln for ln in lines if ln.get("figure") == "recovery_grid" and "recovery" in ln]
        plot(lines, args.output)
        print(table(lines))
        return 0
    if args.cell is not None:
        path, step, n, control = args.cell
        line = run_cell(path, float(step), int(n), args.models,
                        None if control == "none" else control, args.words)
        print(json.dumps(line), flush=True)
        return 0

    steps = [float(s) for s in args.steps.split(",")]
    counts = sorted(int(n) for n in args.lattices.split(","))
    given = {float(k): Path(v) for k, v in (d.split("=", 1) for d in args.dataset)}
    args.workdir.mkdir(parents=True, exist_ok=True)
    from spread_tools.io.dataset import Dataset
    for step in steps:
        path = given.get(step) or args.workdir / f"ly99_{step:g}ev_{counts[-1]}.h5"
        if not path.exists():
            code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import recovery_grid as g; print(json.dumps(g.simulate({step!r}, {counts[-1]}, "
                    f"{str(path)!r})))")
            sim = subprocess.run(_locked(args, [sys.executable, "-c", code]), capture_output=True, text=True)
            if sim.returncode != 0:
                print(json.dumps({"figure": "recovery_grid", "step_ev": step, "error": sim.stderr[-2000:]}))
                continue
            print(json.dumps({"figure": "recovery_grid_dataset", **json.loads(sim.stdout.strip().splitlines()[-1])}),
                  flush=True)
        ds = Dataset.read(path)
        pix_per_lat = np.bincount(ds.sb_lattice, weights=np.diff(ds.pixel_offset), minlength=ds.n_lattices)
        cells = [(n, None) for n in counts]
        if args.controls:
            cells += [(counts[-1], c) for c in ("permute_miller", "shuffle_channels")]
        for n, control in cells:
            if n > ds.n_lattices:
                print(json.dumps({"figure": "recovery_grid", "step_ev": step, "n_lattices": n,
                                  "skipped": f"dataset has {ds.n_lattices} lattices"}), flush=True)
                continue
            n_pix = float(pix_per_lat[:n].sum())
            gb = estimate_gb(n_pix, ds.n_channels)
            if gb > args.max_gb:
                print(json.dumps({"figure": "recovery_grid", "step_ev": step, "n_lattices": n,
                                  "n_pixels": int(n_pix), "skipped": f"estimated {gb:.1f} GB > {args.max_gb:g} GB "
                                  f"(S1 on channel bands)"}), flush=True)
                continue
            cmd = _self_cmd(args, ["--cell", str(path), f"{step:g}", str(n), control or "none",
                                   "--models", args.models, "--words", *args.words])
            r = subprocess.run(cmd, capture_output=True, text=True)
            out = [t for t in r.stdout.splitlines() if t.startswith("{")]
            if r.returncode != 0 or not out:
                print(json.dumps({"figure": "recovery_grid", "step_ev": step, "n_lattices": n,
                                  "control": control, "error": r.stderr[-2000:]}), flush=True)
                continue
            print(out[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
