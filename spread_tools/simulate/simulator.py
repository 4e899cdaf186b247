"""Synthetic SPREAD datasets with ground truth (``simulate_data``).

A simulation draws, for every lattice (one crystal in one XFEL shot):

* an orientation U, uniform over all rotations, and A = U·B (DIALS
  convention, q = A·h in Å⁻¹; B = Mᵀ with M the gemmi/PDB fractionalisation
  matrix of the cache's cell, so |B·h| = 1/d);
* a scale G (log-normal around ``G_median``);
* a SASE-like spectrum on the common channel grid: ``n_spikes`` Gaussian
  spikes (FWHM ``spike_fwhm_ev``) with exponentially distributed heights and
  centres drawn from a Gaussian envelope (FWHM ``envelope_fwhm_ev``) whose
  centre is uniform in [``centre_min_ev``, ``centre_max_ev``]; every spike is
  integrated exactly over each channel's bin and the spectrum is scaled to
  ``fluence`` photons/Å² in the channel window;
* a smooth background: a radial function of the scattering vector length at
  the pixel (flat part plus a water ring around 3.7 Å), times a per-lattice
  factor; each shoebox stores its first-order log-linear (``docs/formats.md``)
  expansion ``exp(b0 + b1 x̂ + b2 ŷ)`` about the shoebox centre, which *is* the
  background the counts are drawn from.

Reflections of the cache with d in the annulus [d_min, d_max] are predicted
in diffraction condition when, for some channel carrying photons, the
distance of A·h from that channel's Ewald sphere is within ``n_sigma`` times
the reflection's width (domain-size Gaussian along the sphere normal,
combined with |q| × mosaic spread). The weighted mean diffracted direction s1
is projected onto the detector with :func:`spread_tools.model.geometry.ray_to_pixel`;
a square shoebox of ``shoebox_size`` pixels is cut around the spot; shoeboxes
whose ray misses every panel or that cross a panel edge are dropped (and
counted). Optionally (``min_spot_photons`` > 0) only reflections whose expected
Bragg photons in the central 5 × 5 pixels reach a threshold are kept, as a spot
finder would (the weak tails of the excitation are left out). The expected counts of every pixel are the pixel model of
``docs/formats.md`` (channel weights from :func:`spread_tools.model.pixel.channel_weights`
times I(h0, E_c) from the cache with the truth curves at the channel energies,
times G, plus background); the counts are Poisson draws of it. Each shoebox
gets counts from its own reflection h0 only (neighbouring spots that overlap
a box do not leak into it), which is exactly the model the refinement fits.

Lattices are processed in chunks and shoeboxes/pixels are appended to the
output file as they are made, so memory stays bounded by one chunk's channel
weights (pixels × channels × 4 bytes). Random numbers come from
``numpy.random.Generator`` streams derived from the seed per purpose and per
lattice, so the result does not depend on the chunk size.

This module runs the simulation and streams it to HDF5; the pieces are in
:mod:`spread_tools.simulate.sase` (SASE spectra), :mod:`spread_tools.model.predict`
(orientations, prediction, shoeboxes) and :mod:`spread_tools.simulate.background`
(background).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model import geometry
from spread_tools.model.geometry import HC_EV_A
from spread_tools.model.geometry import detector_arrays as _detector_arrays
from spread_tools.model.predict import (
    cut_shoeboxes,
    predict_reflections,
    random_rotations,
)
from spread_tools.model.spectra import channel_grid
from spread_tools.simulate.background import background_counts, background_planes
from spread_tools.simulate.sase import sase_spectra
from spread_tools.structure.miller import b_matrix

__all__ = ["SimulationSettings", "SimulationSummary", "truth_at_channels", "simulate_dataset",
           "make_detector"]

_CORE_PX = 5


@dataclasses.dataclass
class SimulationSettings:
    """Everything that defines a simulation besides the SF cache, truth and detector.

    Attributes
    ----------
    n_lattices : int
        Number of lattices (crystal + shot).
    seed : int
        Seed of every random draw.
    d_min_a, d_max_a : float or None
        Resolution annulus (Å) of the simulated reflections; ``None``: the cache's limits.
    shoebox_size : int
        Shoebox edge (pixels), square boxes.
    fluence : float
        Photons per Å² per shot within the channel window.
    channel_min_ev, channel_max_ev, channel_step_ev : float
        Common channel grid (eV), both ends included.
    centre_min_ev, centre_max_ev : float
        Range (eV) of the spectrum envelope centres across lattices.
    envelope_fwhm_ev : float
        FWHM (eV) of the Gaussian SASE envelope.
    n_spikes : int
        SASE spikes per shot.
    spike_fwhm_ev : float
        FWHM (eV) of one spike.
    min_relative_weight : float
        Channels below this fraction of the shot's largest channel get exactly 0 photons.
    G_median, G_log_sigma : float
        G = G_median · exp(G_log_sigma · N(0, 1)).
    mosaic_spread_deg : float
        Mosaic spread (°) as understood by :func:`spread_tools.model.geometry.mosaic_rotations`.
    domain_size_cells : tuple of 3 float
        Domain size N_a, N_b, N_c (cells).
    n_domains : int
        Mosaic domains summed per pixel.
    beam_direction : tuple of 3 float
        Unit vector from the sample towards the source (DIALS ``direction``).
    polarization_normal : tuple of 3 float
        DIALS ``polarization_normal``.
    polarization_fraction : float
        DIALS ``polarization_fraction``.
    background_photons : float
        Background level (photons/pixel) of the flat part; the water ring adds up to
        ``1.5 ×`` this at 3.7 Å.
    background_log_sigma : float
        Per-lattice log-normal spread of the background level.
    n_sigma : float
        A reflection is in diffraction condition within this many widths of an Ewald sphere.
    min_spot_photons : float
        Keep a reflection in diffraction condition only when its expected Bragg photons
        (G included, no noise) in the central 5 × 5 pixels reach this (0: keep all). Like
        a spot finder, it leaves out the weak tails of the excitation.
    poisson_noise : bool
        Draw Poisson counts (False: store the expected counts).
    chunk_lattices : int
        Lattices per chunk (bounds the memory of the channel weights).
    cell_sigma_fraction : float
        Per-lattice spread of the true cell: each edge is the cache's times
        (1 + cell_sigma_fraction · N(0, 1)); angles are kept.
    domain_size_log_sigma, mosaic_log_sigma : float
        Per-lattice log-normal spread of the true domain size (one factor for N_a, N_b, N_c)
        and mosaic spread around ``domain_size_cells`` and ``mosaic_spread_deg``.
    model_rotation_deg : float
        RMS angle of the rotation between the true orientation and the stored one
        (random axis; σ = model_rotation_deg/√3 about each lab axis).
    model_cell_fraction : float
        Relative σ of the stored cell edges around the cache's cell (0: the stored crystal
        models carry the cache's cell, as indexing against a target cell does).
    spectrometer_offset_ev : float
        The stored channel energies are the true ones minus this (a spectrometer
        calibration error that refine_geometry's energy offset should find).
    spectrum_jitter_ev : float
        Per-shot σ of a further shift between the true and the stored spectrum (the stored
        weights are the true ones moved by −jitter, rebinned, photons conserved).
    gain_adu_per_photon, read_noise_adu : float
        Detector: ADU = gain·photons + N(0, read_noise); the stored counts are the
        photon-converted max(0, round(ADU/gain)) (exact photons when read_noise is 0).
    """

    n_lattices: int = 20
    seed: int = 1
    d_min_a: float | None = None
    d_max_a: float | None = None
    shoebox_size: int = 7
    fluence: float = 1.0e4
    channel_min_ev: float = 7070.0
    channel_max_ev: float = 7170.0
    channel_step_ev: float = 1.0
    centre_min_ev: float = 7085.0
    centre_max_ev: float = 7155.0
    envelope_fwhm_ev: float = 25.0
    n_spikes: int = 40
    spike_fwhm_ev: float = 1.5
    min_relative_weight: float = 1e-4
    G_median: float = 1.0
    G_log_sigma: float = 0.3
    mosaic_spread_deg: float = 0.0512
    domain_size_cells: tuple = (48.0, 48.0, 24.0)
    n_domains: int = 8
    beam_direction: tuple = (0.0, 0.0, 1.0)
    polarization_normal: tuple = (0.0, 1.0, 0.0)
    polarization_fraction: float = 0.999
    background_photons: float = 0.5
    background_log_sigma: float = 0.2
    n_sigma: float = 3.0
    min_spot_photons: float = 0.0
    poisson_noise: bool = True
    chunk_lattices: int = 32
    cell_sigma_fraction: float = 0.0
    domain_size_log_sigma: float = 0.0
    mosaic_log_sigma: float = 0.0
    model_rotation_deg: float = 0.0
    model_cell_fraction: float = 0.0
    spectrometer_offset_ev: float = 0.0
    spectrum_jitter_ev: float = 0.0
    gain_adu_per_photon: float = 1.0
    read_noise_adu: float = 0.0

    def check(self):
        """Raise InputError naming the parameter for values that make no sense."""
        def bad(key, msg):
            raise InputError(f"parameter {key}: {msg}")
        if self.n_lattices < 1:
            bad("lattices", f"must be at least 1, got {self.n_lattices}")
        if self.shoebox_size < 1:
            bad("shoebox_size", f"must be at least 1 pixel, got {self.shoebox_size}")
        if not (self.fluence > 0 and math.isfinite(self.fluence)):
            bad("fluence", f"zero photons per shot (fluence={self.fluence:g} photons/Å²); "
                           "give a positive fluence")
        if not self.channel_step_ev > 0:
            bad("spectrum.step_ev", f"must be positive, got {self.channel_step_ev}")
        if not self.channel_max_ev > self.channel_min_ev:
            bad("spectrum.max_ev", f"{self.channel_max_ev} eV must be above spectrum.min_ev "
                                   f"({self.channel_min_ev} eV)")
        if not 1000.0 <= self.channel_min_ev <= 100000.0:
            bad("spectrum.min_ev", f"{self.channel_min_ev} is not an X-ray energy in eV")
        if self.centre_max_ev < self.centre_min_ev:
            bad("spectrum.centre_max_ev", "must not be below spectrum.centre_min_ev")
        for key, v in (("spectrum.envelope_fwhm_ev", self.envelope_fwhm_ev),
                       ("spectrum.spike_fwhm_ev", self.spike_fwhm_ev),
                       ("crystal.G_median", self.G_median)):
            if not v > 0:
                bad(key, f"must be positive, got {v}")
        if self.n_spikes < 1:
            bad("spectrum.n_spikes", f"must be at least 1, got {self.n_spikes}")
        if not 0 <= self.min_relative_weight < 1:
            bad("spectrum.min_relative_weight", "must be in [0, 1)")
        if self.G_log_sigma < 0 or self.background_log_sigma < 0:
            bad("crystal.G_log_sigma", "log sigmas must be >= 0")
        if self.mosaic_spread_deg < 0:
            bad("crystal.mosaic_spread_deg", f"must be >= 0, got {self.mosaic_spread_deg}")
        if len(self.domain_size_cells) != 3 or min(self.domain_size_cells) <= 0:
            bad("crystal.domain_size_cells", "needs three positive numbers N_a, N_b, N_c")
        if self.n_domains < 1:
            bad("crystal.n_domains", f"must be at least 1, got {self.n_domains}")
        if not 0 <= self.polarization_fraction <= 1:
            bad("beam.polarization_fraction", "must be in [0, 1]")
        if not self.background_photons > 0:
            bad("background.photons", f"must be positive (log-linear background), got "
                                      f"{self.background_photons}")
        if not self.min_spot_photons >= 0:
            bad("min_spot_photons", f"must be >= 0, got {self.min_spot_photons}")
        if not self.n_sigma > 0:
            bad("n_sigma", f"must be positive, got {self.n_sigma}")
        if self.chunk_lattices < 1:
            bad("chunk_lattices", "must be at least 1")
        for key, v in (("crystal.cell_sigma_fraction", self.cell_sigma_fraction),
                       ("crystal.domain_size_log_sigma", self.domain_size_log_sigma),
                       ("crystal.mosaic_log_sigma", self.mosaic_log_sigma),
                       ("model_error.rotation_deg", self.model_rotation_deg),
                       ("model_error.cell_fraction", self.model_cell_fraction),
                       ("model_error.spectrum_jitter_ev", self.spectrum_jitter_ev),
                       ("detector.read_noise_adu", self.read_noise_adu)):
            if not (v >= 0 and math.isfinite(v)):
                bad(key, f"must be >= 0, got {v}")
        if not (self.cell_sigma_fraction < 0.05 and self.model_cell_fraction < 0.05):
            bad("crystal.cell_sigma_fraction", "a cell spread of 5 % or more is not a crystal form")
        if not math.isfinite(self.spectrometer_offset_ev) or abs(self.spectrometer_offset_ev) > 50:
            bad("model_error.spectrometer_offset_ev", f"must be within ±50 eV, got {self.spectrometer_offset_ev}")
        if not self.gain_adu_per_photon > 0:
            bad("detector.gain_adu_per_photon", f"must be positive, got {self.gain_adu_per_photon}")
        for key, v in (("beam.direction", self.beam_direction),
                       ("beam.polarization_normal", self.polarization_normal)):
            if len(v) != 3 or not np.linalg.norm(v) > 0:
                bad(key, "needs a non-zero 3-vector")
        return self


@dataclasses.dataclass
class SimulationSummary:
    """What a simulation made (printed by ``simulate_data``)."""

    n_lattices: int = 0
    n_channels: int = 0
    n_in_annulus: int = 0
    n_predicted: int = 0
    n_off_detector: int = 0
    n_on_edge: int = 0
    n_weak: int = 0
    n_shoeboxes: int = 0
    n_pixels: int = 0
    total_counts: float = 0.0
    bragg_counts: float = 0.0
    time_s: float = 0.0
    lattices_without_shoebox: int = 0

    def lines(self):
        """Human-readable report lines."""
        per = self.n_pixels / self.n_shoeboxes if self.n_shoeboxes else 0.0
        frac = self.bragg_counts / self.total_counts if self.total_counts else 0.0
        bg_px = (self.total_counts - self.bragg_counts) / self.n_pixels if self.n_pixels else 0.0
        return [
            f"{self.n_lattices} lattices, {self.n_channels} spectrum channels",
            f"{self.n_predicted} reflections in diffraction condition in the annulus; dropped "
            f"{self.n_off_detector} off the detector, {self.n_on_edge} crossing a panel edge, "
            f"{self.n_weak} below min_spot_photons",
            f"{self.n_shoeboxes} shoeboxes, {self.n_pixels} pixels ({per:.1f} per shoebox); "
            f"{self.lattices_without_shoebox} lattices without a shoebox",
            f"expected photons: {self.total_counts:.4g} in all, Bragg fraction {frac:.3f}, "
            f"background {bg_px:.2f} photons/pixel",
            f"time {self.time_s:.1f} s",
        ]


# --------------------------------------------------------------------------- truth

def truth_at_channels(cache_site_names, truth_tables, energy_ev, cache_source="SF cache"):
    """Ground-truth f′, f″ of every cache site at the channel energies.

    Parameters
    ----------
    cache_site_names : sequence of str
        Sites of the SF cache, in cache order.
    truth_tables : dict
        Site name → :class:`spread_tools.physics.scattering.SpectrumTable`.
    energy_ev : numpy.ndarray
        (n_chan,) channel energies (eV).
    cache_source : str
        Name of the cache for messages.

    Returns
    -------
    fp, fdp : numpy.ndarray
        (n_site, n_chan) electrons, rows in cache order.

    Raises
    ------
    InputError
        Sites that do not match, or a table that does not cover the channels.
    """
    names = list(cache_site_names)
    given = list(truth_tables)
    if sorted(names) != sorted(given):
        missing = [n for n in names if n not in given]
        extra = [n for n in given if n not in names]
        bits = []
        if missing:
            bits.append(f"no truth curve for {', '.join(missing)}")
        if extra:
            bits.append(f"{', '.join(extra)} not in the cache")
        raise InputError(f"truth: sites {', '.join(given) or '(none)'} do not match the sites "
                         f"{', '.join(names) or '(none)'} of {cache_source} ({'; '.join(bits)})")
    fp = np.zeros((len(names), len(energy_ev)))
    fdp = np.zeros_like(fp)
    for i, name in enumerate(names):
        table = truth_tables[name]
        lo, hi = table.energy_range_ev
        if energy_ev[0] < lo or energy_ev[-1] > hi:
            raise InputError(f"truth {name}: {table.source} covers {lo:g}-{hi:g} eV but the "
                             f"spectrum channels span {energy_ev[0]:g}-{energy_ev[-1]:g} eV")
        fp[i], fdp[i] = table.interpolate(energy_ev)
    return fp, fdp


# --------------------------------------------------------------------------- driver

def _project(detector, s1):
    """(panel, x_px, y_px) of unit rays s1 via geometry.ray_to_pixel."""
    panel, x, y = geometry.ray_to_pixel(detector, s1)
    return np.asarray(panel, dtype=np.int64), np.asarray(x, float), np.asarray(y, float)


class _Writer:
    """Append shoeboxes and pixels to an open dataset HDF5 file (``docs/formats.md``)."""

    def __init__(self, h5, n_chunk_pix=1 << 18):
        self.h5 = h5
        opts = dict(compression="gzip", compression_opts=1, shuffle=True)
        self.n_sb = 0
        self.n_pix = 0
        self.sets = {
            "shoeboxes/lattice": h5.create_dataset("shoeboxes/lattice", (0,), np.int32, maxshape=(None,),
                                                   chunks=(8192,)),
            "shoeboxes/panel": h5.create_dataset("shoeboxes/panel", (0,), np.int32, maxshape=(None,),
                                                 chunks=(8192,)),
            "shoeboxes/bbox": h5.create_dataset("shoeboxes/bbox", (0, 4), np.int32,
                                                maxshape=(None, 4), chunks=(8192, 4)),
            "shoeboxes/miller_index": h5.create_dataset("shoeboxes/miller_index", (0, 3), np.int32,
                                                        maxshape=(None, 3), chunks=(8192, 3)),
            "truth/background": h5.create_dataset("truth/background", (0, 3), np.float64,
                                                  maxshape=(None, 3), chunks=(8192, 3)),
            "pixels/counts": h5.create_dataset("pixels/counts", (0,), np.float32, maxshape=(None,),
                                               chunks=(n_chunk_pix,), **opts),
            "pixels/mask": h5.create_dataset("pixels/mask", (0,), bool, maxshape=(None,),
                                             chunks=(n_chunk_pix,), **opts),
        }
        self.offsets = [np.zeros(1, dtype=np.int64)]

    def _append(self, name, data):
        ds = self.sets[name]
        n0 = ds.shape[0]
        ds.resize(n0 + len(data), axis=0)
        ds[n0:] = data

    def add(self, lattice, panel, bbox, hkl, planes, counts, sizes):
        self._append("shoeboxes/lattice", lattice.astype(np.int32))
        self._append("shoeboxes/panel", panel.astype(np.int32))
        self._append("shoeboxes/bbox", bbox.astype(np.int32))
        self._append("shoeboxes/miller_index", hkl.astype(np.int32))
        self._append("truth/background", planes.astype(np.float64))
        self._append("pixels/counts", counts.astype(np.float32))
        self._append("pixels/mask", np.ones(len(counts), dtype=bool))
        self.offsets.append(self.n_pix + np.cumsum(sizes, dtype=np.int64))
        self.n_sb += len(lattice)
        self.n_pix += int(np.sum(sizes))

    def finish(self):
        self.h5.create_dataset("shoeboxes/pixel_offset", data=np.concatenate(self.offsets))


def _chunk_dataset(cache, det, energy_ev, weight, lat, sb_lat, sb_panel, sb_bbox, sb_hkl):
    """An in-memory Dataset for one chunk (counts zero), input to channel_weights."""
    from spread_tools.io.dataset import Dataset
    sizes = (sb_bbox[:, 1] - sb_bbox[:, 0]).astype(np.int64) * (sb_bbox[:, 3] - sb_bbox[:, 2])
    n_pix = int(sizes.sum())
    n = len(lat["A"])
    return Dataset(
        cell=np.asarray(cache.cell, dtype=np.float64), spacegroup=cache.spacegroup,
        origin_mm=det["origin_mm"], fast_axis=det["fast_axis"], slow_axis=det["slow_axis"],
        pixel_size_mm=det["pixel_size_mm"], image_size=det["image_size"],
        energy_ev=energy_ev, spectrum_weight=weight,
        A=lat["A"], beam_direction=lat["beam_direction"],
        polarization_normal=lat["polarization_normal"],
        polarization_fraction=lat["polarization_fraction"],
        domain_size_cells=lat["domain_size_cells"], mosaic_spread_deg=lat["mosaic_spread_deg"],
        n_domains=lat["n_domains"], identifier=np.array([f"chunk{i}" for i in range(n)]),
        sb_lattice=sb_lat.astype(np.int32), sb_panel=sb_panel.astype(np.int32),
        sb_bbox=sb_bbox.astype(np.int32), sb_miller_index=sb_hkl.astype(np.int32),
        pixel_offset=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        counts=np.zeros(n_pix, dtype=np.float32), mask=np.ones(n_pix, dtype=bool),
        source="simulate_data", path="<simulation chunk>")


def _core_boxes(bbox, core_px):
    """Central core_px × core_px part of each shoebox (for the signal selection)."""
    size = bbox[:, 1] - bbox[:, 0]
    x0 = bbox[:, 0] + (size - core_px) // 2
    y0 = bbox[:, 2] + (bbox[:, 3] - bbox[:, 2] - core_px) // 2
    return np.stack([x0, x0 + core_px, y0, y0 + core_px], axis=1).astype(np.int32)


def _bragg_expected(cache, det, energy_ev, weight, lat, sb_lat, sb_panel, sb_bbox, sb_row,
                    fp_t, fdp_t, backend):
    """Chunk dataset and Σ_c w[p, c] I(h0(p), E_c) for every pixel (without G).

    ``lat``/``weight`` hold the chunk's lattices; ``sb_lat`` indexes them.
    """
    from spread_tools.model.pixel import channel_weights
    from spread_tools.structure.factors import intensity_and_gradients
    ds = _chunk_dataset(cache, det, energy_ev, weight, lat, sb_lat, sb_panel, sb_bbox,
                        cache.hkl[sb_row])
    w = channel_weights(ds, backend=backend)
    uniq, inv = np.unique(sb_row, return_inverse=True)
    I_chan, _, _ = intensity_and_gradients(cache, energy_ev, fp_t, fdp_t, h_index=uniq)
    out = np.empty(ds.n_pixels, dtype=np.float64)
    for k in range(ds.n_shoeboxes):
        a, b = ds.pixel_offset[k], ds.pixel_offset[k + 1]
        out[a:b] = np.asarray(w[a:b], dtype=np.float64) @ I_chan[:, inv[k]]
    return ds, out


def _crystal_models(rng, settings, cell, U):
    """True crystals of every lattice and the (erroneous) models stored in the dataset.

    The draws are made in a fixed order and number whatever the settings, so a setting
    changes only what it names.
    """
    n = len(U)
    cell = np.asarray(cell, dtype=np.float64)
    f_cell = rng.standard_normal((n, 3))
    f_n = rng.standard_normal(n)
    f_mosaic = rng.standard_normal(n)
    rot = rng.standard_normal((n, 3))
    f_stored = rng.standard_normal((n, 3))
    jitter = rng.standard_normal(n)
    B0 = b_matrix(cell)
    cell_true = np.tile(cell, (n, 1))
    A_true = U @ B0
    if settings.cell_sigma_fraction > 0:
        cell_true[:, :3] *= 1 + settings.cell_sigma_fraction * f_cell
        A_true = np.stack([U[j] @ b_matrix(cell_true[j]) for j in range(n)])
    N_true = np.tile(np.asarray(settings.domain_size_cells, float), (n, 1)) * \
        np.exp(settings.domain_size_log_sigma * f_n)[:, None]
    mosaic_true = settings.mosaic_spread_deg * np.exp(settings.mosaic_log_sigma * f_mosaic)
    U_stored = U
    if settings.model_rotation_deg > 0:
        vec = np.radians(settings.model_rotation_deg / math.sqrt(3.0)) * rot
        U_stored = np.stack([geometry.rotation_matrix(v, np.linalg.norm(v)) @ U[j]
                             if np.linalg.norm(v) > 0 else U[j] for j, v in enumerate(vec)])
    cell_stored = np.tile(cell, (n, 1))
    cell_stored[:, :3] *= 1 + settings.model_cell_fraction * f_stored
    A_stored = np.stack([U_stored[j] @ b_matrix(cell_stored[j]) for j in range(n)]) \
        if (settings.model_rotation_deg > 0 or settings.model_cell_fraction > 0) else U @ B0
    return {"A_true": A_true, "cell_true": cell_true, "N_true": N_true, "mosaic_true": mosaic_true,
            "A_stored": A_stored, "jitter_ev": settings.spectrum_jitter_ev * jitter}


def _stored_spectra(energy_ev, weight, settings, jitter_ev):
    """Channel energies and spectra as the (miscalibrated) spectrometer reports them."""
    from spread_tools.io.dials.spectra import rebin_spectrum
    energy_stored = energy_ev - settings.spectrometer_offset_ev
    if settings.spectrum_jitter_ev == 0:
        return energy_stored, weight
    stored = np.stack([rebin_spectrum(energy_ev - jitter_ev[j], weight[j], energy_ev)[0]
                       for j in range(len(weight))])
    return energy_stored, stored


def _detected(rng, photons, settings):
    """Photon-converted counts of a detector with gain and read noise (see SimulationSettings)."""
    if settings.read_noise_adu == 0:
        return photons
    adu = settings.gain_adu_per_photon * photons + settings.read_noise_adu * rng.standard_normal(len(photons))
    return np.maximum(np.rint(adu / settings.gain_adu_per_photon), 0.0)


def simulate_dataset(cache, truth_tables, detector, settings, output, overwrite=False,
                     quiet=True, config_json="{}", weights_backend="cpu", log=None):
    """Simulate a SPREAD dataset with ground truth and write it to ``output``.

    Parameters
    ----------
    cache : spread_tools.structure.cache.SFCache
        Structure-factor cache (sites, cell, Miller indices).
    truth_tables : dict
        Site name → :class:`spread_tools.physics.scattering.SpectrumTable`; the names must
        be exactly the cache's sites; each table must cover the channel window.
    detector : object
        Detector model of :mod:`spread_tools.model.geometry` (e.g. ``default_detector()``).
    settings : SimulationSettings
        Everything else (see its attributes).
    output : str or Path
        Dataset file to write (``format = "spread_tools.dataset"``).
    overwrite : bool
        Replace an existing output.
    quiet : bool
        No progress bar.
    config_json : str
        JSON of the effective parameters, stored in the file.
    weights_backend : {"cpu", "cuda", "auto"}
        Backend of :func:`spread_tools.model.pixel.channel_weights` ("cpu" is bit-reproducible).
    log : callable, optional
        Called with progress messages.

    Returns
    -------
    SimulationSummary

    Raises
    ------
    InputError
        Sites that do not match the truth, tables that do not cover the channels,
        zero-photon spectra, a cache without reflections in the annulus, or no
        shoebox on the detector. Nothing is written then.
    """
    from spread_tools.io.dataset import FORMAT, VERSION
    from spread_tools.io.h5io import atomic_writer, check_writable, write_strings
    from spread_tools.model.pixel import resolve_backend
    from spread_tools.progress import progress
    t0 = time.perf_counter()
    settings.check()
    weights_backend = resolve_backend(weights_backend)
    src = getattr(cache, "source", "SF cache")
    energy_ev = channel_grid(settings.channel_min_ev, settings.channel_max_ev,
                             settings.channel_step_ev)
    fp_t, fdp_t = truth_at_channels(cache.site_names, truth_tables, energy_ev, src)
    d_min = cache.d_min_a if settings.d_min_a is None else float(settings.d_min_a)
    d_max = cache.d_max_a if settings.d_max_a is None else float(settings.d_max_a)
    if not 0 < d_min < d_max:
        raise InputError(f"parameter d_min: {d_min} Å must be positive and below d_max ({d_max} Å)")
    if d_min < cache.d_min_a * (1 - 1e-9) or d_max > cache.d_max_a * (1 + 1e-9):
        raise InputError(f"parameter d_min/d_max: the annulus {d_max:g}-{d_min:g} Å is not inside "
                         f"the SF cache range {cache.d_max_a:g}-{cache.d_min_a:g} Å ({src})")
    inv_d2 = cache.inv_d2()
    in_annulus = np.flatnonzero((inv_d2 <= (1 + 1e-12) / d_min ** 2)
                                & (inv_d2 >= (1 - 1e-12) / d_max ** 2))
    if len(in_annulus) == 0:
        raise InputError(f"{src}: no reflection with {d_min:g} <= d <= {d_max:g} Å")
    hkl_ann = cache.hkl[in_annulus].astype(np.int64)
    check_writable(output, overwrite)

    n_lat = settings.n_lattices
    # children 0-4 are the streams of the ideal simulation; 5 draws the model errors
    seeds = np.random.SeedSequence(settings.seed).spawn(6)
    rng_orient, rng_spec, rng_scale, rng_bg = (np.random.default_rng(s) for s in seeds[:4])
    U = random_rotations(rng_orient, n_lat)
    weight, centre_ev = sase_spectra(rng_spec, n_lat, energy_ev, settings.fluence,
                                     settings.centre_min_ev, settings.centre_max_ev,
                                     settings.envelope_fwhm_ev, settings.n_spikes,
                                     settings.spike_fwhm_ev, settings.min_relative_weight)
    G = settings.G_median * np.exp(settings.G_log_sigma * rng_scale.standard_normal(n_lat))
    bg_level = settings.background_photons * np.exp(
        settings.background_log_sigma * rng_bg.standard_normal(n_lat))
    noise_seeds = seeds[4].spawn(n_lat)
    d_hat = np.asarray(settings.beam_direction, dtype=np.float64)
    d_hat = d_hat / np.linalg.norm(d_hat)
    pol_n = np.asarray(settings.polarization_normal, dtype=np.float64)
    pol_n = pol_n / np.linalg.norm(pol_n)
    models = _crystal_models(np.random.default_rng(seeds[5]), settings, cache.cell, U)
    common = {
        "beam_direction": np.tile(d_hat, (n_lat, 1)),
        "polarization_normal": np.tile(pol_n, (n_lat, 1)),
        "polarization_fraction": np.full(n_lat, settings.polarization_fraction),
        "n_domains": np.full(n_lat, settings.n_domains, dtype=np.int32),
    }
    # the crystals that make the counts, and the models stored in the dataset
    lat = dict(common, A=models["A_true"], domain_size_cells=models["N_true"],
               mosaic_spread_deg=models["mosaic_true"])
    lat_stored = dict(common, A=models["A_stored"],
                      domain_size_cells=np.tile(np.asarray(settings.domain_size_cells, float), (n_lat, 1)),
                      mosaic_spread_deg=np.full(n_lat, settings.mosaic_spread_deg))
    energy_stored, weight_stored = _stored_spectra(energy_ev, weight, settings, models["jitter_ev"])
    det = _detector_arrays(detector)
    k_mean = float(np.sum(weight * energy_ev) / np.sum(weight)) / HC_EV_A
    summary = SimulationSummary(n_lattices=n_lat, n_channels=len(energy_ev),
                                n_in_annulus=len(in_annulus))
    sb_per_lattice = np.zeros(n_lat, dtype=np.int64)

    with atomic_writer(output, FORMAT, VERSION, overwrite=overwrite) as h5:
        h5.attrs["cell"] = np.asarray(cache.cell, dtype=np.float64)
        h5.attrs["spacegroup"] = cache.spacegroup
        h5.attrs["source"] = "simulate_data"
        h5.attrs["config"] = config_json
        writer = _Writer(h5)
        starts = range(0, n_lat, settings.chunk_lattices)
        bar = progress(total=n_lat, desc="lattices", quiet=quiet, unit="lattice")
        for start in starts:
            idx = np.arange(start, min(start + settings.chunk_lattices, n_lat))
            sb = {"lat": [], "panel": [], "bbox": [], "row": []}
            for j in idx:
                rows, s1 = predict_reflections(lat["A"][j], hkl_ann, d_hat, energy_ev, weight[j],
                                               lat["domain_size_cells"][j],
                                               lat["mosaic_spread_deg"][j], settings.n_sigma)
                summary.n_predicted += len(rows)
                if len(rows) == 0:
                    continue
                panel, x, y = _project(detector, s1)
                bbox, status = cut_shoeboxes(panel, x, y, det["image_size"], settings.shoebox_size)
                summary.n_off_detector += int(np.sum(status == 1))
                summary.n_on_edge += int(np.sum(status == 2))
                ok = status == 0
                sb["lat"].append(np.full(int(ok.sum()), j, dtype=np.int64))
                sb["panel"].append(panel[ok])
                sb["bbox"].append(bbox[ok])
                sb["row"].append(in_annulus[rows[ok]])
            bar.update(len(idx))
            if not sb["lat"] or sum(len(a) for a in sb["lat"]) == 0:
                continue
            sb_lat = np.concatenate(sb["lat"])
            sb_panel = np.concatenate(sb["panel"])
            sb_bbox = np.concatenate(sb["bbox"])
            sb_row = np.concatenate(sb["row"])
            sub = {k: v[idx] for k, v in lat.items()}
            if settings.min_spot_photons > 0:
                core = _core_boxes(sb_bbox, min(_CORE_PX, settings.shoebox_size))
                ds_core, bragg_core = _bragg_expected(cache, det, energy_ev, weight[idx], sub,
                                                      sb_lat - start, sb_panel, core, sb_row,
                                                      fp_t, fdp_t, weights_backend)
                spot = np.add.reduceat(bragg_core, ds_core.pixel_offset[:-1]) * G[sb_lat]
                strong = spot >= settings.min_spot_photons
                summary.n_weak += int(np.sum(~strong))
                sb_lat, sb_panel, sb_bbox, sb_row = (a[strong] for a in
                                                     (sb_lat, sb_panel, sb_bbox, sb_row))
                if len(sb_lat) == 0:
                    continue
            sb_hkl = cache.hkl[sb_row]
            ds, bragg = _bragg_expected(cache, det, energy_ev, weight[idx], sub, sb_lat - start,
                                        sb_panel, sb_bbox, sb_row, fp_t, fdp_t, weights_backend)
            bragg *= np.repeat(G[sb_lat], np.diff(ds.pixel_offset))
            planes = background_planes(det, sb_panel, sb_bbox, d_hat, k_mean, bg_level[sb_lat])
            expected = bragg + background_counts(sb_bbox, planes)
            sizes = np.diff(ds.pixel_offset)
            if settings.poisson_noise:
                counts = np.empty(len(expected))
                pix_lat = np.repeat(sb_lat, sizes)
                for j in np.unique(sb_lat):
                    m = pix_lat == j
                    rng_noise = np.random.default_rng(noise_seeds[j])
                    counts[m] = _detected(rng_noise, rng_noise.poisson(expected[m]), settings)
            else:
                counts = expected
            summary.total_counts += float(expected.sum())
            summary.bragg_counts += float(bragg.sum())
            np.add.at(sb_per_lattice, sb_lat, 1)
            writer.add(sb_lat, sb_panel, sb_bbox, sb_hkl, planes, counts, sizes)
        bar.close()
        if writer.n_sb == 0:
            raise InputError(
                f"detector: no shoeboxes on the detector ({summary.n_predicted} reflections in "
                f"diffraction condition: {summary.n_off_detector} missed every panel, "
                f"{summary.n_on_edge} crossed a panel edge); check the detector geometry, "
                f"the resolution range and shoebox_size")
        writer.finish()
        for name in ("origin_mm", "fast_axis", "slow_axis", "pixel_size_mm"):
            h5.create_dataset(f"detector/{name}", data=np.asarray(det[name], dtype=np.float64))
        h5.create_dataset("detector/image_size", data=np.asarray(det["image_size"], dtype=np.int32))
        h5["detector"].attrs["gain"] = float(settings.gain_adu_per_photon)
        h5.create_dataset("spectra/energy_ev", data=energy_stored)
        h5.create_dataset("spectra/weight", data=weight_stored)
        for name, arr in lat_stored.items():
            dtype = np.int32 if name == "n_domains" else np.float64
            h5.create_dataset(f"lattices/{name}", data=np.asarray(arr, dtype=dtype))
        write_strings(h5, "lattices/identifier", [f"sim_{j:06d}" for j in range(n_lat)])
        h5.create_dataset("truth/energy_ev", data=energy_ev)
        write_strings(h5, "truth/site_names", list(cache.site_names))
        h5.create_dataset("truth/fp", data=fp_t)
        h5.create_dataset("truth/fdp", data=fdp_t)
        h5.create_dataset("truth/G", data=G)
        h5.create_dataset("truth/spectrum_centre_ev", data=centre_ev)
        h5.create_dataset("truth/background_level", data=bg_level)
        h5.create_dataset("truth/A", data=models["A_true"])
        h5.create_dataset("truth/cell", data=models["cell_true"])
        h5.create_dataset("truth/domain_size_cells", data=models["N_true"])
        h5.create_dataset("truth/mosaic_spread_deg", data=models["mosaic_true"])
        h5.create_dataset("truth/spectrum_offset_ev",
                          data=settings.spectrometer_offset_ev + models["jitter_ev"])
        h5.create_dataset("truth/spectrum_weight", data=weight)
        summary.n_shoeboxes = writer.n_sb
        summary.n_pixels = writer.n_pix
        summary.lattices_without_shoebox = int(np.sum(sb_per_lattice == 0))
        summary.time_s = time.perf_counter() - t0
        h5["truth"].attrs["summary"] = json.dumps(dataclasses.asdict(summary))
    if log:
        for line in summary.lines():
            log(line)
    return summary


def make_detector(distance_mm=100.0, pixel_size_mm=0.1, n_fast=None, n_slow=None,
                  offset_mm=(0.0, 0.0), gap_mm=2.0):
    """Detector for a simulation, normal to a beam along −z.

    :func:`spread_tools.model.geometry.default_detector` with ``simulate_data``'s
    defaults (100 mm): the 16-module ePix10k-2M-like detector, or one flat
    panel when ``n_fast``/``n_slow`` are given.

    Parameters
    ----------
    distance_mm, pixel_size_mm, n_fast, n_slow, offset_mm, gap_mm
        As for :func:`spread_tools.model.geometry.default_detector`.

    Returns
    -------
    spread_tools.model.geometry.Detector
    """
    return geometry.default_detector(distance_mm=distance_mm, pixel_size_mm=pixel_size_mm,
                                     n_fast=n_fast, n_slow=n_slow, offset_mm=tuple(offset_mm),
                                     gap_mm=gap_mm)
