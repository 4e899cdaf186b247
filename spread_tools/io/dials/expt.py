"""DIALS experiment lists (``.expt``, JSON) without dxtbx: beams, detectors, crystals.

What is read
------------
* ``beam``: ``direction`` (sample → source), ``wavelength`` (Å),
  ``polarization_normal``, ``polarization_fraction`` → :class:`geometry.Beam`.
* ``detector``: panels and the ``hierarchy`` tree. Every node (group or panel)
  stores its frame *local to its parent* (dxtbx ``get_local_origin`` etc.).
  The lab frame is composed down the tree as dxtbx does: with the parent's
  lab frame (origin o_p, unit axes f_p, s_p, normal n_p = f_p × s_p) and a
  child's local (o, f, s)::

      origin_lab = o_p + o.x·f_p + o.y·s_p + o.z·n_p
      fast_lab   =       f.x·f_p + f.y·s_p + f.z·n_p        (slow likewise)

  A detector without ``hierarchy`` has its panels in the lab frame. The
  ``ParallaxCorrectedPxMmStrategy`` (sensor ``thickness`` in mm, ``mu`` in
  1/mm) is kept per panel: DIALS' ``xyzcal.px`` includes it
  (:func:`mm_to_px`), while the SPREAD pixel model treats sensors as thin.
* ``crystal``: real-space vectors a, b, c (Å) → A = [a; b; c]⁻¹ (rows a, b, c),
  so that q = A·h (DIALS A = U·B); cell from the vectors; space group from
  ``space_group_hall_symbol`` (gemmi); ``ML_half_mosaicity_deg`` and
  ``ML_domain_size_ang`` when present (Nave model of stills refinement).
* ``imageset``: image file names (relative to the .expt), ``single_file_indices``.
* ``experiment``: identifier and the index of each model it uses.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.geometry import Beam, Detector, Panel

__all__ = ["PanelInfo", "DialsDetector", "DialsCrystal", "Experiment", "ExperimentList",
           "read_expt", "compose_hierarchy", "mm_to_px", "s1_to_mm", "s1_to_px", "predict_s1",
           "crystal_from_A", "spacegroup_from_hall"]


@dataclasses.dataclass
class PanelInfo:
    """What a DIALS panel carries beyond the flat-panel geometry.

    Attributes
    ----------
    thickness_mm : float
        Sensor thickness.
    mu_per_mm : float
        Linear attenuation coefficient of the sensor.
    parallax : bool
        DIALS maps mm ↔ px with the parallax correction (``ParallaxCorrectedPxMmStrategy``).
    trusted_range : tuple
        (min, max) valid raw pixel values.
    gain : float
        ADU per photon.
    mask_rects : ndarray (n, 4) int
        Masked rectangles x0, y0, x1, y1 (dxtbx panel ``mask``).
    """

    thickness_mm: float = 0.0
    mu_per_mm: float = 0.0
    parallax: bool = False
    trusted_range: tuple = (-np.inf, np.inf)
    gain: float = 1.0
    mask_rects: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.int64))


@dataclasses.dataclass
class DialsDetector:
    """A DIALS detector: lab-frame panels (:class:`geometry.Detector`) and their extras."""

    detector: Detector
    info: list

    def __len__(self):
        return len(self.detector)


@dataclasses.dataclass
class DialsCrystal:
    """A DIALS crystal model.

    Attributes
    ----------
    A : ndarray (3, 3)
        q = A·h (Å⁻¹).
    real_space : ndarray (3, 3)
        Rows a, b, c (Å).
    cell : tuple
        a, b, c (Å), α, β, γ (°).
    spacegroup : str
        Hermann–Mauguin symbol (gemmi ``xhm``).
    hall : str
    half_mosaicity_deg, domain_size_a : float or None
        Nave model values (``ML_half_mosaicity_deg``, ``ML_domain_size_ang``) if present.
    """

    A: np.ndarray
    real_space: np.ndarray
    cell: tuple
    spacegroup: str
    hall: str
    half_mosaicity_deg: float | None = None
    domain_size_a: float | None = None


@dataclasses.dataclass
class Experiment:
    """One experiment: identifier and model indices (None where absent)."""

    identifier: str
    beam: int | None
    detector: int | None
    crystal: int | None
    imageset: int | None


@dataclasses.dataclass
class ExperimentList:
    """All models of an ``.expt`` file and the experiments that use them."""

    experiments: list
    beams: list
    detectors: list
    crystals: list
    imagesets: list
    path: str = "<memory>"

    def __len__(self):
        return len(self.experiments)

    def identifiers(self):
        """Experiment identifiers in order."""
        return [e.identifier for e in self.experiments]


# --------------------------------------------------------------------------- helpers

def _vec(d, key, where, n=3):
    if key not in d:
        raise InputError(f"{where}: missing '{key}'")
    try:
        v = np.asarray(d[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: '{key}' is not a list of numbers") from None
    if v.shape != (n,) or not np.all(np.isfinite(v)):
        raise InputError(f"{where}: '{key}' must be {n} finite numbers")
    return v


def _frame(node, where):
    return _vec(node, "origin", where), _vec(node, "fast_axis", where), _vec(node, "slow_axis", where)


def _compose(parent, local):
    """Lab frame of a child from the parent's lab frame and the child's local frame."""
    po, pf, ps = parent
    lo, lf, ls = local
    pf = pf / np.linalg.norm(pf)
    ps = ps / np.linalg.norm(ps)
    pn = np.cross(pf, ps)
    pn /= np.linalg.norm(pn)
    R = np.stack([pf, ps, pn], axis=1)     # columns: parent fast, slow, normal
    return po + R @ lo, R @ lf, R @ ls


def compose_hierarchy(det_dict, where="detector"):
    """Lab-frame (origin, fast, slow) of every panel of a DIALS detector dictionary.

    Parameters
    ----------
    det_dict : dict
        One entry of an ``.expt`` file's ``detector`` list.
    where : str
        Name for messages.

    Returns
    -------
    list of (origin, fast, slow) tuples, one per panel, in panel order.
    """
    panels = det_dict.get("panels")
    if not isinstance(panels, list) or not panels:
        raise InputError(f"{where}: no panels")
    local = [_frame(p, f"{where} panel {i}") for i, p in enumerate(panels)]
    hier = det_dict.get("hierarchy")
    if not hier:
        return local
    out = [None] * len(panels)

    def walk(node, parent, path, depth):
        if depth > 32:
            raise InputError(f"{where}: hierarchy deeper than 32 levels")
        if "panel" in node:
            i = node["panel"]
            if not isinstance(i, int) or not 0 <= i < len(panels):
                raise InputError(f"{where}: hierarchy refers to panel {i!r}, which does not exist")
            if out[i] is not None:
                raise InputError(f"{where}: panel {i} appears twice in the hierarchy")
            out[i] = _compose(parent, local[i])
            return
        frame = _compose(parent, _frame(node, f"{where} group {path}"))
        for k, child in enumerate(node.get("children", [])):
            walk(child, frame, f"{path}/{k}", depth + 1)

    lab = (np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    # The root node is a group with its own frame relative to the lab.
    walk(hier, lab, "root", 0)
    missing = [i for i, f in enumerate(out) if f is None]
    if missing:
        raise InputError(f"{where}: panel(s) {missing[:5]} are not in the hierarchy")
    return out


def _detector(d, where):
    frames = compose_hierarchy(d, where)
    panels, info = [], []
    for i, (p, (o, f, s)) in enumerate(zip(d["panels"], frames)):
        w = f"{where} panel {i}"
        px = _vec(p, "pixel_size", w, 2)
        size = _vec(p, "image_size", w, 2).astype(int)
        panels.append(Panel(o, f, s, tuple(px), tuple(size), str(p.get("name", f"panel{i}"))))
        strategy = (p.get("px_mm_strategy") or {}).get("type", "SimplePxMmStrategy")
        thick, mu = float(p.get("thickness", 0.0) or 0.0), float(p.get("mu", 0.0) or 0.0)
        tr = p.get("trusted_range", [-np.inf, np.inf])
        rects = np.asarray(p.get("mask") or [], dtype=np.int64).reshape(-1, 4)
        info.append(PanelInfo(thick, mu, strategy == "ParallaxCorrectedPxMmStrategy" and thick > 0 and mu > 0,
                              (float(tr[0]), float(tr[1])), float(p.get("gain", 1.0) or 1.0), rects))
    return DialsDetector(Detector(panels), info)


def spacegroup_from_hall(hall, where="crystal"):
    """Hermann–Mauguin symbol (gemmi ``xhm``) of a Hall symbol."""
    import gemmi
    try:
        sg = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(str(hall).strip()))
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{where}: bad Hall symbol {hall!r} ({exc})") from None
    if sg is None:
        raise InputError(f"{where}: Hall symbol {hall!r} is not a tabulated space group setting")
    return sg.xhm()


def crystal_from_A(A):
    """Cell (a, b, c, α, β, γ) of a reciprocal orientation matrix A (q = A·h)."""
    real = np.linalg.inv(np.asarray(A, dtype=np.float64))   # rows a, b, c
    a, b, c = real
    la, lb, lc = (np.linalg.norm(v) for v in (a, b, c))

    def ang(u, v):
        return float(np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))
    return (float(la), float(lb), float(lc), ang(b, c), ang(a, c), ang(a, b))


def _crystal(c, where):
    real = np.stack([_vec(c, k, where) for k in ("real_space_a", "real_space_b", "real_space_c")])
    if abs(np.linalg.det(real)) < 1e-6:
        raise InputError(f"{where}: real-space vectors are degenerate")
    A = np.linalg.inv(real)
    hall = c.get("space_group_hall_symbol", " P 1")
    def opt(key):
        v = c.get(key)
        return None if v is None else float(v)
    return DialsCrystal(A, real, crystal_from_A(A), spacegroup_from_hall(hall, where), str(hall).strip(),
                        opt("ML_half_mosaicity_deg"), opt("ML_domain_size_ang"))


def _beam(b, where):
    if "wavelength" not in b:
        raise InputError(f"{where}: missing 'wavelength'")
    lam = float(b["wavelength"])
    if not lam > 0:
        raise InputError(f"{where}: wavelength must be positive (Å), got {lam}")
    pn = b.get("polarization_normal", [0.0, 1.0, 0.0])
    return Beam(_vec(b, "direction", where), lam, np.asarray(pn, dtype=np.float64),
                float(b.get("polarization_fraction", 0.999)))


def read_expt(path):
    """Read a DIALS experiment list (``.expt`` JSON).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ExperimentList
        Beams (:class:`geometry.Beam`), detectors (:class:`DialsDetector`, panels in the
        lab frame), crystals (:class:`DialsCrystal`), imagesets (dicts with absolute
        ``images``), experiments (:class:`Experiment`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a DIALS experiment list (not JSON text)") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a DIALS experiment list (JSON error at line {exc.lineno})") from None
    if not isinstance(d, dict) or d.get("__id__") != "ExperimentList":
        raise InputError(f"{path}: not a DIALS experiment list (no '__id__': 'ExperimentList')")
    beams = [_beam(b, f"{path}: beam {i}") for i, b in enumerate(d.get("beam", []))]
    detectors = [_detector(x, f"{path}: detector {i}") for i, x in enumerate(d.get("detector", []))]
    crystals = [_crystal(c, f"{path}: crystal {i}") for i, c in enumerate(d.get("crystal", []))]
    imagesets = []
    for i, s in enumerate(d.get("imageset", [])):
        images = [str((path.parent / im).resolve()) if not Path(im).is_absolute() else im
                  for im in s.get("images", [])]
        imagesets.append({"images": images, "single_file_indices": s.get("single_file_indices"),
                          "type": s.get("__id__", "")})
    exps = []
    counts = {"beam": len(beams), "detector": len(detectors), "crystal": len(crystals),
              "imageset": len(imagesets)}
    for i, e in enumerate(d.get("experiment", [])):
        idx = {}
        for key, n in counts.items():
            v = e.get(key)
            if v is not None and (not isinstance(v, int) or not 0 <= v < n):
                raise InputError(f"{path}: experiment {i} refers to {key} {v!r}, which does not exist")
            idx[key] = v
        exps.append(Experiment(str(e.get("identifier", "")), idx["beam"], idx["detector"],
                               idx["crystal"], idx["imageset"]))
    if not exps:
        raise InputError(f"{path}: no experiments")
    return ExperimentList(exps, beams, detectors, crystals, imagesets, str(path))


