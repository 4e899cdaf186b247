"""Tests of spread_tools.simulate.simulator: synthetic SPREAD datasets with ground truth."""

import dataclasses
import math
from pathlib import Path

import gemmi
import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.model.geometry import HC_EV_A
from spread_tools.model.predict import (
    cut_shoeboxes,
    predict_reflections,
    random_rotations,
)
from spread_tools.model.spectra import channel_grid
from spread_tools.physics.scattering import SpectrumTable, read_table
from spread_tools.simulate.background import background_counts, background_planes
from spread_tools.simulate.sase import sase_spectra
from spread_tools.simulate.simulator import (
    SimulationSettings,
    make_detector,
    simulate_dataset,
    truth_at_channels,
)
from spread_tools.structure.build import build_sf_cache
from spread_tools.structure.miller import b_matrix

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
MODEL = TEST_DATA / "models" / "6lk1.pdb"
OX = TEST_DATA / "spectra" / "pf-rd-ox_fftkk.out"
RED = TEST_DATA / "spectra" / "pf-rd-red_fftkk.out"
D_MIN, D_MAX = 2.5, 4.0


@pytest.fixture(scope="module")
def wide_cache():
    """6lk1 cache over 2.3-4.6 Å, wider than the simulated 2.5-4.0 Å annulus."""
    return build_sf_cache(MODEL, ["FE1=FES/FE1", "FE2=FES/FE2"], 2.3, 4.6, route="direct")


@pytest.fixture(scope="module")
def truth():
    return {"FE1": read_table(OX), "FE2": read_table(RED)}


def small_settings(**kw):
    """A quick simulation: few lattices, 4 eV channels, few domains."""
    base = dict(n_lattices=3, seed=7, d_min_a=D_MIN, d_max_a=D_MAX, shoebox_size=7,
                channel_step_ev=4.0, n_domains=2, chunk_lattices=2)
    base.update(kw)
    return SimulationSettings(**base)


def detector(**kw):
    base = dict(distance_mm=100.0, pixel_size_mm=0.2, n_fast=1024, n_slow=1024)
    base.update(kw)
    return make_detector(**base)


# --------------------------------------------------------------------------- building blocks

def test_b_matrix_gives_inverse_d_and_dials_convention():
    cell = (25.955, 60.09, 50.085, 90.0, 102.4, 90.0)
    B = b_matrix(cell)
    uc = gemmi.UnitCell(*cell)
    for h in ([1, 0, 0], [0, 3, 0], [1, 2, 3], [-4, 1, 7]):
        assert np.linalg.norm(B @ h) == pytest.approx(1.0 / uc.calculate_d(h), rel=1e-12)
    # cctbx/DIALS: B = (fractionalisation matrix)ᵀ, lower triangular; a*·a = 1
    assert np.allclose(np.triu(B, 1), 0.0)
    orth = np.array(uc.orth.mat.tolist())
    assert np.allclose(orth.T @ B, np.eye(3), atol=1e-12)      # real-space axes · reciprocal = δ
    U = random_rotations(np.random.default_rng(0), 1)[0]
    A = U @ B
    assert np.linalg.norm(A @ [1, 2, 3]) == pytest.approx(1.0 / uc.calculate_d([1, 2, 3]))


def test_random_rotations_are_uniform_rotations():
    R = random_rotations(np.random.default_rng(3), 4000)
    assert np.allclose(np.einsum("nij,nkj->nik", R, R), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(R), 1.0)
    # uniform on SO(3): a fixed vector goes uniformly onto the sphere -> z uniform in [-1, 1]
    z = R[:, 2, 2]
    hist, _ = np.histogram(z, bins=10, range=(-1, 1))
    assert np.all(np.abs(hist - 400) < 5 * math.sqrt(400))
    # rotation angle density (1 - cos θ)/π: mean of cos θ = -1/2... trace mean = 3 E[cos θ]... = 0
    trace = np.trace(R, axis1=1, axis2=2)
    assert abs(trace.mean()) < 0.06


