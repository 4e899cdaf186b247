"""Benchmark of the structure-factor cache at LY99 size (one JSON line per figure).

The problem: the 6lk1 ferredoxin asymmetric unit (1717 atoms, two [2Fe-2S]
clusters) copied ``--copies`` times by translation into a P4₁2₁2 cell of
107 × 107 × 304 Å (the LY99 MMO cell), which gives LY99's atom density with the
default 12 copies (~20,600 atoms in the asymmetric unit, ~165,000 in the
cell), and the d range 4.0–2.5 Å (~7×10⁵ P1 indices, both Friedel mates).
Copies may overlap their symmetry mates: that does not matter for timing.

Figures:

* ``cache_sf_auto``: the whole cache (sites direct, the rest by the FFT route);
* ``direct_sum``: the direct-summation kernel on a thin shell of the same
  problem (its cost is n_h × n_atom_copies: the figure is atom-pairs per second);
* ``intensity_and_gradients``: I(h,E), ∂I/∂f′, ∂I/∂f″ for every cached h at
  26 energies (what each refinement evaluation needs).

Run: ``python benchmarks/bench_cache_sf.py [--copies 12] [--d-min 2.5]``.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import gemmi
import numba
import numpy as np
from _common import machine

import spread_tools
from spread_tools.structure.build import build_sf_cache
from spread_tools.structure.factors import intensity_and_gradients

REPO = Path(__file__).resolve().parents[1]


def versions():
    """Versions of the packages doing the work."""
    return {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "gemmi": gemmi.__version__,
            "spread_tools": spread_tools.__version__}


def ly99_like_structure(copies):
    """6lk1 translated ``copies`` times into the LY99 P4₁2₁2 cell."""
    src = gemmi.read_structure(str(REPO / "test_data" / "models" / "6lk1.pdb"))
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(107.0, 107.0, 304.0, 90, 90, 90)
    st.spacegroup_hm = "P 41 21 2"
    model = gemmi.Model("1")
    names = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
    shifts = [(i * 27.0, j * 27.0, k * 38.0) for k in range(8) for j in range(2) for i in range(2)]
    for n in range(copies):
        dx, dy, dz = shifts[n % len(shifts)]
        for ch in src[0]:
            new = ch.clone()
            new.name = next(names)
            for res in new:
                for atom in res:
                    p = atom.pos
                    atom.pos = gemmi.Position(p.x + dx, p.y + dy, p.z + dz)
            model.add_chain(new)
    st.add_model(model)
    st.setup_entities()
    return st


def fft_accuracy(cache, direct):
    """Errors of the cache's F_base against a direct-route cache of a thin shell."""
    rows = cache.index_of(direct.hkl)
    ok = rows >= 0
    F_fft, F_dir = cache.F_base[rows[ok]], direct.F_base[ok]
    rms = np.sqrt(np.mean(np.abs(F_dir) ** 2))
    strong = np.abs(F_dir) >= 0.05 * rms
    return {"max_abs_err_over_rms": float(np.max(np.abs(F_fft - F_dir)) / rms),
            "max_rel_err_strong": float(np.max(np.abs(F_fft - F_dir)[strong]
                                               / np.abs(F_dir[strong]))),
            "n_compared": int(ok.sum())}


def emit(figure, **fields):
    """Print one JSON line."""
    print(json.dumps({"benchmark": "bench_cache_sf", "figure": figure, "machine": machine(),
                      "versions": versions(), **fields}), flush=True)


def main(argv=None):
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=12, help="6lk1 copies in the asymmetric unit")
    ap.add_argument("--d-min", type=float, default=2.5, help="high-resolution limit (Å)")
    ap.add_argument("--d-max", type=float, default=4.0, help="low-resolution limit (Å)")
    ap.add_argument("--shell", type=float, default=0.02,
                    help="thickness (Å) of the shell below d_max timed with the direct route")
    args = ap.parse_args(argv)
    st = ly99_like_structure(args.copies)
    n_asu = st[0].count_atom_sites()
    sites = ["FE1=FES/FE1", "FE2=FES/FE2"]
    energy = np.arange(7070.0, 7171.0, 4.0)
    problem = {"cell": [107.0, 107.0, 304.0, 90, 90, 90], "spacegroup": "P 41 21 2",
               "atoms_asu": n_asu, "atom_copies_cell": n_asu * 8}

    # warm the numba kernels (compile or load cache) outside the timings
    build_sf_cache(st, sites, args.d_max - 0.001, args.d_max, energy, route="direct")

    timings = {}
    t0 = time.perf_counter()
    cache = build_sf_cache(st, sites, args.d_min, args.d_max, energy, route="auto",
                           timings=timings)
    wall = time.perf_counter() - t0
    emit("cache_sf_auto", problem={**problem, "d_min_a": args.d_min, "d_max_a": args.d_max,
                                   "n_h": cache.n_h, "route": timings["route"]},
         wall_s=round(wall, 3), stages_s={k: round(v, 3) for k, v in timings.items()
                                          if k.endswith("_s")},
         p1_indices_per_s=round(cache.n_h / wall, 1))

    timings = {}
    t0 = time.perf_counter()
    shell = build_sf_cache(st, sites, args.d_max - args.shell, args.d_max, energy,
                           route="direct", timings=timings)
    wall = time.perf_counter() - t0
    pairs = shell.n_h * timings["atom_copies"]
    hi_shell = build_sf_cache(st, sites, args.d_min, args.d_min + args.shell / 4, energy,
                              route="direct")
    accuracy = {f"d_{lab}": fft_accuracy(cache, sh)
                for lab, sh in (("max_shell", shell), ("min_shell", hi_shell))}
    emit("direct_sum", problem={**problem, "d_min_a": args.d_max - args.shell,
                                "d_max_a": args.d_max, "n_h": shell.n_h, "route": "direct"},
         wall_s=round(wall, 3), p1_indices_per_s=round(shell.n_h / wall, 1),
         atom_pairs_per_s=round(pairs / timings["atoms_s"], 1),
         projected_full_direct_s=round(cache.n_h * timings["atom_copies"] /
                                       (pairs / timings["atoms_s"]), 1),
         fft_accuracy=accuracy)

    fp = np.full((2, len(energy)), -6.0)
    fdp = np.full((2, len(energy)), 3.0)
    intensity_and_gradients(cache, energy, fp, fdp, h_index=np.arange(10))
    t0 = time.perf_counter()
    intensity_and_gradients(cache, energy, fp, fdp)
    wall = time.perf_counter() - t0
    emit("intensity_and_gradients", problem={**problem, "n_h": cache.n_h, "n_E": len(energy),
                                             "n_site": 2},
         wall_s=round(wall, 3), p1_indices_per_s=round(cache.n_h / wall, 1),
         values_per_s=round(cache.n_h * len(energy) * 5 / wall, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