# --------------------------------------------------------------------------- mapping

def s1_to_mm(panel, s1):
    """Intersection (mm in the panel plane, DIALS ``xyzcal.mm`` x, y) of rays s1, unbounded.

    Parameters
    ----------
    panel : geometry.Panel
    s1 : array (..., 3)

    Returns
    -------
    ndarray (..., 2)
        NaN where the ray runs parallel to or away from the panel plane.
    """
    s1 = np.asarray(s1, dtype=np.float64)
    d = np.stack([panel.fast_axis, panel.slow_axis, panel.origin_mm], axis=1)
    v = s1 @ np.linalg.inv(d).T
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = v[..., 2] > 0
        xy = v[..., :2] / v[..., 2:3]
    return np.where(ok[..., None], xy, np.nan)


def mm_to_px(panel, info, xy_mm):
    """DIALS mm → px mapping of a panel, with the parallax correction where DIALS uses one.

    dxtbx ``ParallaxCorrectedPxMmStrategy.to_pixel``: with r̂ the unit vector to
    the point, n the panel normal facing away from the sample, cos t = r̂·n,
    the mean absorption depth
    o = 1/μ − (t0/cos t + 1/μ)·exp(−μ t0 / cos t) shifts the point by
    (r̂·fast, r̂·slow)·o before dividing by the pixel size.

    Parameters
    ----------
    panel : geometry.Panel
    info : PanelInfo
    xy_mm : array (..., 2)

    Returns
    -------
    ndarray (..., 2)
    """
    xy = np.asarray(xy_mm, dtype=np.float64)
    if info is not None and info.parallax:
        f, s, o = panel.fast_axis, panel.slow_axis, panel.origin_mm
        r = o + xy[..., :1] * f + xy[..., 1:2] * s
        r = r / np.linalg.norm(r, axis=-1, keepdims=True)
        n = np.cross(f, s)
        if o @ n < 0:
            n = -n
        cos_t = r @ n
        mu, t0 = info.mu_per_mm, info.thickness_mm
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            att = 1.0 / mu - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
        xy = np.stack([xy[..., 0] + (r @ f) * att, xy[..., 1] + (r @ s) * att], axis=-1)
    return xy / np.asarray(panel.pixel_size_mm)


