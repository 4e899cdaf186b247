"""Spectra for DIALS imports: ``.lam`` CSV, HDF5 per-shot spectra, photon-conserving rebinning.

* ``.lam``: CSV text with one header line (e.g. ``wavelength,weight``), then
  rows ``wavelength_a, weight`` (comma or blank separated; the diffBragg/LS49
  format). Weights are photons per sample (relative or absolute).
* HDF5: ``weight`` (n_shot, n) or (n,), and either ``energy_ev`` or
  ``wavelength_a``, (n,) shared or (n_shot, n). ``file.h5:ROW`` picks a row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.geometry import HC_EV_A

__all__ = ["Spectrum", "read_lam", "read_spectrum", "rebin_spectrum", "channel_grid"]


@dataclasses.dataclass
class Spectrum:
    """A spectrum: increasing energies (eV) and photons per sample."""

    energy_ev: np.ndarray
    weight: np.ndarray
    source: str = ""

    def __post_init__(self):
        e = np.asarray(self.energy_ev, dtype=np.float64).ravel()
        w = np.asarray(self.weight, dtype=np.float64).ravel()
        where = self.source or "spectrum"
        if e.shape != w.shape or e.size == 0:
            raise InputError(f"{where}: energies and weights differ in length or are empty")
        if not (np.all(np.isfinite(e)) and np.all(np.isfinite(w))):
            raise InputError(f"{where}: NaN or infinite values")
        if np.any(e <= 0):
            raise InputError(f"{where}: wavelengths/energies must be positive")
        if np.any(w < 0):
            raise InputError(f"{where}: negative weights (row {int(np.argmax(w < 0)) + 1})")
        if w.sum() <= 0:
            raise InputError(f"{where}: all weights are zero")
        order = np.argsort(e, kind="stable")
        e, w = e[order], w[order]
        if np.any(np.diff(e) <= 0):
            raise InputError(f"{where}: repeated wavelength/energy values")
        self.energy_ev, self.weight = e, w


def read_lam(path):
    """Read a ``.lam`` spectrum: a header line, then ``wavelength_a, weight`` rows.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Spectrum
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read spectrum ({exc})") from None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: empty spectrum file")

    def split(ln):
        return ln.replace(",", " ").split()
    try:
        [float(x) for x in split(lines[0])]
        raise InputError(f"{path}: missing header line (expected e.g. 'wavelength,weight' "
                         f"before the rows of wavelength in Å and weight)")
    except ValueError:
        pass
    rows = []
    for k, ln in enumerate(lines[1:], start=2):
        parts = split(ln)
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            raise InputError(f"{path}: line {k} is not two numbers: {ln.strip()[:40]!r}") from None
        if len(vals) < 2:
            raise InputError(f"{path}: line {k} has {len(vals)} column(s), expected wavelength and weight")
        rows.append(vals[:2])
    if not rows:
        raise InputError(f"{path}: no spectrum rows after the header")
    lam, w = np.asarray(rows).T
    if np.any(lam <= 0):
        raise InputError(f"{path}: wavelengths must be positive (Å)")
    if np.any(w < 0):
        raise InputError(f"{path}: negative weight at line {int(np.argmax(w < 0)) + 2}")
    return Spectrum(HC_EV_A / lam, w, str(path))


