"""DIALS readers against real DIALS files: .refl msgpack, .expt hierarchies, stills geometry.

Independent checks: DIALS' own predicted positions (``xyzcal.mm``, ``xyzcal.px``)
and ``d`` of CuNiR_integrated (5 stills, 5203 reflections); panel corners of the
hierarchical CSPAD and MPCCD detectors composed by hand from the JSON numbers;
byte-identical re-writing of the real DIALS table; photon conservation by sums.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.io.dials.expt import (
    mm_to_px,
    predict_s1,
    read_expt,
    s1_to_mm,
    s1_to_px,
)
from spread_tools.io.dials.importer import (
    ImportSettings,
    Shot,
    build_dataset,
    export_dials,
    read_shot_list,
)
from spread_tools.io.dials.refl import (
    FLAGS,
    ReflectionTable,
    Shoeboxes,
    pack_refl,
    read_refl,
    write_refl,
)
from spread_tools.io.dials.spectra import read_lam, read_spectrum, rebin_spectrum
from spread_tools.model.geometry import HC_EV_A, ray_to_pixel

TD = Path(__file__).resolve().parents[2] / "test_data"
D = TD / "dials"
CUNIR_EXPT = D / "CuNiR_integrated.expt"
CUNIR_REFL = D / "CuNiR_integrated.refl"


@pytest.fixture(scope="module")
def cunir():
    return read_expt(CUNIR_EXPT), read_refl(CUNIR_REFL)


# --------------------------------------------------------------------------- .refl

def test_refl_reads_real_table(cunir):
    el, t = cunir
    assert t.nrows == 5203
    assert t.types["bbox"] == "int6" and t.types["miller_index"] == "cctbx::miller::index<>"
    assert t.types["flags"] == "std::size_t" and t.types["entering"] == "bool"
    assert t["s1"].shape == (5203, 3) and t["bbox"].shape == (5203, 6)
    assert t["entering"].dtype == bool and t["id"].dtype == np.int32
    assert sorted(t.identifiers.values()) == sorted(el.identifiers())
    assert np.bincount(t["id"]).tolist() == [704, 554, 2472, 580, 893]


def test_writer_reproduces_dials_bytes(cunir):
    """Our msgpack writer gives the real DIALS file byte for byte."""
    _, t = cunir
    assert pack_refl(t, version=1) == CUNIR_REFL.read_bytes()


def _small_table(with_data=True):
    rng = np.random.default_rng(5)
    n = 4
    data, mask, bg = [], [], []
    bbox = np.array([[10, 13, 20, 22, 0, 1], [0, 5, 0, 4, 0, 1], [7, 7, 3, 3, 0, 0], [100, 102, 50, 53, 0, 2]],
                    dtype=np.int32)
    for k in range(n):
        x0, x1, y0, y1, z0, z1 = bbox[k]
        shape = (z1 - z0, y1 - y0, x1 - x0)
        if k == 2 or not with_data:
            data.append(None), mask.append(None), bg.append(None)
            continue
        data.append(rng.normal(5, 2, shape).astype(np.float32))
        mask.append(rng.choice([0, 1, 3, 5, 37], size=shape).astype(np.int32))
        bg.append(rng.normal(1, 0.1, shape).astype(np.float32))
    sb = Shoeboxes(np.array([0, 1, 0, 3]), bbox, data, mask, bg)
    cols = {
        "id": np.array([0, 0, 1, 1], np.int32),
        "flags": np.array([FLAGS["integrated_sum"], 0, 2 ** 40, 7], np.uint64),
        "d": rng.random(n),
        "entering": np.array([True, False, True, False]),
        "xy": rng.random((n, 2)),
        "s1": rng.random((n, 3)),
        "m": rng.random((n, 3, 3)),
        "bbox": bbox,
        "miller_index": rng.integers(-30, 30, (n, 3)).astype(np.int32),
        "name": ["a", "bb", "", "ü"],
        "shoebox": sb,
    }
    return ReflectionTable.from_columns(cols, identifiers={0: "exp-a", 1: "exp-b"})


@pytest.mark.parametrize("version", [1, 2])
def test_shoebox_table_round_trip(tmp_path, version):
    t = _small_table()
    assert t.types["m"] == "mat3<double>" and t.types["xy"] == "vec2<double>"
    assert t.types["shoebox"] == "Shoebox<>" and t.types["name"] == "std::string"
    path = tmp_path / "t.refl"
    write_refl(path, t, version=version)
    r = read_refl(path)
    assert r.identifiers == {0: "exp-a", 1: "exp-b"}
    assert r.types == t.types
    for name, col in t.columns.items():
        if name == "shoebox":
            sb = r[name]
            np.testing.assert_array_equal(sb.panel, col.panel)
            np.testing.assert_array_equal(sb.bbox, col.bbox)
            assert sb.has_data().tolist() == [True, True, False, True]
            for k in (0, 1, 3):
                np.testing.assert_array_equal(sb.data[k], col.data[k])
                np.testing.assert_array_equal(sb.mask[k], col.mask[k])
                np.testing.assert_array_equal(sb.background[k], col.background[k])
            assert sb.data[3].shape == (2, 3, 2)
        elif name == "name":
            assert r[name] == col
        else:
            np.testing.assert_array_equal(r[name], col)
    with pytest.raises(InputError, match="exists already"):
        write_refl(path, t)


def test_refl_bad_inputs(tmp_path):
    good = pack_refl(_small_table())
    cases = {
        "text.refl": (b"hello, this is not msgpack\n", "not a DIALS msgpack reflection table"),
        "pickle.refl": (b"\x80\x02cdials_array_family_flex_ext\nreflection_table\n", "pickle"),
        "trunc.refl": (good[: len(good) // 2], "truncated"),
        "empty.refl": (b"", "empty file"),
    }
    import msgpack
    obj = msgpack.unpackb(good, raw=False, strict_map_key=False)
    obj[2]["data"]["weird"] = ["std::complex<double>", [4, b"\0" * 64]]
    cases["unknown.refl"] = (msgpack.packb(obj, use_bin_type=True), "unknown column type 'std::complex<double>'")
    obj = msgpack.unpackb(good, raw=False, strict_map_key=False)
    obj[2]["data"]["d"][1][1] = obj[2]["data"]["d"][1][1][:-8]
    cases["short.refl"] = (msgpack.packb(obj, use_bin_type=True), "column 'd': 24 bytes for 4 values")
    obj = msgpack.unpackb(good, raw=False, strict_map_key=False)
    obj[2]["data"]["shoebox"][1][1] = obj[2]["data"]["shoebox"][1][1][:-3]
    cases["sbtrunc.refl"] = (msgpack.packb(obj, use_bin_type=True), "shoebox column is truncated")
    obj = msgpack.unpackb(good, raw=False, strict_map_key=False)
    obj[0] = "something else"
    cases["magic.refl"] = (msgpack.packb(obj, use_bin_type=True), "not a DIALS reflection table")
    for name, (blob, fragment) in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(InputError) as err:
            read_refl(p)
        msg = str(err.value)
        assert "\n" not in msg and str(p) in msg and fragment in msg, (name, msg)


# --------------------------------------------------------------------------- geometry against DIALS

def test_s1_maps_to_xyzcal_for_every_reflection(cunir):
    """Every reflection's s1 through our detector gives DIALS' xyzcal.mm and xyzcal.px."""
    el, t = cunir
    worst_mm = worst_px = worst_thin = 0.0
    n_on = 0
    for k, exp in enumerate(el.experiments):
        sel = t["id"] == k
        ddet = el.detectors[exp.detector]
        panel, info = ddet.detector[0], ddet.info[0]
        assert info.parallax and info.thickness_mm == 0.45
        s1 = t["s1"][sel]
        mm = s1_to_mm(panel, s1)
        worst_mm = max(worst_mm, np.max(np.abs(mm - t["xyzcal.mm"][sel, :2])))
        px = s1_to_px(panel, info, s1)
        worst_px = max(worst_px, np.max(np.abs(px - t["xyzcal.px"][sel, :2])))
        # geometry.ray_to_pixel (thin sensor) for the reflections that land on the panel,
        # then DIALS' parallax correction mm -> px
        x, y = ray_to_pixel(panel, s1)
        on = np.isfinite(x)
        n_on += int(on.sum())
        xy_mm = np.stack([x, y], axis=1)[on] * panel.pixel_size_mm
        worst_thin = max(worst_thin, np.max(np.abs(mm_to_px(panel, info, xy_mm) - t["xyzcal.px"][sel][on, :2])))
    assert worst_mm < 1e-9
    assert worst_px < 1e-3
    assert worst_thin < 1e-3
    assert n_on >= 5203 - 60     # a few predictions lie just off the panel edge


def test_parallax_shift_is_what_dials_applies(cunir):
    """Without the parallax correction xyzcal.px is off by up to ~0.35 px (0.45 mm Si)."""
    el, t = cunir
    panel = el.detectors[0].detector[0]
    sel = t["id"] == 0
    thin = s1_to_mm(panel, t["s1"][sel]) / panel.pixel_size_mm
    shift = np.abs(thin - t["xyzcal.px"][sel, :2]).max()
    assert 0.2 < shift < 0.5


def test_crystal_A_cell_spacegroup_and_d(cunir):
    el, t = cunir
    for k, exp in enumerate(el.experiments):
        c = el.crystals[exp.crystal]
        np.testing.assert_allclose(c.real_space @ c.A, np.eye(3), atol=1e-12)   # a·a* = 1 (A columns a*, b*, c*)
        assert c.spacegroup == "P 21 3" and c.hall == "P 2ac 2ab 3"
        assert c.cell[0] == pytest.approx(96.37, abs=0.05) and c.cell[3] == pytest.approx(90)
        assert c.half_mosaicity_deg > 0 and c.domain_size_a > 1000
        sel = t["id"] == k
        d = 1 / np.linalg.norm(t["miller_index"][sel] @ c.A.T, axis=1)
        np.testing.assert_allclose(d, t["d"][sel], rtol=1e-9)


def _prediction_distances(el, t, method):
    dist = []
    for k, exp in enumerate(el.experiments):
        sel = t["id"] == k
        panel = el.detectors[exp.detector].detector[0]
        s1 = predict_s1(el.crystals[exp.crystal].A, el.beams[exp.beam], t["miller_index"][sel], method)
        np.testing.assert_allclose(np.linalg.norm(s1, axis=1), 1 / el.beams[exp.beam].wavelength_a, rtol=1e-12)
        mm = s1_to_mm(panel, s1)
        dist.append(np.linalg.norm(mm - t["xyzcal.mm"][sel, :2], axis=1) / panel.pixel_size_mm[0])
    return np.concatenate(dist)


@pytest.mark.parametrize("method", ["rescale", "rotate"])
def test_prediction_from_A_matches_dials(cunir, method):
    """Spots predicted from A and the beam land within a few px of DIALS' predictions.

    Figures (px, 5203 reflections): rescale median 0.85, 95th 2.2, max 3.4;
    rotate median 1.1, 95th 2.9, max 6.2 (printed with -s).
    """
    el, t = cunir
    d = _prediction_distances(el, t, method)
    assert len(d) == 5203 and np.all(np.isfinite(d))
    med, p95, mx = np.median(d), np.percentile(d, 95), d.max()
    print(f"\nprediction {method}: median {med:.3f} px, 95th {p95:.3f} px, max {mx:.3f} px")
    assert med < 1.5 and p95 < 3.5 and mx < 7.0


# --------------------------------------------------------------------------- hierarchies

def _corner(o, f, s, px, size, i, j):
    return o + i * px[0] * f + j * px[1] * s


def test_cspad_hierarchy_corners_by_hand():
    el = read_expt(D / "cspad-single-image.expt")
    det = el.detectors[0].detector
    assert len(det) == 64
    # panel 0: root -> quadrant FS_D0Q0 -> sensor FS_D0Q0S0 -> ASIC; numbers copied from the JSON
    root_o = np.array([0.0, 0.0, -150.0014])            # root and quadrant axes are x, y (normal z)
    quad_o = np.array([-49.6, 43.6, -0.01203125])
    sens_o = np.array([11.304125, -23.19540625, 0.00753125])
    sf = np.array([-0.001825172553060027, 0.9999973206373582, -0.0014238901839527113])
    ss = np.array([-0.9999981947571188, -0.0018259228624977202, -0.0005258214562373528])
    sn = np.cross(sf, ss)
    sens_lab = root_o + quad_o + sens_o          # identity parent frames
    # ASIC 0 local origin (-21.505, 10.175, 0), fast (1,0,0), slow (0,-1,0) in the sensor frame
    o0 = sens_lab + (-21.505) * sf + 10.175 * ss + 0.0 * sn
    f0, s0 = sf, -ss
    p = det[0]
    np.testing.assert_allclose(p.origin_mm, o0, atol=1e-9)
    np.testing.assert_allclose(p.fast_axis, f0, atol=1e-12)
    np.testing.assert_allclose(p.slow_axis, s0, atol=1e-12)
    far = _corner(p.origin_mm, p.fast_axis, p.slow_axis, p.pixel_size_mm, p.image_size, 194, 185)
    np.testing.assert_allclose(far, o0 + 194 * 0.11 * f0 + 185 * 0.11 * s0, atol=1e-9)
    # the two ASICs of a sensor: coplanar, 197 px apart along fast (194 + the 3-pixel gap)
    np.testing.assert_allclose(det[1].origin_mm - det[0].origin_mm, 197 * 0.11 * f0, atol=2e-3)
    z = np.array([q.origin_mm[2] for q in det.panels])
    assert np.all(np.abs(z + 150.0) < 0.2)
    # the beam passes through the central hole
    assert det.ray_to_pixel(el.beams[0].s0())[0] == -1


def test_mpccd_hierarchy_corners_by_hand():
    el = read_expt(D / "SACLA-MPCCD-run266702-0-subset-known_orientations.expt")
    raw = json.loads((D / "SACLA-MPCCD-run266702-0-subset-known_orientations.expt").read_text())
    assert len(el) == 4 and len(el.detectors[0]) == 8
    h = raw["detector"][0]["hierarchy"]
    ro, rf, rs = (np.array(h[k]) for k in ("origin", "fast_axis", "slow_axis"))
    rn = np.cross(rf, rs)
    for i in (0, 5):
        pj = raw["detector"][0]["panels"][i]
        lo, lf, ls = (np.array(pj[k]) for k in ("origin", "fast_axis", "slow_axis"))
        o = ro + lo[0] * rf + lo[1] * rs + lo[2] * rn
        f = lf[0] * rf + lf[1] * rs + lf[2] * rn
        s = ls[0] * rf + ls[1] * rs + ls[2] * rn
        p = el.detectors[0].detector[i]
        np.testing.assert_allclose(p.origin_mm, o, atol=1e-9)
        np.testing.assert_allclose(p.fast_axis, f / np.linalg.norm(f), atol=1e-12)
        far = p.origin_mm + 512 * 0.05 * p.fast_axis + 1024 * 0.05 * p.slow_axis
        np.testing.assert_allclose(far, o + 25.6 * f + 51.2 * s, atol=1e-6)
    # 8 modules of 25.6 x 51.2 mm in two columns of four, separated by < 1.1 mm gaps, none overlapping
    boxes = []
    for p in el.detectors[0].detector.panels:
        c = np.array([p.origin_mm + i * 25.6 * p.fast_axis + j * 51.2 * p.slow_axis for i in (0, 1) for j in (0, 1)])
        boxes.append((c[:, 0].min(), c[:, 0].max(), c[:, 1].min(), c[:, 1].max()))
    boxes = np.array(boxes)
    assert np.all(np.abs(boxes[:, 1] - boxes[:, 0] - 51.2) < 0.25)
    assert np.all(np.abs(boxes[:, 3] - boxes[:, 2] - 25.6) < 0.25)
    for i in range(8):
        for j in range(i + 1, 8):
            ox = min(boxes[i, 1], boxes[j, 1]) - max(boxes[i, 0], boxes[j, 0])
            oy = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 2], boxes[j, 2])
            assert ox <= 0 or oy <= 0, (i, j)
    centre_x = 0.5 * (boxes[:, 0] + boxes[:, 1])
    assert np.sum(centre_x < -20) == 4 and np.sum(centre_x > 20) == 4
    assert all(abs(p.origin_mm[2] + 49.1) < 0.5 for p in el.detectors[0].detector.panels)
    assert el.crystals[0].spacegroup == "P 4/m m m"


def test_expt_bad_inputs(tmp_path):
    cases = {"a.expt": ("not json", "JSON error"),
             "b.expt": ('{"__id__": "Foo"}', "not a DIALS experiment list"),
             "c.expt": ('{"__id__": "ExperimentList", "experiment": [{"beam": 3}], "beam": []}',
                        "refers to beam 3")}
    for name, (text, frag) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=frag):
            read_expt(tmp_path / name)


# --------------------------------------------------------------------------- spectra

def test_rebin_conserves_photons():
    rng = np.random.default_rng(2)
    e = np.sort(rng.uniform(7080, 7160, 300))
    e = np.unique(e)
    w = rng.exponential(1.0, len(e))
    ch = np.arange(7070.0, 7171.0, 1.0)
    out, kept = rebin_spectrum(e, w, ch)
    assert kept == pytest.approx(1.0, abs=1e-12)
    assert out.sum() == pytest.approx(w.sum(), rel=1e-12)
    # identical grids: identity
    out2, _ = rebin_spectrum(ch, np.arange(len(ch), dtype=float), ch)
    np.testing.assert_allclose(out2, np.arange(len(ch)), atol=1e-12)
    # a fine uniform density onto a coarse grid stays uniform (inner channels)
    fine = np.arange(7070.0, 7170.001, 0.25)
    out3, _ = rebin_spectrum(fine, np.ones_like(fine), np.arange(7072.0, 7168.1, 4.0))
    np.testing.assert_allclose(out3, 16.0, rtol=1e-12)
    # part outside the channels is reported
    _, kept4 = rebin_spectrum(ch, np.ones_like(ch), ch[:51])
    assert kept4 == pytest.approx(51 / 101, rel=1e-9)


def test_lam_and_hdf5_spectra(tmp_path):
    lam = tmp_path / "a.lam"
    lam.write_text("wavelength,weight\n1.75,2\n1.74,3\n1.76,0\n")
    s = read_lam(lam)
    np.testing.assert_allclose(s.energy_ev, HC_EV_A / np.array([1.76, 1.75, 1.74]))
    np.testing.assert_allclose(s.weight, [0, 2, 3])
    h5 = tmp_path / "s.h5"
    with h5py.File(h5, "w") as f:
        f["energy_ev"] = np.array([7100.0, 7101.0, 7102.0])
        f["weight"] = np.array([[1.0, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(read_spectrum(f"{h5}:1").weight, [4, 5, 6])
    np.testing.assert_allclose(read_spectrum(h5, experiment_index=0).weight, [1, 2, 3])
    with pytest.raises(InputError, match="no spectrum row 2"):
        read_spectrum(f"{h5}:2")


@pytest.mark.parametrize("text,fragment", [
    ("wavelength,weight\n1.75,2\n1.74,-3\n", "negative weight at line 3"),
    ("1.75,2\n1.74,3\n", "missing header line"),
    ("wavelength,weight\n", "no spectrum rows"),
    ("wavelength,weight\n1.75\n", "line 2 has 1 column"),
    ("wavelength,weight\n1.75,abc\n", "line 2 is not two numbers"),
])
def test_lam_bad_inputs(tmp_path, text, fragment):
    p = tmp_path / "bad.lam"
    p.write_text(text)
    with pytest.raises(InputError) as err:
        read_lam(p)
    assert fragment in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_shot_list(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\n a.expt a.refl  \nb.expt b.refl s.lam 3\n"
                                     "c.expt c.refl 2\nd.expt d.refl sp.h5:4 # row 4\n")
    shots = read_shot_list(tmp_path / "l.txt")
    assert [s.experiment for s in shots] == [None, 3, 2, None]
    assert shots[1].spectrum == str(tmp_path / "s.lam") and shots[3].spectrum == str(tmp_path / "sp.h5") + ":4"
    assert shots[0].expt == tmp_path / "a.expt"
    (tmp_path / "bad.txt").write_text("a.expt\n")
    with pytest.raises(InputError, match="line 1 needs"):
        read_shot_list(tmp_path / "bad.txt")


# --------------------------------------------------------------------------- dataset building

@pytest.fixture(scope="module")
def simulated():
    return Dataset.read(TD / "dataset.h5")


def _settings(ds, **kw):
    return ImportSettings(channels_min_ev=ds.energy_ev[0], channels_max_ev=ds.energy_ev[-1],
                          channels_step_ev=float(ds.energy_ev[1] - ds.energy_ev[0]),
                          domain_size_cells=tuple(ds.domain_size_cells[0]), cell=tuple(ds.cell), **kw)


def test_export_import_round_trip(simulated, tmp_path):
    """A dataset exported as DIALS files (hierarchical detector, shoeboxes, .lam) imports back exactly."""
    lst = export_dials(simulated, tmp_path, lattices=[3, 1, 7])
    out, summary = build_dataset(read_shot_list(lst), _settings(simulated))
    ref = simulated.select_lattices([3, 1, 7])
    assert summary["shoeboxes"] == ref.n_shoeboxes and out.source == "import_dials"
    for name in ("origin_mm", "fast_axis", "slow_axis", "pixel_size_mm", "image_size", "A", "beam_direction",
                 "polarization_normal", "polarization_fraction", "domain_size_cells", "mosaic_spread_deg",
                 "n_domains", "sb_lattice", "sb_panel", "sb_bbox", "sb_miller_index", "pixel_offset",
                 "counts", "mask", "energy_ev"):
        np.testing.assert_allclose(getattr(out, name), getattr(ref, name), atol=1e-12, err_msg=name)
    np.testing.assert_allclose(out.spectrum_weight, ref.spectrum_weight, rtol=1e-9, atol=1e-9)
    assert out.spacegroup == ref.spacegroup
    # a resolution annulus and the fluence option
    sub, s2 = build_dataset(read_shot_list(lst), _settings(simulated, d_min_a=3.0, d_max_a=3.5, fluence=10.0))
    q = np.einsum("kij,kj->ki", sub.A[sub.sb_lattice], sub.sb_miller_index.astype(float))
    d = 1 / np.linalg.norm(q, axis=1)
    assert sub.n_shoeboxes > 0 and np.all((d >= 3.0) & (d <= 3.5)) and s2["resolution"] > 0
    np.testing.assert_allclose(sub.spectrum_weight.sum(axis=1), 10.0, rtol=1e-9)


def test_spectrometer_offset_shifts_every_spectrum(simulated, tmp_path):
    """spectrum.offset_ev moves the spectra by whole channels here: weights shift, photons kept."""
    lst = export_dials(simulated, tmp_path, lattices=[2])
    step = float(simulated.energy_ev[1] - simulated.energy_ev[0])
    base, _ = build_dataset(read_shot_list(lst), _settings(simulated))
    moved, _ = build_dataset(read_shot_list(lst), _settings(simulated, energy_offset_ev=3 * step))
    np.testing.assert_allclose(moved.spectrum_weight[0, 3:], base.spectrum_weight[0, :-3], rtol=1e-9, atol=1e-12)
    with pytest.raises(InputError, match="spectrum.offset_ev"):
        build_dataset(read_shot_list(lst), _settings(simulated, energy_offset_ev=float("nan")))


def test_mask_bits_flags_and_clipping(tmp_path):
    """Mask bits (valid=1, overlapped=32, foreground=4), flags, trusted range and panel clipping."""
    el = read_expt(D / "cspad-single-image.expt")
    ident = el.identifiers()[0]
    real = np.diag([50.0, 60.0, 70.0])
    raw = json.loads((D / "cspad-single-image.expt").read_text())
    raw["crystal"] = [{"__id__": "crystal", "real_space_a": real[0].tolist(), "real_space_b": real[1].tolist(),
                       "real_space_c": real[2].tolist(), "space_group_hall_symbol": " P 1"}]
    raw["experiment"][0]["crystal"] = 0
    (tmp_path / "c.expt").write_text(json.dumps(raw))
    # box 0: on panel 5 at x in [-2, 3) -> clipped to [0, 3); mask codes per pixel
    m0 = np.array([[[1, 5, 33, 0, 7], [1, 1, 1, 1, 1]]], np.int32)
    d0 = np.array([[[1, 2, 3, 4, 5], [6, -1, 20000, 9, 10]]], np.float32)
    boxes = Shoeboxes(np.array([5, 6, 7]), np.array([[-2, 3, 10, 12, 0, 1], [0, 2, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1]],
                                                    np.int32),
                      [d0, np.ones((1, 1, 2), np.float32), np.ones((1, 1, 1), np.float32)],
                      [m0, np.ones((1, 1, 2), np.int32), np.ones((1, 1, 1), np.int32)],
                      [np.zeros_like(d0), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 1), np.float32)])
    t = ReflectionTable.from_columns({
        "id": np.zeros(3, np.int32), "miller_index": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.int32),
        "flags": np.array([FLAGS["integrated_sum"], FLAGS["integrated_sum"] | FLAGS["overloaded"], 0], np.uint64),
        "shoebox": boxes}, identifiers={0: ident})
    write_refl(tmp_path / "c.refl", t)
    shot = [Shot(tmp_path / "c.expt", tmp_path / "c.refl")]
    ds, s = build_dataset(shot, ImportSettings(domain_size_cells=(10, 10, 10)))
    assert s["flags"] == 2 and ds.n_shoeboxes == 1
    assert ds.sb_bbox[0].tolist() == [0, 3, 10, 12] and ds.sb_panel[0] == 5
    # kept columns x = 0, 1, 2 <- original columns 2, 3, 4; trusted range of the CSPAD is [1, 16382]
    np.testing.assert_array_equal(ds.mask, [False, False, True, False, True, True])  # 33 overlapped, 0 invalid
    np.testing.assert_allclose(ds.counts, [3, 4, 5, 20000, 9, 10])
    ds2, _ = build_dataset(shot, ImportSettings(domain_size_cells=(10, 10, 10), exclude_overlapped=False,
                                                foreground_only=True))
    np.testing.assert_array_equal(ds2.mask, [False, False, True, False, False, False])
    ds3, _ = build_dataset(shot, ImportSettings(domain_size_cells=(10, 10, 10), exclude_overlapped=False))
    np.testing.assert_array_equal(ds3.mask, [True, False, True, False, True, True])  # 20000 > trusted max
    assert ds.spectrum_weight.shape == (1, 1) and ds.energy_ev[0] == pytest.approx(HC_EV_A / 1.670421, abs=1)


def test_identifier_mismatch_and_missing_shoeboxes(simulated, tmp_path):
    lst = export_dials(simulated, tmp_path, lattices=[0, 1])
    t = read_refl(tmp_path / "sim.refl")
    t.identifiers[1] = "not-in-the-expt"
    write_refl(tmp_path / "bad.refl", t)
    with pytest.raises(InputError, match="experiment identifiers do not match"):
        build_dataset([Shot(tmp_path / "sim.expt", tmp_path / "bad.refl")], _settings(simulated))
    with pytest.raises(InputError, match="no 'shoebox' column"):
        build_dataset([Shot(CUNIR_EXPT, CUNIR_REFL)], ImportSettings())
    assert lst.exists()


def test_committed_import_fixture_validates():
    """test_data/dials/sim: the fixture for import_dials -> refine_fdp (4 lattices of dataset.h5)."""
    ds, s = build_dataset(read_shot_list(D / "sim" / "sim.list"),
                          ImportSettings(channels_min_ev=7070, channels_max_ev=7170,
                                         domain_size_cells=(48, 48, 24)))
    ds.validate()
    assert s["lattices"] == 4 and ds.n_shoeboxes > 100 and ds.spacegroup == "P 1 21 1"
    assert np.all(ds.spectrum_weight.sum(axis=1) > 0) and ds.n_channels == 101


def test_pixels_cut_from_hdf5_images(simulated, tmp_path):
    """Without a shoebox column, pixels come from an HDF5 stack by bbox (multi-panel layout)."""
    lst = export_dials(simulated, tmp_path, lattices=[2, 5])
    t = read_refl(tmp_path / "sim.refl")
    del t.columns["shoebox"], t.types["shoebox"]
    write_refl(tmp_path / "sim.refl", t, overwrite=True)
    n_panel = len(simulated.origin_mm)
    nf, ns = simulated.image_size[0]
    img = np.zeros((2, n_panel, ns, nf), np.float32)
    yy, xx = np.mgrid[0:ns, 0:nf]
    for j in range(2):
        for p in range(n_panel):
            img[j, p] = (xx + 7 * yy + 13 * p + 101 * j) % 1000     # exact in float32
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f["data"] = img
    ds, _ = build_dataset(read_shot_list(lst), _settings(simulated, images_file=str(tmp_path / "img.h5")))
    ref = simulated.select_lattices([2, 5])
    np.testing.assert_array_equal(ds.sb_bbox, ref.sb_bbox)
    xy = ds.pixel_xy()
    sb = ds.pixel_shoebox()
    expect = (xy[:, 0] + 7 * xy[:, 1] + 13 * ds.sb_panel[sb] + 101 * ds.sb_lattice[sb]) % 1000
    np.testing.assert_array_equal(ds.counts, expect.astype(np.float32))
    assert ds.mask.all()
    with pytest.raises(InputError, match="no dataset 'frames'"):
        build_dataset(read_shot_list(lst), _settings(simulated, images_file=str(tmp_path / "img.h5"),
                                                    images_dataset="frames"))
