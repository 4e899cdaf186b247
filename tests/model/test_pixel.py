"""Pixel model: exactness of the precomputed path, gradients, physics checks."""

import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.model import geometry
from spread_tools.model.pixel import (
    PixelModel,
    channel_weights,
    direct_lambda,
    index_of_hkl,
    resolve_backend,
    unique_hkl,
)


def cubic_A(a_a, rng=None):
    """A = U·B of a cubic cell with edge a (Å); random U when rng is given."""
    B = np.eye(3) / a_a
    if rng is None:
        return B
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    U = q * np.sign(np.diag(r))
    if np.linalg.det(U) < 0:
        U[:, 0] *= -1
    return U @ B


def make_dataset(seed=0, n_lat=2, n_sb_per_lat=3, box=7, energy_ev=None, detector=None, cell_a=40.0,
                 domain=(12.0, 10.0, 8.0), spread_deg=0.05, n_domains=5, triclinic=True, d_min=3.0):
    """A small dataset with shoeboxes around predicted spots (counts Poisson-ish random)."""
    rng = np.random.default_rng(seed)
    energy_ev = np.linspace(7050.0, 7250.0, 6) if energy_ev is None else np.asarray(energy_ev, float)
    det = geometry.single_panel_detector(100.0, 0.1, 600, 640, offset_mm=(1.3, -0.7)) \
        if detector is None else detector
    arr = det.as_arrays()
    k_lo, k_hi = energy_ev[0] / geometry.HC_EV_A, energy_ev[-1] / geometry.HC_EV_A
    As, sb = [], {"lat": [], "panel": [], "bbox": [], "hkl": []}
    r = np.arange(-12, 13)
    hkl_all = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    hkl_all = hkl_all[np.any(hkl_all != 0, axis=1)]
    for j in range(n_lat):
        A = cubic_A(cell_a, rng)
        if triclinic:
            A = A @ np.array([[1.0, 0.05, -0.03], [0.0, 0.97, 0.04], [0.0, 0.0, 1.02]])
        q = hkl_all @ A.T
        q2 = np.sum(q * q, axis=1)
        qz = q[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            kb = q2 / (2 * qz)
        ok = (qz > 0) & (kb > k_lo) & (kb < k_hi) & (q2 < 1 / d_min ** 2)
        idx = rng.permutation(np.flatnonzero(ok))
        n_got = 0
        for i in idx:
            s1 = q[i] + np.array([0, 0, -kb[i]])
            pnl, x, y = det.ray_to_pixel(s1[None])
            if pnl[0] < 0:
                continue
            x0, y0 = int(np.floor(x[0])) - box // 2, int(np.floor(y[0])) - box // 2
            size = arr["image_size"][pnl[0]]
            if x0 < 0 or y0 < 0 or x0 + box > size[0] or y0 + box + 1 > size[1]:
                continue
            sb["lat"].append(j)
            sb["panel"].append(pnl[0])
            sb["bbox"].append([x0, x0 + box, y0, y0 + box + 1])   # not square: checks row-major order
            sb["hkl"].append(hkl_all[i])
            n_got += 1
            if n_got == n_sb_per_lat:
                break
        As.append(A)
    bbox = np.array(sb["bbox"], dtype=np.int32).reshape(-1, 4)
    sizes = (bbox[:, 1] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 2])
    n_pix = int(sizes.sum())
    n_chan = len(energy_ev)
    mask = rng.random(n_pix) > 0.1
    return Dataset(
        cell=np.array([cell_a, cell_a, cell_a, 90, 90, 90.0]), spacegroup="P 1", **arr,
        energy_ev=energy_ev, spectrum_weight=rng.uniform(0.5, 2.0, (n_lat, n_chan)) * 1e10,
        A=np.array(As), beam_direction=np.tile([0.0, 0.0, 1.0], (n_lat, 1)),
        polarization_normal=np.tile([0.0, 1.0, 0.0], (n_lat, 1)),
        polarization_fraction=np.full(n_lat, 0.999),
        domain_size_cells=np.tile(np.asarray(domain, float), (n_lat, 1)),
        mosaic_spread_deg=np.full(n_lat, spread_deg), n_domains=np.full(n_lat, n_domains, np.int32),
        identifier=np.array([f"l{j}" for j in range(n_lat)]),
        sb_lattice=np.array(sb["lat"], np.int32), sb_panel=np.array(sb["panel"], np.int32), sb_bbox=bbox,
        sb_miller_index=np.array(sb["hkl"], np.int32),
        pixel_offset=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        counts=rng.poisson(3.0, n_pix).astype(np.float32), mask=mask).validate()