def test_sase_spectra_sum_to_fluence_and_are_spiky():
    e = channel_grid(7070.0, 7170.0, 1.0)
    assert len(e) == 101 and e[-1] == 7170.0
    w, centre = sase_spectra(np.random.default_rng(1), 50, e, 1234.0, 7085.0, 7155.0, 25.0,
                             40, 1.5)
    assert w.shape == (50, 101) and np.all(w >= 0)
    assert np.allclose(w.sum(axis=1), 1234.0)
    assert np.all((centre >= 7085.0) & (centre <= 7155.0))
    # spiky: far from a smooth envelope (many local maxima per shot)
    peaks = np.sum((w[:, 1:-1] > w[:, :-2]) & (w[:, 1:-1] > w[:, 2:]), axis=1)
    assert np.median(peaks) >= 5
    # jittered centres: the set of shots covers the whole window
    assert np.all(w.sum(axis=0)[5:-5] > 0)
    w2, _ = sase_spectra(np.random.default_rng(1), 50, e, 1234.0, 7085.0, 7155.0, 25.0, 40, 1.5)
    assert np.array_equal(w, w2)


def test_sase_spectrum_bins_integrate_a_single_spike_exactly():
    e = channel_grid(7000.0, 7010.0, 2.0)
    w, centre = sase_spectra(np.random.default_rng(0), 1, e, 1.0, 7005.0, 7005.0, 1e-9, 1, 2.0,
                             min_relative_weight=0.0)
    # one spike at 7005 (envelope width ~0): channel 7004 collects [7003, 7005] etc.
    sig = 2.0 / (2 * math.sqrt(2 * math.log(2)))
    cdf = lambda x: 0.5 * (1 + math.erf((x - 7005.0) / (sig * math.sqrt(2))))  # noqa: E731
    edges = [6999.0, 7001.0, 7003.0, 7005.0, 7007.0, 7009.0, 7011.0]
    expect = np.diff([cdf(x) for x in edges])
    assert np.allclose(w[0], expect / expect.sum(), atol=1e-12)


def test_zero_fluence_is_an_error():
    e = channel_grid(7070.0, 7170.0, 4.0)
    with pytest.raises(InputError, match="zero photons"):
        sase_spectra(np.random.default_rng(0), 3, e, 0.0, 7100, 7110, 20, 10, 1.5)
    with pytest.raises(InputError, match="zero photons"):          # envelope outside window
        sase_spectra(np.random.default_rng(0), 3, e, 1e4, 7500, 7510, 5, 10, 1.5)
    with pytest.raises(InputError, match="fluence"):
        SimulationSettings(fluence=0.0).check()


def test_truth_sites_and_coverage_are_checked(truth):
    e = channel_grid(7070.0, 7170.0, 4.0)
    fp, fdp = truth_at_channels(["FE2", "FE1"], truth, e)
    ox_fp, ox_fdp = truth["FE1"].interpolate(e)
    assert np.allclose(fp[1], ox_fp) and np.allclose(fdp[1], ox_fdp)
    with pytest.raises(InputError, match="do not match the sites FE1, FE2.*no truth curve for FE2"):
        truth_at_channels(["FE1", "FE2"], {"FE1": truth["FE1"]}, e)
    with pytest.raises(InputError, match="FE3 not in the cache"):
        truth_at_channels(["FE1", "FE2"], {**truth, "FE3": truth["FE1"]}, e)
    short = truth["FE1"].cut(7000.0, 7120.0)
    with pytest.raises(InputError, match="covers 7000-7120 eV but the spectrum channels span "
                                         "7070-7170 eV"):
        truth_at_channels(["FE1", "FE2"], {"FE1": short, "FE2": truth["FE2"]}, e)


def _brute_force_in_condition(A, hkl, e, w, N, mosaic_deg, n_sigma):
    """Independent check: distance of A·h from each channel's Ewald sphere (centre d̂/λ)."""
    d_hat = np.array([0.0, 0.0, 1.0])
    var_h = 0.63 / (4.0 * np.asarray(N, float) ** 2)
    q = hkl @ A.T
    best = np.full(len(q), np.inf)
    normal = np.zeros_like(q)
    for E, phi in zip(e, w):            # loop over channels, all reflections at once
        if phi <= 0:
            continue
        centre = (E / HC_EV_A) * d_hat   # sphere through the origin, centre -s0
        v = q - centre
        dist = np.linalg.norm(v, axis=1) - E / HC_EV_A
        better = np.abs(dist) < np.abs(best)
        best[better] = dist[better]
        normal[better] = v[better] / np.linalg.norm(v[better], axis=1, keepdims=True)
    var = sum((normal @ A[:, kk]) ** 2 * var_h[kk] for kk in range(3))
    var += (np.linalg.norm(q, axis=1) * math.radians(mosaic_deg)) ** 2
    ratio = np.abs(best) / (n_sigma * np.sqrt(var))
    return set(np.flatnonzero(ratio <= 1 - 1e-9)), set(np.flatnonzero(np.abs(ratio - 1) < 1e-9))


