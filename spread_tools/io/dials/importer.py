"""DIALS stills → SPREAD dataset: shot lists, shoebox selection, dataset building, export.

The readers live in :mod:`spread_tools.io.dials.expt` (``.expt`` JSON),
:mod:`spread_tools.io.dials.refl` (``.refl`` msgpack) and
:mod:`spread_tools.io.dials.spectra` (spectra).

Spectra (:mod:`spread_tools.io.dials.spectra`): a ``.lam`` CSV (header line, then
``wavelength_a, weight`` rows), an HDF5 file of per-shot spectra (``file.h5:ROW``;
without ``:ROW`` the row of the experiment index), or none (all photons at the
beam's wavelength, one channel). Every spectrum is rebinned onto the dataset's
common channels conserving photons; ``fluence`` rescales each shot's total.

Shot list file: one shot per line, ``expt refl [spectrum] [experiment_index]``
(blank lines and ``#`` comments skipped, relative paths relative to the list).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError
from spread_tools.io.dials.expt import DialsCrystal, read_expt
from spread_tools.io.dials.refl import (
    FLAGS,
    MASK_CODES,
    ReflectionTable,
    Shoeboxes,
    flag_value,
    read_refl,
    write_refl,
)
from spread_tools.io.dials.spectra import (
    Spectrum,
    channel_grid,
    read_spectrum,
    rebin_spectrum,
)
from spread_tools.model.geometry import HC_EV_A

__all__ = ["Shot", "ImportSettings", "read_shot_list", "build_dataset", "export_dials"]


@dataclasses.dataclass
class Shot:
    """One input: an experiment list, its reflections, optional spectrum and experiment index."""

    expt: Path
    refl: Path
    spectrum: str | None = None
    experiment: int | None = None


def read_shot_list(path):
    """Read a shot list: lines ``expt refl [spectrum] [experiment_index]``.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of Shot
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read shot list ({exc})") from None
    shots = []
    base = path.parent
    for k, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2 or len(words) > 4:
            raise InputError(f"{path}: line {k} needs 'expt refl [spectrum] [experiment_index]'")
        expt, refl, rest = words[0], words[1], words[2:]
        index, spec = None, None
        if rest and rest[-1].lstrip("-").isdigit():
            index = int(rest.pop())
            if index < 0:
                raise InputError(f"{path}: line {k}: experiment index must be >= 0")
        if rest:
            spec = rest.pop(0)
        if rest:
            raise InputError(f"{path}: line {k}: unexpected word {rest[0]!r}")

        def rel(p):
            return Path(p) if Path(p).is_absolute() else base / p
        spec_path = None
        if spec is not None:
            sbase, _, srow = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() and ":" in spec \
                else (spec, "", "")
            spec_path = str(rel(sbase)) + (f":{srow}" if srow else "")
        shots.append(Shot(rel(expt), rel(refl), spec_path, index))
    if not shots:
        raise InputError(f"{path}: no shots listed")
    return shots


@dataclasses.dataclass
class ImportSettings:
    """Choices of :func:`build_dataset` (the ``import_dials`` parameters)."""

    channels_min_ev: float | None = None
    channels_max_ev: float | None = None
    channels_step_ev: float = 1.0
    spectrum_file: str | None = None
    fluence: float | None = None
    energy_offset_ev: float = 0.0
    d_min_a: float | None = None
    d_max_a: float | None = None
    flags_require: tuple = ("integrated_sum",)
    flags_reject: tuple = ("bad_shoebox", "failed_during_background_modelling", "failed_during_summation")
    exclude_overlapped: bool = True
    foreground_only: bool = False
    domain_size_cells: tuple | None = None
    mosaic_spread_deg: float | None = None
    n_domains: int = 8
    gain: float | None = None
    images_file: str | None = None
    images_dataset: str = "data"
    predictions_only: bool = False
    cell: tuple | None = None
    cell_tolerance: float = 0.03
    detector_tolerance_mm: float = 1e-3


