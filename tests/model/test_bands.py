"""Channel bands: the exact cut is the dense result, the default cut keeps its documented tolerance.

The reference is the dense channel-weight kernel (``channel_weights``) with λ, the NLL and
its gradients computed from it in plain NumPy (no banded code involved).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.model.bands import (
    DEFAULT_FLOOR,
    DEFAULT_RTOL,
    bands_from_dense,
    build_bands,
    check_floor,
    check_rtol,
)
from spread_tools.model.pixel import PixelModel, channel_weights, kernel_inputs, unique_hkl

sys.path.insert(0, str(Path(__file__).parent))
from test_pixel import make_dataset, random_params  # noqa: E402

ENERGY_4EV = np.arange(7080.0, 7221.0, 4.0)          # 36 channels of 4 eV


@pytest.fixture(scope="module")
def narrow():
    """Spots narrow in energy (large domains), 4 eV channels: most of dense w is (near) zero."""
    return make_dataset(seed=21, n_lat=3, n_sb_per_lat=4, box=9, energy_ev=ENERGY_4EV,
                        domain=(60.0, 60.0, 40.0), n_domains=4, cell_a=80.0)


@pytest.fixture(scope="module")
def spiky(narrow):
    """The same with a spiky spectrum: zero photons in 60 % of the channels."""
    ds = make_dataset(seed=21, n_lat=3, n_sb_per_lat=4, box=9, energy_ev=ENERGY_4EV,
                      domain=(60.0, 60.0, 40.0), n_domains=4, cell_a=80.0)
    rng = np.random.default_rng(3)
    ds.spectrum_weight = np.where(rng.random(ds.spectrum_weight.shape) < 0.6, 0.0, ds.spectrum_weight)
    return ds


def _dropped_and_total(w, bands, off):
    wb = bands.to_dense(off)
    kept = wb != 0
    assert np.array_equal(wb[kept], w[kept])                   # kept weights are the dense ones, bit for bit
    w64 = w.astype(np.float64)
    return np.sum(np.where(kept, 0.0, w64), axis=1), w64.sum(axis=1)


def test_exact_cut_is_the_dense_weights_bit_for_bit(narrow):
    """rtol = 0 (and no floor): the bands hold the dense weights; only exact zeros are left out."""
    w = channel_weights(narrow, backend="cpu")
    kin = kernel_inputs(narrow)
    b = build_bands(kin, narrow.n_pixels, narrow.n_channels, 1, 0.0)
    assert np.array_equal(b.to_dense(narrow.pixel_offset), w)
    # only exact zeros left out: every band starts and ends on a non-zero weight
    vals = b.values
    starts = b.sb_offset[:-1]
    assert np.all(b.length <= narrow.n_channels) and b.values.dtype == np.float32
    d = bands_from_dense(w, narrow.pixel_offset, 0.0)
    assert np.array_equal(d.lo, b.lo) and np.array_equal(d.length, b.length) and np.array_equal(d.values, vals)
    assert len(starts) == narrow.n_shoeboxes
    assert 0.05 < np.mean(w > 0) < 0.9                         # a real mix of zero and non-zero weights
    # repeated builds are bit-identical
    b2 = build_bands(kin, narrow.n_pixels, narrow.n_channels, 1, 0.0)
    assert np.array_equal(b2.values, b.values) and np.array_equal(b2.lo, b.lo)


def test_exact_cut_oversampled():
    ds = make_dataset(seed=4, n_lat=1, n_sb_per_lat=2, box=5, energy_ev=ENERGY_4EV, domain=(60.0, 60.0, 40.0),
                      cell_a=80.0)
    w = channel_weights(ds, backend="cpu", oversample=2)
    b = build_bands(kernel_inputs(ds), ds.n_pixels, ds.n_channels, 2, 0.0)
    assert np.array_equal(b.to_dense(ds.pixel_offset), w)


@pytest.mark.parametrize("fixture", ["narrow", "spiky"])
@pytest.mark.parametrize("rtol", [DEFAULT_RTOL, 1e-4])
def test_cut_drops_at_most_rtol_of_each_pixel(request, fixture, rtol):
    ds = request.getfixturevalue(fixture)
    w = channel_weights(ds, backend="cpu")
    b = build_bands(kernel_inputs(ds), ds.n_pixels, ds.n_channels, 1, rtol)
    dropped, total = _dropped_and_total(w, b, ds.pixel_offset)
    assert np.all(dropped <= rtol * total)
    assert np.sum(dropped > 0) > 10                             # the cut really cuts
    exact = build_bands(kernel_inputs(ds), ds.n_pixels, ds.n_channels, 1, 0.0)
    assert b.n_values < 0.9 * exact.n_values
    # the analytic screen evaluated far fewer channels than the dense kernel
    assert b.stats["channels_evaluated"] < 0.6 * ds.n_pixels * ds.n_channels
    # the cut on dense weights (no screen) obeys the same bound
    d = bands_from_dense(w, ds.pixel_offset, rtol)
    dropped_d, _ = _dropped_and_total(w, d, ds.pixel_offset)
    assert np.all(dropped_d <= rtol * total)


def _dense_reference(w, ds, sb_h, I, G, bg, rtol, floor):
    """λ, NLL, dI, dG, dbg from dense w in NumPy (float64), and the documented bounds of the
    differences a cut (rtol, floor) may make (module docstring of spread_tools.model.bands)."""
    sb = np.repeat(np.arange(ds.n_shoeboxes), np.diff(ds.pixel_offset))
    xy = ds.pixel_xy()
    bb = ds.sb_bbox
    xh = xy[:, 0] + 0.5 - 0.5 * (bb[sb, 0] + bb[sb, 1])
    yh = xy[:, 1] + 0.5 - 0.5 * (bb[sb, 2] + bb[sb, 3])
    h = sb_h[sb]
    Gp = G[ds.sb_lattice[sb]]
    w64 = w.astype(np.float64)
    S = np.einsum("pc,pc->p", w64, I[h])
    bgp = np.exp(bg[sb, 0] + bg[sb, 1] * xh + bg[sb, 2] * yh)
    lam = Gp * S + bgp
    m = ds.mask
    k = ds.counts.astype(np.float64)
    nll = np.sum((lam - np.where(k != 0, k * np.log(lam), 0.0))[m])
    r = np.where(m, 1.0 - k / lam, 0.0)
    dI = np.zeros_like(I)
    np.add.at(dI, h, (r * Gp)[:, None] * w64)
    dG = np.bincount(ds.sb_lattice[sb], weights=r * S, minlength=ds.n_lattices)
    a = np.stack([np.ones_like(xh), xh, yh], axis=1)
    dbg = np.zeros((ds.n_shoeboxes, 3))
    np.add.at(dbg, sb, (r * bgp)[:, None] * a)
    # D: weight a pixel may lose (cut + floor); Δλ ≤ G max I D
    tot = w64.sum(axis=1)
    peak = np.maximum.reduceat(tot, ds.pixel_offset[:-1])[sb]
    D = rtol * tot + floor * peak
    Imax = I.max(axis=1)[h]
    dlam = Gp * Imax * D
    q = np.where(m, 1.0 + k / lam, 0.0)
    ratio = np.max(I.max(axis=1) / I.min(axis=1))
    b_dI = np.zeros_like(I)
    np.add.at(b_dI, h, ((2 + ratio) * q * Gp * D)[:, None] * np.ones_like(w64))
    b_dG = np.bincount(ds.sb_lattice[sb], weights=2 * q * Imax * D, minlength=ds.n_lattices)
    b_dbg = np.zeros((ds.n_shoeboxes, 3))
    np.add.at(b_dbg, sb, (np.where(m, k, 0.0) * bgp * dlam / lam ** 2)[:, None] * np.abs(a))
    b_nll = np.sum((dlam * q)[m])
    return (lam, nll, dI, dG, dbg), (dlam, b_nll, b_dI, b_dG, b_dbg)


@pytest.mark.parametrize("rtol,floor", [(0.0, 0.0), (DEFAULT_RTOL, DEFAULT_FLOOR), (1e-4, 0.0), (0.0, 1e-4)])
def test_lambda_nll_gradients_equal_dense_to_the_documented_tolerance(spiky, rtol, floor):
    """Every difference from the dense path within its documented bound."""
    ds = spiky
    hkl, sb_h = unique_hkl(ds.sb_miller_index)
    pm = PixelModel.from_dataset(ds, backend="cpu", band_rtol=rtol, band_floor=floor)
    assert pm.band_rtol == rtol and pm.band_floor == floor
    rng = np.random.default_rng(7)
    I, G, bg = random_params(pm, rng)
    bg[:, 0] -= 3.0                                             # Bragg-dominated pixels: λ tests the cut
    ref, bound = _dense_reference(channel_weights(ds, backend="cpu"), ds, sb_h, I, G, bg, rtol, floor)
    got = pm.nll_and_gradients(I, G, bg, return_lambda=True)
    got = (got[4], got[0], got[1], got[2], got[3])
    rnd = 1e-12                                                 # float64 round-off of different sum orders
    for name, x, y, b in zip(("lam", "nll", "dI", "dG", "dbg"), got, ref, bound):
        assert np.all(np.abs(x - y) <= b + rnd * np.max(np.abs(y))), name
    lam, lam_ref = got[0], ref[0]
    if rtol + floor >= 1e-4:                                     # the cut is visible at these settings
        assert np.max(np.abs(lam - lam_ref) / lam_ref) > 1e-9
    if floor > 0:
        assert pm.bands.stats["pixels_floored"] > 0
    # the Bragg part is most of λ somewhere, so the λ check means something
    assert np.max(lam_ref / np.exp(bg[pm.pixel_shoebox, 0] + 1.0)) > 10


def test_floor_empties_only_faint_pixels(narrow):
    w = channel_weights(narrow, backend="cpu").astype(np.float64)
    b = build_bands(kernel_inputs(narrow), narrow.n_pixels, narrow.n_channels, 1, 0.0, floor=1e-6)
    tot = w.sum(axis=1)
    sb = np.repeat(np.arange(narrow.n_shoeboxes), np.diff(narrow.pixel_offset))
    peak = np.maximum.reduceat(tot, narrow.pixel_offset[:-1])[sb]
    faint = tot < 1e-6 * peak
    assert np.all(b.length[faint] == 0) and np.sum(faint & (tot > 0)) > 10
    kept = ~faint & (tot > 0)
    assert np.all(b.length[kept] > 0)
    # counted: the faint pixels with weight, and those skipped unevaluated (possibly all zero)
    assert np.sum(faint & (tot > 0)) <= b.stats["pixels_floored"] <= np.sum(faint)
    d = bands_from_dense(w.astype(np.float32), narrow.pixel_offset, 0.0, 1e-6)
    assert np.array_equal(d.length == 0, b.length == 0)
    with pytest.raises(InputError, match="band_floor"):
        check_floor(0.5)


def test_pass_reads_only_active_pixels(spiky):
    pm = PixelModel.from_dataset(spiky, backend="cpu")
    act = pm.mask & (pm.counts != 0) & (pm.bands.length > 0)
    assert pm.act_off[-1] == act.sum() and 0 < act.sum() < pm.n_pix
    assert pm.pass_bytes()["values"] == 4 * int(pm.bands.length[act].sum(dtype=np.int64))
    st = pm.storage_bytes()
    assert st["values"] == 4 * pm.bands.n_values and st["dense"] == 4 * pm.n_pix * pm.n_chan
    assert st["total"] < st["dense"]
    with pytest.raises(ValueError):
        pm.counts[0] = 1.0                                      # fixed at construction (constants depend on them)


def test_nll_independent_of_active_order_and_chunks(spiky):
    """Results do not depend on the number of shoebox ranges of the pass (only on the data)."""
    pm = PixelModel.from_dataset(spiky, backend="cpu")
    I, G, bg = random_params(pm, np.random.default_rng(1))
    a = pm.nll_and_gradients(I, G, bg)
    pm._n_chunks = 1
    b = pm.nll_and_gradients(I, G, bg)
    assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_bad_cut_is_one_clear_error(narrow):
    for bad in (-1e-3, 0.5, "x", None):
        with pytest.raises(InputError, match="band_rtol"):
            check_rtol(bad)
    w = channel_weights(narrow, backend="cpu")
    with pytest.raises(InputError, match="band_rtol"):
        PixelModel(w, narrow.pixel_offset, narrow.sb_bbox, narrow.sb_lattice, np.zeros(narrow.n_shoeboxes),
                   np.array([[1, 0, 0]]), narrow.counts, narrow.mask, backend="cpu", band_rtol=-1)
    with pytest.raises(InputError, match="band_rtol"):
        PixelModel.from_dataset(narrow, backend="cpu", band_rtol=1.0)


def test_extreme_backgrounds_give_numbers_not_errors(spiky):
    """A line search may try a background that overflows or underflows: no exception, and the
    NLL equals Σ (λ − k ln λ) with ln λ computed in log space (ln bg = b0 + b1 x̂ + b2 ŷ exactly,
    also where exp(ln bg) underflows to 0): finite where that is finite."""
    pm = PixelModel.from_dataset(spiky, backend="cpu")
    I, G, bg = random_params(pm, np.random.default_rng(2))
    sb = pm.pixel_shoebox
    xh, yh = pm.pixel_offsets_xy()
    GS = G[pm.sb_lattice[sb]] * pm.bragg_counts(I)
    m = pm.mask
    k = pm.counts.astype(np.float64)
    for b0 in (-800.0, 800.0):
        b = bg.copy()
        b[:, 0] = b0
        lnbg = b[sb, 0] + b[sb, 1] * xh + b[sb, 2] * yh
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            ln_lam = np.logaddexp(np.log(GS), lnbg)
            ref = np.sum((np.exp(ln_lam) - k * ln_lam)[m])
        nll = pm.nll(I, G, b)
        if np.isfinite(ref):
            assert nll == pytest.approx(ref, rel=1e-9)
        else:
            assert not np.isfinite(nll)
