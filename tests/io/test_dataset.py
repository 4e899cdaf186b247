"""The dataset HDF5 format: round trip, pixel coordinates, selection, validation errors."""

import dataclasses

import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset, Truth, concatenate


def tiny_dataset(n_lat=3, seed=0):
    """A hand-made dataset: one 100x80 panel, boxes of varying size."""
    rng = np.random.default_rng(seed)
    boxes, lattice, hkl = [], [], []
    for j in range(n_lat):
        for k in range(j + 1):
            x0, y0 = 10 * k + j, 5 * j + k
            boxes.append((x0, x0 + 3 + k, y0, y0 + 2 + j))
            lattice.append(j)
            hkl.append((j, k, -1))
    boxes = np.array(boxes, dtype=np.int32)
    sizes = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    n_pix = int(sizes.sum())
    n_chan = 4
    return Dataset(
        cell=np.array([29.4, 52.7, 33.9, 90, 102.5, 90.0]), spacegroup="P 1 21 1",
        origin_mm=np.array([[-5.0, 4.0, -100.0]]), fast_axis=np.array([[1.0, 0, 0]]),
        slow_axis=np.array([[0, -1.0, 0]]), pixel_size_mm=np.array([[0.1, 0.1]]),
        image_size=np.array([[100, 80]], dtype=np.int32),
        energy_ev=np.linspace(7100, 7112, n_chan), spectrum_weight=rng.uniform(1, 2, (n_lat, n_chan)),
        A=np.tile(np.eye(3) / 30, (n_lat, 1, 1)), beam_direction=np.tile([0, 0, 1.0], (n_lat, 1)),
        polarization_normal=np.tile([0, 1.0, 0], (n_lat, 1)), polarization_fraction=np.full(n_lat, 0.999),
        domain_size_cells=np.tile([48, 48, 24.0], (n_lat, 1)), mosaic_spread_deg=np.full(n_lat, 0.05),
        n_domains=np.full(n_lat, 5, dtype=np.int32), identifier=np.array([f"shot{j}" for j in range(n_lat)]),
        sb_lattice=np.array(lattice, dtype=np.int32), sb_panel=np.zeros(len(boxes), dtype=np.int32),
        sb_bbox=boxes, sb_miller_index=np.array(hkl, dtype=np.int32),
        pixel_offset=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        counts=rng.poisson(3, n_pix).astype(np.float32), mask=rng.uniform(size=n_pix) > 0.1,
        truth=Truth(energy_ev=np.array([7000.0, 7200.0]), site_names=["FE1"], fp=np.zeros((1, 2)),
                    fdp=np.ones((1, 2)), G=np.arange(n_lat, dtype=float), background=np.zeros((len(boxes), 3))))


def test_round_trip(tmp_path):
    ds = tiny_dataset()
    out = tmp_path / "ds.h5"
    ds.write(out)
    back = Dataset.read(out)
    for f in dataclasses.fields(Dataset):
        if f.name in ("truth", "path"):
            continue
        a, b = getattr(ds, f.name), getattr(back, f.name)
        assert np.array_equal(np.asarray(a), np.asarray(b)), f.name
    assert back.truth.site_names == ["FE1"]
    assert np.array_equal(back.truth.G, ds.truth.G)
    with pytest.raises(InputError, match="exists already"):
        ds.write(out)


def test_pixel_xy_matches_boxes():
    ds = tiny_dataset()
    xy = ds.pixel_xy()
    sb = ds.pixel_shoebox()
    for k in range(ds.n_shoeboxes):
        x0, x1, y0, y1 = ds.sb_bbox[k]
        expect = [(x, y) for y in range(y0, y1) for x in range(x0, x1)]  # slow outer, fast inner
        assert [tuple(v) for v in xy[sb == k]] == expect


def test_select_and_concatenate_keep_pixels_with_their_shoeboxes():
    ds = tiny_dataset(n_lat=4)
    sub = ds.select_lattices([2, 0])
    sub.validate()
    assert sub.n_lattices == 2
    assert np.array_equal(sub.identifier, ["shot2", "shot0"])
    # shoeboxes of old lattice 2 come first, then those of lattice 0
    old = [k for j in (2, 0) for k in np.flatnonzero(ds.sb_lattice == j)]
    assert np.array_equal(sub.sb_bbox, ds.sb_bbox[old])
    expect_counts = np.concatenate([ds.counts[ds.pixel_offset[k]:ds.pixel_offset[k + 1]] for k in old])
    assert np.array_equal(sub.counts, expect_counts)
    both = concatenate([ds.select_lattices([0, 1]), ds.select_lattices([2, 3])])
    both.validate()
    assert np.array_equal(both.counts, ds.counts)
    assert np.array_equal(both.sb_lattice, ds.sb_lattice)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.counts.__setitem__(0, np.nan), "NaN"),
    (lambda d: d.spectrum_weight.__setitem__((0, slice(None)), 0.0), "zero photons"),
    (lambda d: d.sb_bbox.__setitem__((0, 1), 500), "bbox sizes do not match"),
    (lambda d: d.energy_ev.__setitem__(slice(None), d.energy_ev[::-1].copy()), "strictly increasing"),
    (lambda d: d.energy_ev.__setitem__(slice(None), d.energy_ev / 1000), "wrong units"),
    (lambda d: d.sb_lattice.__setitem__(0, 99), "lattice that does not exist"),
])
def test_validate_names_the_problem(change, fragment):
    ds = tiny_dataset()
    ds.path = "bad.h5"
    change(ds)
    with pytest.raises(InputError, match=f"bad.h5: .*{fragment}"):
        ds.validate()


def test_missing_dataset_in_file(tmp_path):
    out = tmp_path / "ds.h5"
    tiny_dataset().write(out)
    with h5py.File(out, "a") as h5:
        del h5["pixels/mask"]
    with pytest.raises(InputError, match="missing dataset 'pixels/mask'"):
        Dataset.read(out)


def test_select_shoeboxes_by_mask_and_by_index():
    ds = tiny_dataset(n_lat=4)
    keep = np.arange(ds.n_shoeboxes) % 3 != 1
    sub = ds.select_shoeboxes(keep)
    sub.validate()
    kept = np.flatnonzero(keep)
    assert np.array_equal(sub.sb_bbox, ds.sb_bbox[kept])
    assert np.array_equal(sub.counts, np.concatenate(
        [ds.counts[ds.pixel_offset[k]:ds.pixel_offset[k + 1]] for k in kept]))
    assert np.array_equal(sub.truth.background, ds.truth.background[kept])
    assert sub.n_lattices == ds.n_lattices
    reordered = ds.select_shoeboxes(kept[::-1])
    assert np.array_equal(reordered.sb_miller_index, ds.sb_miller_index[kept[::-1]])
    assert np.array_equal(reordered.mask[:reordered.pixel_offset[1]],
                          ds.mask[ds.pixel_offset[kept[-1]]:ds.pixel_offset[kept[-1] + 1]])