@dataclasses.dataclass
class _Lattice:
    A: np.ndarray
    beam: object
    crystal: DialsCrystal
    identifier: str
    spectrum: Spectrum
    boxes: list          # (panel, x0, x1, y0, y1, hkl, counts(flat), mask(flat))


def _match_ids(table, el):
    """Map the table's ``id`` values to experiment indices, checking identifiers."""
    ids = np.unique(table["id"]) if table.nrows else np.zeros(0, int)
    exp_ids = el.identifiers()
    out = {}
    for i in ids.tolist():
        if i < 0:
            continue   # unindexed
        if table.identifiers:
            ident = table.identifiers.get(i)
            if ident is None:
                raise InputError(f"{table.path}: id {i} has no experiment identifier in the table")
            if ident not in exp_ids:
                raise InputError(f"{table.path}: experiment identifiers do not match {el.path} "
                                 f"(id {i} = '{ident}' is not in the experiment list)")
            out[i] = exp_ids.index(ident)
        else:
            if not 0 <= i < len(el):
                raise InputError(f"{table.path}: id {i} refers to experiment {i}, but {el.path} has {len(el)}")
            out[i] = i
    return out


def _same_detector(a, b, tol):
    if len(a) != len(b):
        return False
    for p, q in zip(a.panels, b.panels):
        if p.image_size != q.image_size or not np.allclose(p.pixel_size_mm, q.pixel_size_mm) \
                or np.max(np.abs(p.origin_mm - q.origin_mm)) > tol \
                or np.max(np.abs(p.fast_axis - q.fast_axis)) > 1e-6 \
                or np.max(np.abs(p.slow_axis - q.slow_axis)) > 1e-6:
            return False
    return True