def random_params(pm, rng):
    I = rng.uniform(1e3, 1e4, (pm.n_h, pm.n_chan))
    G = rng.uniform(0.5, 2.0, pm.n_lat)
    bg = np.column_stack([rng.uniform(-0.5, 1.0, pm.n_sb), rng.uniform(-0.1, 0.1, pm.n_sb),
                          rng.uniform(-0.1, 0.1, pm.n_sb)])
    return I, G, bg


@pytest.fixture(scope="module")
def small():
    ds = make_dataset()
    pm = PixelModel.from_dataset(ds, backend="cpu")
    return ds, pm


def test_precomputed_equals_direct_simulation(small):
    ds, pm = small
    rng = np.random.default_rng(1)
    I, G, bg = random_params(pm, rng)
    lam = pm.expected_counts(I, G, bg)
    pix = rng.choice(ds.n_pixels, 60, replace=False)
    pix = np.concatenate([pix, [0, ds.n_pixels - 1]])   # first and last pixel of the arrays
    ref = direct_lambda(ds, pm.hkl, I, G, bg, pixels=pix)
    np.testing.assert_allclose(lam[pix], ref, rtol=2e-6)
    # the spots are really there: many pixels are Bragg dominated
    xh, yh = pm.pixel_offsets_xy()
    sb = pm.pixel_shoebox
    bgv = np.exp(bg[sb, 0] + bg[sb, 1] * xh + bg[sb, 2] * yh)
    assert np.mean(lam > 2 * bgv) > 0.05


def test_bragg_counts_is_lambda_without_background_at_unit_scale(small):
    ds, pm = small
    rng = np.random.default_rng(4)
    I, G, bg = random_params(pm, rng)
    off = np.zeros_like(bg)
    off[:, 0] = -np.inf
    no_bg = direct_lambda(ds, pm.hkl, I, np.ones_like(G), off, pixels=np.arange(0, ds.n_pixels, 7))
    np.testing.assert_allclose(pm.bragg_counts(I)[::7], no_bg, rtol=2e-6)
    xh, yh = pm.pixel_offsets_xy()
    sb = pm.pixel_shoebox
    bgv = np.exp(bg[sb, 0] + bg[sb, 1] * xh + bg[sb, 2] * yh)
    Gp = G[pm.sb_lattice[sb]]
    np.testing.assert_allclose(Gp * pm.bragg_counts(I) + bgv, pm.expected_counts(I, G, bg), rtol=1e-12)


def test_precomputed_equals_direct_oversampled():
    ds = make_dataset(seed=3, n_lat=1, n_sb_per_lat=2, box=5)
    pm = PixelModel.from_dataset(ds, backend="cpu", oversample=3)
    I, G, bg = random_params(pm, np.random.default_rng(2))
    pix = np.arange(0, ds.n_pixels, 3)
    np.testing.assert_allclose(pm.expected_counts(I, G, bg)[pix],
                               direct_lambda(ds, pm.hkl, I, G, bg, pixels=pix, oversample=3), rtol=2e-6)


def _fd(f, x, i, eps):
    xp, xm = x.copy(), x.copy()
    xp.flat[i] += eps
    xm.flat[i] -= eps
    return (f(xp) - f(xm)) / (2 * eps)


