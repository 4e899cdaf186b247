"""The pixel model: channel weights, expected counts λ, Poisson NLL and its gradients.

For pixel p of shoebox k (lattice j, Miller index h0, ``docs/formats.md``)::

    w[p, c] = r_e² · φ_jc · P_p · ω_p · (1/n_dom) Σ_d L(p, c, d)                (float32)
    λ_p     = G_j Σ_c w[p, c] I(h0, E_c) + exp(b0 + b1 x̂ + b2 ŷ)
    NLL     = Σ_{p unmasked} (λ_p − k_p ln λ_p)

The geometry, mosaic model and spectra are fixed during refinement, so ``w`` is
computed once; every evaluation then reads it once (:class:`PixelModel`). The model
keeps ``w`` as channel bands (:mod:`spread_tools.model.bands`): per pixel only the
contiguous channels whose weight is not negligible under the cut ``band_rtol`` (a
relative tolerance on λ; 0 keeps the exact dense result), computed directly from the
closed-form centre and curvature of the lattice transform (never dense), so memory
and time follow the signal, not the spectrum's length. :func:`channel_weights` gives
the dense weights (the simulator's path); :func:`direct_lambda` recomputes λ from
scratch for a check.

Typical use (refinement)::

    pm = PixelModel.from_dataset(ds, backend="auto")
    I = ...                                   # (pm.n_h, n_chan) intensities of pm.hkl at the channels
    nll, dI, dG, dbg = pm.nll_and_gradients(I, G, bg)

Backends: ``"cpu"`` (Numba, threads: :mod:`spread_tools.model.kernels.bands_cpu`),
``"cuda"`` (Numba CUDA: :mod:`spread_tools.model.kernels.bands_cuda`), ``"auto"`` (cuda
when ``numba.cuda.is_available()``, else cpu). Results are deterministic: the
same inputs give bit-identical outputs on every call (no atomics; per-shoebox
partial sums are combined in a fixed order).
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.geometry import (
    HC_EV_A,
    R_E_A,
    Detector,
    mosaic_rotations,
    pixel_to_lab_mm,
    polarization_factor,
    solid_angle,
)
from spread_tools.model.kernels import GAUSS_SHAPE_CONST

__all__ = ["resolve_backend", "channel_weights", "PixelModel", "pixel_model", "nll_and_gradients",
           "direct_lambda", "unique_hkl", "index_of_hkl", "kernel_inputs"]


def resolve_backend(backend="auto"):
    """``"cpu"`` or ``"cuda"`` for a backend name (``"auto"``: cuda when a GPU is usable).

    Raises
    ------
    InputError
        Unknown name, or ``"cuda"`` without a usable GPU (or the simulator).
    """
    backend = str(backend).lower()
    if backend not in ("auto", "cpu", "cuda"):
        raise InputError(f"backend: '{backend}' is not one of auto, cpu, cuda")
    if backend == "cpu":
        return "cpu"
    try:
        from numba import cuda
        ok = bool(cuda.is_available())
    except Exception:  # numba-cuda missing or broken driver
        ok = False
    if backend == "auto":
        return "cuda" if ok else "cpu"
    if not ok:
        raise InputError("backend: 'cuda' asked for but no CUDA GPU is available (install spread_tools[cuda])")
    return "cuda"


def unique_hkl(miller_index):
    """Distinct Miller indices and the index of each row into them.

    Parameters
    ----------
    miller_index : int array (n, 3)

    Returns
    -------
    hkl : int32 (n_h, 3)
        Distinct indices, sorted lexicographically.
    index : int64 (n,)
        ``hkl[index] == miller_index``.
    """
    mi = np.asarray(miller_index, dtype=np.int64).reshape(-1, 3)
    if len(mi) == 0:
        return np.zeros((0, 3), np.int32), np.zeros(0, np.int64)
    hkl, inv = np.unique(mi, axis=0, return_inverse=True)
    return hkl.astype(np.int32), inv.reshape(-1).astype(np.int64)


def index_of_hkl(hkl, miller_index, where="miller_index"):
    """Row of ``hkl`` holding each Miller index.

    Parameters
    ----------
    hkl : int (n_h, 3)
        Reference list (e.g. the global distinct indices of all MPI ranks, or SF-cache rows).
    miller_index : int (n, 3)
    where : str
        Name used in the error message.

    Returns
    -------
    int64 (n,)

    Raises
    ------
    InputError
        When a Miller index is not in ``hkl``.
    """
    ref = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    mi = np.asarray(miller_index, dtype=np.int64).reshape(-1, 3)
    if len(mi) == 0:
        return np.zeros(0, np.int64)
    lo = min(ref.min(initial=0), mi.min())
    span = max(ref.max(initial=0), mi.max()) - lo + 1

    def key(a):
        return ((a[:, 0] - lo) * span + (a[:, 1] - lo)) * span + (a[:, 2] - lo)
    kref = key(ref)
    order = np.argsort(kref, kind="stable")
    kq = key(mi)
    pos = np.searchsorted(kref[order], kq)
    pos = np.minimum(pos, max(len(order) - 1, 0))
    found = (len(order) > 0) & (kref[order][pos] == kq) if len(order) else np.zeros(len(kq), bool)
    if not np.all(found):
        bad = mi[np.argmin(found)]
        raise InputError(f"{where}: Miller index {tuple(int(v) for v in bad)} is not in the hkl list")
    return order[pos].astype(np.int64)


def kernel_inputs(ds):
    """Flat float64/int64 arrays of a dataset in the kernels' conventions (:mod:`spread_tools.model.kernels`).

    Returns
    -------
    dict
        minv, dom_off, s0hat, pol_n, pol_f, nabc, phi, porig, pfast, pslow, pnorm, ppix,
        pix_off, bbox, sb_lat, sb_panel, h0, inv_lam.
    """
    n_lat = ds.n_lattices
    minv, dom_off = [], [0]
    for j in range(n_lat):
        R = mosaic_rotations(float(ds.mosaic_spread_deg[j]), int(ds.n_domains[j]))
        A = np.asarray(ds.A[j], dtype=np.float64)
        if abs(np.linalg.det(A)) < 1e-300:
            raise InputError(f"{ds.path}: lattice {j} has a singular A matrix")
        minv.append(np.linalg.inv(R @ A))
        dom_off.append(dom_off[-1] + len(R))
    bd = np.asarray(ds.beam_direction, dtype=np.float64).reshape(-1, 3)
    s0hat = -bd / np.linalg.norm(bd, axis=1, keepdims=True)
    pol_n = np.asarray(ds.polarization_normal, dtype=np.float64).reshape(-1, 3)
    pol_n = pol_n / np.linalg.norm(pol_n, axis=1, keepdims=True)
    fast = np.asarray(ds.fast_axis, dtype=np.float64).reshape(-1, 3)
    slow = np.asarray(ds.slow_axis, dtype=np.float64).reshape(-1, 3)
    fast = fast / np.linalg.norm(fast, axis=1, keepdims=True)
    slow = slow / np.linalg.norm(slow, axis=1, keepdims=True)
    # fast × slow, not normalised: |fast × slow| = sin(angle) makes ω exact for non-orthogonal axes
    normal = np.cross(fast, slow)
    c = np.ascontiguousarray
    return {
        "minv": c(np.concatenate(minv) if minv else np.zeros((0, 3, 3))),
        "dom_off": np.asarray(dom_off, dtype=np.int64),
        "s0hat": c(s0hat), "pol_n": c(pol_n),
        "pol_f": c(np.asarray(ds.polarization_fraction, dtype=np.float64).reshape(-1)),
        "nabc": c(np.asarray(ds.domain_size_cells, dtype=np.float64).reshape(-1, 3)),
        "phi": c(np.asarray(ds.spectrum_weight, dtype=np.float64).reshape(n_lat, -1)),
        "porig": c(np.asarray(ds.origin_mm, dtype=np.float64).reshape(-1, 3)),
        "pfast": c(fast), "pslow": c(slow), "pnorm": c(normal),
        "ppix": c(np.asarray(ds.pixel_size_mm, dtype=np.float64).reshape(-1, 2)),
        "pix_off": c(np.asarray(ds.pixel_offset, dtype=np.int64)),
        "bbox": c(np.asarray(ds.sb_bbox, dtype=np.int64).reshape(-1, 4)),
        "sb_lat": c(np.asarray(ds.sb_lattice, dtype=np.int64)),
        "sb_panel": c(np.asarray(ds.sb_panel, dtype=np.int64)),
        "h0": c(np.asarray(ds.sb_miller_index, dtype=np.float64).reshape(-1, 3)),
        "inv_lam": c(np.asarray(ds.energy_ev, dtype=np.float64) / HC_EV_A),
    }


_CW_ORDER = ("minv", "dom_off", "s0hat", "pol_n", "pol_f", "nabc", "phi", "porig", "pfast", "pslow",
             "pnorm", "ppix", "pix_off", "bbox", "sb_lat", "sb_panel", "h0", "inv_lam")


def _check_oversample(oversample):
    os_ = int(oversample)
    if os_ < 1 or os_ != oversample:
        raise InputError(f"oversample: {oversample} must be a positive integer")
    return os_


def _cuda_channel_weights(kin, n_pix, n_chan, oversample):
    from numba import cuda

    from spread_tools.model.kernels import cuda as ck
    w_d = cuda.device_array(max(1, n_pix * n_chan), dtype=np.float32)
    n_sb = len(kin["sb_lat"])
    if n_sb and n_pix:
        args = [ck.to_device(kin[name]) for name in _CW_ORDER]
        ck.channel_weights[n_sb, ck.TPB](*args, oversample, w_d, n_chan, 1)
        cuda.synchronize()
    return w_d


def channel_weights(ds, backend="auto", oversample=1):
    """Channel weights w[p, c] of every pixel of a dataset (``docs/formats.md``).

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
        Geometry, lattices, spectra and shoeboxes (counts are not used).
    backend : {"auto", "cpu", "cuda"}
    oversample : int
        Sub-pixels per pixel edge (``oversample²`` sub-pixel centres per pixel,
        each with its own direction, solid angle and polarization).

    Returns
    -------
    ndarray float32 (n_pix, n_chan)
        Host array, pixel-major (pixels in dataset order).
    """
    oversample = _check_oversample(oversample)
    backend = resolve_backend(backend)
    kin = kernel_inputs(ds)
    n_pix, n_chan = int(ds.n_pixels), int(ds.n_channels)
    if backend == "cuda":
        w_d = _cuda_channel_weights(kin, n_pix, n_chan, oversample)
        return w_d.copy_to_host()[:n_pix * n_chan].reshape(n_pix, n_chan)
    from spread_tools.model.kernels import cpu
    w = np.zeros((n_pix, n_chan), dtype=np.float32)
    if len(kin["sb_lat"]):
        cpu.channel_weights(*[kin[name] for name in _CW_ORDER], oversample, w)
    return w


class PixelModel:
    """Precomputed pixel model of one dataset (or one MPI rank's part of it), channel-banded.

    The channel weights are kept as one band of channels per pixel
    (:class:`spread_tools.model.bands.ChannelBands`): only the channels whose weight is not
    negligible under the cut ``band_rtol`` (a relative tolerance on λ, see
    :mod:`spread_tools.model.bands`; 0 keeps the exact dense result). Counts and mask
    are fixed at construction (per-shoebox constants of the NLL are precomputed from them).

    Parameters
    ----------
    w : ndarray float32 (n_pix, n_chan), or ChannelBands
        Dense weights (cut into bands here) or bands already made (their own cut is kept).
    pixel_offset : int (n_sb+1,)
        Pixels of shoebox k are ``pixel_offset[k]:pixel_offset[k+1]``.
    bbox : int (n_sb, 4)
        x0, x1, y0, y1 of each shoebox (row-major pixels: slow outer, fast inner).
    sb_lattice : int (n_sb,)
        Lattice of each shoebox.
    sb_h_index : int (n_sb,)
        Row of ``hkl`` (and of I) of each shoebox.
    hkl : int (n_h, 3)
        Distinct Miller indices.
    counts : float32 (n_pix,)
        Observed photons.
    mask : bool (n_pix,)
        True = pixel used in the NLL.
    n_lattices : int, optional
        Number of lattices (default ``max(sb_lattice) + 1``).
    backend : {"auto", "cpu", "cuda"}
    band_rtol, band_floor : float
        The cut and the floor applied to dense ``w`` (defaults
        :data:`spread_tools.model.bands.DEFAULT_RTOL`, :data:`~spread_tools.model.bands.DEFAULT_FLOOR`).

    Attributes
    ----------
    n_pix, n_chan, n_sb, n_lat, n_h : int
    hkl, sb_h_index, sb_lattice, pixel_offset, bbox, counts, mask
        (``counts`` and ``mask`` are read-only copies.)
    bands : ChannelBands
    backend : str
        ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, w, pixel_offset, bbox, sb_lattice, sb_h_index, hkl, counts, mask, n_lattices=None,
                 backend="auto", band_rtol=None, band_floor=None):
        from spread_tools.model.bands import (
            DEFAULT_FLOOR,
            DEFAULT_RTOL,
            MAX_CHANNELS,
            ChannelBands,
            bands_from_dense,
        )
        self.backend = resolve_backend(backend)
        self.pixel_offset = np.ascontiguousarray(pixel_offset, dtype=np.int64)
        self.bbox = np.ascontiguousarray(np.asarray(bbox).reshape(-1, 4), dtype=np.int64)
        self.sb_lattice = np.ascontiguousarray(sb_lattice, dtype=np.int64)
        self.sb_h_index = np.ascontiguousarray(sb_h_index, dtype=np.int64)
        self.hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
        self.counts = np.array(counts, dtype=np.float32, copy=True).reshape(-1)
        self.mask = np.array(mask, dtype=np.bool_, copy=True).reshape(-1)
        self.counts.setflags(write=False)
        self.mask.setflags(write=False)
        self.n_sb = len(self.sb_lattice)
        self.n_pix = len(self.counts)
        self.n_h = len(self.hkl)
        self.n_lat = int(n_lattices) if n_lattices is not None else \
            (int(self.sb_lattice.max()) + 1 if self.n_sb else 0)
        if self.pixel_offset.shape != (self.n_sb + 1,) or self.pixel_offset[-1] != self.n_pix:
            raise InputError("pixel model: pixel_offset does not match the pixels")
        if self.mask.shape != (self.n_pix,):
            raise InputError("pixel model: mask does not match the pixels")
        if self.n_sb and (self.sb_h_index.min() < 0 or self.sb_h_index.max() >= self.n_h):
            raise InputError("pixel model: sb_h_index out of range of hkl")
        if self.n_sb and (self.sb_lattice.min() < 0 or self.sb_lattice.max() >= self.n_lat):
            raise InputError("pixel model: sb_lattice out of range")
        size = (self.bbox[:, 1] - self.bbox[:, 0]) * (self.bbox[:, 3] - self.bbox[:, 2])
        if self.n_sb and not np.array_equal(size, np.diff(self.pixel_offset)):
            raise InputError("pixel model: shoebox sizes (bbox) do not match pixel_offset")
        if isinstance(w, ChannelBands):
            bands = w
        else:
            w = np.asarray(w)
            if w.ndim != 2 or w.shape[0] != self.n_pix:
                raise InputError(f"pixel model: w has shape {w.shape}, expected ({self.n_pix}, n_chan)")
            bands = bands_from_dense(w, self.pixel_offset, DEFAULT_RTOL if band_rtol is None else band_rtol,
                                     DEFAULT_FLOOR if band_floor is None else band_floor)
        if bands.n_pix != self.n_pix or len(bands.sb_offset) != self.n_sb + 1:
            raise InputError("pixel model: channel bands do not match the pixels")
        if bands.n_chan > MAX_CHANNELS:
            raise InputError(f"pixel model: {bands.n_chan} channels, at most {MAX_CHANNELS}")
        self.n_chan = int(bands.n_chan)
        self.bands = bands
        self._setup_shoeboxes()
        self._dev = None
        if self.backend == "cuda":
            self._setup_cuda()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataset(cls, ds, backend="auto", oversample=1, hkl=None, band_rtol=None, band_floor=None,
                     per_shoebox=False):
        """Compute the channel bands of a dataset (never dense) and build its pixel model.

        Parameters
        ----------
        ds : spread_tools.io.dataset.Dataset
        backend : {"auto", "cpu", "cuda"}
        oversample : int
            Sub-pixels per pixel edge (see :func:`channel_weights`).
        hkl : int (n_h, 3), optional
            The Miller indices that the rows of I (and dI) refer to, e.g. one list
            shared by all MPI ranks; every shoebox's index must be in it. Default:
            the distinct Miller indices of the shoeboxes (:func:`unique_hkl`).
        band_rtol : float, optional
            The cut, a relative tolerance on λ (:mod:`spread_tools.model.bands`; default
            :data:`~spread_tools.model.bands.DEFAULT_RTOL`).
        band_floor : float, optional
            The floor relative to the shoebox's brightest pixel (default
            :data:`~spread_tools.model.bands.DEFAULT_FLOOR`); both 0: the exact dense result.
        per_shoebox : bool
            One row of I per shoebox (``hkl`` = the shoeboxes' Miller indices, repeated where
            lattices share a reflection), so that every lattice can have intensities of its
            own (the ``shuffle_channels`` control of S1). Not with ``hkl``.

        Returns
        -------
        PixelModel
        """
        from spread_tools.model.bands import DEFAULT_FLOOR, DEFAULT_RTOL, build_bands
        backend = resolve_backend(backend)
        oversample = _check_oversample(oversample)
        if per_shoebox:
            if hkl is not None:
                raise ValueError("from_dataset: per_shoebox and hkl exclude each other")
            hkl = np.asarray(ds.sb_miller_index, dtype=np.int32).reshape(-1, 3)
            sb_h = np.arange(len(hkl), dtype=np.int64)
        elif hkl is None:
            hkl, sb_h = unique_hkl(ds.sb_miller_index)
        else:
            hkl = np.asarray(hkl, dtype=np.int32).reshape(-1, 3)
            sb_h = index_of_hkl(hkl, ds.sb_miller_index, where=f"{ds.path}: shoeboxes/miller_index")
        rtol = DEFAULT_RTOL if band_rtol is None else band_rtol
        floor = DEFAULT_FLOOR if band_floor is None else band_floor
        bands = build_bands(kernel_inputs(ds), int(ds.n_pixels), int(ds.n_channels), oversample, rtol,
                            backend=backend, floor=floor)
        return cls(bands, ds.pixel_offset, ds.sb_bbox, ds.sb_lattice, sb_h, hkl, ds.counts, ds.mask,
                   n_lattices=ds.n_lattices, backend=backend)

    def _setup_shoeboxes(self):
        """Per-shoebox constants of the fixed counts and mask (:func:`bands_cpu.setup_shoeboxes`)."""
        from spread_tools.model.kernels import bands_cpu
        b = self.bands
        _, span_lo, span_len = bands_cpu.shoebox_sizes(self.pixel_offset, b.lo, b.length)
        self.span_lo = span_lo
        self.span_off = np.concatenate([[0], np.cumsum(span_len)]).astype(np.int64)
        n_act = bands_cpu.count_active(self.pixel_offset, b.length, self.counts, self.mask)
        self.act_off = np.concatenate([[0], np.cumsum(n_act)]).astype(np.int64)
        n = int(self.act_off[-1])
        heights = self.bbox[:, 3] - self.bbox[:, 2]
        self.row_off = np.concatenate([[0], np.cumsum(heights)]).astype(np.int64)
        self.row_full = np.zeros(int(self.row_off[-1]), np.uint8)
        self.wsum = np.zeros(int(self.span_off[-1]))
        # fixed shoebox ranges of the CPU pass (independent of the thread count) and scratch sizes
        self._n_chunks = max(1, min(self.n_sb, 256))
        edges = np.concatenate([[1], self.bbox[:, 1] - self.bbox[:, 0], heights])
        self._max_edge = int(edges.max())
        self._max_span = int(max(1, np.diff(self.span_off).max(initial=1)))
        self._max_active = int(max(1, np.diff(self.act_off).max(initial=1)))
        self.kmom = np.zeros((self.n_sb, 3))
        self.act_row = np.zeros(n, np.uint16)
        self.act_col = np.zeros(n, np.uint16)
        self.act_woff = np.zeros(n, np.int32)
        self.act_lo = np.zeros(n, np.uint16)
        self.act_len = np.zeros(n, np.uint16)
        self.act_k = np.zeros(n, np.float32)
        if self.n_sb:
            sizes = np.diff(b.sb_offset)
            if sizes.max(initial=0) >= 2 ** 31:
                raise InputError("pixel model: a shoebox with more than 2^31 channel weights")
            if max(np.max(self.bbox[:, 1] - self.bbox[:, 0]), np.max(self.bbox[:, 3] - self.bbox[:, 2])) >= 2 ** 16:
                raise InputError("pixel model: a shoebox wider or higher than 65535 pixels")
            bands_cpu.setup_shoeboxes(b.host_values(), b.lo, b.length, b.sb_offset, self.pixel_offset, self.bbox,
                                      self.counts, self.mask, self.span_lo, self.span_off, self.row_off,
                                      self.act_off, self.wsum, self.kmom, self.row_full, self.act_row,
                                      self.act_col, self.act_woff, self.act_lo, self.act_len, self.act_k)

    def _setup_cuda(self):
        from numba import cuda

        from spread_tools.model.kernels import bands_cuda as ck
        b = self.bands
        d = {}
        vals = b.values
        if not hasattr(vals, "copy_to_host"):
            vals = ck.to_device(vals if len(vals) else np.zeros(1, np.float32))
            b.values = vals
        d["values"] = vals
        for name in ("mask", "pixel_offset", "bbox", "sb_lattice", "sb_h_index", "span_lo", "span_off", "wsum",
                     "kmom", "act_off", "act_row", "act_col", "act_woff", "act_lo", "act_len", "act_k"):
            d[name] = ck.to_device(getattr(self, name))
        d["lo"] = ck.to_device(b.lo)
        d["length"] = ck.to_device(b.length)
        d["sb_offset"] = ck.to_device(b.sb_offset)
        # CSR of shoeboxes per distinct h and per lattice, in shoebox order (fixed-order reductions)
        for key, idx, n in (("h", self.sb_h_index, self.n_h), ("lat", self.sb_lattice, self.n_lat)):
            order = np.argsort(idx, kind="stable").astype(np.int64)
            off = np.concatenate([[0], np.cumsum(np.bincount(idx, minlength=n))]).astype(np.int64)
            d[key + "_order"] = ck.to_device(order)
            d[key + "_off"] = ck.to_device(off)
        nsb = max(1, self.n_sb)
        d["nll_sb"] = cuda.device_array(nsb, np.float64)
        d["dG_sb"] = cuda.device_array((nsb, 1), np.float64)
        d["dbg_sb"] = cuda.device_array((nsb, 3), np.float64)
        d["dI_span"] = cuda.device_array(max(1, int(self.span_off[-1])), np.float64)
        d["dI"] = cuda.device_array((max(1, self.n_h), self.n_chan), np.float64)
        d["dG"] = cuda.device_array((max(1, self.n_lat), 1), np.float64)
        d["nll"] = cuda.device_array(1, np.float64)
        self._dev = d

    # ------------------------------------------------------------------ properties
    @property
    def w(self):
        """Dense channel weights, host float32 (n_pix, n_chan), zero outside the bands.

        Made on every access (n_pix × n_chan × 4 bytes): for checks and small problems.
        """
        return self.bands.to_dense(self.pixel_offset)

    @property
    def band_rtol(self):
        """The cut of the bands (relative tolerance on λ)."""
        return self.bands.rtol

    @property
    def band_floor(self):
        """The floor of the bands (relative to the shoebox's brightest pixel)."""
        return self.bands.floor

    @property
    def pixel_shoebox(self):
        """Shoebox of every pixel, int64 (n_pix,)."""
        return np.repeat(np.arange(self.n_sb, dtype=np.int64), np.diff(self.pixel_offset))

    def pixel_offsets_xy(self):
        """(x̂, ŷ): pixel-centre offsets from the shoebox centre in pixels, float64 (n_pix,) each."""
        sb = self.pixel_shoebox
        loc = np.arange(self.n_pix, dtype=np.int64) - self.pixel_offset[sb]
        x0, x1, y0, y1 = (self.bbox[sb, i] for i in range(4))
        width = x1 - x0
        xh = (x0 + loc % width) + 0.5 - 0.5 * (x0 + x1)
        yh = (y0 + loc // width) + 0.5 - 0.5 * (y0 + y1)
        return xh.astype(np.float64), yh.astype(np.float64)

    def storage_bytes(self):
        """Bytes held for the channel weights, by part (dict).

        ``values`` (the band weights), ``band_index`` (lo, length, shoebox offsets),
        ``active`` (the list of active pixels and their bands), ``shoebox_constants``
        (Σ_unmasked w per span channel, count moments, spans), ``total``, and for
        comparison ``dense`` (float32 n_pix × n_chan).
        """
        b = self.bands
        active = sum(getattr(self, n).nbytes for n in ("act_off", "act_row", "act_col", "act_woff", "act_lo",
                                                        "act_len", "act_k"))
        const = (self.wsum.nbytes + self.kmom.nbytes + self.span_lo.nbytes + self.span_off.nbytes
                 + self.row_off.nbytes + self.row_full.nbytes)
        out = {"values": b.value_bytes(), "band_index": b.index_bytes(), "active": int(active),
               "shoebox_constants": int(const)}
        out["total"] = int(sum(out.values()))
        out["dense"] = b.dense_bytes()
        return out

    def pass_bytes(self):
        """Bytes one :meth:`nll_and_gradients` pass reads (dict, by part).

        ``values``: the band weights of the active pixels (unmasked, k ≠ 0, non-empty
        band), the only weights read; ``active``: their index; ``mask``: one byte per
        pixel (the background sums); ``shoebox``: per-shoebox constants and parameters;
        ``total``.
        """
        n_act = int(self.act_off[-1])
        vals = 4 * int(self.act_len.sum(dtype=np.int64))
        partial = np.flatnonzero(self.row_full == 0)
        n_mask = int(np.sum(np.diff(self.row_off)[np.searchsorted(self.row_off, partial, side="right") - 1]))
        out = {"values": vals, "active": n_act * (2 + 2 + 4 + 2 + 2 + 4),
               "mask": n_mask if self.backend == "cpu" else self.n_pix,
               "shoebox": int(self.wsum.nbytes + self.kmom.nbytes + self.row_full.nbytes
                              + self.n_sb * (8 * 4 + 8 * 3 + 8 * 4 + 8 * 3 + 8 * 2))}
        out["total"] = int(sum(out.values()))
        return out

    # ------------------------------------------------------------------ evaluation
    def _check_params(self, I, G, bg):
        I = np.ascontiguousarray(I, dtype=np.float64)
        G = np.ascontiguousarray(G, dtype=np.float64).reshape(-1)
        bg = np.ascontiguousarray(bg, dtype=np.float64)
        if I.shape != (self.n_h, self.n_chan):
            raise InputError(f"pixel model: I has shape {I.shape}, expected {(self.n_h, self.n_chan)}")
        if G.shape != (self.n_lat,):
            raise InputError(f"pixel model: G has shape {G.shape}, expected {(self.n_lat,)}")
        if bg.shape != (self.n_sb, 3):
            raise InputError(f"pixel model: bg has shape {bg.shape}, expected {(self.n_sb, 3)}")
        return I, G, bg

    def _run(self, I, G, bg, want_grad):
        I, G, bg = self._check_params(I, G, bg)
        if self.backend == "cuda":
            return self._run_cuda(I, G, bg, want_grad)
        from spread_tools.model.kernels import bands_cpu
        nll_sb = np.empty(self.n_sb)
        dG_sb = np.empty(self.n_sb)
        dbg = np.zeros((self.n_sb, 3))
        dI_span = np.empty(int(self.span_off[-1]) if want_grad else 0)
        b = self.bands
        bands_cpu.model_pass(b.values, b.sb_offset, self.mask, self.pixel_offset, self.bbox, self.sb_lattice,
                             self.sb_h_index, self.span_lo, self.span_off, self.wsum, self.kmom, self.row_off,
                             self.row_full, self.act_off, self.act_row, self.act_col, self.act_woff, self.act_lo, self.act_len,
                             self.act_k, I, G, bg, want_grad, self._n_chunks, self._max_edge, self._max_span,
                             self._max_active, nll_sb, dG_sb, dbg, dI_span)
        nll, dG, dI = bands_cpu.reduce_spans(nll_sb, dG_sb, dI_span, self.sb_lattice, self.sb_h_index,
                                             self.span_lo, self.span_off, self.n_lat, self.n_h, self.n_chan,
                                             want_grad)
        return nll, dI, dG, dbg

    def _run_cuda(self, I, G, bg, want_grad):
        from numba import cuda

        from spread_tools.model.kernels import bands_cuda as ck
        d = self._dev
        if self.n_sb == 0:
            z = np.zeros
            return 0.0, z((self.n_h, self.n_chan)), z(self.n_lat), z((0, 3))
        I_d = cuda.to_device(I if I.size else np.zeros((1, self.n_chan)))
        G_d = cuda.to_device(G if G.size else np.zeros(1))
        bg_d = cuda.to_device(bg)
        ck.model_pass[self.n_sb, ck.TPB](
            d["values"], d["sb_offset"], d["mask"], d["pixel_offset"], d["bbox"], d["sb_lattice"], d["sb_h_index"],
            d["span_lo"], d["span_off"], d["wsum"], d["kmom"], d["act_off"], d["act_row"], d["act_col"], d["act_woff"],
            d["act_lo"], d["act_len"], d["act_k"], I_d, G_d, bg_d, want_grad, d["nll_sb"], d["dG_sb"], d["dbg_sb"],
            d["dI_span"])
        ck.sum_fixed_order[1, ck.TPB](d["nll_sb"], d["nll"])
        dI = np.zeros((self.n_h, self.n_chan))
        dG = np.zeros(self.n_lat)
        dbg = np.zeros((self.n_sb, 3))
        if want_grad:
            if self.n_h:
                ck.reduce_spans_by_h[ck.blocks_for(self.n_h * self.n_chan), ck.TPB](
                    d["h_order"], d["h_off"], d["span_lo"], d["span_off"], d["dI_span"], d["dI"])
                dI = d["dI"].copy_to_host()[:self.n_h]
            if self.n_lat:
                ck.reduce_by_csr[ck.blocks_for(self.n_lat), ck.TPB](d["lat_order"], d["lat_off"], d["dG_sb"],
                                                                     d["dG"])
                dG = d["dG"].copy_to_host()[:self.n_lat, 0]
            dbg = d["dbg_sb"].copy_to_host()[:self.n_sb]
        nll = float(d["nll"].copy_to_host()[0])
        return nll, dI, dG, dbg

    def nll_and_gradients(self, I, G, bg, return_lambda=False):
        """Poisson NLL over unmasked pixels and its gradients.

        Parameters
        ----------
        I : float64 (n_h, n_chan)
            I(h, E_c) of the distinct Miller indices ``self.hkl``, e².
        G : float64 (n_lat,)
            Per-lattice scale (positive).
        bg : float64 (n_sb, 3)
            Per-shoebox background (b0, b1, b2): bg_p = exp(b0 + b1 x̂ + b2 ŷ).
        return_lambda : bool
            Also return λ (float64 (n_pix,)).

        Returns
        -------
        nll : float
            Σ_unmasked (λ − k ln λ) (a zero count contributes λ).
        dI : float64 (n_h, n_chan)
            ∂NLL/∂I.
        dG : float64 (n_lat,)
            ∂NLL/∂G.
        dbg : float64 (n_sb, 3)
            ∂NLL/∂(b0, b1, b2).
        lam : float64 (n_pix,)
            Only with ``return_lambda``.
        """
        nll, dI, dG, dbg = self._run(I, G, bg, True)
        if return_lambda:
            return nll, dI, dG, dbg, self.expected_counts(I, G, bg)
        return nll, dI, dG, dbg

    def nll(self, I, G, bg):
        """Poisson NLL only (no gradients); see :meth:`nll_and_gradients`."""
        return self._run(I, G, bg, False)[0]

    def expected_counts(self, I, G, bg):
        """λ of every pixel (masked ones too), float64 (n_pix,); arguments as :meth:`nll_and_gradients`."""
        I, G, bg = self._check_params(I, G, bg)
        if self.n_pix == 0:
            return np.zeros(0)
        if self.backend == "cuda":
            from numba import cuda

            from spread_tools.model.kernels import bands_cuda as ck
            d = self._dev
            lam_d = cuda.device_array(self.n_pix, np.float64)
            ck.expected_counts[self.n_sb, ck.TPB](
                d["values"], d["lo"], d["length"], d["sb_offset"], d["pixel_offset"], d["bbox"], d["sb_lattice"],
                d["sb_h_index"], cuda.to_device(I if I.size else np.zeros((1, self.n_chan))),
                cuda.to_device(G if G.size else np.zeros(1)), cuda.to_device(bg), lam_d)
            return lam_d.copy_to_host()
        from spread_tools.model.kernels import bands_cpu
        lam = np.empty(self.n_pix)
        b = self.bands
        bands_cpu.expected_counts(b.values, b.lo, b.length, b.sb_offset, self.pixel_offset, self.bbox,
                                  self.sb_lattice, self.sb_h_index, I, G, bg, lam)
        return lam

    def bragg_counts(self, I):
        """Bragg part Σ_c w[p,c] I(h_p, E_c) of every pixel at G = 1, no background, float64 (n_pix,).

        Parameters
        ----------
        I : float64 (n_h, n_chan)
            As in :meth:`nll_and_gradients`.
        """
        no_background = np.zeros((self.n_sb, 3))
        no_background[:, 0] = -1000.0  # exp(-1000) is exactly 0 in float64
        return self.expected_counts(I, np.ones(self.n_lat), no_background)


def pixel_model(ds, backend="auto", oversample=1, hkl=None, band_rtol=None, band_floor=None):
    """:meth:`PixelModel.from_dataset`."""
    return PixelModel.from_dataset(ds, backend=backend, oversample=oversample, hkl=hkl, band_rtol=band_rtol,
                                   band_floor=band_floor)


def nll_and_gradients(pm, I, G, bg, return_lambda=False):
    """:meth:`PixelModel.nll_and_gradients` of ``pm``."""
    return pm.nll_and_gradients(I, G, bg, return_lambda=return_lambda)


def direct_lambda(ds, hkl, I, G, bg, pixels=None, oversample=1):
    """λ of selected pixels simulated from scratch (reference path, no precomputed w).

    Independent of the kernels: uses :mod:`spread_tools.model.geometry` (pixel positions,
    solid angle, polarization, mosaic rotations) and solves (R_d A) h = q for every
    sub-pixel, domain and channel in float64 NumPy.

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
    hkl : int (n_h, 3)
        Miller indices of the rows of I.
    I : float64 (n_h, n_chan)
    G : float64 (n_lat,)
    bg : float64 (n_sb, 3)
    pixels : int array, optional
        Pixel indices (default: all; slow, meant for a few hundred pixels).
    oversample : int

    Returns
    -------
    float64 (len(pixels),)
    """
    oversample = _check_oversample(oversample)
    det = Detector.from_dataset(ds)
    pixels = np.arange(ds.n_pixels) if pixels is None else np.asarray(pixels, dtype=np.int64)
    sb_of = ds.pixel_shoebox()
    xy = ds.pixel_xy()
    lookup = {tuple(int(v) for v in h): i for i, h in enumerate(np.asarray(hkl))}
    lam_c = HC_EV_A / np.asarray(ds.energy_ev, dtype=np.float64)
    sub = (np.arange(oversample) + 0.5) / oversample
    out = np.empty(len(pixels))
    rot_cache = {}
    for n, p in enumerate(pixels):
        k = sb_of[p]
        j = ds.sb_lattice[k]
        panel = det[ds.sb_panel[k]]
        h0 = np.asarray(ds.sb_miller_index[k], dtype=np.float64)
        key = (float(ds.mosaic_spread_deg[j]), int(ds.n_domains[j]))
        if key not in rot_cache:
            rot_cache[key] = mosaic_rotations(*key)
        U = rot_cache[key] @ ds.A[j]                        # (n_dom, 3, 3)
        N = np.asarray(ds.domain_size_cells[j], dtype=np.float64)
        s0hat = -np.asarray(ds.beam_direction[j], float) / np.linalg.norm(ds.beam_direction[j])
        fx = (xy[p, 0] + sub)[:, None] * np.ones(oversample)[None, :]
        sy = np.ones(oversample)[:, None] * (xy[p, 1] + sub)[None, :]
        r = pixel_to_lab_mm(panel, fx.ravel(), sy.ravel())   # (n_sub, 3)
        area = panel.pixel_area_mm2 / oversample ** 2
        omega = solid_angle(r, panel.normal, area)
        pol = polarization_factor(r, ds.beam_direction[j], ds.polarization_normal[j],
                                  ds.polarization_fraction[j])
        shat = r / np.linalg.norm(r, axis=1, keepdims=True)
        q = (shat[:, None, :] - s0hat) / lam_c[None, :, None]          # (n_sub, n_chan, 3)
        h = np.linalg.solve(U[None, None, :, :, :],
                            np.broadcast_to(q[:, :, None, :], q.shape[:2] + (len(U), 3))[..., None])[..., 0]
        L = np.prod(N) ** 2 * np.exp(-2.0 * np.sum(N ** 2 * (h - h0) ** 2, axis=-1) / GAUSS_SHAPE_CONST)
        wc = R_E_A ** 2 * ds.spectrum_weight[j] * np.sum((omega * pol)[:, None] * L.mean(axis=2), axis=0)
        x0, x1, y0, y1 = ds.sb_bbox[k]
        xh = xy[p, 0] + 0.5 - 0.5 * (x0 + x1)
        yh = xy[p, 1] + 0.5 - 0.5 * (y0 + y1)
        hi = lookup[tuple(int(v) for v in ds.sb_miller_index[k])]
        out[n] = G[j] * np.dot(wc, I[hi]) + np.exp(bg[k, 0] + bg[k, 1] * xh + bg[k, 2] * yh)
    return out