def _pixels(bbox, data, mbits, panel, info, gain, st):
    """Clip one shoebox to its panel; counts (photons) and mask (True = used), or None."""
    x0, x1, y0, y1, z0, z1 = (int(v) for v in bbox)
    if z1 - z0 != 1:
        data = data.sum(axis=0, keepdims=True)
        mbits = np.bitwise_and.reduce(mbits, axis=0, keepdims=True)
    nf, ns = panel.image_size
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, nf), max(y0, 0), min(y1, ns)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    raw = data[0, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].astype(np.float64)
    m = mbits[0, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    use = (m & MASK_CODES["valid"]) != 0
    if st.exclude_overlapped:
        use &= (m & MASK_CODES["overlapped"]) == 0
    if st.foreground_only:
        use &= (m & MASK_CODES["foreground"]) != 0
    lo, hi = info.trusted_range
    use &= np.isfinite(raw) & (raw >= lo) & (raw <= hi)
    yy, xx = np.mgrid[cy0:cy1, cx0:cx1]
    for rx0, ry0, rx1, ry1 in info.mask_rects:
        use &= ~((xx >= rx0) & (xx < rx1) & (yy >= ry0) & (yy < ry1))
    counts = np.where(np.isfinite(raw), raw, 0.0) / gain
    use &= counts >= 0
    counts = np.where(use, counts, np.maximum(counts, 0.0))
    if not use.any():
        return None
    return cx0, cx1, cy0, cy1, counts.astype(np.float32).ravel(), use.ravel()


def _empty_boxes(table):
    """Reader of every reflection's bbox with zero counts, all pixels valid (for model spots)."""
    bboxes, panels = table["bbox"], table["panel"] if "panel" in table else None

    def box(r):
        x0, x1, y0, y1, z0, z1 = (int(v) for v in bboxes[r])
        shape = (max(z1 - z0, 1), y1 - y0, x1 - x0)
        return (int(panels[r]) if panels is not None else 0, bboxes[r], np.zeros(shape),
                np.full(shape, MASK_CODES["valid"] | MASK_CODES["foreground"], np.int32))
    return box


class _Images:
    """Pixels cut by bounding box from an HDF5 image stack (when a table has no shoeboxes).

    The stack is ``dataset`` of shape (n_image, n_slow, n_fast) for one panel or
    (n_image, n_panel, n_slow, n_fast); raw values (ADU). Every pixel is marked
    valid (mask bit 1); trusted range, panel masks and gain apply as for shoeboxes.
    """

    def __init__(self, path, dataset):
        self.path, self.dataset, self.h5 = path, dataset, None

    def _open(self):
        if self.h5 is None:
            from spread_tools.io.h5io import note_input, open_h5
            if not Path(self.path).is_file():
                raise InputError(f"{self.path}: no such image file")
            note_input(self.path)
            self.h5 = open_h5(self.path, "HDF5 image file")
            if self.dataset not in self.h5:
                raise InputError(f"{self.path}: no dataset '{self.dataset}' (set images.dataset)")
        return self.h5[self.dataset]

    def reader(self, table, index, detector):
        """A function row -> (panel, bbox6, data (1, ny, nx), mask) for image ``index``."""
        stack = self._open()
        multi = stack.ndim == 4
        if stack.ndim not in (3, 4) or (multi and stack.shape[1] != len(detector)):
            raise InputError(f"{self.path}: '{self.dataset}' has shape {stack.shape}; expected "
                             f"(n_image, n_slow, n_fast) or (n_image, {len(detector)}, n_slow, n_fast)")
        if not 0 <= index < stack.shape[0]:
            raise InputError(f"{self.path}: no image {index} (the stack holds {stack.shape[0]})")
        if not multi and len(detector) != 1:
            raise InputError(f"{self.path}: a 3-D image stack needs a single-panel detector")
        panels, bboxes = table["panel"], table["bbox"]

        def box(r):
            p = int(panels[r])
            if not 0 <= p < len(detector):
                raise InputError(f"{table.path}: row {r} is on panel {p}, which the detector lacks")
            nf, ns = detector[p].image_size
            if stack.shape[-2:] != (ns, nf):
                raise InputError(f"{self.path}: images are {stack.shape[-1]} x {stack.shape[-2]} pixels, "
                                 f"panel {p} is {nf} x {ns}")
            x0, x1, y0, y1 = (int(v) for v in bboxes[r][:4])
            x0, x1, y0, y1 = max(x0, 0), min(x1, nf), max(y0, 0), min(y1, ns)
            if x1 <= x0 or y1 <= y0:
                return p, None, None, None
            cut = stack[index, p, y0:y1, x0:x1] if multi else stack[index, y0:y1, x0:x1]
            data = np.asarray(cut, dtype=np.float32)[None]
            return p, (x0, x1, y0, y1, 0, 1), data, np.full(data.shape, MASK_CODES["valid"], np.int32)
        return box

    def close(self):
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None


def build_dataset(shots, settings=None, config_json="{}", log=None):
    """Read DIALS stills and build a SPREAD :class:`~spread_tools.io.dataset.Dataset`.

    Parameters
    ----------
    shots : list of Shot
    settings : ImportSettings, optional
    config_json : str
        Effective parameters stored in the dataset.
    log : callable, optional
        Receives one-line progress messages.

    Returns
    -------
    dataset : Dataset
    summary : dict
        Counts of lattices, shoeboxes, pixels and rejected reflections.
    """
    from spread_tools.io.dataset import Dataset
    st = settings or ImportSettings()
    log = log or (lambda msg: None)
    require = flag_value(st.flags_require, "parameter flags.require")
    reject = flag_value(st.flags_reject, "parameter flags.reject")
    default_spec = read_spectrum(st.spectrum_file) if st.spectrum_file else None
    cache = {}
    detector, dinfo, det_src = None, None, None
    lattices = []
    images = _Images(st.images_file, st.images_dataset)
    summary = {"reflections": 0, "flags": 0, "resolution": 0, "no_pixels": 0, "off_panel": 0,
               "no_shoebox_data": 0}
    for shot in shots:
        key = (str(shot.expt), str(shot.refl))
        if key not in cache:
            cache.clear()
            cache[key] = (read_expt(shot.expt), read_refl(shot.refl))
        el, table = cache[key]
        idmap = _match_ids(table, el)
        wanted = [shot.experiment] if shot.experiment is not None else \
            [k for k, e in enumerate(el.experiments) if e.crystal is not None]
        for k in wanted:
            if not 0 <= k < len(el):
                raise InputError(f"{el.path}: no experiment {k} (it has {len(el)})")
            exp = el.experiments[k]
            if exp.crystal is None or exp.beam is None or exp.detector is None:
                raise InputError(f"{el.path}: experiment {k} lacks a crystal, beam or detector model")
            ddet = el.detectors[exp.detector]
            if detector is None:
                detector, dinfo, det_src = ddet.detector, ddet.info, f"{el.path} experiment {k}"
            elif not _same_detector(detector, ddet.detector, st.detector_tolerance_mm):
                raise InputError(f"{el.path}: experiment {k} has a detector that differs from that of "
                                 f"{det_src}; import them into separate datasets")
            rows = np.flatnonzero(np.isin(table["id"], [i for i, e in idmap.items() if e == k])) \
                if "id" in table else np.arange(table.nrows)
            summary["reflections"] += len(rows)
            if "shoebox" in table:
                sbcol = table["shoebox"]

                def box(r):
                    return int(sbcol.panel[r]), sbcol.bbox[r], sbcol.data[r], sbcol.mask[r]
            elif st.images_file is not None:
                iset = el.imagesets[exp.imageset] if exp.imageset is not None else {}
                sfi = iset.get("single_file_indices")
                box = images.reader(table, sfi[0] if sfi else k, detector)
            elif st.predictions_only:
                box = _empty_boxes(table)
            else:
                raise InputError(f"{table.path}: no 'shoebox' column; integrate with shoeboxes kept "
                                 f"(e.g. dials.stills_process ... output.shoeboxes=True) or give the "
                                 f"images with images.file=FILE.h5")
            flags = table["flags"][rows] if "flags" in table else np.full(len(rows), FLAGS["integrated_sum"], np.uint64)
            ok = ((flags & np.uint64(require)) == np.uint64(require)) & ((flags & np.uint64(reject)) == 0)
            summary["flags"] += int((~ok).sum())
            rows = rows[ok]
            crystal = el.crystals[exp.crystal]
            hkl = table["miller_index"][rows].astype(np.int64)
            d = 1.0 / np.linalg.norm(hkl @ crystal.A.T, axis=1).clip(1e-12)
            okd = np.ones(len(rows), bool)
            if st.d_min_a is not None:
                okd &= d >= st.d_min_a
            if st.d_max_a is not None:
                okd &= d <= st.d_max_a
            summary["resolution"] += int((~okd).sum())
            rows, hkl = rows[okd], hkl[okd]
            beam = el.beams[exp.beam]
            if shot.spectrum:
                spec = read_spectrum(shot.spectrum, k)
            elif default_spec is not None:
                spec = default_spec
            else:
                spec = Spectrum([HC_EV_A / beam.wavelength_a], [1.0], f"{el.path} beam wavelength")
            boxes = []
            for r, h in zip(rows, hkl):
                p, bbox, data, mbits = box(r)
                if data is None:
                    summary["no_shoebox_data"] += 1
                    continue
                if not 0 <= p < len(detector):
                    raise InputError(f"{table.path}: row {r} is on panel {p}, which the detector lacks")
                got = _pixels(bbox, data, mbits, detector[p], dinfo[p], st.gain or dinfo[p].gain, st)
                if got is None:
                    summary["no_pixels"] += 1
                    continue
                boxes.append((p, *got[:4], h, got[4], got[5]))
            lattices.append(_Lattice(crystal.A, beam, crystal, exp.identifier or f"{el.path}#{k}", spec, boxes))
            log(f"{el.path} experiment {k}: {len(boxes)} shoeboxes")
    images.close()
    if not lattices:
        raise InputError("input: no experiments with a crystal model")
    # one cell and space group for the dataset
    groups = {lat.crystal.spacegroup for lat in lattices}
    if len(groups) > 1:
        raise InputError(f"input: experiments have different space groups {sorted(groups)}")
    cells = np.array([lat.crystal.cell for lat in lattices])
    cell = np.asarray(st.cell, dtype=np.float64) if st.cell is not None else cells.mean(axis=0)
    if cell.shape != (6,):
        raise InputError("parameter cell: needs 6 numbers a, b, c (Å), alpha, beta, gamma (°)")
    dev = np.max(np.abs(cells[:, :3] / cell[:3] - 1), axis=1)
    if np.any(dev > st.cell_tolerance):
        bad = int(np.argmax(dev))
        raise InputError(f"input: lattice {lattices[bad].identifier} has cell "
                         f"{np.round(cells[bad], 3).tolist()}, {dev[bad]:.1%} away from "
                         f"{np.round(cell, 3).tolist()} (cell_tolerance={st.cell_tolerance})")
    # channels
    step = st.channels_step_ev
    if not step > 0:
        raise InputError(f"parameter channels.step_ev: must be positive, got {step}")
    # default window: channel centres on multiples of the step, bins covering every sample
    if not math.isfinite(st.energy_offset_ev) or abs(st.energy_offset_ev) > 100:
        raise InputError(f"parameter spectrum.offset_ev: {st.energy_offset_ev} eV is not a spectrometer "
                         f"calibration offset (within ±100 eV)")
    # the spectrometer's calibration: true photon energy = its reading + offset
    off = float(st.energy_offset_ev)
    lo = st.channels_min_ev if st.channels_min_ev is not None else \
        step * round((min(lat.spectrum.energy_ev[0] for lat in lattices) + off) / step)
    hi = st.channels_max_ev if st.channels_max_ev is not None else \
        step * round((max(lat.spectrum.energy_ev[-1] for lat in lattices) + off) / step)
    channels = channel_grid(lo, hi, st.channels_step_ev)
    weights = np.zeros((len(lattices), len(channels)))
    for j, lat in enumerate(lattices):
        w, kept = rebin_spectrum(lat.spectrum.energy_ev + off, lat.spectrum.weight, channels)
        if kept <= 0:
            raise InputError(f"{lat.spectrum.source}: no photons within the channels "
                             f"{channels[0]:g}-{channels[-1]:g} eV")
        if kept < 0.99:
            log(f"{lat.spectrum.source}: {1 - kept:.1%} of the photons lie outside the channels")
        if st.fluence is not None:
            w = w * (st.fluence / lat.spectrum.weight.sum())
        weights[j] = w
    # mosaic model
    n_lat = len(lattices)
    dom = np.zeros((n_lat, 3))
    spread = np.zeros(n_lat)
    for j, lat in enumerate(lattices):
        if st.domain_size_cells is not None:
            if len(st.domain_size_cells) != 3:
                raise InputError("parameter crystal.domain_size_cells: needs 3 numbers N_a, N_b, N_c")
            dom[j] = st.domain_size_cells
        elif lat.crystal.domain_size_a is not None:
            dom[j] = lat.crystal.domain_size_a / np.asarray(lat.crystal.cell[:3])
        else:
            raise InputError(f"{lat.identifier}: the crystal has no ML_domain_size_ang; "
                             f"give crystal.domain_size_cells=Na,Nb,Nc")
        if st.mosaic_spread_deg is not None:
            spread[j] = st.mosaic_spread_deg
        elif lat.crystal.half_mosaicity_deg is not None:
            spread[j] = lat.crystal.half_mosaicity_deg
    n_dom = np.where(spread > 0, int(st.n_domains), 1).astype(np.int32)
    # shoeboxes
    sb_lat, sb_panel, sb_bbox, sb_hkl, sizes, counts, masks = [], [], [], [], [], [], []
    for j, lat in enumerate(lattices):
        for p, x0, x1, y0, y1, h, c, m in lat.boxes:
            sb_lat.append(j)
            sb_panel.append(p)
            sb_bbox.append((x0, x1, y0, y1))
            sb_hkl.append(h)
            sizes.append(len(c))
            counts.append(c)
            masks.append(m)
    arrays = detector.as_arrays()
    ds = Dataset(
        cell=cell, spacegroup=lattices[0].crystal.spacegroup,
        origin_mm=arrays["origin_mm"], fast_axis=arrays["fast_axis"], slow_axis=arrays["slow_axis"],
        pixel_size_mm=arrays["pixel_size_mm"], image_size=arrays["image_size"],
        energy_ev=channels.astype(np.float64), spectrum_weight=weights,
        A=np.array([lat.A for lat in lattices]),
        beam_direction=np.array([lat.beam.direction for lat in lattices]),
        polarization_normal=np.array([lat.beam.polarization_normal for lat in lattices]),
        polarization_fraction=np.array([lat.beam.polarization_fraction for lat in lattices]),
        domain_size_cells=dom, mosaic_spread_deg=spread, n_domains=n_dom,
        identifier=np.array([lat.identifier for lat in lattices], dtype=object),
        sb_lattice=np.asarray(sb_lat, np.int32), sb_panel=np.asarray(sb_panel, np.int32),
        sb_bbox=np.asarray(sb_bbox, np.int32).reshape(-1, 4),
        sb_miller_index=np.asarray(sb_hkl, np.int32).reshape(-1, 3),
        pixel_offset=np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
        counts=np.concatenate(counts).astype(np.float32) if counts else np.zeros(0, np.float32),
        mask=np.concatenate(masks).astype(bool) if masks else np.zeros(0, bool),
        gain=1.0, source="import_dials", config_json=config_json)
    ds.validate()
    summary.update(lattices=n_lat, shoeboxes=ds.n_shoeboxes, pixels=ds.n_pixels,
                   channels=len(channels), used_pixels=int(ds.mask.sum()))
    return ds, summary


# --------------------------------------------------------------------------- export

def export_dials(ds, folder, stem="sim", lattices=None, overwrite=False, table_version=1):
    """Write a dataset as DIALS files: ``stem.expt``, ``stem.refl`` (with shoeboxes),
    one ``stem_NNN.lam`` per lattice and ``stem.list`` (the shot list).

    The detector is stored as a two-level hierarchy (a root group rotated and
    shifted from the lab, panels local to it), so a re-import exercises the
    frame composition. Shoebox masks: used pixels get valid|foreground, unused 0.

    Parameters
    ----------
    ds : Dataset
    folder : str or Path
    stem : str
    lattices : array of int, optional
        Lattices to export (default all).
    overwrite : bool
    table_version : int
        Reflection-table version (1 or 2).

    Returns
    -------
    Path
        The shot list.
    """
    import gemmi

    from spread_tools.io.h5io import atomic_write_text
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if lattices is not None:
        ds = ds.select_lattices(lattices)
    ro = np.array([0.0, 0.0, float(np.mean(ds.origin_mm[:, 2]))])
    rf, rs = np.array([1.0, 0, 0]), np.array([0, -1.0, 0])
    R = np.stack([rf, rs, np.cross(rf, rs)], axis=1)

    def node(name, o, f, s, **extra):
        return {"name": name, "type": "", "fast_axis": list(map(float, f)), "slow_axis": list(map(float, s)),
                "origin": list(map(float, o)), **extra}
    panels = []
    for i in range(len(ds.origin_mm)):
        panels.append(node(f"panel{i}", R.T @ (ds.origin_mm[i] - ro), R.T @ ds.fast_axis[i],
                           R.T @ ds.slow_axis[i], raw_image_offset=[0, 0],
                           image_size=[int(v) for v in ds.image_size[i]],
                           pixel_size=[float(v) for v in ds.pixel_size_mm[i]],
                           trusted_range=[-1.0, 1e9], thickness=0.0, material="", mu=0.0,
                           identifier="", mask=[], gain=1.0, pedestal=0.0,
                           px_mm_strategy={"type": "SimplePxMmStrategy"}))
    hier = node("root", ro, rf, rs, children=[{"panel": i} for i in range(len(panels))])
    hall = gemmi.SpaceGroup(ds.spacegroup).hall
    idents = [str(x) for x in ds.identifier]
    if len(set(idents)) != len(idents):
        idents = [f"lattice-{j:05d}" for j in range(ds.n_lattices)]
    beams, crystals, exps = [], [], []
    for j in range(ds.n_lattices):
        w = ds.spectrum_weight[j]
        lam = HC_EV_A / (np.sum(w * ds.energy_ev) / w.sum())
        beams.append({"direction": list(map(float, ds.beam_direction[j])), "wavelength": float(lam),
                      "divergence": 0.0, "sigma_divergence": 0.0,
                      "polarization_normal": list(map(float, ds.polarization_normal[j])),
                      "polarization_fraction": float(ds.polarization_fraction[j]),
                      "flux": 0.0, "transmission": 1.0})
        real = np.linalg.inv(ds.A[j])
        crystals.append({"__id__": "crystal", "real_space_a": list(map(float, real[0])),
                         "real_space_b": list(map(float, real[1])), "real_space_c": list(map(float, real[2])),
                         "space_group_hall_symbol": " " + hall,
                         "ML_half_mosaicity_deg": float(ds.mosaic_spread_deg[j]),
                         "ML_domain_size_ang": float(np.mean(ds.domain_size_cells[j] * ds.cell[:3]))})
        exps.append({"__id__": "Experiment", "identifier": idents[j], "beam": j, "detector": 0,
                     "crystal": j, "imageset": j})
    expt = {"__id__": "ExperimentList", "experiment": exps,
            "imageset": [{"__id__": "ImageSet", "images": [f"{stem}_{j:03d}.cbf"], "mask": None}
                         for j in range(ds.n_lattices)],
            "beam": beams, "detector": [{"panels": panels, "hierarchy": hier}], "goniometer": [],
            "scan": [], "crystal": crystals, "profile": [], "scaling_model": []}
    atomic_write_text(folder / f"{stem}.expt", json.dumps(expt, indent=1), overwrite)
    # reflections
    n = ds.n_shoeboxes
    x0, x1, y0, y1 = ds.sb_bbox.T.astype(np.int32)
    bbox6 = np.stack([x0, x1, y0, y1, np.zeros(n, np.int32), np.ones(n, np.int32)], axis=1)
    data, mask, bg = [], [], []
    for k in range(n):
        shape = (1, int(y1[k] - y0[k]), int(x1[k] - x0[k]))
        sl = slice(ds.pixel_offset[k], ds.pixel_offset[k + 1])
        data.append(ds.counts[sl].reshape(shape).astype(np.float32))
        mask.append(np.where(ds.mask[sl], MASK_CODES["valid"] | MASK_CODES["foreground"], 0)
                    .reshape(shape).astype(np.int32))
        bg.append(np.zeros(shape, np.float32))
    sb = Shoeboxes(ds.sb_panel.astype(np.int64), bbox6, data, mask, bg)
    hkl = ds.sb_miller_index.astype(np.int32)
    q = np.einsum("kij,kj->ki", ds.A[ds.sb_lattice], hkl.astype(np.float64))
    table = ReflectionTable.from_columns({
        "id": ds.sb_lattice.astype(np.int32), "miller_index": hkl,
        "panel": ds.sb_panel.astype(np.uint64), "bbox": bbox6,
        "flags": np.full(n, FLAGS["integrated_sum"], np.uint64),
        "d": 1.0 / np.linalg.norm(q, axis=1), "shoebox": sb,
    }, identifiers={j: idents[j] for j in range(ds.n_lattices)})
    write_refl(folder / f"{stem}.refl", table, version=table_version, overwrite=overwrite)
    lines = [f"# shots exported from {Path(str(ds.path)).name}: expt refl spectrum experiment_index"]
    for j in range(ds.n_lattices):
        lam_a = HC_EV_A / ds.energy_ev[::-1]
        rows = "\n".join(f"{float(a)!r},{float(w)!r}" for a, w in zip(lam_a, ds.spectrum_weight[j][::-1]))
        atomic_write_text(folder / f"{stem}_{j:03d}.lam", "wavelength,weight\n" + rows + "\n", overwrite)
        lines.append(f"{stem}.expt {stem}.refl {stem}_{j:03d}.lam {j}")
    atomic_write_text(folder / f"{stem}.list", "\n".join(lines) + "\n", overwrite)
    return folder / f"{stem}.list"
