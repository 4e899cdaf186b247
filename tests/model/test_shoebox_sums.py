"""shoebox_moments against the np.bincount formulas it replaces (same bits)."""

from pathlib import Path

import numpy as np

from spread_tools.io.dataset import Dataset
from spread_tools.model.kernels.shoebox_sums import shoebox_moments

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


def test_moments_are_the_bincount_sums_bit_for_bit():
    ds = Dataset.read(TEST_DATA / "dataset.h5")
    rng = np.random.default_rng(1)
    ds.mask = ds.mask & (rng.random(ds.n_pixels) > 0.2)      # some pixels masked
    w = rng.standard_normal(ds.n_pixels) * 10
    sb, xy = ds.pixel_shoebox(), ds.pixel_xy() + 0.5
    wm = np.where(ds.mask, w, 0.0)
    mom = shoebox_moments(ds, w)
    np.testing.assert_array_equal(mom[:, 0], np.bincount(sb, weights=wm, minlength=ds.n_shoeboxes))
    for i in (0, 1):
        np.testing.assert_array_equal(mom[:, 1 + i], np.bincount(sb, weights=wm * xy[:, i],
                                                                 minlength=ds.n_shoeboxes))
    assert np.any(mom[:, 0] != np.bincount(sb, weights=w, minlength=ds.n_shoeboxes))   # mask used
