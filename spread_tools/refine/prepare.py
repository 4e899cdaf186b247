"""Input of the S1 refinement: datasets joined, cleaned and checked against the SF cache.

Shoeboxes with too few unmasked pixels are dropped (with a warning), lattices left
with fewer than ``lattice.min_shoeboxes`` usable shoeboxes too (their G would rest on a
handful of spots); cell, space group and Miller indices must match the SF cache
(see :mod:`spread_tools.refine.s1`, section *Input policy*).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.errors import InputError

__all__ = ["PreparedData", "prepare_data", "build_pixel_model"]


@dataclasses.dataclass
class PreparedData:
    """The datasets joined, cleaned and checked against the SF cache (same on every rank).

    Attributes
    ----------
    ds : Dataset
        Usable lattices and shoeboxes, shoeboxes grouped by lattice.
    lattice_orig, shoebox_orig : int arrays
        Index of each lattice / shoebox of ``ds`` in the joined input.
    n_lat_total, n_sb_total : int
        Sizes of the joined input.
    warnings : list of str
    dropped : dict
        Counts of what was left out: ``shoeboxes_few_pixels`` (fewer than ``min_pixels``
        unmasked pixels), ``lattices_no_shoebox`` (no usable shoebox left),
        ``lattices_few_shoeboxes`` (fewer than ``min_shoeboxes``) and
        ``shoeboxes_of_dropped_lattices`` (usable shoeboxes of those lattices).
    """

    ds: object
    lattice_orig: np.ndarray
    shoebox_orig: np.ndarray
    n_lat_total: int
    n_sb_total: int
    warnings: list
    dropped: dict = dataclasses.field(default_factory=dict)


def prepare_data(datasets, cache, min_pixels=4, min_shoeboxes=1):
    """Join datasets, drop unusable shoeboxes/lattices and check them against the SF cache.

    Parameters
    ----------
    datasets : list of Dataset
    cache : spread_tools.structure.cache.SFCache
    min_pixels : int
        Shoeboxes with fewer unmasked pixels are dropped (warning).
    min_shoeboxes : int
        Lattices with fewer usable shoeboxes are dropped, with their shoeboxes (warning).

    Returns
    -------
    PreparedData

    Raises
    ------
    InputError
        Cell/space group/Miller indices that do not match the cache, or nothing usable.
    """
    from spread_tools.io.dataset import concatenate
    src = getattr(cache, "source", "SF cache")
    for d in datasets:
        if _norm_sg(d.spacegroup) != _norm_sg(cache.spacegroup):
            raise InputError(f"{d.path}: space group {d.spacegroup} differs from {cache.spacegroup} "
                             f"of {src} (dataset and SF cache from different models?)")
        if not np.allclose(np.asarray(d.cell, float), np.asarray(cache.cell, float), rtol=2e-3, atol=0.05):
            raise InputError(f"{d.path}: cell {_fmt_cell(d.cell)} differs from {_fmt_cell(cache.cell)} "
                             f"of {src} (dataset and SF cache from different models or cells)")
    ds = concatenate(list(datasets))
    n_lat, n_sb = ds.n_lattices, ds.n_shoeboxes
    warnings = []
    rows = cache.index_of(ds.sb_miller_index)
    if np.any(rows < 0):
        bad = int(np.sum(rows < 0))
        h = tuple(int(v) for v in ds.sb_miller_index[np.argmax(rows < 0)])
        raise InputError(f"{ds.path}: {bad} shoebox Miller indices (e.g. {h}) are not in {src} "
                         f"(d {cache.d_max_a:g}-{cache.d_min_a:g} Å): dataset and SF cache from "
                         f"different models, cells or resolution ranges")
    n_unmasked = np.add.reduceat(ds.mask.astype(np.int64), ds.pixel_offset[:-1]) if ds.n_pixels else \
        np.zeros(n_sb, np.int64)
    n_unmasked[np.diff(ds.pixel_offset) == 0] = 0
    keep = n_unmasked >= int(min_pixels)
    if int(min_shoeboxes) < 1:
        raise InputError(f"parameter lattice.min_shoeboxes: must be at least 1, got {min_shoeboxes}")
    usable_per_lat = np.bincount(ds.sb_lattice[keep], minlength=n_lat)
    few = (usable_per_lat > 0) & (usable_per_lat < int(min_shoeboxes))
    dropped = {"shoeboxes_few_pixels": int(np.sum(~keep)),
               "lattices_no_shoebox": int(np.sum(usable_per_lat == 0)),
               "lattices_few_shoeboxes": int(np.sum(few)),
               "shoeboxes_of_dropped_lattices": int(np.sum(usable_per_lat[few]))}
    sb_orig = np.arange(n_sb)
    if not keep.all():
        n_empty = int(np.sum(n_unmasked == 0))
        warnings.append(f"dropped {int(np.sum(~keep))} of {n_sb} shoeboxes with fewer than "
                        f"{int(min_pixels)} unmasked pixels ({n_empty} all masked)")
    if few.any():
        warnings.append(f"dropped {int(few.sum())} of {n_lat} lattices with fewer than "
                        f"{int(min_shoeboxes)} usable shoeboxes (lattice.min_shoeboxes; "
                        f"{dropped['shoeboxes_of_dropped_lattices']} shoeboxes; their G is NaN "
                        f"in the result)")
        keep = keep & ~few[ds.sb_lattice]
    if not keep.all():
        ds = ds.select_shoeboxes(keep)
        sb_orig = sb_orig[keep]
    has = np.bincount(ds.sb_lattice, minlength=n_lat) > 0
    lat_used = np.flatnonzero(has)
    if len(lat_used) == 0:
        raise InputError(f"{ds.path}: no usable shoebox (every shoebox has fewer than "
                         f"{int(min_pixels)} unmasked pixels, or its lattice fewer than "
                         f"{int(min_shoeboxes)} usable shoeboxes)")
    if dropped["lattices_no_shoebox"]:
        warnings.append(f"dropped {dropped['lattices_no_shoebox']} of {n_lat} lattices without a "
                        f"usable shoebox (their G is NaN in the result)")
    new_of_old = np.full(n_lat, -1, np.int64)
    new_of_old[lat_used] = np.arange(len(lat_used))
    order = np.argsort(new_of_old[ds.sb_lattice], kind="stable")
    if len(lat_used) < n_lat or np.any(np.diff(order) != 1):
        ds = ds.select_lattices(lat_used)
        sb_orig = sb_orig[order]
    return PreparedData(ds, lat_used, sb_orig, n_lat, n_sb, warnings, dropped)


def build_pixel_model(ds, cfg, backend=None, per_shoebox=False):
    """The channel-banded pixel model of (one rank's part of) the prepared data.

    Parameters
    ----------
    ds : Dataset
        This rank's lattices.
    cfg : Config
        Effective configuration: ``backend``, ``pixel_model.band_rtol`` (the cut, a
        relative tolerance on λ) and ``pixel_model.band_floor`` (:mod:`spread_tools.model.bands`).
    backend : str, optional
        Overrides ``cfg.backend``.
    per_shoebox : bool
        One row of I per shoebox (:meth:`~spread_tools.model.pixel.PixelModel.from_dataset`).

    Returns
    -------
    spread_tools.model.pixel.PixelModel
    """
    from spread_tools.model.bands import check_floor, check_rtol
    from spread_tools.model.pixel import PixelModel
    rtol = check_rtol(cfg.pixel_model.band_rtol, "parameter pixel_model.band_rtol")
    floor = check_floor(cfg.pixel_model.band_floor, "parameter pixel_model.band_floor")
    return PixelModel.from_dataset(ds, backend=backend or cfg.backend, band_rtol=rtol, band_floor=floor,
                                   per_shoebox=per_shoebox)


def _norm_sg(sg):
    return str(sg).replace(" ", "").upper()


def _fmt_cell(c):
    return "(" + ", ".join(f"{v:g}" for v in np.asarray(c, float)) + ")"
