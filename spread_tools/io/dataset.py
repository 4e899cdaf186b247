"""The SPREAD dataset: lattices, spectra, detector, shoeboxes and their pixels (HDF5).

The layout is described in ``docs/formats.md``. :class:`Dataset` holds the
arrays in memory; :meth:`Dataset.read` and :meth:`Dataset.write` move them to
and from the HDF5 file (``format = "spread_tools.dataset"``, version 1).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError
from spread_tools.io.h5io import atomic_writer, open_checked, read_array, write_strings

FORMAT = "spread_tools.dataset"
VERSION = 1

# name -> (HDF5 path, dtype, trailing shape) ; leading dimension is n_panel/n_lat/n_sb/n_pix/n_chan
_DETECTOR = {
    "origin_mm": ("detector/origin_mm", np.float64, (3,)),
    "fast_axis": ("detector/fast_axis", np.float64, (3,)),
    "slow_axis": ("detector/slow_axis", np.float64, (3,)),
    "pixel_size_mm": ("detector/pixel_size_mm", np.float64, (2,)),
    "image_size": ("detector/image_size", np.int32, (2,)),
}
_LATTICES = {
    "A": ("lattices/A", np.float64, (3, 3)),
    "beam_direction": ("lattices/beam_direction", np.float64, (3,)),
    "polarization_normal": ("lattices/polarization_normal", np.float64, (3,)),
    "polarization_fraction": ("lattices/polarization_fraction", np.float64, ()),
    "domain_size_cells": ("lattices/domain_size_cells", np.float64, (3,)),
    "mosaic_spread_deg": ("lattices/mosaic_spread_deg", np.float64, ()),
    "n_domains": ("lattices/n_domains", np.int32, ()),
}
_SHOEBOXES = {
    "sb_lattice": ("shoeboxes/lattice", np.int32, ()),
    "sb_panel": ("shoeboxes/panel", np.int32, ()),
    "sb_bbox": ("shoeboxes/bbox", np.int32, (4,)),
    "sb_miller_index": ("shoeboxes/miller_index", np.int32, (3,)),
}


@dataclasses.dataclass
class Truth:
    """Ground truth stored by simulations.

    Attributes
    ----------
    energy_ev : ndarray (n_E,)
    site_names : list of str
    fp, fdp : ndarray (n_site, n_E)
        The curves that made the data, in electrons.
    G : ndarray (n_lat,)
        Per-lattice scale.
    background : ndarray (n_sb, 3)
        Log-linear background (b0, b1, b2) per shoebox.
    A, cell, domain_size_cells, mosaic_spread_deg : ndarray (n_lat, ...), optional
        The true crystal of every lattice (the stored ``lattices/`` models may differ).
    spectrum_offset_ev : ndarray (n_lat,), optional
        True photon energy minus the stored channel energy, per lattice.
    spectrum_weight : ndarray (n_lat, n_chan), optional
        The true spectra (photons/Å² per channel at ``energy_ev``).
    """

    energy_ev: np.ndarray
    site_names: list
    fp: np.ndarray
    fdp: np.ndarray
    G: np.ndarray
    background: np.ndarray
    A: np.ndarray = None
    cell: np.ndarray = None
    domain_size_cells: np.ndarray = None
    mosaic_spread_deg: np.ndarray = None
    spectrum_offset_ev: np.ndarray = None
    spectrum_weight: np.ndarray = None

    #: Per-lattice fields (first axis n_lat), optional.
    LATTICE_FIELDS = ("G", "A", "cell", "domain_size_cells", "mosaic_spread_deg",
                      "spectrum_offset_ev", "spectrum_weight")

    def select_lattices(self, index):
        """The truth of the given lattices (per-lattice fields indexed, the rest kept)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[index] for name in self.LATTICE_FIELDS
                                            if getattr(self, name) is not None})


