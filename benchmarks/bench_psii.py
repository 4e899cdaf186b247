"""Benchmark of a photosystem-II-size problem: the SF cache and the memory of S1 (JSON lines).

The problem: the cell of photosystem II crystals (117 × 223 × 310 Å, P2₁2₁2₁) filled
as ``bench_cache_sf.py`` does for LY99: the 6lk1 ferredoxin asymmetric unit translated
``--copies`` times (29 copies ≈ 50,000 atoms in the asymmetric unit, ≈ 200,000 in the
cell: a PS-II dimer's worth), d 4.0–2.5 Å. Two of the copies play the two PS-II
monomers: their four iron atoms become manganese (residue ``OEX``, atoms ``MN1``..``MN4``),
so there are four Mn classes, each of two NCS-related atoms (sites
``MN1=OEX/MN1`` … ``MN4=OEX/MN4``). Channels of 4 eV across the Mn K-edge (6510–6610 eV).

Figures:

* ``psii_cache_sf``: building the cache (sites direct, the rest by the FFT route), in
  a child process: wall time, P1 indices, bytes in memory and on disk, peak memory.
* ``psii_s1`` (one per ``--lattices`` value): a dataset simulated with this cache
  (truth: Chantler's Mn for MN1, MN2 and a copy 2 eV higher for MN3, MN4; 15 × 15
  pixel shoeboxes) and the whole S1 refinement of it in a child process: pixels,
  shoeboxes, distinct reflections, wall time, peak memory, and the bytes of the main
  parts (channel bands, the per-evaluation structure-factor arrays, the cache).
* ``psii_s1_per_mpix``: the slope of peak memory against pixels between the
  smallest and the largest run (MB per million pixels) and the fixed part.

Run: ``python benchmarks/bench_psii.py [--copies 29] [--lattices 1 4]``.
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]
CELL = (117.0, 223.0, 310.0, 90.0, 90.0, 90.0)
SPACEGROUP = "P 21 21 21"
SITES = ["MN1=OEX/MN1", "MN2=OEX/MN2", "MN3=OEX/MN3", "MN4=OEX/MN4"]
ENERGY = np.arange(6510.0, 6611.0, 4.0)


def emit(figure, **fields):
    """Print one JSON line."""
    print(json.dumps({"benchmark": "bench_psii", "figure": figure, **fields, "machine": machine()}),
          flush=True)


def psii_like_structure(copies):
    """6lk1 translated ``copies`` times into the PS-II cell; copies 0 and 1 carry the Mn sites."""
    import gemmi
    src = gemmi.read_structure(str(REPO / "test_data" / "models" / "6lk1.pdb"))
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*CELL)
    st.spacegroup_hm = SPACEGROUP
    model = gemmi.Model("1")
    names = iter([a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    # a grid of translations inside the asymmetric unit's quarter of the cell
    shifts = [(i * 28.0, j * 27.0, k * 38.0) for k in range(4) for j in range(4) for i in range(2)]
    for n in range(copies):
        dx, dy, dz = shifts[n % len(shifts)]
        for ci, ch in enumerate(src[0]):
            new = ch.clone()
            new.name = next(names)
            for res in new:
                if n < 2 and res.name == "FES":
                    res.name = "OEX"
                for atom in res:
                    p = atom.pos
                    atom.pos = gemmi.Position(p.x + dx, p.y + dy, p.z + dz)
                    if res.name == "OEX" and atom.name in ("FE1", "FE2"):
                        atom.name = f"MN{2 * ci + int(atom.name[-1])}"
                        atom.element = gemmi.Element("Mn")
            model.add_chain(new)
    st.add_model(model)
    st.setup_entities()
    return st


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cache_child(copies, d_min, path, out):
    from spread_tools.structure.build import build_sf_cache
    st = psii_like_structure(copies)
    timings = {}
    t0 = time.perf_counter()
    cache = build_sf_cache(st, SITES, d_min, 4.0, ENERGY, route="auto", timings=timings)
    wall = time.perf_counter() - t0
    cache.write(path, overwrite=True)
    mem = sum(getattr(cache, k).nbytes for k in ("hkl", "F_base", "S_el", "S_site", "f0_site")
              if hasattr(getattr(cache, k, None), "nbytes"))
    out.put({"wall_s": wall, "n_h": int(cache.n_h), "atoms_asu": int(st[0].count_atom_sites()),
             "n_elements": len(cache.elements), "sites": list(cache.site_names),
             "memory_bytes": int(mem), "file_bytes": os.path.getsize(path), "route": timings.get("route"),
             "stages_s": {k: round(v, 3) for k, v in timings.items() if k.endswith("_s")},
             "peak_rss_mb": _peak_mb()})


def _mn_tables():
    from spread_tools.physics.scattering import SpectrumTable, reference_fp_fdp
    e = np.arange(6400.0, 6700.0, 0.5)
    fp, fdp = reference_fp_fdp("Mn", e, "chantler")
    fp2, fdp2 = reference_fp_fdp("Mn", e - 2.0, "chantler")
    a = SpectrumTable(e, fp, fdp, "chantler:Mn")
    b = SpectrumTable(e, fp2, fdp2, "chantler:Mn+2eV")
    return {"MN1": a, "MN2": a, "MN3": b, "MN4": b}


def _sim_child(cache_path, n_lat, seed, path, out):
    from spread_tools.simulate.simulator import SimulationSettings, make_detector, simulate_dataset
    from spread_tools.structure.cache import SFCache
    cache = SFCache.read(cache_path)
    settings = SimulationSettings(n_lattices=n_lat, seed=seed, shoebox_size=15, channel_min_ev=6510.0,
                                  channel_max_ev=6610.0, channel_step_ev=4.0, centre_min_ev=6525.0,
                                  centre_max_ev=6595.0, chunk_lattices=1)
    t0 = time.perf_counter()
    simulate_dataset(cache, _mn_tables(), make_detector(), settings, path, overwrite=True)
    out.put({"simulate_s": time.perf_counter() - t0, "simulate_peak_rss_mb": _peak_mb()})


def _s1_child(cache_path, path, out):
    from spread_tools import refine as R
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.structure.cache import SFCache
    cache = SFCache.read(cache_path)
    ds = Dataset.read(path)
    rss_read = _peak_mb()
    cfg = resolve(R.REFINE_SCHEMA)
    t0 = time.perf_counter()
    res = R.refine([ds], cache, cfg, backend="cpu")
    wall = time.perf_counter() - t0
    rss = _peak_mb()
    prep = R.prepare_data([ds], cache, cfg.shoebox.min_pixels)
    prob = R.S1Problem(prep, cache, cfg, backend="cpu")
    n_h = prob.pm.n_h
    n_site = len(cache.site_names)
    out.put({"n_lattices": ds.n_lattices, "n_shoeboxes": ds.n_shoeboxes, "n_pixels": ds.n_pixels,
             "n_channels": ds.n_channels, "n_h_distinct": int(n_h), "wall_s": wall,
             "converged": bool(res.converged), "iterations": len(res.history["objective"]),
             "evaluations": res.n_evaluations, "bands": prob.pm.storage_bytes(),
             # F (complex), I, dI/dfp and dI/dfdp of every site, dI: float64 (n_h, n_chan) each
             "sf_arrays_per_evaluation_bytes": int(n_h * ds.n_channels * 8 * (2 + 1 + 2 * n_site + 1)),
             "peak_rss_after_reading_mb": rss_read, "peak_rss_mb": rss})


def _run(target, *args):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None):
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=29, help="6lk1 copies in the asymmetric unit")
    ap.add_argument("--lattices", type=int, nargs="+", default=[1, 4], help="lattices of the S1 runs")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--d-min", type=float, default=2.5, help="high-resolution limit (Å; 2.5 for the figures)")
    args = ap.parse_args(argv)
    problem = {"cell": list(CELL), "spacegroup": SPACEGROUP, "d_min_a": args.d_min, "d_max_a": 4.0,
               "sites": SITES, "copies": args.copies}
    with tempfile.TemporaryDirectory() as tmp:
        cache_path = Path(tmp) / "psii_sf_cache.h5"
        c = _run(_cache_child, args.copies, args.d_min, str(cache_path))
        emit("psii_cache_sf", problem=problem, **c)
        runs = []
        for n_lat in args.lattices:
            data = Path(tmp) / f"psii_{n_lat}.h5"
            r = _run(_sim_child, str(cache_path), n_lat, args.seed, str(data))
            r.update(_run(_s1_child, str(cache_path), str(data)))
            data.unlink()
            runs.append(r)
            emit("psii_s1", problem=problem, cache_memory_bytes=c["memory_bytes"], **r)
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        mpix = (b["n_pixels"] - a["n_pixels"]) / 1e6
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / mpix if mpix > 0 else float("nan")
        emit("psii_s1_per_mpix", problem=problem, mb_per_million_pixels=slope,
             fixed_mb=a["peak_rss_mb"] - slope * a["n_pixels"] / 1e6,
             pixels=[a["n_pixels"], b["n_pixels"]], peak_rss_mb=[a["peak_rss_mb"], b["peak_rss_mb"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
