"""Benchmark of the pixel-model kernels; prints one JSON line per figure.

Figures:

* ``channel_weights``: pixel·channel·domain evaluations per second of the dense
  channel-weight kernel (the simulator's; a synthetic dataset of spots on the
  default detector).
* ``channel_bands``: the channel bands of the same dataset computed directly
  (analytic window per pixel, two passes, never dense): time, ratio to the dense
  kernel, channels evaluated per pixel, stored bytes against dense.
* ``memory_bandwidth``: a numpy copy of as many bytes as the *dense* float32
  channel weights of the model problem (a device-to-device copy on the GPU),
  counted as bytes read + bytes written per second.
* ``model_nll_gradients``: one λ + NLL + all gradients pass at LY99 size
  (23,121,402 pixels × 26 channels, 66,069 shoeboxes, 3044 lattices; or
  ``--fraction`` of it) on channel bands: time, ``pass_over_copy`` (time over
  the time of the dense copy, the issue asks ≤ 1/3), the bytes stored and read per
  pass. The bands are random: ``--empty`` of the pixels have none, the others
  a length uniform in 1..``2·mean − 1`` with ``--band-mean`` channels on average (the
  simulated LY99-like data: 34 % empty, 6.4 channels of 4 eV); ``--count-mean``
  photons per pixel (Poisson). On the GPU, ``time_s`` is the user-level call
  (parameter uploads and gradient downloads included) and ``kernel_time_s`` the kernels only.

Usage::

    python benchmarks/bench_kernels.py [--backend cpu|cuda|auto] [--fraction 1.0] [--repeat 5]
"""

import argparse
import json
import sys
import time

import numpy as np
from _common import machine

LY99 = {"n_pix": 23_121_402, "n_sb": 66_069, "n_lat": 3044, "n_chan": 26}


def emit(figure, info, **values):
    """Print one JSON line: the figure, its values and the machine."""
    print(json.dumps({"figure": figure, **values, "machine": info}), flush=True)


