"""Kernels: CPU determinism and CPU ↔ CUDA agreement (CUDA in the simulator, in a subprocess).

Both backends are compared with the exact cut (rtol = 0, where the bands must hold the
dense weights) and the default one.

The CUDA kernels run under ``NUMBA_ENABLE_CUDASIM=1`` in a child process, so that
the simulator never leaks into other tests that imported ``numba.cuda`` already.
Inputs are tiny (the simulator runs every GPU thread as a Python thread) but
cover a shoebox with more pixels than a CUDA block has threads (two chunks) and
the first and last channel.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spread_tools.model.kernels import bands_cpu, cpu
from spread_tools.model.pixel import PixelModel, kernel_inputs

sys.path.insert(0, str(Path(__file__).parent))
from test_pixel import make_dataset, random_params  # noqa: E402

_CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_pixel import make_dataset, random_params
    from spread_tools.model.pixel import PixelModel, channel_weights, resolve_backend
    from spread_tools.model.kernels import cuda as ck
    assert resolve_backend("auto") == "cuda"
    ds = make_dataset(seed=11, n_lat=2, n_sb_per_lat=1, box=11, n_domains=3,
                      energy_ev=np.linspace(7080.0, 7220.0, 29), domain=(40.0, 36.0, 30.0))
    out = {"n_pix": int(ds.n_pixels), "tpb": ck.TPB}
    def rel(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        return float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300))
    for rtol in (0.0, 1e-7):
        res = {}
        for backend in ("cpu", "cuda"):
            pm = PixelModel.from_dataset(ds, backend=backend, oversample=2, band_rtol=rtol,
                                         band_floor=0.0 if rtol == 0 else 1e-9)
            I, G, bg = random_params(pm, np.random.default_rng(4))
            nll, dI, dG, dbg, lam = pm.nll_and_gradients(I, G, bg, return_lambda=True)
            res[backend] = dict(w=pm.w, lo=pm.bands.lo, length=pm.bands.length, nll=nll, dI=dI, dG=dG, dbg=dbg,
                                lam=lam, lam2=pm.expected_counts(I, G, bg), nll2=pm.nll(I, G, bg),
                                again=pm.nll_and_gradients(I, G, bg))
            if rtol == 0:
                res[backend]["w_pix"] = channel_weights(ds, backend=backend, oversample=2)
        a, b = res["cpu"], res["cuda"]
        keys = ["w", "nll", "dI", "dG", "dbg", "lam", "lam2", "nll2"] + (["w_pix"] if rtol == 0 else [])
        r = {key: rel(a[key], b[key]) for key in keys}
        r["bands_equal"] = bool(np.array_equal(a["lo"], b["lo"]) and np.array_equal(a["length"], b["length"]))
        r["w_max"] = float(np.max(a["w"]))
        r["w_nonzero_fraction"] = float(np.mean(a["w"] > 0))
        again = b["again"]
        r["cuda_repeat_identical"] = bool(again[0] == b["nll"] and all(np.array_equal(x, y) for x, y in
                                          zip(again[1:], (b["dI"], b["dG"], b["dbg"]))))
        out[str(rtol)] = r
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def cudasim_result():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_cuda_simulator_matches_cpu(cudasim_result):
    r = cudasim_result
    assert r["n_pix"] > r["tpb"]           # a shoebox spans two CUDA chunks
    for rtol in ("0.0", "1e-07"):
        q = r[rtol]
        assert q["w_max"] > 0 and 0 < q["w_nonzero_fraction"] < 1
        assert q["bands_equal"], rtol
        for key in ("w", "nll", "dI", "dG", "dbg", "lam", "lam2", "nll2") + (("w_pix",) if rtol == "0.0" else ()):
            assert q[key] <= 1e-6, (rtol, key, q[key])
        assert q["cuda_repeat_identical"]


def test_cpu_kernels_bit_identical_on_repeat():
    ds = make_dataset(seed=2, n_lat=3, n_sb_per_lat=4)
    kin = kernel_inputs(ds)
    order = ("minv", "dom_off", "s0hat", "pol_n", "pol_f", "nabc", "phi", "porig", "pfast", "pslow",
             "pnorm", "ppix", "pix_off", "bbox", "sb_lat", "sb_panel", "h0", "inv_lam")
    w1 = np.zeros((ds.n_pixels, ds.n_channels), np.float32)
    w2 = np.ones_like(w1)                         # not zeroed: the kernel must overwrite everything
    cpu.channel_weights(*[kin[k] for k in order], 1, w1)
    cpu.channel_weights(*[kin[k] for k in order], 1, w2)
    assert np.array_equal(w1, w2)
    pm = PixelModel(w1, ds.pixel_offset, ds.sb_bbox, ds.sb_lattice, np.arange(ds.n_shoeboxes) % 3,
                    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), ds.counts, ds.mask, backend="cpu")
    I, G, bg = random_params(pm, np.random.default_rng(0))
    r1 = pm.nll_and_gradients(I, G, bg, return_lambda=True)
    r2 = pm.nll_and_gradients(I, G, bg, return_lambda=True)
    assert r1[0] == r2[0]
    for x, y in zip(r1[1:], r2[1:]):
        assert np.array_equal(x, y)


def test_span_reduction_is_fixed_order():
    rng = np.random.default_rng(0)
    n_sb, n_chan, n_lat, n_h = 50, 9, 5, 7
    span_lo = rng.integers(0, 5, n_sb)
    span_len = rng.integers(0, 5, n_sb)
    span_off = np.concatenate([[0], np.cumsum(span_len)])
    nll_sb = rng.standard_normal(n_sb)
    dG_sb = rng.standard_normal(n_sb)
    dI_span = rng.standard_normal(span_off[-1])
    sb_lat = rng.integers(0, n_lat, n_sb)
    sb_h = rng.integers(0, n_h, n_sb)
    nll, dG, dI = bands_cpu.reduce_spans(nll_sb, dG_sb, dI_span, sb_lat, sb_h, span_lo, span_off, n_lat, n_h,
                                         n_chan, True)
    assert nll == pytest.approx(nll_sb.sum(), rel=1e-13)
    np.testing.assert_allclose(dG, np.bincount(sb_lat, dG_sb, minlength=n_lat), rtol=1e-13)
    ref = np.zeros((n_h, n_chan))
    for k in range(n_sb):
        ref[sb_h[k], span_lo[k]:span_lo[k] + span_len[k]] += dI_span[span_off[k]:span_off[k + 1]]
    np.testing.assert_allclose(dI, ref, rtol=1e-13)


def test_cuda_module_imports_without_gpu():
    from spread_tools.model.kernels import bands_cuda, cuda as ck
    assert ck.TPB % 32 == 0 and bands_cuda.TPB == ck.TPB


def test_cuda_kernels_type_and_lower_for_sm90(monkeypatch):
    """Compile the CUDA kernels for a real GPU target (sm_90) up to LLVM IR: catches typing and
    lowering errors that the simulator (plain Python) cannot see. Needs no GPU and no NVRTC
    (device functions ask the current device for its compute capability: answered sm_90)."""
    import types

    import numba
    try:
        from numba.cuda import dispatcher as cuda_dispatcher
        from numba.cuda.compiler import compile_cuda
        from numba.cuda.cudadrv import nvvm
        if not nvvm.is_available():
            pytest.skip("libNVVM not available")
    except ImportError:
        pytest.skip("numba-cuda without compile_cuda")
    if hasattr(cuda_dispatcher, "get_current_device"):
        monkeypatch.setattr(cuda_dispatcher, "get_current_device",
                            lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    from spread_tools.model.kernels import bands_cuda as bk
    from spread_tools.model.kernels import cuda as ck
    from spread_tools.model.pixel import _CW_ORDER
    ds = make_dataset(seed=1, n_lat=1, n_sb_per_lat=1)
    kin = kernel_inputs(ds)
    pm = PixelModel.from_dataset(ds, backend="cpu")
    ty = numba.typeof
    b = pm.bands
    I, G, bg = random_params(pm, np.random.default_rng(0))
    f1, f2, i1 = np.zeros(3), np.zeros((3, 3)), np.zeros(3, np.int64)
    w = np.zeros(10, np.float32)
    cw = tuple(ty(kin[k]) for k in _CW_ORDER)
    i64, f64 = numba.int64, numba.float64
    sigs = [
        (ck.channel_weights, cw + (i64, ty(w), i64, i64)),
        (bk.band_lengths, cw + (i64, f64, ty(b.lo), ty(b.length), ty(np.zeros(3)))),
        (bk.band_values, cw + (i64, ty(b.lo), ty(b.length), ty(b.sb_offset), ty(b.values))),
        (bk.expected_counts, tuple(ty(a) for a in (b.values, b.lo, b.length, b.sb_offset, pm.pixel_offset,
                                                   pm.bbox, pm.sb_lattice, pm.sb_h_index, I, G, bg, f1))),
        (bk.model_pass, tuple(ty(a) for a in (b.values, b.sb_offset, pm.mask, pm.pixel_offset, pm.bbox,
                                              pm.sb_lattice, pm.sb_h_index, pm.span_lo, pm.span_off, pm.wsum,
                                              pm.kmom, pm.act_off, pm.act_row, pm.act_col, pm.act_woff, pm.act_lo,
                                              pm.act_len, pm.act_k, I, G, bg)) + (numba.boolean,)
         + (ty(f1), ty(f2), ty(f2), ty(f1))),
        (bk.reduce_spans_by_h, (ty(i1), ty(i1), ty(i1), ty(i1), ty(f1), ty(f2))),
        (ck.reduce_by_csr, (ty(i1), ty(i1), ty(f2), ty(f2))),
        (ck.sum_fixed_order, (ty(f1), ty(f1))),
    ]
    for kern, sig in sigs:
        try:
            cres = compile_cuda(kern.py_func, numba.types.void, sig, cc=(9, 0))
        except TypeError as exc:        # another numba-cuda version's compile_cuda signature
            pytest.skip(f"compile_cuda API differs: {exc}")
        assert "define" in str(cres.library.get_llvm_str())
