"""Geometry: pixel ↔ lab mapping, DIALS predictions, solid angle, polarization, mosaic domains."""

import json

import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.model import geometry as g


def test_wavelength_energy_and_s0():
    assert g.wavelength_a_from_energy_ev(12398.4198) == pytest.approx(1.0)
    assert g.energy_ev_from_wavelength_a(g.wavelength_a_from_energy_ev(7112.0)) == pytest.approx(7112.0)
    s0 = g.s0_from([0, 0, 2.0], 1.25)
    np.testing.assert_allclose(s0, [0, 0, -0.8])
    np.testing.assert_allclose(g.s0_from([0, 0, 1.0], np.array([1.0, 2.0])), [[0, 0, -1], [0, 0, -0.5]])
    assert g.Beam(wavelength_a=2.0).s0() == pytest.approx(np.array([0, 0, -0.5]))


def test_pixel_centre_and_ray_roundtrip():
    det = g.default_detector()
    assert len(det) == 16
    rng = np.random.default_rng(0)
    for i in (0, 7, 15):
        p = det[i]
        fx = rng.uniform(0, p.image_size[0], 50)
        sy = rng.uniform(0, p.image_size[1], 50)
        r = g.pixel_to_lab_mm(p, fx, sy) * rng.uniform(0.3, 3, (50, 1))   # any ray length
        x, y = g.ray_to_pixel(p, r)
        np.testing.assert_allclose(x, fx, atol=1e-9)
        np.testing.assert_allclose(y, sy, atol=1e-9)
        pnl, x2, y2 = g.ray_to_pixel(det, r)
        assert np.all(pnl == i)
        np.testing.assert_allclose(x2, fx, atol=1e-9)
    # pixel (0, 0) centre is half a pixel from the outer corner along fast and slow
    p = det[0]
    np.testing.assert_allclose(g.pixel_to_lab_mm(p, 0.5, 0.5),
                               p.origin_mm + 0.05 * p.fast_axis + 0.05 * p.slow_axis)


def test_ray_misses():
    det = g.default_detector()
    pnl, x, y = g.ray_to_pixel(det, np.array([[0, 0, -1.0], [0.1, 0.1, 1.0], [1.0, 0, 0]]))
    assert np.all(pnl == -1) and np.all(np.isnan(x)) and np.all(np.isnan(y))   # gap, behind, parallel
    x, y = g.ray_to_pixel(det[0], -g.pixel_to_lab_mm(det[0], 10.5, 10.5))      # behind the sample
    assert np.isnan(x) and np.isnan(y)


def test_non_orthogonal_tilted_panel_roundtrip():
    p = g.Panel([-20.0, 30.0, -90.0], [0.98, 0.1, 0.17], [0.05, -0.97, 0.2], (0.075, 0.08), (500, 400), "tilted")
    fx, sy = np.array([0.01, 123.4, 499.9]), np.array([0.01, 222.2, 399.9])
    x, y = g.ray_to_pixel(p, g.pixel_to_lab_mm(p, fx, sy))
    np.testing.assert_allclose(x, fx, atol=1e-9)
    np.testing.assert_allclose(y, sy, atol=1e-9)


def test_dials_predictions(test_data):
    """DIALS s1 → xyzcal.mm exactly; xyzcal.px within 0.5 px (DIALS adds a parallax correction
    for the 0.45 mm Si sensor of this Pilatus; we treat the sensor as thin)."""
    refl = json.loads((test_data / "dials_cunir_predictions.json").read_text())["reflections"]
    for r in refl:
        p = g.Panel(r["origin"], r["fast_axis"], r["slow_axis"], r["pixel_size"], r["image_size"])
        x, y = g.ray_to_pixel(p, np.array(r["s1"]))
        xd, yd = r["xyzcal_mm"][0] / p.pixel_size_mm[0], r["xyzcal_mm"][1] / p.pixel_size_mm[1]
        if not (0 <= xd < p.image_size[0] and 0 <= yd < p.image_size[1]):
            assert np.isnan(x) and np.isnan(y)          # DIALS also predicts just off the panel
            continue
        assert x * p.pixel_size_mm[0] == pytest.approx(r["xyzcal_mm"][0], abs=1e-6)
        assert y * p.pixel_size_mm[1] == pytest.approx(r["xyzcal_mm"][1], abs=1e-6)
        assert abs(x - r["xyzcal_px"][0]) < 0.5 and abs(y - r["xyzcal_px"][1]) < 0.5


def test_detector_arrays_roundtrip():
    det = g.default_detector(distance_mm=150.0)
    arr = det.as_arrays()
    assert arr["origin_mm"].shape == (16, 3) and arr["image_size"].dtype == np.int32
    assert np.all(arr["image_size"] == [352, 384]) and np.allclose(arr["pixel_size_mm"], 0.1)
    assert np.allclose(arr["origin_mm"][:, 2], -150.0)
    det2 = g.Detector.from_arrays(**arr)
    for k, v in det2.as_arrays().items():
        np.testing.assert_array_equal(v, arr[k])
    assert g.detector_arrays(det)["fast_axis"].shape == (16, 3)
    one = g.default_detector(distance_mm=100.0, pixel_size_mm=0.11, n_fast=100, n_slow=80)
    assert len(one) == 1 and one[0].image_size == (100, 80)
    pnl, x, y = one.ray_to_pixel(np.array([[0, 0, -1.0]]))
    assert pnl[0] == 0 and x[0] == pytest.approx(50.0) and y[0] == pytest.approx(40.0)