def test_prediction_matches_brute_force(wide_cache):
    rng = np.random.default_rng(5)
    e = channel_grid(7070.0, 7170.0, 4.0)
    w, _ = sase_spectra(rng, 1, e, 1e4, 7100.0, 7140.0, 25.0, 40, 1.5)
    A = random_rotations(rng, 1)[0] @ b_matrix(wide_cache.cell)
    hkl = wide_cache.hkl.astype(np.int64)
    rows, s1 = predict_reflections(A, hkl, np.array([0.0, 0.0, 1.0]), e, w[0], (48, 48, 24),
                                   0.0512, 3.0)
    sure, maybe = _brute_force_in_condition(A, hkl, e, w[0], (48, 48, 24), 0.0512, 3.0)
    assert len(sure) > 20
    assert sure <= set(rows.tolist()) <= sure | maybe
    # predicted s1 are unit vectors satisfying the Laue condition closely
    assert np.allclose(np.linalg.norm(s1, axis=1), 1.0)


def test_cut_shoeboxes_edges_and_misses():
    panel = np.array([0, 0, -1, 0, 1])
    x = np.array([10.3, 1.2, np.nan, 97.9, 50.0])
    y = np.array([20.9, 50.0, np.nan, 50.0, 50.0])
    img = np.array([[100, 100], [60, 60]])
    bbox, status = cut_shoeboxes(panel, x, y, img, 7)
    assert status.tolist() == [0, 2, 1, 2, 0]
    assert bbox[0].tolist() == [7, 14, 17, 24]           # spot pixel (10, 20) in the centre
    bbox8, _ = cut_shoeboxes(panel[:1], x[:1], y[:1], img, 8)
    assert bbox8[0].tolist() == [6, 14, 17, 25]


def test_background_planes_follow_the_radial_function():
    det = make_detector(distance_mm=100.0, pixel_size_mm=0.2, n_fast=1024, n_slow=1024)
    from spread_tools.model.geometry import detector_arrays as _detector_arrays
    from spread_tools.simulate.background import _background_level
    arrays = _detector_arrays(det)
    bbox = np.array([[600, 611, 300, 311], [100, 111, 900, 911]], dtype=np.int32)
    k = 7100.0 / HC_EV_A
    planes = background_planes(arrays, np.array([0, 0]), bbox, np.array([0, 0, 1.0]), k,
                               np.array([2.0, 3.0]))
    bg = background_counts(bbox, planes)
    assert bg.shape == (2 * 121,) and np.all(bg > 0)
    # the log-linear plane is the first-order expansion of the radial shape about the centre
    for i, (x0, x1, y0, y1) in enumerate(bbox):
        yy, xx = np.mgrid[y0:y1, x0:x1]
        exact = [2.0, 3.0][i] * _background_level(arrays, np.zeros(xx.size, int),
                                                   xx.ravel() + 0.5, yy.ravel() + 0.5,
                                                   np.array([0, 0, 1.0]), k)
        assert np.allclose(bg[i * 121:(i + 1) * 121], exact, rtol=0.02)


# --------------------------------------------------------------------------- whole simulation

@pytest.fixture(scope="module")
def simulated(wide_cache, truth, tmp_path_factory):
    """One small noise-free and one noisy simulation, plus their settings."""
    out = tmp_path_factory.mktemp("sim")
    s_clean = small_settings(poisson_noise=False)
    simulate_dataset(wide_cache, truth, detector(), s_clean, out / "clean.h5")
    s_noisy = small_settings()
    summary = simulate_dataset(wide_cache, truth, detector(), s_noisy, out / "noisy.h5")
    return {"clean": out / "clean.h5", "noisy": out / "noisy.h5", "settings": s_clean,
            "summary": summary, "dir": out}