def bench_channel_weights(backend, n_sb, box, n_chan, n_domains, info, repeat):
    from spread_tools.io.dataset import Dataset
    from spread_tools.model import geometry
    from spread_tools.model.pixel import channel_weights
    rng = np.random.default_rng(0)
    det = geometry.default_detector()
    arr = det.as_arrays()
    n_pix_sb = box * box
    panel = rng.integers(0, len(det), n_sb)
    x0 = rng.integers(0, 352 - box, n_sb)
    y0 = rng.integers(0, 384 - box, n_sb)
    bbox = np.stack([x0, x0 + box, y0, y0 + box], axis=1).astype(np.int32)
    # Miller indices near the pixels' own diffraction condition so L is not trivially 0
    A = np.eye(3) / 60.0
    s1 = np.array([geometry.pixel_to_lab_mm(det[p], x + box / 2, y + box / 2) for p, x, y in zip(panel, x0, y0)])
    s1 /= np.linalg.norm(s1, axis=1, keepdims=True)
    k = 7100.0 / geometry.HC_EV_A
    hkl = np.rint((s1 - [0, 0, -1.0]) * k @ np.linalg.inv(A).T).astype(np.int32)

    def make(nsb):
        sizes = np.full(nsb, n_pix_sb)
        n_pix = int(sizes.sum())
        return Dataset(
            cell=np.array([60, 60, 60, 90, 90, 90.0]), spacegroup="P 1", **arr,
            energy_ev=np.linspace(7070, 7170, n_chan), spectrum_weight=np.ones((1, n_chan)),
            A=A[None], beam_direction=np.array([[0, 0, 1.0]]), polarization_normal=np.array([[0, 1.0, 0]]),
            polarization_fraction=np.array([0.999]), domain_size_cells=np.array([[20.0, 20.0, 20.0]]),
            mosaic_spread_deg=np.array([0.05]), n_domains=np.array([n_domains], np.int32),
            identifier=np.array(["bench"]), sb_lattice=np.zeros(nsb, np.int32),
            sb_panel=panel[:nsb].astype(np.int32), sb_bbox=bbox[:nsb], sb_miller_index=hkl[:nsb],
            pixel_offset=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            counts=np.zeros(n_pix, np.float32), mask=np.ones(n_pix, bool))
    channel_weights(make(min(2, n_sb)), backend=backend)      # compile
    ds = make(n_sb)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        w = channel_weights(ds, backend=backend)
        times.append(time.perf_counter() - t0)
    t = min(times)
    evals = ds.n_pixels * n_chan * n_domains
    emit("channel_weights", info, evaluations_per_s=evals / t, time_s=t, n_pix=ds.n_pixels, n_chan=n_chan,
         n_domains=n_domains, oversample=1, nonzero_fraction=float(np.mean(w > 0)))
    from spread_tools.model.bands import DEFAULT_FLOOR, DEFAULT_RTOL, build_bands
    from spread_tools.model.pixel import kernel_inputs
    build_bands(kernel_inputs(make(min(2, n_sb))), 2 * n_pix_sb, n_chan, 1, DEFAULT_RTOL, backend=backend,
                floor=DEFAULT_FLOOR)
    kin = kernel_inputs(ds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        bands = build_bands(kin, ds.n_pixels, n_chan, 1, DEFAULT_RTOL, backend=backend, floor=DEFAULT_FLOOR)
        times.append(time.perf_counter() - t0)
    tb = min(times)
    extra = {}
    if backend == "cpu":
        wb = bands.to_dense(ds.pixel_offset).astype(np.float64)
        wd = w.astype(np.float64)
        dropped = np.abs(wd - wb).sum(axis=1)
        tot = wd.sum(axis=1)
        extra["max_dropped_over_total"] = float(np.max(np.where(tot > 0, dropped / np.where(tot > 0, tot, 1), 0)))
        extra["channels_evaluated_per_pixel"] = bands.stats["channels_evaluated"] / ds.n_pixels
    emit("channel_bands", info, time_s=tb, dense_time_s=t, speedup_over_dense=t / tb, band_rtol=DEFAULT_RTOL,
         band_floor=DEFAULT_FLOOR,
         n_pix=ds.n_pixels, n_chan=n_chan, n_domains=n_domains, mean_band_channels=float(bands.length.mean()),
         stored_bytes=bands.value_bytes() + bands.index_bytes(), dense_bytes=bands.dense_bytes(), **extra)


def synthetic_model(backend, fraction, n_chan, band_mean=6.4, empty=0.34, count_mean=0.5, seed=0):
    """A PixelModel of LY99 shape with random channel bands (values do not change the cost)."""
    from spread_tools.model.bands import ChannelBands, _sb_offsets
    from spread_tools.model.pixel import PixelModel
    rng = np.random.default_rng(seed)
    n_sb = max(1, int(round(LY99["n_sb"] * fraction)))
    n_lat = max(1, int(round(LY99["n_lat"] * fraction)))
    mean = LY99["n_pix"] / LY99["n_sb"]                       # ≈ 350 pixels per shoebox
    side = rng.integers(15, 23, n_sb)                          # 15..22 px square boxes
    height = np.maximum(1, np.rint(mean / side)).astype(np.int64)
    sizes = side * height
    n_pix = int(sizes.sum())
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    x0 = rng.integers(0, 300, n_sb)
    y0 = rng.integers(0, 300, n_sb)
    bbox = np.stack([x0, x0 + side, y0, y0 + height], axis=1)
    sb_lat = np.sort(rng.integers(0, n_lat, n_sb))
    n_h = max(1, n_sb // 3)
    sb_h = rng.integers(0, n_h, n_sb)
    hkl = np.stack([np.arange(n_h), np.zeros(n_h), np.zeros(n_h)], axis=1)
    top = max(1, min(n_chan, int(round(2 * band_mean - 1))))
    length = np.where(rng.random(n_pix) < empty, 0, rng.integers(1, top + 1, n_pix)).astype(np.uint16)
    lo = (rng.random(n_pix) * (n_chan - length + 1)).astype(np.uint16)
    sb_off = _sb_offsets(off, lo, length)
    values = np.empty(int(sb_off[-1]), np.float32)
    step = 1 << 22
    for i in range(0, len(values), step):
        values[i:i + step] = rng.random(min(step, len(values) - i), dtype=np.float32) * 1e-3
    counts = rng.poisson(count_mean, n_pix).astype(np.float32)
    mask = np.ones(n_pix, bool)
    bands = ChannelBands(n_chan, lo, length, sb_off, values, 1e-7)
    pm = PixelModel(bands, off, bbox, sb_lat, sb_h, hkl, counts, mask, n_lattices=n_lat, backend=backend)
    I = rng.uniform(100, 1000, (n_h, n_chan))
    G = np.ones(n_lat)
    bg = np.column_stack([np.full(n_sb, np.log(count_mean)), np.zeros(n_sb), np.zeros(n_sb)])
    return pm, I, G, bg


def bench_copy(backend, n_bytes, repeat, src=None):
    if backend == "cuda":
        from numba import cuda
        a = cuda.device_array(n_bytes // 4, np.float32)
        b = cuda.device_array(n_bytes // 4, np.float32)
        b.copy_to_device(a)
        cuda.synchronize()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            b.copy_to_device(a)
            cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del a, b
    else:
        a = src if src is not None else np.ones(n_bytes // 4, np.float32)
        b = np.empty_like(a)
        np.copyto(b, a)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            np.copyto(b, a)
            times.append(time.perf_counter() - t0)
        del b
    return min(times)


def bench_model(backend, fraction, n_chan, info, repeat, band_mean, empty, count_mean):
    pm, I, G, bg = synthetic_model(backend, fraction, n_chan, band_mean, empty, count_mean)
    w_bytes = pm.n_pix * pm.n_chan * 4
    pm.nll_and_gradients(I, G, bg)                              # compile / warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = pm.nll_and_gradients(I, G, bg)
        times.append(time.perf_counter() - t0)
    t = min(times)                                              # the best of repeat, as the copy's
    extra = {}
    if backend == "cuda":
        extra["kernel_time_s"] = _cuda_kernel_time(pm, I, G, bg, repeat)
    t_copy = bench_copy(backend, w_bytes, repeat)
    emit("memory_bandwidth", info, bytes_per_s=2 * w_bytes / t_copy, copy_bytes=w_bytes, time_s=t_copy,
         method="numpy.copyto" if backend == "cpu" else "device-to-device copy")
    t_best = extra.get("kernel_time_s", t)
    stored = pm.storage_bytes()
    read = pm.pass_bytes()
    emit("model_nll_gradients", info, time_s=t, pass_over_copy=t_best / t_copy, dense_copy_s=t_copy,
         w_dense_bytes=w_bytes, w_stored_bytes=stored["total"], w_stored=stored, w_read_bytes=read["total"],
         w_read=read, read_bytes_per_s=read["total"] / t_best, fraction_of_ly99=fraction, n_pix=pm.n_pix,
         n_chan=pm.n_chan, n_sb=pm.n_sb, n_lat=pm.n_lat, n_h=pm.n_h, active_pixels=int(pm.act_off[-1]),
         mean_band_channels=float(pm.bands.length.mean()), nll=float(out[0]), **extra)
    t0 = time.perf_counter()
    pm.nll(I, G, bg)
    emit("model_nll_only", info, time_s=time.perf_counter() - t0, n_pix=pm.n_pix, n_chan=pm.n_chan)


def _cuda_kernel_time(pm, I, G, bg, repeat):
    from numba import cuda

    from spread_tools.model.kernels import bands_cuda as ck
    d = pm._dev
    I_d, G_d, bg_d = cuda.to_device(I), cuda.to_device(G), cuda.to_device(bg)
    times = []
    for _ in range(repeat + 1):
        cuda.synchronize()
        t0 = time.perf_counter()
        ck.model_pass[pm.n_sb, ck.TPB](
            d["values"], d["sb_offset"], d["mask"], d["pixel_offset"], d["bbox"], d["sb_lattice"], d["sb_h_index"],
            d["span_lo"], d["span_off"], d["wsum"], d["kmom"], d["act_off"], d["act_row"], d["act_col"],
            d["act_woff"], d["act_lo"], d["act_len"], d["act_k"], I_d, G_d, bg_d, True, d["nll_sb"], d["dG_sb"],
            d["dbg_sb"], d["dI_span"])
        ck.sum_fixed_order[1, ck.TPB](d["nll_sb"], d["nll"])
        ck.reduce_spans_by_h[ck.blocks_for(pm.n_h * pm.n_chan), ck.TPB](
            d["h_order"], d["h_off"], d["span_lo"], d["span_off"], d["dI_span"], d["dI"])
        ck.reduce_by_csr[ck.blocks_for(pm.n_lat), ck.TPB](d["lat_order"], d["lat_off"], d["dG_sb"], d["dG"])
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--fraction", type=float, default=1.0, help="fraction of the LY99 problem size (pixels, "
                    "shoeboxes, lattices) for the model pass")
    ap.add_argument("--n-chan", type=int, default=LY99["n_chan"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cw-shoeboxes", type=int, default=None,
                    help="shoeboxes (21×21 px) of the channel-weight benchmark (default 200 cpu, 20000 cuda)")
    ap.add_argument("--cw-domains", type=int, default=10)
    ap.add_argument("--skip-channel-weights", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--band-mean", type=float, default=6.4, help="mean channels of a non-empty band")
    ap.add_argument("--empty", type=float, default=0.34, help="fraction of pixels without a band")
    ap.add_argument("--count-mean", type=float, default=0.5, help="mean photons per pixel")
    args = ap.parse_args(argv)
    from spread_tools.model.pixel import resolve_backend
    backend = resolve_backend(args.backend)
    info = machine(backend)
    if not args.skip_channel_weights:
        n_sb = args.cw_shoeboxes or (20000 if backend == "cuda" else 200)
        bench_channel_weights(backend, n_sb, 21, args.n_chan, args.cw_domains, info, args.repeat)
    if not args.skip_model:
        bench_model(backend, args.fraction, args.n_chan, info, args.repeat, args.band_mean, args.empty,
                    args.count_mean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
