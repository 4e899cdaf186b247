"""Beam, detector and crystal model in the DIALS/dxtbx lab frame.

Conventions (``docs/formats.md``, DIALS/dxtbx):

* Lengths in mm, wavelengths in Å, energies in eV, angles in degrees in names.
* The beam ``direction`` is the unit vector from the sample towards the source;
  ``s0 = -direction / λ`` (Å⁻¹). λ[Å] = 12398.4198 / E[eV].
* A flat panel has an ``origin_mm`` (lab position of the outer corner of pixel
  (0, 0)), unit ``fast_axis`` and ``slow_axis`` and a pixel size (fast, slow) in
  mm. Pixel (i, j) spans [i, i+1) × [j, j+1) in fast/slow pixel coordinates; its
  centre is at (i + 0.5, j + 0.5). Lab position of pixel coordinate (x, y):
  ``origin + x·pixel_fast·fast_axis + y·pixel_slow·slow_axis``.
* The crystal's reciprocal orientation matrix A (DIALS A = U·B) maps a Miller
  index to the scattering vector, q = A·h in Å⁻¹.

Hierarchical DIALS detectors are flattened into independent panels by the
DIALS importer (``spread_tools.io.dials.importer``); every panel here is in the lab frame.
No parallax correction is applied (the sensor is treated as infinitely thin),
as in DIALS predictions without a ``ParallaxCorrectedPxMmStrategy``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from spread_tools.errors import InputError

__all__ = ["HC_EV_A", "R_E_A", "Beam", "Panel", "Detector", "Crystal", "pixel_to_lab_mm",
           "ray_to_pixel", "s0_from", "wavelength_a_from_energy_ev", "energy_ev_from_wavelength_a",
           "solid_angle", "polarization_factor", "mosaic_rotations", "mosaic_axes_and_quantiles",
           "default_detector", "single_panel_detector", "detector_arrays", "rotation_matrix"]

#: h·c in eV·Å: λ[Å] = HC_EV_A / E[eV].
HC_EV_A = 12398.4198
#: Classical electron radius in Å.
R_E_A = 2.8179403262e-5


def _unit(v, name="vector"):
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(n == 0) or not np.all(np.isfinite(n)):
        raise InputError(f"{name}: must be a finite non-zero vector")
    return v / n


# --------------------------------------------------------------------------- models

@dataclasses.dataclass
class Beam:
    """Incident beam (DIALS ``Beam``).

    Attributes
    ----------
    direction : ndarray (3,)
        Unit vector from the sample towards the source (DIALS ``direction``).
    wavelength_a : float or None
        Wavelength in Å; None for a polychromatic beam described by a spectrum.
    polarization_normal : ndarray (3,)
        Normal of the polarization plane (DIALS ``polarization_normal``).
    polarization_fraction : float
        Fraction of the intensity polarised in the plane normal to
        ``polarization_normal`` (DIALS ``polarization_fraction``; 0.5 = unpolarised,
        0.999 typical at XFELs).
    """

    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    wavelength_a: float | None = None
    polarization_normal: np.ndarray = dataclasses.field(default_factory=lambda: np.array([0.0, 1.0, 0.0]))
    polarization_fraction: float = 0.999

    def __post_init__(self):
        self.direction = _unit(self.direction, "beam direction")
        self.polarization_normal = _unit(self.polarization_normal, "beam polarization_normal")
        self.polarization_fraction = float(self.polarization_fraction)
        if not 0.0 <= self.polarization_fraction <= 1.0:
            raise InputError("beam polarization_fraction: must be in [0, 1]")

    def s0(self, wavelength_a=None):
        """Incident wave vector s0 = −direction/λ (Å⁻¹) at ``wavelength_a`` (default: the beam's)."""
        lam = self.wavelength_a if wavelength_a is None else wavelength_a
        if lam is None:
            raise InputError("beam: no wavelength given")
        return s0_from(self.direction, lam)


@dataclasses.dataclass
class Panel:
    """One flat detector panel (DIALS ``Panel`` in the lab frame).

    Attributes
    ----------
    origin_mm : ndarray (3,)
        Lab position of the outer corner of pixel (0, 0), mm.
    fast_axis, slow_axis : ndarray (3,)
        Unit vectors along increasing fast / slow pixel index.
    pixel_size_mm : tuple (fast, slow)
        Pixel size in mm.
    image_size : tuple (n_fast, n_slow)
        Number of pixels.
    name : str
        Panel name.
    """

    origin_mm: np.ndarray
    fast_axis: np.ndarray
    slow_axis: np.ndarray
    pixel_size_mm: tuple = (0.1, 0.1)
    image_size: tuple = (352, 384)
    name: str = ""

    def __post_init__(self):
        self.origin_mm = np.asarray(self.origin_mm, dtype=np.float64).reshape(3)
        self.fast_axis = _unit(self.fast_axis, f"panel {self.name} fast_axis").reshape(3)
        self.slow_axis = _unit(self.slow_axis, f"panel {self.name} slow_axis").reshape(3)
        self.pixel_size_mm = tuple(float(v) for v in self.pixel_size_mm)
        self.image_size = tuple(int(v) for v in self.image_size)
        if len(self.pixel_size_mm) != 2 or min(self.pixel_size_mm) <= 0:
            raise InputError(f"panel {self.name}: pixel_size_mm must be two positive numbers")
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise InputError(f"panel {self.name}: image_size must be two positive integers")
        if abs(np.linalg.norm(np.cross(self.fast_axis, self.slow_axis))) < 1e-6:
            raise InputError(f"panel {self.name}: fast and slow axes are parallel")

    @property
    def normal(self):
        """Unit normal fast × slow."""
        return _unit(np.cross(self.fast_axis, self.slow_axis))

    @property
    def pixel_area_mm2(self):
        """Area of one pixel: pixel_fast · pixel_slow · |fast × slow| (exact for non-orthogonal axes)."""
        return self.pixel_size_mm[0] * self.pixel_size_mm[1] * float(
            np.linalg.norm(np.cross(self.fast_axis, self.slow_axis)))

    def d_matrix(self):
        """DIALS d matrix: columns fast·pixel_fast, slow·pixel_slow, origin (maps (x_px, y_px, 1) to lab mm)."""
        return np.stack([self.fast_axis * self.pixel_size_mm[0], self.slow_axis * self.pixel_size_mm[1],
                         self.origin_mm], axis=1)


@dataclasses.dataclass
class Detector:
    """A list of flat panels (one dataset's ``detector/`` group)."""

    panels: list

    def __len__(self):
        return len(self.panels)

    def __getitem__(self, i):
        return self.panels[i]

    def as_arrays(self):
        """Arrays of the dataset's ``detector/`` group.

        Returns
        -------
        dict
            ``origin_mm``, ``fast_axis``, ``slow_axis`` (n_panel, 3) float64,
            ``pixel_size_mm`` (n_panel, 2) float64, ``image_size`` (n_panel, 2) int32.
        """
        return {
            "origin_mm": np.array([p.origin_mm for p in self.panels], dtype=np.float64).reshape(-1, 3),
            "fast_axis": np.array([p.fast_axis for p in self.panels], dtype=np.float64).reshape(-1, 3),
            "slow_axis": np.array([p.slow_axis for p in self.panels], dtype=np.float64).reshape(-1, 3),
            "pixel_size_mm": np.array([p.pixel_size_mm for p in self.panels], dtype=np.float64).reshape(-1, 2),
            "image_size": np.array([p.image_size for p in self.panels], dtype=np.int32).reshape(-1, 2),
        }

    @classmethod
    def from_arrays(cls, origin_mm, fast_axis, slow_axis, pixel_size_mm, image_size, names=None):
        """Detector from the arrays of a dataset's ``detector/`` group (see :meth:`as_arrays`)."""
        n = len(origin_mm)
        names = names if names is not None else [f"panel{i}" for i in range(n)]
        return cls([Panel(origin_mm[i], fast_axis[i], slow_axis[i], tuple(pixel_size_mm[i]),
                          tuple(image_size[i]), str(names[i])) for i in range(n)])

    @classmethod
    def from_dataset(cls, ds):
        """Detector of a :class:`spread_tools.io.dataset.Dataset`."""
        return cls.from_arrays(ds.origin_mm, ds.fast_axis, ds.slow_axis, ds.pixel_size_mm, ds.image_size)

    def ray_to_pixel(self, s1):
        """Panel hit by rays along ``s1`` and the fast/slow pixel coordinates there.

        Parameters
        ----------
        s1 : array (..., 3)
            Ray directions from the sample (any length).

        Returns
        -------
        panel : ndarray of int64 (...)
            First panel hit (the nearest along the ray), −1 when none.
        x_px, y_px : ndarray (...)
            Fast/slow pixel coordinates (DIALS ``xyzcal.px`` convention), NaN when missed.
        """
        s1 = np.asarray(s1, dtype=np.float64)
        shape = s1.shape[:-1]
        s1f = s1.reshape(-1, 3)
        panel = np.full(len(s1f), -1, dtype=np.int64)
        x = np.full(len(s1f), np.nan)
        y = np.full(len(s1f), np.nan)
        best = np.full(len(s1f), np.inf)
        for i, p in enumerate(self.panels):
            xi, yi, dist = _ray_panel(p, s1f)
            hit = np.isfinite(xi) & (dist < best)
            panel[hit], x[hit], y[hit], best[hit] = i, xi[hit], yi[hit], dist[hit]
        return panel.reshape(shape), x.reshape(shape), y.reshape(shape)


@dataclasses.dataclass
class Crystal:
    """A crystal lattice: reciprocal orientation matrix, cell and space group.

    Attributes
    ----------
    A : ndarray (3, 3)
        q = A·h in Å⁻¹ (DIALS A = U·B).
    cell : tuple
        a, b, c (Å), α, β, γ (°).
    spacegroup : str
        Hermann–Mauguin symbol.
    """

    A: np.ndarray
    cell: tuple = ()
    spacegroup: str = "P 1"

    def __post_init__(self):
        self.A = np.asarray(self.A, dtype=np.float64).reshape(3, 3)
        if abs(np.linalg.det(self.A)) == 0:
            raise InputError("crystal A matrix: singular")

    def q(self, hkl):
        """Scattering vectors A·h (Å⁻¹) of Miller indices (..., 3)."""
        return np.asarray(hkl, dtype=np.float64) @ self.A.T


# --------------------------------------------------------------------------- functions

def wavelength_a_from_energy_ev(energy_ev):
    """Wavelength in Å of photons of ``energy_ev`` (λ = 12398.4198 / E)."""
    return HC_EV_A / np.asarray(energy_ev, dtype=np.float64)


def energy_ev_from_wavelength_a(wavelength_a):
    """Photon energy in eV at ``wavelength_a`` (E = 12398.4198 / λ)."""
    return HC_EV_A / np.asarray(wavelength_a, dtype=np.float64)


def s0_from(direction, wavelength_a):
    """Incident wave vector s0 = −direction/λ (Å⁻¹).

    Parameters
    ----------
    direction : array (3,)
        Beam direction (sample → source); normalised here.
    wavelength_a : float or array (n,)
        Wavelength(s) in Å.

    Returns
    -------
    ndarray (3,) or (n, 3)
    """
    d = _unit(direction, "beam direction")
    lam = np.asarray(wavelength_a, dtype=np.float64)
    return -d / lam[..., None] if lam.ndim else -d / float(lam)


def pixel_to_lab_mm(panel, fast_px, slow_px):
    """Lab position (mm) of fast/slow pixel coordinates on a panel.

    Parameters
    ----------
    panel : Panel
    fast_px, slow_px : float or array
        Pixel coordinates; pixel (i, j) spans [i, i+1) × [j, j+1), its centre is (i+0.5, j+0.5).

    Returns
    -------
    ndarray (..., 3)
    """
    fx = np.asarray(fast_px, dtype=np.float64)[..., None]
    sy = np.asarray(slow_px, dtype=np.float64)[..., None]
    return (panel.origin_mm + fx * panel.pixel_size_mm[0] * panel.fast_axis
            + sy * panel.pixel_size_mm[1] * panel.slow_axis)


def _ray_panel(panel, s1):
    """(x_px, y_px, distance along unit ray) of rays s1 (n, 3) on one panel; NaN/inf off panel."""
    D = np.linalg.inv(panel.d_matrix())
    v = s1 @ D.T
    with np.errstate(divide="ignore", invalid="ignore"):
        x = v[:, 0] / v[:, 2]
        y = v[:, 1] / v[:, 2]
        ok = (v[:, 2] > 0) & (x >= 0) & (y >= 0) & (x < panel.image_size[0]) & (y < panel.image_size[1])
        dist = np.linalg.norm(s1, axis=1) / v[:, 2]
    x = np.where(ok, x, np.nan)
    y = np.where(ok, y, np.nan)
    dist = np.where(ok, dist, np.inf)
    return x, y, dist


def ray_to_pixel(panel, s1):
    """Intersection of rays from the sample along ``s1`` with a panel (or a detector).

    Uses DIALS' ``D = d⁻¹`` mapping (d = [fast·px_f, slow·px_s, origin]), so a
    DIALS reflection's ``s1`` maps onto its ``xyzcal.px`` (x, y).

    Parameters
    ----------
    panel : Panel or Detector
        One panel, or a detector (then the nearest panel hit is found).
    s1 : array (..., 3)
        Ray directions (any length).

    Returns
    -------
    (x_px, y_px) for a Panel, ``(panel_index, x_px, y_px)`` for a Detector.
        Fast/slow pixel coordinates (pixel i spans [i, i+1)); NaN where the ray
        misses the panel (off its area, parallel to or behind it); panel index −1
        where it misses every panel.
    """
    if isinstance(panel, Detector):
        return panel.ray_to_pixel(s1)
    s1 = np.asarray(s1, dtype=np.float64)
    x, y, _ = _ray_panel(panel, s1.reshape(-1, 3))
    return x.reshape(s1.shape[:-1]), y.reshape(s1.shape[:-1])


def solid_angle(position_mm, normal, area_mm2):
    """Solid angle (sr) of small flat pixels: area · |cos(incidence)| / |r|².

    Parameters
    ----------
    position_mm : array (..., 3)
        Pixel centres relative to the sample.
    normal : array (3,) or (..., 3)
        Unit normal of the pixel plane.
    area_mm2 : float or array
        Pixel area.

    Returns
    -------
    ndarray (...)
    """
    r = np.asarray(position_mm, dtype=np.float64)
    d = np.linalg.norm(r, axis=-1)
    cos_inc = np.abs(np.sum(r * np.asarray(normal, dtype=np.float64), axis=-1)) / d
    return np.asarray(area_mm2, dtype=np.float64) * cos_inc / d ** 2


def polarization_factor(s1, beam_direction, polarization_normal, polarization_fraction):
    """Polarization factor of scattering along ``s1`` (Kahn et al. 1982, DIALS form).

    P = (1 − 2f)(1 − (n·ŝ1)²) + f (1 + (ŝ1·ŝ0)²), with n the polarization-plane
    normal and f the polarization fraction; f = 0.5 gives the unpolarised
    (1 + cos²2θ)/2. Equivalent to nanoBragg's ``polarization_factor`` with
    Kahn factor 2f − 1 and E-vector axis n × ŝ0.

    Parameters
    ----------
    s1 : array (..., 3)
        Scattered directions (any length).
    beam_direction : array (3,)
        Sample → source unit vector.
    polarization_normal : array (3,)
    polarization_fraction : float

    Returns
    -------
    ndarray (...)
    """
    s = _unit(s1, "s1")
    s0 = -_unit(beam_direction, "beam direction")
    n = _unit(polarization_normal, "polarization_normal")
    f = float(polarization_fraction)
    pn = s @ n
    c2 = s @ s0
    return (1 - 2 * f) * (1 - pn ** 2) + f * (1 + c2 ** 2)


def rotation_matrix(axis, angle_rad):
    """Rotation matrix about unit ``axis`` by ``angle_rad`` (right-handed, Rodrigues)."""
    u = _unit(axis, "rotation axis")
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    ux = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return c * np.eye(3) + s * ux + (1 - c) * np.outer(u, u)


def mosaic_axes_and_quantiles(n_domains):
    """Rotation axes and unit angles of the mosaic domains (see :func:`mosaic_rotations`).

    Parameters
    ----------
    n_domains : int
        Number of domains (≥ 1).

    Returns
    -------
    axes : ndarray (n_domains, 3)
        Unit rotation axis of each domain (domains d and n−1−d share one).
    quantiles : ndarray (n_domains,)
        Φ⁻¹((d + 0.5)/n): domain d is rotated by ``spread_rad · quantiles[d]`` about
        ``axes[d]``; 0 for the middle domain of an odd n.
    """
    from scipy.special import ndtri
    n = int(n_domains)
    if n < 1:
        raise InputError("mosaic n_domains: must be at least 1")
    axes = np.tile(np.array([0.0, 0.0, 1.0]), (n, 1))
    quantiles = np.zeros(n)
    if n == 1:
        return axes, quantiles
    quantiles = ndtri((np.arange(n) + 0.5) / n)
    if n % 2:
        quantiles[n // 2] = 0.0
    g = 1.32471795724474602596  # plastic number: R2 sequence
    a1, a2 = 1.0 / g, 1.0 / g ** 2
    for i in range(n // 2):
        t1 = (0.5 + (i + 1) * a1) % 1.0
        t2 = (0.5 + (i + 1) * a2) % 1.0
        z = 2 * t1 - 1
        rxy = math.sqrt(max(0.0, 1 - z * z))
        axes[i] = axes[n - 1 - i] = [rxy * math.cos(2 * math.pi * t2), rxy * math.sin(2 * math.pi * t2), z]
    return axes, quantiles


def mosaic_rotations(spread_deg, n_domains):
    """Deterministic rotations of the mosaic domains (same result on every call).

    Domain d is a rotation by angle α_d about unit axis u_d
    (:func:`mosaic_axes_and_quantiles`):

    * angles: the Gaussian quantiles α_d = σ·Φ⁻¹((d + 0.5)/n), d = 0..n−1,
      with σ = ``spread_deg`` (so the rms rotation angle is ≈ σ); they are
      antisymmetric (α_{n−1−d} = −α_d);
    * axes: domains d and n−1−d share one axis, so the set comes in ±α pairs
      and its mean orientation is the unrotated crystal; the axis of pair i is
      point i + 1 of the 2-D golden-ratio (R2, Roberts 2018) low-discrepancy
      sequence mapped area-uniformly onto the sphere (z = 2t₁ − 1, φ = 2πt₂).
      For odd n the middle domain has angle 0 (identity).

    No random-number generator is used. ``spread_deg == 0`` or ``n_domains == 1``
    gives identity matrices. The angles are linear in σ at fixed axes, so every
    domain rotation, and the model, is a smooth function of σ.

    Parameters
    ----------
    spread_deg : float
        Mosaic spread σ in degrees (≥ 0).
    n_domains : int
        Number of domains (≥ 1).

    Returns
    -------
    ndarray (n_domains, 3, 3) float64
    """
    n = int(n_domains)
    if n < 1:
        raise InputError("mosaic n_domains: must be at least 1")
    if not spread_deg >= 0:
        raise InputError("mosaic spread_deg: must be >= 0")
    out = np.tile(np.eye(3), (n, 1, 1))
    if n == 1 or spread_deg == 0:
        return out
    axes, quantiles = mosaic_axes_and_quantiles(n)
    sigma = math.radians(float(spread_deg))
    for d in range(n):
        if d != n - 1 - d:
            out[d] = rotation_matrix(axes[d], sigma * quantiles[d])
    return out


def single_panel_detector(distance_mm=125.0, pixel_size_mm=0.1, n_fast=2048, n_slow=2048,
                          offset_mm=(0.0, 0.0)):
    """One flat panel normal to a beam along −z, centred on the beam (plus ``offset_mm``).

    Fast axis +x, slow axis −y (DIALS' usual image orientation), the panel plane
    at z = −``distance_mm``; ``offset_mm`` (x, y) shifts the panel in the lab frame.

    Returns
    -------
    Detector
    """
    fast = np.array([1.0, 0.0, 0.0])
    slow = np.array([0.0, -1.0, 0.0])
    ps = float(pixel_size_mm)
    centre = np.array([offset_mm[0], offset_mm[1], -float(distance_mm)])
    origin = centre - 0.5 * n_fast * ps * fast - 0.5 * n_slow * ps * slow
    return Detector([Panel(origin, fast, slow, (ps, ps), (int(n_fast), int(n_slow)), "panel0")])


def default_detector(distance_mm=125.0, pixel_size_mm=0.1, n_fast=None, n_slow=None,
                     offset_mm=(0.0, 0.0), gap_mm=2.0):
    """An ePix10k-2M-like detector: 16 modules of 352 × 384 pixels around the beam.

    The lab frame is DIALS': beam along −z (``direction`` = (0, 0, 1)), modules in
    the plane z = −``distance_mm``, fast axis +x, slow axis −y. The 16 modules
    (352 fast × 384 slow pixels of ``pixel_size_mm``, 35.2 × 38.4 mm at 0.1 mm)
    form a 4 × 4 grid with ``gap_mm`` gaps, centred on the beam, so the direct
    beam passes through the central cross of gaps (≈ 147 × 160 mm in all; at
    125 mm and 7.1 keV the module corners reach ≈ 2.2 Å). This is a simple
    stand-in with the ePix10k-2M's pixel count and pixel size, not its metrology.

    With ``n_fast`` and ``n_slow`` given, one flat panel of that size is returned
    instead (:func:`single_panel_detector`).

    Parameters
    ----------
    distance_mm : float
        Sample-to-detector distance.
    pixel_size_mm : float
        Square pixel size.
    n_fast, n_slow : int, optional
        Single-panel size (see above).
    offset_mm : (float, float)
        Lateral shift (x, y) of the whole detector.
    gap_mm : float
        Gap between modules.

    Returns
    -------
    Detector
    """
    if n_fast is not None or n_slow is not None:
        return single_panel_detector(distance_mm, pixel_size_mm, n_fast or n_slow, n_slow or n_fast,
                                     offset_mm)
    nf, ns = 352, 384
    ps = float(pixel_size_mm)
    wf, ws = nf * ps, ns * ps
    fast = np.array([1.0, 0.0, 0.0])
    slow = np.array([0.0, -1.0, 0.0])
    panels = []
    for row in range(4):
        for col in range(4):
            cx = (col - 1.5) * (wf + gap_mm) + offset_mm[0]
            cy = -(row - 1.5) * (ws + gap_mm) + offset_mm[1]
            centre = np.array([cx, cy, -float(distance_mm)])
            origin = centre - 0.5 * wf * fast - 0.5 * ws * slow
            panels.append(Panel(origin, fast, slow, (ps, ps), (nf, ns), f"module{4 * row + col:02d}"))
    return Detector(panels)


def detector_arrays(detector):
    """Arrays of a detector's ``detector/`` dataset group (:meth:`Detector.as_arrays`)."""
    return detector.as_arrays()