def test_reproducible_with_a_seed_and_independent_of_chunks(wide_cache, truth, simulated):
    out = simulated["dir"]
    simulate_dataset(wide_cache, truth, detector(), small_settings(), out / "again.h5")
    simulate_dataset(wide_cache, truth, detector(), small_settings(chunk_lattices=1),
                     out / "chunk1.h5")
    simulate_dataset(wide_cache, truth, detector(), small_settings(seed=8), out / "seed8.h5")
    ref = h5py.File(simulated["noisy"], "r")
    names = []
    ref.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    for other in ("again.h5", "chunk1.h5"):
        with h5py.File(out / other, "r") as h5:
            for n in names:
                assert np.array_equal(ref[n][()], h5[n][()]), (other, n)
    with h5py.File(out / "seed8.h5", "r") as h5:
        assert not np.array_equal(ref["lattices/A"][()], h5["lattices/A"][()])
    ref.close()


def test_dataset_validates_and_truth_reloads(simulated, truth):
    ds = Dataset.read(simulated["noisy"])
    s = simulated["settings"]
    assert ds.source == "simulate_data" and ds.n_lattices == 3 and ds.n_shoeboxes > 10
    assert ds.truth is not None and ds.truth.site_names == ["FE1", "FE2"]
    e = channel_grid(7070.0, 7170.0, 4.0)
    assert np.array_equal(ds.energy_ev, e) and np.array_equal(ds.truth.energy_ev, e)
    for i, name in enumerate(["FE1", "FE2"]):
        fp, fdp = truth[name].interpolate(e)
        assert np.allclose(ds.truth.fp[i], fp) and np.allclose(ds.truth.fdp[i], fdp)
    assert ds.truth.G.shape == (3,) and np.all(ds.truth.G > 0)
    assert ds.truth.background.shape == (ds.n_shoeboxes, 3)
    assert np.allclose(ds.spectrum_weight.sum(axis=1), s.fluence)
    assert np.all(ds.counts == np.round(ds.counts)) and ds.mask.all()
    assert np.all(np.diff(ds.pixel_offset) == 49)
    assert np.allclose(ds.domain_size_cells, [48, 48, 24]) and np.all(ds.n_domains == 2)
    assert summary_matches(simulated["summary"], ds)


def summary_matches(summary, ds):
    return summary.n_shoeboxes == ds.n_shoeboxes and summary.n_pixels == ds.n_pixels


def test_all_reflections_in_annulus_and_outside_ones_left_out(wide_cache, simulated):
    """h0 of every shoebox has d in [2.5, 4.0]; the reflections of the wider cache just
    outside the annulus that would have landed on the detector are not in the dataset."""
    ds = Dataset.read(simulated["clean"])
    uc = gemmi.UnitCell(*ds.cell)
    d = np.array([uc.calculate_d(list(map(int, h))) for h in ds.sb_miller_index])
    assert np.all((d >= D_MIN - 1e-9) & (d <= D_MAX + 1e-9))
    from spread_tools.model.geometry import ray_to_pixel
    s = simulated["settings"]
    det = detector()
    outside_on_detector = 0
    for j in range(ds.n_lattices):
        rows, s1 = predict_reflections(ds.A[j], wide_cache.hkl.astype(np.int64),
                                       ds.beam_direction[j], ds.energy_ev,
                                       ds.spectrum_weight[j], ds.domain_size_cells[j],
                                       ds.mosaic_spread_deg[j], s.n_sigma)
        panel, x, y = ray_to_pixel(det, s1)
        bbox, status = cut_shoeboxes(np.asarray(panel), np.asarray(x), np.asarray(y),
                                     ds.image_size, s.shoebox_size)
        hk = wide_cache.hkl[rows]
        dd = 1.0 / np.sqrt(wide_cache.inv_d2(rows))
        out = (dd < D_MIN) | (dd > D_MAX)
        outside_on_detector += int(np.sum(out & (status == 0)))
        mine = {tuple(h) for h in ds.sb_miller_index[ds.sb_lattice == j]}
        assert not any(tuple(h) in mine for h in hk[out])
        # and every reflection inside the annulus that fits the detector is there
        inside = {tuple(h) for h in hk[~out & (status == 0)]}
        assert inside == mine
    assert outside_on_detector > 5          # the check above is not vacuous


