"""The pixel model of a set of lattices with its derivatives with respect to the crystal models.

:class:`LatticeBatch` holds what does not change while crystal models are refined (the
pixels, their counts and mask, shoebox boxes and Miller indices, detector, beam,
polarization, spectra) and evaluates, for given crystal models, per shoebox the Poisson
NLL, its gradient and the expected (Fisher) information with respect to the local
parameters of :mod:`spread_tools.model.kernels.geometry_cpu` (matrix parameters q, ln N,
the energy offset δ, g = ln G and the background plane). The kernels compute the channel
weights on the fly: nothing of size pixels × channels is stored.

Typical use (see :mod:`spread_tools.refine.lattice_fit`)::

    batch = LatticeBatch.from_dataset(ds, backend="cpu")
    out = batch.evaluate(minv, dminv, dom_off, nabc, il, I_sb, dI_sb, G, bg)
    out.nll_sb, out.grad_sb, out.fisher_sb
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.geometry import HC_EV_A
from spread_tools.model.kernels.geometry_cpu import N_EXTRA
from spread_tools.model.kernels.pixel_terms import MAX_Q
from spread_tools.model.pixel import kernel_inputs, resolve_backend

__all__ = ["LatticeBatch", "BatchResult", "DEFAULT_CUT"]

#: Channels where a domain's lattice transform is below exp(−DEFAULT_CUT) (2e-9) of its peak
#: are skipped: λ changes by < 1e-5 relative (≈1e-7 on background-dominated data), the cost
#: falls 2–6× against all channels (tests/model/test_lattice_batch.py); 30 gives < 1e-9.
DEFAULT_CUT = 20.0


@dataclasses.dataclass
class BatchResult:
    """Per-shoebox results of :meth:`LatticeBatch.evaluate` (rows of shoeboxes not asked for are 0)."""

    nll_sb: np.ndarray
    grad_sb: np.ndarray
    fisher_sb: np.ndarray
    lam: np.ndarray = None
    bragg: np.ndarray = None
    jac: np.ndarray = None


class LatticeBatch:
    """Fixed data of a set of lattices for crystal-model refinement.

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
        The lattices, their shoeboxes and pixels.
    backend : {"auto", "cpu", "cuda"}
    oversample : int
        Sub-pixels per pixel edge.
    cut : float
        Band cut of the lattice transform (:data:`DEFAULT_CUT`; ``inf`` visits every channel).
    """

    def __init__(self, ds, backend="auto", oversample=1, cut=DEFAULT_CUT):
        self.backend = resolve_backend(backend)
        self.oversample = int(oversample)
        if self.oversample < 1 or self.oversample != oversample:
            raise InputError(f"oversample: {oversample} must be a positive integer")
        self.cut = float(cut)
        kin = kernel_inputs(ds)
        self.static = {name: kin[name] for name in (
            "s0hat", "pol_n", "pol_f", "phi", "porig", "pfast", "pslow", "pnorm", "ppix", "pix_off", "bbox",
            "sb_lat", "sb_panel", "h0")}
        self.static["counts"] = np.ascontiguousarray(ds.counts, dtype=np.float32)
        self.static["mask"] = np.ascontiguousarray(ds.mask, dtype=np.bool_)
        self.energy_ev = np.asarray(ds.energy_ev, dtype=np.float64)
        self.n_lat = int(ds.n_lattices)
        self.n_sb = int(ds.n_shoeboxes)
        self.n_pix = int(ds.n_pixels)
        self._dev = {}

    @classmethod
    def from_dataset(cls, ds, backend="auto", oversample=1, cut=DEFAULT_CUT):
        """Same as the constructor (for symmetry with :class:`~spread_tools.model.pixel.PixelModel`)."""
        return cls(ds, backend=backend, oversample=oversample, cut=cut)

    def inverse_wavelength(self, offset_ev):
        """(n_lat, n_chan) il = (E_c + offset_j)/hc for per-lattice energy offsets (eV)."""
        off = np.broadcast_to(np.asarray(offset_ev, dtype=np.float64), (self.n_lat,))
        return np.ascontiguousarray((self.energy_ev[None, :] + off[:, None]) / HC_EV_A)

    def evaluate(self, minv, dminv, dom_off, nabc, il, I_sb, dI_sb, G, bg, want_lam=False,
                 shoeboxes=None, want_jac=False):
        """Per-shoebox NLL, gradient and Fisher information at the given crystal models.

        Parameters
        ----------
        minv : ndarray (n_dom_total, 3, 3)
            (R_d A)⁻¹ of every domain of every lattice.
        dminv : ndarray (n_dom_total, n_q, 3, 3)
            Its derivatives with respect to the n_q matrix parameters (n_q ≤ MAX_Q).
        dom_off : int array (n_lat + 1,)
            Domains of lattice j are ``dom_off[j]:dom_off[j+1]``.
        nabc : ndarray (n_lat, 3)
            Domain sizes N_a, N_b, N_c (cells).
        il : ndarray (n_lat, n_chan)
            Inverse wavelengths of each lattice's channels (:meth:`inverse_wavelength`).
        I_sb, dI_sb : ndarray (n_sb, n_chan)
            Intensity of each shoebox's reflection at its lattice's channel energies, and
            its slope (per eV).
        G : ndarray (n_lat,)
            Scales.
        bg : ndarray (n_sb, 3)
            Log-linear background planes.
        want_lam : bool
            Also return λ and its Bragg part per pixel.
        shoeboxes : int array, optional
            Evaluate only these shoeboxes (default all); the other rows of the result are 0.
        want_jac : bool
            Also return the Jacobian row of λ of every pixel (n_pix, n_q + 8), masked or not.

        Returns
        -------
        BatchResult
            ``grad_sb`` (n_sb, n_q + 8), ``fisher_sb`` (n_sb, n_q + 8, n_q + 8).
        """
        n_q = int(dminv.shape[1])
        if n_q > MAX_Q:
            raise InputError(f"geometry kernel: {n_q} matrix parameters, at most {MAX_Q}")
        n_loc = n_q + N_EXTRA
        f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
        args = [f64(minv), f64(dminv.reshape(len(minv), n_q, 3, 3)), np.ascontiguousarray(dom_off, np.int64)]
        st = self.static
        args += [st["s0hat"], st["pol_n"], st["pol_f"], f64(nabc), f64(il), st["phi"], st["porig"],
                 st["pfast"], st["pslow"], st["pnorm"], st["ppix"], st["pix_off"], st["bbox"],
                 st["sb_lat"], st["sb_panel"], st["h0"], f64(I_sb), f64(dI_sb), f64(G), f64(bg),
                 st["counts"], st["mask"]]
        sb_list = np.arange(self.n_sb, dtype=np.int64) if shoeboxes is None else \
            np.ascontiguousarray(shoeboxes, dtype=np.int64)
        args.append(sb_list)
        nll = np.zeros(self.n_sb)
        grad = np.zeros((self.n_sb, n_loc))
        fisher = np.zeros((self.n_sb, n_loc, n_loc))
        lam = np.zeros(self.n_pix if want_lam else 1)
        bragg = np.zeros_like(lam)
        jac = np.zeros((self.n_pix if want_jac else 1, n_loc))
        res = lambda: BatchResult(nll, grad, fisher, lam if want_lam else None,  # noqa: E731
                                  bragg if want_lam else None, jac if want_jac else None)
        if len(sb_list) == 0:
            return res()
        if self.backend == "cuda":
            self._evaluate_cuda(args, want_lam, lam, bragg, want_jac, jac, nll, grad, fisher)
        else:
            from spread_tools.model.kernels import geometry_cpu
            geometry_cpu.lattice_model(*args, self.oversample, self.cut, bool(want_lam), lam, bragg,
                                       bool(want_jac), jac, nll, grad, fisher)
        return res()

    def _evaluate_cuda(self, args, want_lam, lam, bragg, want_jac, jac, nll, grad, fisher):
        from numba import cuda

        from spread_tools.model.kernels import geometry_cuda
        static_names = ("s0hat", "pol_n", "pol_f", "phi", "porig", "pfast", "pslow", "pnorm", "ppix",
                        "pix_off", "bbox", "sb_lat", "sb_panel", "h0", "counts", "mask")
        if not self._dev:
            self._dev = {name: cuda.to_device(self.static[name]) for name in static_names}
        static_ids = {id(self.static[name]): name for name in static_names}
        dev_args = [self._dev[static_ids[id(a)]] if id(a) in static_ids else cuda.to_device(a)
                    for a in args]
        hosts = (lam, bragg, jac, nll, grad, fisher)
        outs = [cuda.to_device(x) for x in hosts]
        geometry_cuda.lattice_model[len(args[-1]), geometry_cuda.TPB](
            *dev_args, self.oversample, self.cut, bool(want_lam), outs[0], outs[1], bool(want_jac),
            *outs[2:])
        cuda.synchronize()
        for host, dev in zip(hosts, outs):
            dev.copy_to_host(host)
