"""Tests of the geometry-refinement pixel model (LatticeBatch and its CPU/CUDA kernels):
values against the S1 channel-weight kernel, every gradient family against finite
differences, the band cut against all channels, determinism."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools.io.dataset import Dataset
from spread_tools.model.crystal_params import CellParameterization, domain_matrices, split_orientation
from spread_tools.model.lattice_batch import DEFAULT_CUT, LatticeBatch
from spread_tools.model.pixel import channel_weights
from spread_tools.structure.cache import SFCache
from spread_tools.structure.factors import intensity_and_gradients


TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


@pytest.fixture(scope="module")
def small():
    ds = Dataset.read(TEST_DATA / "dataset.h5").select_lattices([0, 5])
    keep = np.flatnonzero(np.isin(np.arange(ds.n_shoeboxes), np.r_[0:6, ds.n_shoeboxes - 6:ds.n_shoeboxes]))
    ds = ds.select_shoeboxes(keep)
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    t = ds.truth
    rows = cache.index_of(ds.sb_miller_index)
    I, _, _ = intensity_and_gradients(cache, ds.energy_ev, t.fp, t.fdp, h_index=rows)
    I_sb = np.ascontiguousarray(I.T)
    # a smooth made-up energy slope of I, so that the offset's chain rule is exercised
    dI_sb = 0.01 * I_sb * np.cos((ds.energy_ev - 7100.0) / 20.0)[None, :]
    return ds, I_sb, dI_sb


#: A band cut whose truncation is below round-off in the finite differences (the default cut
#: is tested against all channels below).
EXACT_CUT = 30.0


class Point:
    """Crystal models of a small dataset as flat parameters, and the NLL at them."""

    def __init__(self, ds, I_sb, dI_sb, backend="cpu", cut=EXACT_CUT, rng=None):
        self.ds, self.I0, self.dI = ds, I_sb, dI_sb
        self.param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
        self.batch = LatticeBatch(ds, backend=backend, cut=cut)
        rng = rng or np.random.default_rng(3)
        n = ds.n_lattices
        self.U0, self.p = [], []
        for j in range(n):
            U0, p0 = split_orientation(ds.A[j], self.param)
            self.U0.append(U0)
            self.p.append(p0 * (1 + 3e-4 * rng.standard_normal(self.param.n_free)))
        self.theta = 2e-4 * rng.standard_normal((n, 3))
        self.eta = np.asarray(ds.mosaic_spread_deg) * 1.1
        self.lnN = np.log(ds.domain_size_cells) + 0.05 * rng.standard_normal((n, 3))
        self.delta = 0.3 + 0.1 * rng.standard_normal(n)
        self.g = np.log(ds.truth.G) + 0.1
        self.bg = ds.truth.background + [0.05, 0.01, -0.01]

    def evaluate(self, want_lam=False, want_jac=False, no_q=False):
        """Kernel results; ``no_q``: without the matrix parameters (the forward-only call)."""
        mats, dms, off = [], [], [0]
        for j in range(self.ds.n_lattices):
            mi, dm, _ = domain_matrices(self.U0[j], self.theta[j], self.param, self.p[j], self.eta[j],
                                        self.ds.n_domains[j])
            mats.append(mi)
            dms.append(dm)
            off.append(off[-1] + len(mi))
        il = self.batch.inverse_wavelength(self.delta)
        I_sb = self.I0 + self.dI * self.delta[self.ds.sb_lattice][:, None]
        dminv = np.concatenate(dms)
        return self.batch.evaluate(np.concatenate(mats), dminv[:, :0] if no_q else dminv, np.array(off),
                                   np.exp(self.lnN), il, I_sb, self.dI, np.exp(self.g), self.bg,
                                   want_lam=want_lam, want_jac=want_jac)


def test_bragg_part_matches_the_s1_channel_weights(small):
    ds, I_sb, dI_sb = small
    pt = Point(ds, I_sb, dI_sb)
    pt.theta[:] = 0
    pt.p = [split_orientation(ds.A[j], pt.param)[1] for j in range(ds.n_lattices)]
    pt.eta = np.asarray(ds.mosaic_spread_deg, float)
    pt.lnN = np.log(ds.domain_size_cells)
    pt.delta[:] = 0
    pt.g[:] = 0
    out = pt.evaluate(want_lam=True)
    w = channel_weights(ds, backend="cpu").astype(np.float64)
    ref = np.einsum("pc,pc->p", w, I_sb[ds.pixel_shoebox()])
    assert ref.max() > 10
    np.testing.assert_allclose(out.bragg, ref, rtol=1e-6, atol=1e-7 * ref.max())
    bgp = np.exp(out.lam - out.bragg)  # noqa: F841  (λ − bragg is the background, checked below)
    xy = ds.pixel_xy() + 0.5
    sb = ds.pixel_shoebox()
    bb = ds.sb_bbox[sb]
    xc, yc = 0.5 * (bb[:, 0] + bb[:, 1]), 0.5 * (bb[:, 2] + bb[:, 3])
    b = pt.bg[sb]
    np.testing.assert_allclose(out.lam - out.bragg, np.exp(b[:, 0] + b[:, 1] * (xy[:, 0] - xc) + b[:, 2] * (xy[:, 1] - yc)),
                               rtol=1e-12)
    m = ds.mask
    k = ds.counts.astype(np.float64)
    lam = out.lam
    nll = np.where(k != 0, lam - k * np.log(lam), lam)
    np.testing.assert_allclose(out.nll_sb, np.bincount(sb[m], weights=nll[m], minlength=ds.n_shoeboxes),
                               rtol=1e-12)


FAMILIES = ["theta", "cell", "mosaic", "lnN", "delta", "g", "bg"]
#: Central-difference steps (radians, Å or degrees, degrees, -, eV, -, -): the NLL is stiff in
#: the orientation (a 1e-5 rad turn moves spots by a sizeable part of their width).
STEPS = {"theta": 1e-7, "p": 1e-5, "eta": 1e-5, "lnN": 1e-5, "delta": 1e-4, "g": 1e-6, "bg": 1e-6}


def _columns(pt, family):
    """(parameter accessor, kernel local column) pairs of a family, for every lattice/shoebox."""
    n_free = pt.param.n_free
    cols = {"theta": [(("theta", i), i) for i in range(3)],
            "cell": [(("p", i), 3 + i) for i in range(n_free)],
            "mosaic": [(("eta", None), 3 + n_free)],
            "lnN": [(("lnN", i), 4 + n_free + i) for i in range(3)],
            "delta": [(("delta", None), 7 + n_free)],
            "g": [(("g", None), 8 + n_free)],
            "bg": [(("bg", i), 9 + n_free + i) for i in range(3)]}
    return cols[family]


def _shift(pt, name, i, unit, h):
    arr = getattr(pt, name)
    if name == "p":
        arr[unit] = arr[unit].copy()
        arr[unit][i] += h
    elif i is None:
        arr[unit] += h
    else:
        arr[unit, i] += h


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_matches_finite_differences(small, family):
    ds, I_sb, dI_sb = small
    pt = Point(ds, I_sb, dI_sb)
    out = pt.evaluate()
    steps = STEPS
    for (name, i), col in _columns(pt, family):
        units = range(ds.n_shoeboxes) if name == "bg" else range(ds.n_lattices)
        for unit in list(units)[:3]:
            rows = [unit] if name == "bg" else np.flatnonzero(ds.sb_lattice == unit)
            analytic = out.grad_sb[rows, col].sum()
            h = steps[name]
            _shift(pt, name, i, unit, h)
            fp = pt.evaluate().nll_sb.sum()
            _shift(pt, name, i, unit, -2 * h)
            fm = pt.evaluate().nll_sb.sum()
            _shift(pt, name, i, unit, h)
            numeric = (fp - fm) / (2 * h)
            scale = max(abs(numeric), 1e-3 * np.abs(out.grad_sb[:, col]).max(), 1e-8)
            assert abs(analytic - numeric) <= 2e-5 * scale + 1e-7, (family, name, i, unit, analytic, numeric)


def test_fisher_is_sum_of_jacobian_outer_products(small):
    """The Fisher information against J Jᵀ/λ from finite-difference Jacobians of λ."""
    ds, I_sb, dI_sb = small
    pt = Point(ds, I_sb, dI_sb)
    ds.mask[ds.pixel_offset[0] + 3] = False          # a masked pixel still gets its Jacobian row
    out = pt.evaluate(want_lam=True, want_jac=True)
    k0 = 0
    pix = slice(ds.pixel_offset[k0], ds.pixel_offset[k0 + 1])
    cols = [c for fam in FAMILIES for (_, c) in _columns(pt, fam)]
    J = np.zeros((pix.stop - pix.start, max(cols) + 1))
    j = ds.sb_lattice[k0]
    for fam in FAMILIES:
        for (name, i), col in _columns(pt, fam):
            unit = k0 if name == "bg" else j
            h = STEPS[name]
            _shift(pt, name, i, unit, h)
            lp = pt.evaluate(want_lam=True).lam[pix]
            _shift(pt, name, i, unit, -2 * h)
            lm = pt.evaluate(want_lam=True).lam[pix]
            _shift(pt, name, i, unit, h)
            J[:, col] = (lp - lm) / (2 * h)
    m = ds.mask[pix]
    F = (J[m] / out.lam[pix][m, None]).T @ J[m]
    ds.mask[ds.pixel_offset[0] + 3] = True
    np.testing.assert_allclose(out.fisher_sb[k0], F, rtol=2e-4, atol=1e-6 * np.abs(F).max())
    np.testing.assert_allclose(out.jac[pix][:, :J.shape[1]], J, rtol=2e-4, atol=1e-6 * np.abs(J).max())


@pytest.mark.parametrize("cut,tol", [(DEFAULT_CUT, 1e-5), (EXACT_CUT, 1e-9)])
def test_band_cut_equals_all_channels(small, cut, tol):
    ds, I_sb, dI_sb = small
    a = Point(ds, I_sb, dI_sb, cut=cut).evaluate(want_lam=True)
    b = Point(ds, I_sb, dI_sb, cut=np.inf).evaluate(want_lam=True)
    assert np.max(np.abs(a.lam - b.lam) / b.lam) < tol
    for name in ("grad_sb", "fisher_sb"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.max(np.abs(x - y)) <= tol * np.max(np.abs(y)), name


def test_evaluation_is_bit_identical_and_subsets_agree(small):
    ds, I_sb, dI_sb = small
    pt = Point(ds, I_sb, dI_sb)
    a, b = pt.evaluate(), pt.evaluate()
    assert np.array_equal(a.nll_sb, b.nll_sb) and np.array_equal(a.fisher_sb, b.fisher_sb)
    mats, dms, off = [], [], [0]
    for j in range(ds.n_lattices):
        mi, dm, _ = domain_matrices(pt.U0[j], pt.theta[j], pt.param, pt.p[j], pt.eta[j], ds.n_domains[j])
        mats.append(mi)
        dms.append(dm)
        off.append(off[-1] + len(mi))
    sub = pt.batch.evaluate(np.concatenate(mats), np.concatenate(dms), np.array(off), np.exp(pt.lnN),
                            pt.batch.inverse_wavelength(pt.delta),
                            pt.I0 + pt.dI * pt.delta[ds.sb_lattice][:, None], pt.dI, np.exp(pt.g), pt.bg,
                            shoeboxes=[1, 3])
    assert np.array_equal(sub.grad_sb[[1, 3]], a.grad_sb[[1, 3]])
    assert not sub.grad_sb[0].any()


def test_call_without_matrix_parameters_keeps_lambda_and_the_other_columns(small):
    ds, I_sb, dI_sb = small
    pt = Point(ds, I_sb, dI_sb)
    full = pt.evaluate(want_lam=True)
    fwd = pt.evaluate(want_lam=True, no_q=True)
    n_q = full.grad_sb.shape[1] - fwd.grad_sb.shape[1]
    assert n_q > 0 and fwd.grad_sb.shape[1] == 8
    for key in ("lam", "bragg", "nll_sb"):
        np.testing.assert_array_equal(getattr(fwd, key), getattr(full, key))
    np.testing.assert_allclose(fwd.grad_sb, full.grad_sb[:, n_q:], rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(fwd.fisher_sb, full.fisher_sb[:, n_q:, n_q:], rtol=1e-13, atol=1e-300)


_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_lattice_batch as T
from spread_tools.io.dataset import Dataset
from spread_tools.model.kernels import geometry_cuda
from spread_tools.structure.cache import SFCache
from spread_tools.structure.factors import intensity_and_gradients
ds = Dataset.read(T.TEST_DATA / "dataset.h5").select_lattices([0]).select_shoeboxes([0, 1])
cache = SFCache.read(T.TEST_DATA / "sf_cache.h5")
I, _, _ = intensity_and_gradients(cache, ds.energy_ev, ds.truth.fp, ds.truth.fdp,
                                  h_index=cache.index_of(ds.sb_miller_index))
I_sb = np.ascontiguousarray(I.T)
dI = 0.01 * I_sb
# the simulator reads these globals at run time: 32 threads make 81-pixel shoeboxes span 3 chunks
geometry_cuda.TPB = 32
geometry_cuda._PER_THREAD = (geometry_cuda._MAX_ENTRIES + 31) // 32
res = {}
for backend in ("cpu", "cuda"):
    pt = T.Point(ds, I_sb, dI, backend=backend)
    pt.batch.oversample = 2
    a = pt.evaluate(want_lam=True, want_jac=True)
    b = pt.evaluate(want_lam=True, want_jac=True)
    fwd = pt.evaluate(want_lam=True, no_q=True)
    res[backend] = (a, bool(np.array_equal(a.fisher_sb, b.fisher_sb) and np.array_equal(a.nll_sb, b.nll_sb)))
    res[backend + "_forward"] = fwd
out = {"tpb": geometry_cuda.TPB, "n_pix_sb": int(np.diff(ds.pixel_offset).max()),
       "cuda_repeat_identical": res["cuda"][1]}
# the forward-only call (no matrix parameters) on the GPU against the full CPU evaluation
for key in ("lam", "bragg", "nll_sb"):
    x, y = getattr(res["cpu"][0], key), getattr(res["cuda_forward"], key)
    out["forward_" + key] = float(np.max(np.abs(x - y)) / np.max(np.abs(x)))
for key in ("nll_sb", "grad_sb", "fisher_sb", "lam", "bragg", "jac"):
    x, y = getattr(res["cpu"][0], key), getattr(res["cuda"][0], key)
    out[key] = float(np.max(np.abs(x - y)) / np.max(np.abs(x)))
print("RESULT" + json.dumps(out))
"""


def test_cuda_kernel_matches_cpu_in_the_simulator():
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads([s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1][len("RESULT"):])
    assert r["cuda_repeat_identical"] and r["n_pix_sb"] > 2 * r["tpb"]   # three chunks per block
    for key in ("nll_sb", "grad_sb", "fisher_sb", "lam", "bragg", "jac", "forward_lam", "forward_bragg",
                "forward_nll_sb"):
        assert r[key] <= 1e-12, (key, r[key])