def s1_to_px(panel, info, s1):
    """Rays s1 → DIALS pixel coordinates (``xyzcal.px`` x, y), unbounded, parallax as DIALS."""
    return mm_to_px(panel, info, s1_to_mm(panel, s1))


def predict_s1(A, beam, hkl, method="rotate"):
    """Stills prediction of the diffracted ray of Miller indices.

    Parameters
    ----------
    A : array (3, 3)
        q = A·h (Å⁻¹).
    beam : geometry.Beam
        Direction and wavelength (s0 = −direction/λ).
    hkl : array (n, 3)
    method : {"rotate", "rescale"}
        ``rotate``: q is rotated about q × s0 onto the Ewald sphere (the
        smallest rotation, DIALS' stills Δψ predictor), s1 = s0 + R q.
        ``rescale``: s1 = (s0 + q) scaled to length |s0|.

    Returns
    -------
    ndarray (n, 3)
    """
    s0 = beam.s0()
    k = np.linalg.norm(s0)
    q = np.asarray(hkl, dtype=np.float64) @ np.asarray(A, dtype=np.float64).T
    if method == "rescale":
        s1 = s0 + q
        return s1 * (k / np.linalg.norm(s1, axis=-1, keepdims=True))
    if method != "rotate":
        raise InputError(f"prediction method {method!r}: use 'rotate' or 'rescale'")
    u = s0 / k
    qn = np.linalg.norm(q, axis=-1, keepdims=True)
    perp = q - (q @ u)[..., None] * u
    w = perp / np.linalg.norm(perp, axis=-1, keepdims=True)
    cos_a = np.clip(-qn / (2 * k), -1, 1)
    sin_a = np.sqrt(1 - cos_a ** 2)
    return s0 + qn * (cos_a * u + sin_a * w)