def test_gradients_finite_difference(small):
    ds, pm = small
    rng = np.random.default_rng(5)
    I, G, bg = random_params(pm, rng)
    nll, dI, dG, dbg = pm.nll_and_gradients(I, G, bg)
    assert np.isclose(nll, pm.nll(I, G, bg), rtol=1e-14)
    # I: first/last distinct h, first/last channel, and a middle entry
    for (h, c) in [(0, 0), (0, pm.n_chan - 1), (pm.n_h - 1, 0), (pm.n_h - 1, pm.n_chan - 1), (pm.n_h // 2, 2)]:
        num = _fd(lambda x: pm.nll(x, G, bg), I, h * pm.n_chan + c, 1e-2 * I[h, c] * 1e-3)
        assert num == pytest.approx(dI[h, c], rel=1e-5, abs=1e-9 * abs(nll) / I[h, c])
    for j in (0, pm.n_lat - 1):
        num = _fd(lambda x: pm.nll(I, x, bg), G, j, 1e-4)
        assert num == pytest.approx(dG[j], rel=1e-5, abs=1e-6)
    for k in (0, pm.n_sb - 1):       # first and last shoebox of the arrays
        for m in range(3):
            num = _fd(lambda x: pm.nll(I, G, x), bg, 3 * k + m, 1e-4)
            assert num == pytest.approx(dbg[k, m], rel=1e-5, abs=1e-5)


def test_gradient_sums_over_shared_h():
    """Two shoeboxes of the same h (two lattices) add into one dI row."""
    ds = make_dataset(seed=7, n_lat=1, n_sb_per_lat=2)
    ds2 = make_dataset(seed=7, n_lat=1, n_sb_per_lat=2)
    from spread_tools.io.dataset import concatenate
    both = concatenate([ds, ds2])
    pm = PixelModel.from_dataset(both, backend="cpu")
    assert pm.n_h == 2 and pm.n_lat == 2
    I, G, bg = random_params(pm, np.random.default_rng(0))
    _, dI, dG, _ = pm.nll_and_gradients(I, G, bg)
    num = _fd(lambda x: pm.nll(x, G, bg), I, 1, 1e-3)
    assert num == pytest.approx(dI.flat[1], rel=1e-5)


def test_deterministic_and_masked(small):
    ds, pm = small
    I, G, bg = random_params(pm, np.random.default_rng(9))
    a = pm.nll_and_gradients(I, G, bg, return_lambda=True)
    b = pm.nll_and_gradients(I, G, bg, return_lambda=True)
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        assert np.array_equal(x, y)
    lam = a[4]
    m = ds.mask
    k = ds.counts.astype(float)
    ref = np.sum(lam[m] - np.where(k[m] > 0, k[m] * np.log(lam[m]), 0.0))
    assert a[0] == pytest.approx(ref, rel=1e-12)


def test_bad_shapes_raise(small):
    ds, pm = small
    I, G, bg = random_params(pm, np.random.default_rng(0))
    with pytest.raises(InputError, match="I has shape"):
        pm.nll_and_gradients(I[:, :-1], G, bg)
    with pytest.raises(InputError, match="bg has shape"):
        pm.nll_and_gradients(I, G, bg[:-1])
    with pytest.raises(InputError):
        resolve_backend("opencl")
    with pytest.raises(InputError):
        channel_weights(ds, backend="cpu", oversample=0)


def test_unique_hkl_and_index_of_hkl():
    mi = np.array([[1, 2, 3], [0, 0, 1], [1, 2, 3], [-1, 0, 0]])
    hkl, idx = unique_hkl(mi)
    assert len(hkl) == 3 and np.array_equal(hkl[idx], mi)
    ref = np.array([[5, 5, 5], [-1, 0, 0], [1, 2, 3], [0, 0, 1], [-7, 3, 2]])
    i = index_of_hkl(ref, mi)
    assert np.array_equal(ref[i], mi)
    with pytest.raises(InputError, match=r"\(2, 2, 2\) is not in"):
        index_of_hkl(ref, [[2, 2, 2]])


def test_given_hkl_list_rows(small):
    """A shared hkl list (e.g. all MPI ranks'): gradients land in the right rows, other rows zero."""
    ds, pm = small
    extra = np.array([[30, 30, 30], [-30, 1, 2]])
    ref = np.concatenate([extra[:1], pm.hkl[::-1], extra[1:]])
    pm2 = PixelModel.from_dataset(ds, backend="cpu", hkl=ref)
    I, G, bg = random_params(pm, np.random.default_rng(3))
    I2 = np.concatenate([np.full((1, pm.n_chan), 7.0), I[::-1], np.full((1, pm.n_chan), 9.0)])
    a = pm.nll_and_gradients(I, G, bg)
    b = pm2.nll_and_gradients(I2, G, bg)
    assert a[0] == b[0]
    np.testing.assert_array_equal(b[1][1:-1][::-1], a[1])
    assert np.all(b[1][0] == 0) and np.all(b[1][-1] == 0)


def test_channel_weights_pixel_major_matches_model(small):
    ds, pm = small
    w = channel_weights(ds, backend="cpu")
    assert w.dtype == np.float32 and w.shape == (ds.n_pixels, ds.n_channels)
    assert np.array_equal(w, PixelModel.from_dataset(ds, backend="cpu", band_rtol=0, band_floor=0).w)   # the exact cut
    assert np.array_equal(w, channel_weights(ds, backend="cpu"))   # bit-identical on repeat
    # the default cut: the kept weights are the dense ones bit for bit, the dropped ones a tiny share
    wb = pm.w
    kept = wb != 0
    assert np.array_equal(wb[kept], w[kept])
    w64 = w.astype(np.float64)
    dropped = np.sum(np.where(kept, 0.0, w64), axis=1)
    peak = np.maximum.reduceat(w64.sum(axis=1), ds.pixel_offset[:-1])[pm.pixel_shoebox]
    assert np.all(dropped <= pm.band_rtol * w64.sum(axis=1) + pm.band_floor * peak)
    assert np.any(dropped > 0)


def _spot_dataset(energy_ev, h0, N, pixel_mm, box, distance_mm=100.0, a=40.0, A=None):
    """One shoebox of ``box``×``box`` pixels centred on h0's spot at the middle channel's Bragg energy."""
    A = cubic_A(a) if A is None else A
    q = A @ np.asarray(h0, float)
    det = geometry.single_panel_detector(distance_mm, pixel_mm, 12000, 12000)
    k = np.asarray(energy_ev)[len(energy_ev) // 2] / geometry.HC_EV_A
    s1 = q + np.array([0, 0, -k])
    _, x, y = det.ray_to_pixel(s1[None])
    x0, y0 = int(x[0]) - box // 2, int(y[0]) - box // 2
    n_chan = len(energy_ev)
    ds = Dataset(
        cell=np.array([a, a, a, 90, 90, 90.0]), spacegroup="P 1", **det.as_arrays(),
        energy_ev=np.asarray(energy_ev, float), spectrum_weight=np.ones((1, n_chan)),
        A=A[None], beam_direction=np.array([[0, 0, 1.0]]), polarization_normal=np.array([[0, 1.0, 0]]),
        polarization_fraction=np.array([0.999]), domain_size_cells=np.array([N], float),
        mosaic_spread_deg=np.array([0.0]), n_domains=np.array([1], np.int32), identifier=np.array(["x"]),
        sb_lattice=np.array([0], np.int32), sb_panel=np.array([0], np.int32),
        sb_bbox=np.array([[x0, x0 + box, y0, y0 + box]], np.int32), sb_miller_index=np.array([h0], np.int32),
        pixel_offset=np.array([0, box * box], np.int64), counts=np.zeros(box * box, np.float32),
        mask=np.ones(box * box, bool))
    return ds, det, q


def test_spot_peak_on_ewald_sphere():
    """With a cubic cell and equal N, the brightest pixel of each channel is where the
    ray s1 = q + s0(λ_c) (the Ewald-sphere point nearest q) meets the detector."""
    h0 = (6, 3, 1)
    A = cubic_A(40.0)
    q = A @ np.array(h0, float)
    kb = q @ q / (2 * q[2])
    e_b = kb * geometry.HC_EV_A
    energy = e_b + np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
    ds, det, q = _spot_dataset(energy, h0, (20, 20, 20), 0.02, 61, A=A)
    w = channel_weights(ds, backend="cpu")
    xy = ds.pixel_xy()
    for c, e in enumerate(energy):
        k = e / geometry.HC_EV_A
        s1 = q + np.array([0, 0, -k])
        _, x, y = geometry.ray_to_pixel(det, s1[None])
        best = np.argmax(w[:, c])
        assert abs(xy[best, 0] + 0.5 - x[0]) <= 1.0 and abs(xy[best, 1] + 0.5 - y[0]) <= 1.0
        cx = np.sum(w[:, c] * (xy[:, 0] + 0.5)) / w[:, c].sum()
        cy = np.sum(w[:, c] * (xy[:, 1] + 0.5)) / w[:, c].sum()
        assert abs(cx - x[0]) < 0.05 and abs(cy - y[0]) < 0.05


def test_integrated_spot_is_lattice_volume_over_lorentz():
    """Σ_c Σ_p w over a dense flat spectrum equals r_e² P |det A| ∫L d³h / (Δk k² (1 − cos 2θ)),
    with ∫L d³h = N_aN_bN_c (0.63π/2)^{3/2} (closed form of the Gaussian transform)."""
    h0 = (11, 8, 5)          # 2θ ≈ 40° at 6.5 keV
    A = cubic_A(40.0)
    q = A @ np.array(h0, float)
    kb = q @ q / (2 * q[2])
    e_b = kb * geometry.HC_EV_A
    N = np.array([30.0, 36.0, 24.0])
    energy = e_b + np.arange(-70, 70.01, 0.5)
    box = 121
    ds, det, _ = _spot_dataset(energy, h0, N, 0.02, box, A=A)
    w = channel_weights(ds, backend="cpu").astype(np.float64)
    k = energy / geometry.HC_EV_A
    dk = np.mean(np.diff(k))
    total = w.sum()
    s1 = q + np.array([0, 0, -kb])
    s1u = s1 / np.linalg.norm(s1)
    cos2t = -s1u[2]
    P = geometry.polarization_factor(s1u, [0, 0, 1.0], [0, 1.0, 0], 0.999)
    int_L = np.prod(N) * (0.63 * np.pi / 2) ** 1.5
    expected = geometry.R_E_A ** 2 * P * abs(np.linalg.det(A)) * int_L / (dk * kb ** 2 * (1 - cos2t))
    assert total == pytest.approx(expected, rel=1e-3)
    # the box and the channel range hold the whole spot
    img = w.sum(axis=1).reshape(box, box)
    assert img[0].sum() + img[-1].sum() + img[:, 0].sum() + img[:, -1].sum() < 1e-4 * total
    assert w[:, 0].sum() + w[:, -1].sum() < 1e-4 * total


def test_non_orthogonal_panel_matches_direct():
    """Slightly sheared, tilted panel: kernel ω uses |fast × slow| like the reference."""
    fast = np.array([0.995, 0.0, 0.0998])
    slow = np.array([0.05, -0.998, 0.0])
    det = geometry.Detector([geometry.Panel([-28.7, 31.3, -100.0], fast, slow, (0.1, 0.1), (600, 640))])
    ds = make_dataset(seed=0, n_lat=2, n_sb_per_lat=2, box=5, detector=det)
    pm = PixelModel.from_dataset(ds, backend="cpu")
    I, G, bg = random_params(pm, np.random.default_rng(8))
    pix = np.arange(0, ds.n_pixels, 2)
    lam = pm.expected_counts(I, G, bg)
    np.testing.assert_allclose(lam[pix], direct_lambda(ds, pm.hkl, I, G, bg, pixels=pix), rtol=2e-6)
    assert np.max(lam - pm.expected_counts(I, G * 0, bg)) > 10 * np.exp(bg[:, 0].max() + 1)   # spots present
    from spread_tools.model.geometry import Detector
    assert Detector.from_dataset(ds)[0].pixel_area_mm2 < 0.01 * (1 - 1e-4)