def read_spectrum(spec, experiment_index=0):
    """Read one shot's spectrum from ``FILE.lam``, ``FILE.h5`` or ``FILE.h5:ROW``.

    Parameters
    ----------
    spec : str or Path
    experiment_index : int
        Row of an HDF5 file when ``:ROW`` is not given.

    Returns
    -------
    Spectrum
    """
    spec = str(spec)
    row = None
    base = spec
    if ":" in spec and spec.rsplit(":", 1)[1].isdigit():
        base, r = spec.rsplit(":", 1)
        row = int(r)
    path = Path(base)
    if not path.is_file():
        raise InputError(f"{path}: no such spectrum file")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        if row is not None:
            raise InputError(f"{spec}: a row can only be chosen in an HDF5 spectrum file")
        return read_lam(path)
    from spread_tools.io.h5io import note_input, open_h5
    note_input(path)
    try:
        with open_h5(path, "HDF5 spectrum file") as h5:
            if "weight" not in h5 or not ("energy_ev" in h5 or "wavelength_a" in h5):
                raise InputError(f"{path}: HDF5 spectra need 'weight' and 'energy_ev' or 'wavelength_a'")
            w = np.asarray(h5["weight"][()], dtype=np.float64)
            key = "energy_ev" if "energy_ev" in h5 else "wavelength_a"
            x = np.asarray(h5[key][()], dtype=np.float64)
    except OSError as exc:
        raise InputError(f"{path}: damaged HDF5 spectrum file ({exc})") from None
    w2 = w.reshape(1, -1) if w.ndim == 1 else w
    i = row if row is not None else (experiment_index if len(w2) > 1 else 0)
    if w2.ndim != 2 or not 0 <= i < len(w2):
        raise InputError(f"{path}: no spectrum row {i} (weight has shape {w.shape})")
    xi = x if x.ndim == 1 else x[i]
    if xi.shape != w2[i].shape:
        raise InputError(f"{path}: '{key}' and 'weight' rows differ in length")
    if np.any(xi <= 0):
        raise InputError(f"{path}: '{key}' must be positive")
    energy = xi if key == "energy_ev" else HC_EV_A / xi
    return Spectrum(energy, w2[i], f"{path} row {i}")


def _edges(centres):
    """Bin edges around increasing centres: midpoints, ends mirrored (one centre: ±0.5 eV)."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = 0.5 * (c[1:] + c[:-1])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def rebin_spectrum(energy_ev, weight, channels_ev):
    """Rebin a sampled spectrum onto channels, conserving photons.

    Sample i carries ``weight[i]`` photons spread uniformly over its bin (edges at
    the midpoints between samples); channel c receives the photons of the part of
    each sample bin that overlaps its own bin (edges at the midpoints between
    channel energies). Photons outside the channels' span are lost (see the
    returned fraction).

    Parameters
    ----------
    energy_ev, weight : array (n,)
        Increasing sample energies and photons.
    channels_ev : array (m,)
        Increasing channel energies.

    Returns
    -------
    weight_c : ndarray (m,)
    kept : float
        Fraction of the photons that fell inside the channels.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    ch = np.asarray(channels_ev, dtype=np.float64)
    if len(e) == 1:      # a single line (monochromatic beam): all photons in the channel holding it
        dst = _edges(ch)
        out = np.zeros(len(ch))
        k = int(np.searchsorted(dst, e[0], side="right")) - 1
        if 0 <= k < len(ch):
            out[k] = w[0]
        return out, (1.0 if 0 <= k < len(ch) and w[0] > 0 else 0.0)
    src = _edges(e)
    dst = _edges(channels_ev)
    lo = np.maximum(src[:-1, None], dst[None, :-1])
    hi = np.minimum(src[1:, None], dst[None, 1:])
    frac = np.clip(hi - lo, 0, None) / (src[1:] - src[:-1])[:, None]
    out = w @ frac
    total = w.sum()
    return out, (float(out.sum() / total) if total > 0 else 0.0)


def channel_grid(min_ev, max_ev, step_ev):
    """Channel energies min, min+step, ..., up to max (:func:`spectra.channel_grid`), checked."""
    if not step_ev > 0:
        raise InputError(f"parameter channels.step_ev: must be positive, got {step_ev}")
    if max_ev < min_ev:
        raise InputError(f"parameters channels.min_ev/max_ev: max {max_ev} < min {min_ev}")
    from spread_tools.model.spectra import channel_grid as grid
    return grid(float(min_ev), float(max_ev), float(step_ev))