@dataclasses.dataclass
class Dataset:
    """All arrays of one dataset file (see ``docs/formats.md`` for meanings and units)."""

    cell: np.ndarray
    spacegroup: str
    origin_mm: np.ndarray
    fast_axis: np.ndarray
    slow_axis: np.ndarray
    pixel_size_mm: np.ndarray
    image_size: np.ndarray
    energy_ev: np.ndarray
    spectrum_weight: np.ndarray
    A: np.ndarray
    beam_direction: np.ndarray
    polarization_normal: np.ndarray
    polarization_fraction: np.ndarray
    domain_size_cells: np.ndarray
    mosaic_spread_deg: np.ndarray
    n_domains: np.ndarray
    identifier: np.ndarray
    sb_lattice: np.ndarray
    sb_panel: np.ndarray
    sb_bbox: np.ndarray
    sb_miller_index: np.ndarray
    pixel_offset: np.ndarray
    counts: np.ndarray
    mask: np.ndarray
    gain: float = 1.0
    source: str = ""
    config_json: str = "{}"
    truth: Truth = None
    path: str = "<memory>"

    @property
    def n_lattices(self):
        """Number of lattices."""
        return len(self.A)

    @property
    def n_shoeboxes(self):
        """Number of shoeboxes."""
        return len(self.sb_lattice)

    @property
    def n_pixels(self):
        """Number of pixels over all shoeboxes."""
        return len(self.counts)

    @property
    def n_channels(self):
        """Number of spectrum channels."""
        return len(self.energy_ev)

    def pixel_shoebox(self):
        """Index of the shoebox of every pixel, shape (n_pix,)."""
        return np.repeat(np.arange(self.n_shoeboxes, dtype=np.int64), np.diff(self.pixel_offset))

    def pixel_xy(self):
        """Fast and slow pixel indices of every pixel, shape (n_pix, 2), int64.

        Pixel centres are at index + 0.5 in DIALS convention.
        """
        n_per = np.diff(self.pixel_offset)
        box = self.sb_bbox.astype(np.int64)
        local = np.arange(self.n_pixels, dtype=np.int64) - np.repeat(np.asarray(self.pixel_offset[:-1], np.int64), n_per)
        row, col = np.divmod(local, np.repeat(box[:, 1] - box[:, 0], n_per))
        return np.stack([np.repeat(box[:, 0], n_per) + col, np.repeat(box[:, 2], n_per) + row], axis=1)

    def validate(self):
        """Check shapes and values; raise InputError naming the file and the problem."""
        where = self.path
        n_lat, n_sb, n_pix, n_chan = self.n_lattices, self.n_shoeboxes, self.n_pixels, self.n_channels
        n_panel = len(self.origin_mm)

        def fail(msg):
            raise InputError(f"{where}: {msg}")
        for name, (_, _, shape) in _DETECTOR.items():
            if getattr(self, name).shape != (n_panel, *shape):
                fail(f"detector {name} has shape {getattr(self, name).shape}, expected {(n_panel, *shape)}")
        for name, (_, _, shape) in _LATTICES.items():
            if getattr(self, name).shape != (n_lat, *shape):
                fail(f"lattices {name} has shape {getattr(self, name).shape}, expected {(n_lat, *shape)}")
        for name, (_, _, shape) in _SHOEBOXES.items():
            if getattr(self, name).shape != (n_sb, *shape):
                fail(f"shoeboxes {name[3:]} has shape {getattr(self, name).shape}, expected {(n_sb, *shape)}")
        if self.spectrum_weight.shape != (n_lat, n_chan):
            fail(f"spectra/weight has shape {self.spectrum_weight.shape}, expected {(n_lat, n_chan)}")
        if n_chan < 1 or np.any(np.diff(self.energy_ev) <= 0):
            fail("spectra/energy_ev must be strictly increasing")
        for name in ("energy_ev", "spectrum_weight", "A", "origin_mm", "counts"):
            if not np.all(np.isfinite(getattr(self, name))):
                fail(f"{name} contains NaN or infinite values")
        if np.any(self.spectrum_weight < 0):
            fail("spectra/weight has negative photon counts")
        if np.any(self.spectrum_weight.sum(axis=1) <= 0):
            bad = int(np.argmax(self.spectrum_weight.sum(axis=1) <= 0))
            fail(f"lattice {bad} has a spectrum with zero photons")
        if self.energy_ev[0] < 1000 or self.energy_ev[-1] > 100000:
            fail("spectra/energy_ev must be in eV (1000-100000); wrong units?")
        if self.pixel_offset.shape != (n_sb + 1,) or self.pixel_offset[0] != 0 \
                or self.pixel_offset[-1] != n_pix or np.any(np.diff(self.pixel_offset) < 0):
            fail("shoeboxes/pixel_offset does not match the pixel arrays")
        if self.mask.shape != (n_pix,):
            fail(f"pixels/mask has shape {self.mask.shape}, expected {(n_pix,)}")
        if n_sb and (self.sb_lattice.min() < 0 or self.sb_lattice.max() >= n_lat):
            fail("shoeboxes/lattice refers to a lattice that does not exist")
        if n_sb and (self.sb_panel.min() < 0 or self.sb_panel.max() >= n_panel):
            fail("shoeboxes/panel refers to a panel that does not exist")
        x0, x1, y0, y1 = self.sb_bbox.T
        if np.any(x1 <= x0) or np.any(y1 <= y0):
            fail("shoeboxes/bbox has empty boxes")
        size = (x1 - x0).astype(np.int64) * (y1 - y0)
        if np.any(size != np.diff(self.pixel_offset)):
            fail("shoeboxes/bbox sizes do not match shoeboxes/pixel_offset")
        if n_sb:
            img = self.image_size[self.sb_panel]
            if np.any(x0 < 0) or np.any(y0 < 0) or np.any(x1 > img[:, 0]) or np.any(y1 > img[:, 1]):
                fail("a shoebox lies (partly) off its detector panel")
        if np.any(self.counts < 0):
            fail("pixels/counts has negative values")
        if np.any(self.n_domains < 1):
            fail("lattices/n_domains must be at least 1")
        if len(self.cell) != 6 or np.any(np.asarray(self.cell[:3]) <= 0):
            fail("cell must be a, b, c (Å), alpha, beta, gamma (°)")
        return self

    @classmethod
    def read(cls, path, validate=True):
        """Read a dataset file.

        Parameters
        ----------
        path : str or Path
            Dataset HDF5 file.
        validate : bool
            Run :meth:`validate` after reading.

        Returns
        -------
        Dataset
        """
        with open_checked(path, FORMAT, VERSION) as h5:
            fields = {}
            for table in (_DETECTOR, _LATTICES, _SHOEBOXES):
                for name, (h5name, dtype, _) in table.items():
                    fields[name] = read_array(h5, h5name, dtype)
            fields["energy_ev"] = read_array(h5, "spectra/energy_ev", np.float64)
            fields["spectrum_weight"] = read_array(h5, "spectra/weight", np.float64)
            fields["identifier"] = read_array(h5, "lattices/identifier").astype(str)
            fields["pixel_offset"] = read_array(h5, "shoeboxes/pixel_offset", np.int64)
            fields["counts"] = read_array(h5, "pixels/counts", np.float32)
            fields["mask"] = read_array(h5, "pixels/mask", bool)
            attrs = h5.attrs
            for key in ("cell", "spacegroup"):
                if key not in attrs:
                    raise InputError(f"{path}: missing root attribute '{key}'")
            fields["cell"] = np.asarray(attrs["cell"], dtype=np.float64)
            fields["spacegroup"] = str(attrs["spacegroup"])
            fields["gain"] = float(h5["detector"].attrs.get("gain", 1.0))
            fields["source"] = str(attrs.get("source", ""))
            fields["config_json"] = str(attrs.get("config", "{}"))
            truth = None
            if "truth" in h5:
                optional = {name: read_array(h5, f"truth/{name}", np.float64)
                            for name in Truth.LATTICE_FIELDS[1:] if f"truth/{name}" in h5}
                truth = Truth(
                    energy_ev=read_array(h5, "truth/energy_ev", np.float64),
                    site_names=list(read_array(h5, "truth/site_names").astype(str)),
                    fp=read_array(h5, "truth/fp", np.float64),
                    fdp=read_array(h5, "truth/fdp", np.float64),
                    G=read_array(h5, "truth/G", np.float64),
                    background=read_array(h5, "truth/background", np.float64), **optional)
        ds = cls(**fields, truth=truth, path=str(path))
        if validate:
            ds.validate()
        return ds

    def write(self, path, overwrite=False, extra=None):
        """Write the dataset atomically.

        Parameters
        ----------
        path : str or Path
            Output file.
        overwrite : bool
            Replace an existing file.
        extra : dict, optional
            Further HDF5 datasets, ``"group/name" → array`` (string arrays as strings), e.g.
            the per-lattice table of ``refine_geometry``; readers ignore them.
        """
        self.validate()
        with atomic_writer(path, FORMAT, VERSION, overwrite=overwrite) as h5:
            h5.attrs["cell"] = np.asarray(self.cell, dtype=np.float64)
            h5.attrs["spacegroup"] = self.spacegroup
            h5.attrs["source"] = self.source
            h5.attrs["config"] = self.config_json
            for table in (_DETECTOR, _LATTICES, _SHOEBOXES):
                for name, (h5name, dtype, _) in table.items():
                    h5.create_dataset(h5name, data=np.asarray(getattr(self, name), dtype=dtype))
            h5["detector"].attrs["gain"] = float(self.gain)
            h5.create_dataset("spectra/energy_ev", data=self.energy_ev.astype(np.float64))
            h5.create_dataset("spectra/weight", data=self.spectrum_weight.astype(np.float64))
            write_strings(h5, "lattices/identifier", self.identifier)
            h5.create_dataset("shoeboxes/pixel_offset", data=self.pixel_offset.astype(np.int64))
            opts = dict(compression="gzip", compression_opts=1, shuffle=True) if self.n_pixels > 4096 else {}
            h5.create_dataset("pixels/counts", data=self.counts.astype(np.float32), **opts)
            h5.create_dataset("pixels/mask", data=self.mask.astype(bool), **opts)
            for name, arr in (extra or {}).items():
                arr = np.asarray(arr)
                if arr.dtype.kind in "US":
                    write_strings(h5, name, [str(x) for x in arr])
                else:
                    h5.create_dataset(name, data=arr)
            if self.truth is not None:
                t = self.truth
                h5.create_dataset("truth/energy_ev", data=np.asarray(t.energy_ev, np.float64))
                write_strings(h5, "truth/site_names", t.site_names)
                for name in ("fp", "fdp", "background") + Truth.LATTICE_FIELDS:
                    if getattr(t, name) is not None:
                        h5.create_dataset(f"truth/{name}", data=np.asarray(getattr(t, name), np.float64))

    def select_shoeboxes(self, keep):
        """Sub-dataset with the given shoeboxes; lattices are kept as they are.

        Parameters
        ----------
        keep : array of bool (n_sb,) or array of int
            A mask (order kept) or shoebox indices (in the order given).

        Returns
        -------
        Dataset
        """
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        sizes = np.diff(self.pixel_offset)[index]
        offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        pix = np.arange(offset[-1], dtype=np.int64) + np.repeat(self.pixel_offset[index] - offset[:-1], sizes)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _SHOEBOXES:
            fields[name] = getattr(self, name)[index]
        fields["pixel_offset"] = offset
        fields["counts"] = self.counts[pix]
        fields["mask"] = self.mask[pix]
        if self.truth is not None:
            fields["truth"] = dataclasses.replace(self.truth, background=self.truth.background[index])
        return Dataset(**fields)

    def select_lattices(self, lattice_index):
        """Sub-dataset with the given lattices (renumbered in the given order).

        Parameters
        ----------
        lattice_index : array of int
            Lattices to keep, e.g. those owned by one MPI rank.

        Returns
        -------
        Dataset
            Shoeboxes grouped in the order of ``lattice_index``, stable within a lattice.
        """
        lattice_index = np.asarray(lattice_index, dtype=np.int64)
        new_of_old = np.full(self.n_lattices, -1, dtype=np.int64)
        new_of_old[lattice_index] = np.arange(len(lattice_index))
        keep_sb = np.flatnonzero(new_of_old[self.sb_lattice] >= 0)
        keep_sb = keep_sb[np.argsort(new_of_old[self.sb_lattice[keep_sb]], kind="stable")]
        sub = self.select_shoeboxes(keep_sb)
        for name in _LATTICES:
            setattr(sub, name, getattr(self, name)[lattice_index])
        sub.identifier = self.identifier[lattice_index]
        sub.spectrum_weight = self.spectrum_weight[lattice_index]
        sub.sb_lattice = new_of_old[self.sb_lattice[keep_sb]].astype(np.int32)
        if self.truth is not None:
            sub.truth = sub.truth.select_lattices(lattice_index)
        return sub