def test_counts_are_exactly_the_pixel_model_of_their_own_reflection(wide_cache, simulated):
    """Noise-free counts = G Σ_c w I(h0, E_c) + background: no other reflection contributes."""
    from spread_tools.model.pixel import channel_weights
    from spread_tools.structure.factors import intensity_and_gradients
    ds = Dataset.read(simulated["clean"])
    w = channel_weights(ds)
    rows = wide_cache.index_of(ds.sb_miller_index)
    assert np.all(rows >= 0)
    I, _, _ = intensity_and_gradients(wide_cache, ds.energy_ev, ds.truth.fp, ds.truth.fdp,
                                      h_index=rows)
    sb = ds.pixel_shoebox()
    bragg = np.einsum("pc,cp->p", np.asarray(w, float), I[:, sb]) * ds.truth.G[ds.sb_lattice[sb]]
    bg = background_counts(ds.sb_bbox, ds.truth.background)
    assert np.allclose(ds.counts, bragg + bg, rtol=2e-6, atol=1e-6)
    assert bragg.sum() > 10 * bg.sum() * 0 + 1.0


def test_counts_match_the_independent_numpy_pixel_model(wide_cache, simulated):
    """A few hundred noise-free pixels recomputed from scratch by model.direct_lambda
    (NumPy, no precomputed weights) equal the stored counts."""
    from spread_tools.model.pixel import direct_lambda, unique_hkl
    from spread_tools.structure.factors import intensity_and_gradients
    ds = Dataset.read(simulated["clean"])
    hkl, _ = unique_hkl(ds.sb_miller_index)
    I, _, _ = intensity_and_gradients(wide_cache, ds.energy_ev, ds.truth.fp, ds.truth.fdp,
                                      h_index=wide_cache.index_of(hkl))
    # the brightest pixel of some shoeboxes and a few others
    pix = [int(ds.pixel_offset[k] + np.argmax(ds.counts[ds.pixel_offset[k]:ds.pixel_offset[k + 1]]))
           for k in range(0, ds.n_shoeboxes, 3)]
    pix += list(range(0, ds.n_pixels, max(1, ds.n_pixels // 50)))
    lam = direct_lambda(ds, hkl, I.T, ds.truth.G, ds.truth.background, pixels=np.array(pix))
    assert np.allclose(ds.counts[pix], lam, rtol=1e-5, atol=1e-6)
    assert np.max(lam) > 50 * np.min(lam)       # real spots, not only background


def _spot_offsets(cache, path, settings):
    """(centroid distance, brightest-pixel Chebyshev distance) from the predicted spot (px)."""
    from spread_tools.model.geometry import ray_to_pixel
    ds = Dataset.read(path)
    det = detector()
    size = settings.shoebox_size
    bg = background_counts(ds.sb_bbox, ds.truth.background)
    signal = ds.counts - bg
    spot_sum = np.add.reduceat(signal, ds.pixel_offset[:-1])
    strong = spot_sum >= np.median(spot_sum)     # weak tails of the excitation left out
    dc, dp = [], []
    for j in range(ds.n_lattices):
        sel = np.flatnonzero(ds.sb_lattice == j)
        rows = cache.index_of(ds.sb_miller_index[sel])
        pred_rows, s1 = predict_reflections(ds.A[j], cache.hkl[rows].astype(np.int64),
                                            ds.beam_direction[j], ds.energy_ev,
                                            ds.spectrum_weight[j], ds.domain_size_cells[j],
                                            ds.mosaic_spread_deg[j], settings.n_sigma)
        assert np.array_equal(pred_rows, np.arange(len(sel)))
        panel, x, y = (np.asarray(a) for a in ray_to_pixel(det, s1))
        # an independent ray-plane intersection gives the same pixel coordinates
        o, f, sl = ds.origin_mm[0], ds.fast_axis[0], ds.slow_axis[0]
        n = np.cross(f, sl)
        t = (o @ n) / (s1 @ n)
        r = s1 * t[:, None] - o
        assert np.allclose(x, r @ f / ds.pixel_size_mm[0, 0], atol=1e-6)
        assert np.allclose(y, r @ sl / ds.pixel_size_mm[0, 1], atol=1e-6)
        for k_local, k in enumerate(sel):
            if not strong[k]:
                continue
            a, b = ds.pixel_offset[k], ds.pixel_offset[k + 1]
            img = signal[a:b].reshape(size, size)
            x0, _, y0, _ = ds.sb_bbox[k]
            yy, xx = np.mgrid[0:size, 0:size]
            cx = x0 + 0.5 + (img * xx).sum() / img.sum()
            cy = y0 + 0.5 + (img * yy).sum() / img.sum()
            peak = np.unravel_index(np.argmax(img), img.shape)
            dc.append(math.hypot(cx - x[k_local], cy - y[k_local]))
            dp.append(max(abs(x0 + peak[1] + 0.5 - x[k_local]),
                          abs(y0 + peak[0] + 0.5 - y[k_local])))
    return np.array(dc), np.array(dp)


def test_spot_centroid_sits_where_geometry_predicts(wide_cache, simulated):
    """Spiky SASE spectra: the centroid of the Bragg signal is on the predicted position
    (the brightest pixel may sit further out along the spectral streak)."""
    dc, dp = _spot_offsets(wide_cache, simulated["clean"], simulated["settings"])
    assert len(dc) > 10 and np.median(dc) < 0.45 and dc.max() < 1.0


def test_spot_peak_sits_where_geometry_predicts(wide_cache, truth, tmp_path):
    """A single narrow spike per shot: the brightest pixel is the predicted one or its
    neighbour (two mosaic domains here: sub-pixel structure moves it by a fraction)."""
    narrow = small_settings(poisson_noise=False, n_spikes=1, envelope_fwhm_ev=0.01,
                            spike_fwhm_ev=1.0, centre_min_ev=7100.0, centre_max_ev=7140.0,
                            channel_step_ev=1.0, n_lattices=4)
    simulate_dataset(wide_cache, truth, detector(), narrow, tmp_path / "narrow.h5")
    dc, dp = _spot_offsets(wide_cache, tmp_path / "narrow.h5", narrow)
    assert len(dp) > 10
    assert dp.max() <= 1.25 and np.median(dp) <= 0.5
    assert dc.max() < 0.8


def test_no_shoeboxes_on_the_detector_is_a_clear_error(wide_cache, truth, tmp_path):
    far = detector(offset_mm=(5000.0, 5000.0))
    out = tmp_path / "none.h5"
    with pytest.raises(InputError, match="no shoeboxes on the detector"):
        simulate_dataset(wide_cache, truth, far, small_settings(), out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_shoeboxes_crossing_edges_are_dropped_and_counted(wide_cache, truth, tmp_path):
    small = detector(n_fast=600, n_slow=600)
    summary = simulate_dataset(wide_cache, truth, small, small_settings(shoebox_size=15,
                                                                         n_lattices=4),
                               tmp_path / "edge.h5")
    assert summary.n_on_edge > 0 and summary.n_off_detector > 0
    ds = Dataset.read(tmp_path / "edge.h5")
    assert ds.n_shoeboxes == summary.n_predicted - summary.n_on_edge - summary.n_off_detector
    assert np.all(ds.sb_bbox[:, [0, 2]] >= 0) and np.all(ds.sb_bbox[:, [1, 3]] <= 600)


def test_min_spot_photons_keeps_only_strong_spots(wide_cache, truth, simulated, tmp_path):
    weak = small_settings(poisson_noise=False, min_spot_photons=50.0)
    summary = simulate_dataset(wide_cache, truth, detector(), weak, tmp_path / "strong.h5")
    ds = Dataset.read(tmp_path / "strong.h5")
    full = Dataset.read(simulated["clean"])
    assert 0 < ds.n_shoeboxes < full.n_shoeboxes and summary.n_weak > 0
    bg = background_counts(ds.sb_bbox, ds.truth.background)
    spot = (ds.counts - bg).reshape(-1, 7, 7)[:, 1:6, 1:6].sum(axis=(1, 2))
    assert np.all(spot >= 50.0 * (1 - 1e-5))


def test_other_bad_inputs(wide_cache, truth, tmp_path):
    with pytest.raises(InputError, match="not inside the SF cache range"):
        simulate_dataset(wide_cache, truth, detector(), small_settings(d_min_a=2.0),
                         tmp_path / "x.h5")
    (tmp_path / "exists.h5").write_text("")
    with pytest.raises(InputError, match="exists already"):
        simulate_dataset(wide_cache, truth, detector(), small_settings(), tmp_path / "exists.h5")
    bad = dataclasses.replace(small_settings(), shoebox_size=0)
    with pytest.raises(InputError, match="shoebox_size"):
        simulate_dataset(wide_cache, truth, detector(), bad, tmp_path / "y.h5")
    table = SpectrumTable(np.array([7000.0, 7100.0]), np.zeros(2), np.ones(2), "short.dat")
    with pytest.raises(InputError, match="short.dat covers 7000-7100 eV"):
        simulate_dataset(wide_cache, {"FE1": table, "FE2": truth["FE2"]}, detector(),
                         small_settings(), tmp_path / "z.h5")
