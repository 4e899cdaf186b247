"""Benchmark of refine_geometry at LY99 size (3044 lattices of the ly99 preset); JSON lines.

Figures:

* ``geometry_simulate``: the simulated dataset (not part of the benchmark; for context).
* ``geometry_kernel``: one evaluation of the geometry kernel (λ, NLL, gradient and Fisher
  information in every crystal parameter) on ``--kernel-lattices`` lattices, against the
  forward channel-weight kernel of S1 (``model.pixel.channel_weights``: w only, every
  channel) on the same lattices in the same run: times, their ratio, and the forward
  kernel's pixel·channel·domain throughput; and the geometry kernel's forward-only call
  (λ without the matrix-parameter derivatives: ``LatticeProblem.forward``) against its full one.
* ``geometry_refine``: the whole ``refine_geometry`` (library call, defaults): wall time,
  peak resident memory, Levenberg–Marquardt iterations per lattice, macrocycles, and the
  errors of the refined models against the simulation truth next to those of the stored
  models (rotation per axis in degrees with its reported σ, cell edges, domain size,
  mosaic spread, energy offset), and the macrocycle history (per macrocycle: wall time of
  the fits and of the offset step, lattices refitted, LM iterations, offset evaluations).

Usage::

    python benchmarks/bench_geometry.py [--lattices 3044] [--channel-step-ev 4] [--dataset PATH]
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

REPO = Path(__file__).resolve().parents[1]


def emit(figure, info, **values):
    """Print one JSON line."""
    print(json.dumps({"figure": figure, **values, "machine": info}), flush=True)


def peak_rss_mb():
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulate(path, n_lat, step_ev, seed):
    """A ly99-preset dataset of ``n_lat`` lattices."""
    from spread_tools.cli.simulate_data import PRESETS, SCHEMA, settings_from_config
    from spread_tools.config import resolve
    from spread_tools.physics.scattering import read_table
    from spread_tools.simulate.simulator import make_detector, simulate_dataset
    from spread_tools.structure.cache import SFCache
    spectra = REPO / "test_data" / "spectra"
    cfg = resolve(SCHEMA, overrides=["preset=ly99", f"lattices={n_lat}", f"seed={seed}",
                                     f"spectrum.step_ev={step_ev}", "chunk_lattices=64"], presets=PRESETS)
    truth = {"FE1": read_table(spectra / "pf-rd-ox_fftkk.out"), "FE2": read_table(spectra / "pf-rd-red_fftkk.out")}
    return simulate_dataset(SFCache.read(REPO / "test_data" / "sf_cache.h5"), truth, make_detector(),
                            settings_from_config(cfg), path, overwrite=True)


def model_errors(ds, A, N, mosaic, offset_ev, kept):
    """RMS errors of crystal models against the truth, over the lattices ``kept``."""
    from spread_tools.model.crystal_params import cell_from_A, rotation_angle_deg
    t = ds.truth
    rot = np.array([rotation_angle_deg(A[j], t.A[j]) for j in kept])
    cell = np.array([cell_from_A(A[j])[:3] / t.cell[j, :3] - 1 for j in kept])
    return {"rotation_rms_deg_per_axis": float(np.sqrt(np.mean(rot ** 2) / 3)),
            "cell_edge_rms_fraction": float(np.sqrt(np.mean(cell ** 2))),
            "domain_size_rms_log": float(np.sqrt(np.mean(np.log(N[kept, 0] / t.domain_size_cells[kept, 0]) ** 2))),
            "mosaic_rms_log": float(np.sqrt(np.mean(np.log(mosaic[kept] / t.mosaic_spread_deg[kept]) ** 2))),
            "energy_offset_error_ev": float(np.mean(offset_ev - t.spectrum_offset_ev[kept]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lattices", type=int, default=3044)
    ap.add_argument("--channel-step-ev", type=float, default=4.0)
    ap.add_argument("--dataset", type=Path, default=None, help="use this ly99-preset dataset")
    ap.add_argument("--keep", type=Path, default=None, help="keep the simulated dataset here")
    ap.add_argument("--output", type=Path, default=None, help="write the refined dataset here")
    ap.add_argument("--kernel-lattices", type=int, default=100)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--words", nargs="*", default=[], help="refine_geometry key=value parameters")
    args = ap.parse_args(argv)
    from spread_tools.config import resolve
    from spread_tools.io.dataset import Dataset
    from spread_tools.model.crystal_params import CellParameterization, stored_domain_matrices
    from spread_tools.model.lattice_batch import LatticeBatch
    from spread_tools.model.pixel import channel_weights, resolve_backend
    from spread_tools.refine.crystal_models import GEOMETRY_SCHEMA, refine_geometry, refined_dataset
    from spread_tools.structure.cache import SFCache
    backend = resolve_backend(args.backend)
    info = machine(backend)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dataset
        if path is None:
            path = args.keep or Path(tmp) / "ly99.h5"
            t0 = time.perf_counter()
            s = simulate(path, args.lattices, args.channel_step_ev, args.seed)
            emit("geometry_simulate", info, time_s=time.perf_counter() - t0, n_lattices=s.n_lattices,
                 n_shoeboxes=s.n_shoeboxes, n_pixels=s.n_pixels, bragg_fraction=s.bragg_counts / s.total_counts)
        ds = Dataset.read(path)
        size = {"n_lattices": ds.n_lattices, "n_shoeboxes": ds.n_shoeboxes, "n_pixels": ds.n_pixels,
                "n_channels": ds.n_channels}

        # kernels on a subset: geometry (all derivatives) vs S1's forward channel weights
        sub = ds.select_lattices(np.arange(min(args.kernel_lattices, ds.n_lattices)))
        param = CellParameterization.for_spacegroup(sub.spacegroup, sub.cell)
        minv, dminv_all, dom_off = stored_domain_matrices(sub, param)
        batch = LatticeBatch(sub, backend=backend)
        I_sb = np.full((sub.n_shoeboxes, sub.n_channels), 100.0)
        bg = np.tile([1.0, 0, 0], (sub.n_shoeboxes, 1))
        call = lambda: batch.evaluate(minv, dminv_all, dom_off,  # noqa: E731
                                      sub.domain_size_cells, batch.inverse_wavelength(np.zeros(sub.n_lattices)),
                                      I_sb, np.zeros_like(I_sb), np.ones(sub.n_lattices), bg)
        call_fwd = lambda: batch.evaluate(minv, dminv_all[:, :0], dom_off,  # noqa: E731
                                          sub.domain_size_cells, batch.inverse_wavelength(np.zeros(sub.n_lattices)),
                                          I_sb, np.zeros_like(I_sb), np.ones(sub.n_lattices), bg, want_lam=True)
        call()
        call_fwd()
        channel_weights(sub, backend=backend)
        t_geo = min(_timed(call) for _ in range(3))
        t_geo_fwd = min(_timed(call_fwd) for _ in range(3))
        t_fwd = min(_timed(lambda: channel_weights(sub, backend=backend)) for _ in range(3))
        work = float(sub.n_pixels) * sub.n_channels * float(np.mean(sub.n_domains))
        emit("geometry_kernel", info, n_lattices=sub.n_lattices, n_pixels=sub.n_pixels, n_channels=sub.n_channels,
             n_parameters_per_shoebox=int(dminv_all.shape[1]) + 8,
             geometry_kernel_s=t_geo, forward_channel_weights_s=t_fwd, ratio_geometry_to_forward=t_geo / t_fwd,
             geometry_forward_only_s=t_geo_fwd, ratio_forward_only_to_geometry=t_geo_fwd / t_geo,
             forward_px_ch_dom_per_s=work / t_fwd, geometry_px_per_s=sub.n_pixels / t_geo)

        cache = SFCache.read(REPO / "test_data" / "sf_cache.h5")
        cfg = resolve(GEOMETRY_SCHEMA, overrides=[f"backend={backend}", *args.words])
        t0 = time.perf_counter()
        res = refine_geometry(ds, cache, cfg, log=lambda s: print("#", s, flush=True))
        wall = time.perf_counter() - t0
        k = res.kept
        t = res.table
        stored = model_errors(ds, ds.A, ds.domain_size_cells, ds.mosaic_spread_deg, 0.0, k)
        refined = model_errors(ds, res.A, res.domain_size_cells, res.mosaic_spread_deg,
                               res.energy_offset_ev + res.lattice_offset_ev[k], k)
        sigma = float(np.sqrt(np.mean(t["rotation_sigma_deg"][k] ** 2)))
        emit("geometry_refine", info, **size, wall_s=wall, peak_rss_mb=peak_rss_mb(),
             lattices_kept=int(len(k)), statuses={s: int(np.sum(t["status"] == s)) for s in set(t["status"])},
             iterations_per_lattice=float(np.mean(t["iterations"][k])), macrocycles=len(res.macrocycles),
             energy_offset_ev=res.energy_offset_ev, truth_offset_mean_ev=float(np.mean(ds.truth.spectrum_offset_ev)),
             stored=stored, refined=refined, rotation_sigma_rms_deg=sigma,
             rotation_error_over_sigma=refined["rotation_rms_deg_per_axis"] / sigma,
             centroid_rmsd_start_px=float(np.nanmedian(t["centroid_rmsd_start_px"][k])),
             centroid_rmsd_final_px=float(np.nanmedian(t["centroid_rmsd_final_px"][k])),
             macrocycle_history=res.macrocycles)
        if args.output:
            refined_dataset(ds, res).write(args.output, overwrite=True)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
