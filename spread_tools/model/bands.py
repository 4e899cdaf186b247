"""Channel-banded channel weights: each pixel keeps only its contiguous band of non-negligible channels.

A pixel diffracts only in the few channels where the Ewald sphere crosses its
reflection, so most of the dense ``w[p, c]`` (n_pix × n_chan) is zero or negligible.
:class:`ChannelBands` stores, for every pixel p, the channels
``lo[p] : lo[p] + length[p]`` only; memory and time then follow the signal, not the
spectrum's length.

The cut (``rtol``, a relative tolerance on λ)
----------------------------------------------
Channels are dropped from the two ends of a pixel's band while the dropped weight
(plus a rigorous bound on the weight of the channels the analytic window never
evaluated, see :mod:`spread_tools.model.kernels.bands_cpu`) stays within
``rtol · Σ_c w[p, c]``; the weights kept are the dense ones bit for bit. The
Bragg part of λ_p = G Σ_c w[p, c] I(h, E_c) + bg_p then changes by at most
``rtol · G Σ_c w[p, c] · max_c I``, so for any scale and background

    |Δλ_p| / λ_p ≤ rtol · max_c I(h, E_c) / min_c I(h, E_c)

(the ratio over the pixel's channels is ~1 for a refinement across an edge: only the
sites' anomalous terms change with energy). The default
:data:`DEFAULT_RTOL` = 1e-7 keeps |Δλ|/λ below 1e-6 unless I varies more than
tenfold across a pixel's band.

The floor (``floor``)
---------------------
Most pixels of a shoebox lie in the far tails of its spot: their whole weight is many
orders of magnitude below the spot's, yet the per-pixel cut keeps a channel or two for
each. A pixel whose weight Σ_c w[p, c] is below ``floor`` × that of the brightest pixel
of its shoebox keeps no band. Its λ then changes by at most ``floor`` × the brightest
pixel's Bragg part (× max I / min I), so with the default :data:`DEFAULT_FLOOR` = 1e-9
|Δλ|/λ < 1e-6 wherever the spot's brightest Bragg part is below 1000 × the background of
the pixel; whatever the spot, such a pixel carries less than floor² × (1 + peak/background)
of the brightest pixel's Fisher information on any parameter, so it cannot move a
refined value by a visible fraction of σ (``benchmarks/bench_s1.py --compare-exact``
measures it). ``floor = 0`` switches it off.

``rtol = 0`` with ``floor = 0`` drops exact zeros only: every stored value is the dense
float32 weight bit for bit, and λ is the dense result.

Layout
------
``lo``, ``length`` uint16 (n_pix,); ``sb_offset`` int64 (n_sb+1,): the values of
shoebox k start at ``sb_offset[k]`` and follow its pixels in order; ``values``
float32 (``sb_offset[-1]``,), on the host (or on the GPU for the CUDA backend).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.errors import InputError

__all__ = ["DEFAULT_RTOL", "DEFAULT_FLOOR", "ChannelBands", "check_rtol", "check_floor", "bands_from_dense",
           "build_bands"]

#: Default cut: |Δλ|/λ ≤ 1e-7 · max I / min I over a pixel's channels.
DEFAULT_RTOL = 1e-7
#: Default floor: no band for a pixel below 1e-9 of its shoebox's brightest pixel.
DEFAULT_FLOOR = 1e-9
#: Most channels a band index (uint16) can address.
MAX_CHANNELS = 65535


def check_rtol(rtol, name="band_rtol"):
    """The cut as a float in [0, 0.1]; InputError naming ``name`` otherwise."""
    try:
        r = float(rtol)
    except (TypeError, ValueError):
        raise InputError(f"{name}: '{rtol}' is not a number") from None
    if not (0.0 <= r <= 0.1):
        raise InputError(f"{name}: {rtol} must be between 0 (exact dense result) and 0.1")
    return r


def check_floor(floor, name="band_floor"):
    """The floor as a float in [0, 1e-3]; InputError naming ``name`` otherwise."""
    try:
        r = float(floor)
    except (TypeError, ValueError):
        raise InputError(f"{name}: '{floor}' is not a number") from None
    if not (0.0 <= r <= 1e-3):
        raise InputError(f"{name}: {floor} must be between 0 (no floor) and 1e-3")
    return r


@dataclasses.dataclass
class ChannelBands:
    """Channel weights stored as one band of channels per pixel.

    Attributes
    ----------
    n_chan : int
        Channels of the spectrum grid.
    lo, length : uint16 (n_pix,)
        First channel and number of channels of every pixel's band.
    sb_offset : int64 (n_sb+1,)
        Start of each shoebox's values in ``values``.
    values : float32 (n_values,)
        The weights inside the bands (host array, or a CUDA device array).
    rtol : float
        The cut they were made with.
    floor : float
        The floor they were made with.
    stats : dict
        Build diagnostics.
    """

    n_chan: int
    lo: np.ndarray
    length: np.ndarray
    sb_offset: np.ndarray
    values: object
    rtol: float
    #: The floor they were made with (0: none).
    floor: float = 0.0
    #: Build diagnostics (channels evaluated, pixels evaluated over every channel).
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def n_pix(self):
        """Number of pixels."""
        return len(self.lo)

    @property
    def n_values(self):
        """Number of stored weights."""
        return int(self.sb_offset[-1])

    def index_bytes(self):
        """Bytes of the band index (lo, length, sb_offset)."""
        return int(self.lo.nbytes + self.length.nbytes + self.sb_offset.nbytes)

    def value_bytes(self):
        """Bytes of the stored weights."""
        return 4 * self.n_values

    def dense_bytes(self):
        """Bytes the same weights take dense (float32 n_pix × n_chan)."""
        return 4 * self.n_pix * self.n_chan

    def host_values(self):
        """The values as a host array (copied from the device when needed)."""
        v = self.values
        return v.copy_to_host() if hasattr(v, "copy_to_host") else v

    def to_dense(self, pixel_offset):
        """Dense float32 (n_pix, n_chan), zero outside the bands."""
        from spread_tools.model.kernels import bands_cpu
        w = np.empty((self.n_pix, self.n_chan), np.float32)
        if self.n_pix:
            bands_cpu.unpack_dense(self.host_values(), np.asarray(pixel_offset, np.int64), self.lo, self.length,
                                   self.sb_offset, w)
        return w


def _sb_offsets(pixel_offset, lo, length):
    from spread_tools.model.kernels import bands_cpu
    n_val, _, _ = bands_cpu.shoebox_sizes(pixel_offset, lo, length)
    return np.concatenate([[0], np.cumsum(n_val)]).astype(np.int64)


def bands_from_dense(w, pixel_offset, rtol=DEFAULT_RTOL, floor=0.0):
    """Bands of dense weights (no screen: only the cut and the floor).

    Parameters
    ----------
    w : float32 (n_pix, n_chan)
    pixel_offset : int (n_sb+1,)
    rtol : float
        The cut (module docstring).
    floor : float
        The floor (module docstring).

    Returns
    -------
    ChannelBands
    """
    from spread_tools.model.kernels import bands_cpu
    rtol = check_rtol(rtol)
    floor = check_floor(floor)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise InputError(f"pixel model: w must be 2-D (n_pix, n_chan), got shape {w.shape}")
    n_pix, n_chan = w.shape
    if n_chan > MAX_CHANNELS:
        raise InputError(f"pixel model: {n_chan} channels, at most {MAX_CHANNELS}")
    off = np.ascontiguousarray(pixel_offset, dtype=np.int64)
    lo = np.zeros(n_pix, np.uint16)
    length = np.zeros(n_pix, np.uint16)
    total = np.zeros(n_pix)
    if n_pix:
        bands_cpu.bands_from_dense(w, off, rtol, lo, length, total)
        if floor > 0:
            bands_cpu.apply_floor(off, total, floor, lo, length)
    sb_off = _sb_offsets(off, lo, length)
    values = np.empty(int(sb_off[-1]), np.float32)
    if n_pix:
        bands_cpu.pack_dense(w, off, lo, length, sb_off, values)
    return ChannelBands(n_chan, lo, length, sb_off, values, rtol, floor)


def build_bands(kin, n_pix, n_chan, oversample=1, rtol=DEFAULT_RTOL, backend="cpu", floor=0.0):
    """Bands of a dataset's channel weights, computed directly (never dense).

    Parameters
    ----------
    kin : dict
        Kernel inputs (:func:`spread_tools.model.pixel.kernel_inputs`).
    n_pix, n_chan : int
    oversample : int
    rtol : float
        The cut (module docstring).
    backend : {"cpu", "cuda"}
        ``"cuda"`` leaves ``values`` on the GPU.
    floor : float
        The floor (module docstring).

    Returns
    -------
    ChannelBands
    """
    from spread_tools.model.pixel import _CW_ORDER
    rtol = check_rtol(rtol)
    floor = check_floor(floor)
    if n_chan > MAX_CHANNELS:
        raise InputError(f"pixel model: {n_chan} channels, at most {MAX_CHANNELS}")
    off = kin["pix_off"]
    lo = np.zeros(n_pix, np.uint16)
    length = np.zeros(n_pix, np.uint16)
    evaluated = np.zeros(n_pix, np.uint16)
    total = np.zeros(n_pix)
    n_floor = 0
    n_sb = len(kin["sb_lat"])
    if backend == "cuda":
        from spread_tools.model.kernels import bands_cuda
        return bands_cuda.build_bands(kin, n_pix, n_chan, oversample, rtol, floor)
    from spread_tools.model.kernels import bands_cpu
    args = [kin[name] for name in _CW_ORDER]
    if n_sb and n_pix:
        bands_cpu.band_lengths(*args, oversample, rtol, floor, lo, length, evaluated, total)
        if floor > 0:
            n_floor = int(bands_cpu.apply_floor(off, total, floor, lo, length))
    del total
    sb_off = _sb_offsets(off, lo, length)
    values = np.empty(int(sb_off[-1]), np.float32)
    if n_sb and n_pix:
        bands_cpu.band_values(*args, oversample, lo, length, sb_off, values)
    stats = {"channels_evaluated": int(evaluated.sum(dtype=np.int64)),
             "pixels_all_channels": int(np.sum(evaluated == n_chan)), "pixels_floored": n_floor}
    return ChannelBands(n_chan, lo, length, sb_off, values, rtol, floor, stats)
