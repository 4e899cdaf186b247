"""Kernels: CPU determinism and CPU ↔ CUDA agreement (CUDA in the simulator, in a subprocess).

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

from spread_tools.model.kernels import cpu
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
    ds = make_dataset(seed=11, n_lat=2, n_sb_per_lat=1, box=11, n_domains=3)
    out = {"n_pix": int(ds.n_pixels), "tpb": ck.TPB}
    res = {}
    for backend in ("cpu", "cuda"):
        pm = PixelModel.from_dataset(ds, backend=backend, oversample=2)
        I, G, bg = random_params(pm, np.random.default_rng(4))
        nll, dI, dG, dbg, lam = pm.nll_and_gradients(I, G, bg, return_lambda=True)
        res[backend] = dict(w=pm.w, w_pix=channel_weights(ds, backend=backend, oversample=2),
                            nll=nll, dI=dI, dG=dG, dbg=dbg, lam=lam, lam2=pm.expected_counts(I, G, bg),
                            nll2=pm.nll(I, G, bg))
    a, b = res["cpu"], res["cuda"]
    def rel(x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        return float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300))
    for key in ("w", "w_pix", "nll", "dI", "dG", "dbg", "lam", "lam2", "nll2"):
        out[key] = rel(a[key], b[key])
    out["w_max"] = float(np.max(a["w"]))
    out["cuda_repeat_identical"] = bool(res["cuda"]["nll"] == res["cuda"]["nll2"])
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
    assert r["w_max"] > 0
    for key in ("w", "w_pix", "nll", "dI", "dG", "dbg", "lam", "lam2", "nll2"):
        assert r[key] <= 1e-5, (key, r[key])
    assert r["cuda_repeat_identical"]


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


def test_per_shoebox_reduction_is_fixed_order():
    rng = np.random.default_rng(0)
    n_sb, n_chan = 50, 4
    nll_sb = rng.standard_normal(n_sb)
    dG_sb = rng.standard_normal(n_sb)
    dI_sb = rng.standard_normal((n_sb, n_chan))
    sb_lat = rng.integers(0, 5, n_sb)
    sb_h = rng.integers(0, 7, n_sb)
    nll, dG, dI = cpu.reduce_per_shoebox(nll_sb, dG_sb, dI_sb, sb_lat, sb_h, 5, 7, True)
    assert nll == pytest.approx(nll_sb.sum(), rel=1e-13)
    np.testing.assert_allclose(dG, np.bincount(sb_lat, dG_sb, minlength=5), rtol=1e-13)
    ref = np.zeros((7, n_chan))
    np.add.at(ref, sb_h, dI_sb)
    np.testing.assert_allclose(dI, ref, rtol=1e-13)


def test_cuda_module_imports_without_gpu():
    from spread_tools.model.kernels import cuda as ck
    assert ck.TPB % 32 == 0 and ck.MAX_CHAN >= 100


def test_cuda_kernels_type_and_lower_for_sm90():
    """Compile the CUDA kernels for a real GPU target (sm_90) up to LLVM IR: catches typing and
    lowering errors that the simulator (plain Python) cannot see. Needs no GPU and no NVRTC."""
    import numba
    try:
        from numba.cuda.compiler import compile_cuda
        from numba.cuda.cudadrv import nvvm
        if not nvvm.is_available():
            pytest.skip("libNVVM not available")
    except ImportError:
        pytest.skip("numba-cuda without compile_cuda")
    from spread_tools.model.kernels import cuda as ck
    from spread_tools.model.pixel import _CW_ORDER
    ds = make_dataset(seed=1, n_lat=1, n_sb_per_lat=1)
    kin = kernel_inputs(ds)
    ty = numba.typeof
    w = np.zeros(10, np.float32)
    f1, f2, i1, b1 = np.zeros(3), np.zeros((3, 3)), np.zeros(3, np.int64), np.zeros(3, bool)
    sigs = [
        (ck.channel_weights, tuple(ty(kin[k]) for k in _CW_ORDER) + (numba.int64, ty(w), numba.int64, numba.int64)),
        (ck.model_per_shoebox, (ty(w), numba.int64, ty(np.zeros(3, np.float32)), ty(b1), ty(i1),
                                ty(np.zeros((3, 4), np.int64)), ty(i1), ty(i1), ty(f2), ty(f1), ty(f2),
                                numba.boolean, numba.boolean, ty(f1), ty(f1), ty(f2), ty(f2), ty(f2))),
        (ck.reduce_by_csr, (ty(i1), ty(i1), ty(f2), ty(f2))),
        (ck.sum_fixed_order, (ty(f1), ty(f1))),
    ]
    for kern, sig in sigs:
        try:
            cres = compile_cuda(kern.py_func, numba.types.void, sig, cc=(9, 0))
        except TypeError as exc:        # another numba-cuda version's compile_cuda signature
            pytest.skip(f"compile_cuda API differs: {exc}")
        assert "define" in str(cres.library.get_llvm_str())