def concatenate(datasets):
    """Join datasets that share detector, spectrum channels, cell and space group.

    Parameters
    ----------
    datasets : sequence of Dataset

    Returns
    -------
    Dataset
        Lattices and shoeboxes of all inputs, in order.

    Raises
    ------
    InputError
        When the inputs differ in detector, channels, cell or space group.
    """
    first = datasets[0]
    if len(datasets) == 1:
        return first
    for ds in datasets[1:]:
        if ds.spacegroup != first.spacegroup or not np.allclose(ds.cell, first.cell, rtol=1e-3):
            raise InputError(f"{ds.path}: cell/space group differ from {first.path}")
        if ds.energy_ev.shape != first.energy_ev.shape or not np.allclose(ds.energy_ev, first.energy_ev):
            raise InputError(f"{ds.path}: spectrum channels differ from {first.path}")
        for name in _DETECTOR:
            if getattr(ds, name).shape != getattr(first, name).shape or \
                    not np.allclose(getattr(ds, name), getattr(first, name)):
                raise InputError(f"{ds.path}: detector differs from {first.path} "
                                 "(refine them as separate datasets of one job is not supported yet)")
    lat_shift = np.cumsum([0] + [d.n_lattices for d in datasets[:-1]])
    pix_shift = np.cumsum([0] + [d.n_pixels for d in datasets[:-1]])
    fields = {f.name: getattr(first, f.name) for f in dataclasses.fields(first)}
    for name in list(_LATTICES) + ["identifier", "spectrum_weight"]:
        fields[name] = np.concatenate([getattr(d, name) for d in datasets])
    for name in _SHOEBOXES:
        fields[name] = np.concatenate([getattr(d, name) for d in datasets])
    fields["sb_lattice"] = np.concatenate([d.sb_lattice + s for d, s in zip(datasets, lat_shift)]).astype(np.int32)
    fields["pixel_offset"] = np.concatenate(
        [[0]] + [d.pixel_offset[1:] + s for d, s in zip(datasets, pix_shift)]).astype(np.int64)
    fields["counts"] = np.concatenate([d.counts for d in datasets])
    fields["mask"] = np.concatenate([d.mask for d in datasets])
    fields["truth"] = None
    fields["path"] = "+".join(str(d.path) for d in datasets)
    fields["config_json"] = json.dumps([json.loads(d.config_json or "{}") for d in datasets])
    return Dataset(**fields)


def read_many(paths):
    """Read and concatenate several dataset files (see :func:`concatenate`)."""
    return concatenate([Dataset.read(Path(p)) for p in paths])