def test_default_detector_modules_do_not_overlap():
    det = g.default_detector()
    rng = np.random.default_rng(1)
    # rays through random pixel centres of every module hit exactly that module
    for i, p in enumerate(det.panels):
        r = g.pixel_to_lab_mm(p, rng.integers(0, 352, 20) + 0.5, rng.integers(0, 384, 20) + 0.5)
        pnl, _, _ = det.ray_to_pixel(r)
        assert np.all(pnl == i)


def _cube_pixels(n):
    """Pixel centres, normals and areas of a closed cube of side 2 mm around the origin, n×n pixels per face."""
    c = (np.arange(n) + 0.5) / n * 2 - 1
    u, v = np.meshgrid(c, c, indexing="ij")
    u, v = u.ravel(), v.ravel()
    pos, nor = [], []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            p = np.zeros((len(u), 3))
            p[:, axis] = sign
            p[:, (axis + 1) % 3] = u
            p[:, (axis + 2) % 3] = v
            nn = np.zeros(3)
            nn[axis] = sign
            pos.append(p)
            nor.append(np.tile(nn, (len(u), 1)))
    return np.concatenate(pos), np.concatenate(nor), (2.0 / n) ** 2


def test_solid_angle_closed_cube_is_4pi():
    pos, nor, area = _cube_pixels(300)
    total = g.solid_angle(pos, nor, area).sum()
    assert total == pytest.approx(4 * np.pi, rel=1e-5)


def test_solid_angle_on_axis_pixel():
    # tiny pixel straight ahead at 100 mm: area/d²; tilted by 60°: half of it
    assert g.solid_angle([0, 0, -100.0], [0, 0, 1.0], 0.01) == pytest.approx(1e-6)
    n60 = np.array([np.sin(np.pi / 3), 0, np.cos(np.pi / 3)])
    assert g.solid_angle([0, 0, -100.0], n60, 0.01) == pytest.approx(0.5e-6)


def _kahn_nanobragg(s1, incident, e_axis, kahn):
    """nanoBragg's polarization_factor (closed form with ψ), written independently."""
    i = incident / np.linalg.norm(incident)
    d = s1 / np.linalg.norm(s1)
    c2 = d @ i
    b_in = np.cross(e_axis, i)
    b_in /= np.linalg.norm(b_in)
    e_in = np.cross(i, b_in)
    e_in /= np.linalg.norm(e_in)
    psi = -np.arctan2(d @ b_in, d @ e_in)
    return 0.5 * (1 + c2 ** 2 - kahn * np.cos(2 * psi) * (1 - c2 ** 2))


@pytest.mark.parametrize("f", [0.5, 0.8, 0.999, 1.0])
def test_polarization_closed_forms(f):
    direction = [0, 0, 1.0]        # beam travels along −z
    normal = [0, 1.0, 0]           # E vector along x
    P = g.polarization_factor
    assert P([0, 0, -1.0], direction, normal, f) == pytest.approx(1.0)          # 2θ = 0
    assert P([1.0, 0, 0], direction, normal, f) == pytest.approx(1 - f)         # 2θ = 90° along E
    assert P([0, 1.0, 0], direction, normal, f) == pytest.approx(f)             # 2θ = 90° along n
    tt = np.radians(30.0)
    assert P([0, np.sin(tt), -np.cos(tt)], direction, normal, 0.5) == pytest.approx(0.5 * (1 + np.cos(tt) ** 2))
    rng = np.random.default_rng(2)
    s1 = rng.standard_normal((20, 3))
    s1[:, 2] = -np.abs(s1[:, 2])
    ref = np.array([_kahn_nanobragg(s, np.array([0, 0, -1.0]), np.array([1.0, 0, 0]), 2 * f - 1) for s in s1])
    np.testing.assert_allclose(P(s1, direction, normal, f), ref, rtol=1e-12)


def test_mosaic_rotations_deterministic_and_spread():
    R = g.mosaic_rotations(0.2, 50)
    assert R.shape == (50, 3, 3)
    np.testing.assert_array_equal(R, g.mosaic_rotations(0.2, 50))
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.tile(np.eye(3), (50, 1, 1)), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(R), 1.0)
    ang = np.degrees(np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.sqrt(np.mean(ang ** 2)) == pytest.approx(0.2, rel=0.05)
    M = R.mean(axis=0)                     # ± pairs: first-order (antisymmetric) parts cancel
    np.testing.assert_allclose(M - M.T, 0, atol=1e-15)
    np.testing.assert_allclose(M, np.eye(3), atol=1e-4)
    np.testing.assert_array_equal(g.mosaic_rotations(0.0, 5), np.tile(np.eye(3), (5, 1, 1)))
    np.testing.assert_array_equal(g.mosaic_rotations(0.3, 1), np.eye(3)[None])
    # axes are spread over the sphere, not clustered
    axes = []
    for r in R[:25]:
        w, v = np.linalg.eig(r)
        axes.append(np.real(v[:, np.argmin(np.abs(w - 1))]))
    axes = np.abs(np.array(axes))
    assert np.all(axes.mean(axis=0) > 0.3)
    with pytest.raises(InputError):
        g.mosaic_rotations(0.1, 0)


def test_bad_inputs():
    with pytest.raises(InputError):
        g.Panel([0, 0, -100.0], [1, 0, 0], [1, 0, 0])
    with pytest.raises(InputError):
        g.Beam(direction=[0, 0, 0])
    with pytest.raises(InputError):
        g.Crystal(np.zeros((3, 3)))
    c = g.Crystal(np.eye(3) / 50.0, (50, 50, 50, 90, 90, 90), "P 1")
    np.testing.assert_allclose(c.q([1, 2, 3]), [0.02, 0.04, 0.06])
