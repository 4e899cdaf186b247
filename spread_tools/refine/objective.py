"""The S1 objective: parameter vector layout, Poisson NLL + restraints, and its gradient.

The gradient runs from ∂f/∂I[h, c] of the pixel model through ∂I/∂f′, ∂I/∂f″ of the
structure factors at the channel energies to the grid with ``Mᵀ`` (see
:mod:`spread_tools.refine.s1`, section *Objective*). The curvature methods come from
:class:`spread_tools.refine.uncertainty.FisherInformationMixin`.
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError
from spread_tools.refine.grid import energy_grid, interpolation_matrix
from spread_tools.refine.mpi import Comm, rank_blocks
from spread_tools.refine.prepare import build_pixel_model
from spread_tools.refine.restraints import build_restraints
from spread_tools.refine.uncertainty import FisherInformationMixin

__all__ = ["S1Problem"]


class S1Problem(FisherInformationMixin):
    """The S1 objective of one rank's lattices (plus, on rank 0, the restraints).

    Parameters
    ----------
    prepared : PreparedData
        All usable data (every rank holds the same).
    cache : SFCache
    cfg : Config
        Effective configuration (schema :data:`REFINE_SCHEMA`).
    comm : Comm
    backend : str, optional
        Overrides ``cfg.backend`` (tests).
    grid_ev : array_like, optional
        The f′/f″ grid itself instead of ``cfg.grid`` (the KK-constrained mode puts it on
        the channel energies, :mod:`spread_tools.refine.kk_constrained`).

    Notes
    -----
    Layout of ``x``: ``[fp (n_ref, n_grid), fdp (n_ref, n_grid), g (n_lat), b (n_sb, 3)]``
    over *all* usable lattices and shoeboxes, independent of the number of ranks.
    """

    def __init__(self, prepared, cache, cfg, comm=None, backend=None, grid_ev=None):
        from spread_tools.physics.scattering import reference_fp_fdp
        self.comm = comm or Comm(None)
        self.cfg = cfg
        self.cache = cache
        ds = prepared.ds
        self.prepared = prepared
        names = list(cache.site_names)
        want = list(cfg.sites) or names
        unknown = [s for s in want if s not in names]
        if unknown:
            raise InputError(f"parameter sites: {', '.join(unknown)} not in the SF cache "
                             f"{getattr(cache, 'source', '')} (sites: {', '.join(names)})")
        if len(set(want)) != len(want):
            raise InputError(f"parameter sites: repeated names in {', '.join(want)}")
        self.ref_sites = [names.index(s) for s in want]
        self.site_names = want
        self.site_elements = [cache.site_elements[i] for i in self.ref_sites]
        self.channel_ev = np.asarray(ds.energy_ev, dtype=np.float64)
        if grid_ev is None:
            self.grid_ev = energy_grid(self.channel_ev, ds.spectrum_weight, cfg.grid.step_ev,
                                       cfg.grid.min_ev, cfg.grid.max_ev)
        else:
            self.grid_ev = np.asarray(grid_ev, dtype=np.float64)
        self.M = interpolation_matrix(self.channel_ev, self.grid_ev)
        self.M_dense = self.M.toarray()
        # the two entries of each row of M: columns k0, k0+1 with weights 1-t, t
        e = np.clip(self.channel_ev, self.grid_ev[0], self.grid_ev[-1])
        self._m_k0 = np.clip(np.searchsorted(self.grid_ev, e, side="right") - 1, 0,
                             len(self.grid_ev) - 2).astype(np.int64)
        self._m_t = (e - self.grid_ev[self._m_k0]) / (self.grid_ev[self._m_k0 + 1] - self.grid_ev[self._m_k0])
        ref = cfg.reference
        # all cache sites at the channels: reference values; refined rows are replaced
        self.fp_chan0 = np.zeros((len(names), len(self.channel_ev)))
        self.fdp_chan0 = np.zeros_like(self.fp_chan0)
        for i, el in enumerate(cache.site_elements):
            self.fp_chan0[i], self.fdp_chan0[i] = reference_fp_fdp(el, self.channel_ev, ref)
        self.n_ref = len(self.ref_sites)
        self.n_grid = len(self.grid_ev)
        self.n_glob = 2 * self.n_ref * self.n_grid
        self.n_lat = ds.n_lattices
        self.n_sb = ds.n_shoeboxes
        self.n_x = self.n_glob + self.n_lat + 3 * self.n_sb
        self.restraints = build_restraints(cfg, self.grid_ev, self.site_elements,
                                           reference_source=ref)
        # this rank's lattices / shoeboxes (contiguous blocks of the canonical order)
        blocks = rank_blocks(ds, self.comm.size)
        self.blocks = blocks
        sb_start = np.searchsorted(ds.sb_lattice, [b[0] for b in blocks] + [ds.n_lattices], side="left")
        self.sb_blocks = [(int(sb_start[r]), int(sb_start[r + 1])) for r in range(self.comm.size)]
        a, b = blocks[self.comm.rank]
        self.lat0, self.lat1 = a, b
        self.sb0, self.sb1 = self.sb_blocks[self.comm.rank]
        self.local = ds.select_lattices(np.arange(a, b)) if self.comm.size > 1 else ds
        self.pm = None
        if self.local.n_shoeboxes:
            self.pm = build_pixel_model(self.local, cfg, backend)
            self.h_rows = cache.index_of(self.pm.hkl)
            k = self.pm.counts.astype(np.float64)
            m = self.pm.mask
            kk = k[m]
            pos = kk > 0
            self.const = float(np.sum(kk) - np.sum(kk[pos] * np.log(kk[pos])))
        else:
            self.const = 0.0

    # ------------------------------------------------------------------ layout helpers
    def split(self, x):
        """(fp (n_ref, n_grid), fdp, g (n_lat,), b (n_sb, 3)) views of ``x``."""
        n = self.n_ref * self.n_grid
        fp = x[:n].reshape(self.n_ref, self.n_grid)
        fdp = x[n:2 * n].reshape(self.n_ref, self.n_grid)
        g = x[2 * n:2 * n + self.n_lat]
        b = x[2 * n + self.n_lat:].reshape(self.n_sb, 3)
        return fp, fdp, g, b

    def curves_and_covariance(self, x, cov):
        """f′, f″ on the grid (n_ref, n_grid) and their covariance (fp all sites, then fdp)."""
        fp, fdp, _, _ = self.split(x)
        return fp.copy(), fdp.copy(), cov

    def local_slices(self, rank=None):
        """Index arrays into ``x`` of a rank's g and b entries (in that order)."""
        rank = self.comm.rank if rank is None else rank
        a, b = self.blocks[rank]
        s0, s1 = self.sb_blocks[rank]
        off = self.n_glob
        return np.concatenate([np.arange(off + a, off + b),
                               np.arange(off + self.n_lat + 3 * s0, off + self.n_lat + 3 * s1)])

    def channel_values(self, fp, fdp):
        """All cache sites' f′, f″ at the channel energies, (n_site, n_chan) each."""
        fpc = self.fp_chan0.copy()
        fdpc = self.fdp_chan0.copy()
        fpc[self.ref_sites] = (self.M @ fp.T).T
        fdpc[self.ref_sites] = (self.M @ fdp.T).T
        return fpc, fdpc

    def _intensities(self, fp, fdp, grad=True):
        from spread_tools.structure.factors import (
            intensity_and_gradients,
            structure_factors,
        )
        fpc, fdpc = self.channel_values(fp, fdp)
        if not grad:
            F = structure_factors(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                  reference=self.cfg.reference)
            return np.ascontiguousarray((F.real ** 2 + F.imag ** 2).T), None, None
        I, dfp, dfdp = intensity_and_gradients(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                               reference=self.cfg.reference)
        return np.ascontiguousarray(I.T), dfp[self.ref_sites], dfdp[self.ref_sites]

    def _local_params(self, x):
        fp, fdp, g, b = self.split(x)
        return fp, fdp, g[self.lat0:self.lat1], b[self.sb0:self.sb1]

    # ------------------------------------------------------------------ evaluation
    def local_objective(self, x):
        """This rank's data term and gradients.

        Returns
        -------
        f : float
            NLL − constant of this rank's pixels.
        g_glob : array (n_glob,)
        g_loc : array (n_lat_rank + 3 n_sb_rank,)
            Gradient with respect to this rank's g and b.
        """
        fp, fdp, g, b = self._local_params(x)
        if self.pm is None:
            return 0.0, np.zeros(self.n_glob), np.zeros(0)
        I, dfp, dfdp = self._intensities(fp, fdp)
        G = np.exp(g)
        nll, dI, dG, dbg = self.pm.nll_and_gradients(I, G, b)
        # chain rule: ∂f/∂u_chan[s, c] = Σ_h ∂f/∂I[h, c] ∂I[h, c]/∂u[s, c]
        gfp_c = np.einsum("sch,hc->sc", dfp, dI)
        gfdp_c = np.einsum("sch,hc->sc", dfdp, dI)
        gfp = (self.M.T @ gfp_c.T).T
        gfdp = (self.M.T @ gfdp_c.T).T
        g_glob = np.concatenate([gfp.ravel(), gfdp.ravel()])
        g_loc = np.concatenate([dG * G, dbg.ravel()])
        return float(nll) - self.const, g_glob, g_loc

    def evaluate(self, x):
        """Full objective and gradient at ``x`` (single rank only; MPI runs use :func:`refine`).

        Returns
        -------
        f : float
        grad : array (n_x,)
        """
        if self.comm.size != 1:
            raise RuntimeError("S1Problem.evaluate is for single-rank use")
        f, gg, gl = self.local_objective(x)
        fr, gr = self.restraint_terms(x)
        return f + fr, np.concatenate([gg + gr, gl])

    def restraint_terms(self, x):
        """Restraint loss and gradient over ``x``'s global block (rank 0 adds them).

        The global block is the restraints' :class:`~spread_tools.refine.restraints.FlatLayout`
        (kind-major), so this is ``self.restraints(x[:n_glob])``: one implementation.
        """
        f, g = self.restraints(np.asarray(x[:self.n_glob], dtype=np.float64))
        return float(f), g

    def restraint_hessian(self, x):
        """Exact Hessian of the (quadratic) restraints over the global block (n_glob²)."""
        if not hasattr(self, "_restraint_H"):
            self._restraint_H = self.restraints.hessian()
        return self._restraint_H.copy()

    def predicted(self, x):
        """λ of this rank's pixels at ``x`` (for galleries)."""
        fp, fdp, g, b = self._local_params(x)
        I, _, _ = self._intensities(fp, fdp, grad=False)
        return self.pm.expected_counts(I, np.exp(g), b)

    # ------------------------------------------------------------------ start values
    def start_vector(self, start_curves=None):
        """Start values of ``x`` on this rank's part: reference (or given) curves, G from a
        moment match, backgrounds from each shoebox's border pixels.

        Parameters
        ----------
        start_curves : (fp, fdp) arrays (n_ref, n_grid), optional

        Returns
        -------
        glob : array (n_glob,)
        loc : array (this rank's g and b)
        """
        from spread_tools.physics.scattering import reference_fp_fdp
        if start_curves is None:
            fp = np.array([reference_fp_fdp(el, self.grid_ev, self.cfg.reference)[0]
                           for el in self.site_elements])
            fdp = np.array([reference_fp_fdp(el, self.grid_ev, self.cfg.reference)[1]
                            for el in self.site_elements])
        else:
            fp, fdp = (np.asarray(a, dtype=np.float64) for a in start_curves)
        glob = np.concatenate([fp.ravel(), fdp.ravel()])
        if self.pm is None:
            return glob, np.zeros(0)
        pm = self.pm
        off = pm.pixel_offset
        sb = pm.pixel_shoebox
        loc = np.arange(pm.n_pix) - off[sb]
        x0, x1, y0, y1 = (pm.bbox[sb, i] for i in range(4))
        width = x1 - x0
        px = x0 + loc % width
        py = y0 + loc // width
        border = (px == x0) | (px == x1 - 1) | (py == y0) | (py == y1 - 1)
        use = pm.mask & border
        nb = np.bincount(sb, weights=use, minlength=pm.n_sb)
        sumb = np.bincount(sb, weights=np.where(use, pm.counts, 0.0), minlength=pm.n_sb)
        nall = np.bincount(sb, weights=pm.mask, minlength=pm.n_sb)
        suma = np.bincount(sb, weights=np.where(pm.mask, pm.counts, 0.0), minlength=pm.n_sb)
        mean = np.where(nb > 0, sumb / np.maximum(nb, 1), suma / np.maximum(nall, 1))
        b = np.zeros((pm.n_sb, 3))
        b[:, 0] = np.log(np.maximum(mean, 0.05))
        I, _, _ = self._intensities(fp, fdp, grad=False)
        S = pm.bragg_counts(I)
        bgp = np.exp(b[sb, 0])
        lat = pm.sb_lattice[sb]
        excess = np.bincount(lat, weights=np.where(pm.mask, pm.counts - bgp, 0.0), minlength=pm.n_lat)
        ssum = np.bincount(lat, weights=np.where(pm.mask, S, 0.0), minlength=pm.n_lat)
        ratio = np.where((excess > 0) & (ssum > 0), excess / np.where(ssum > 0, ssum, 1.0), 1.0)
        g = np.clip(np.log(ratio), -10.0, 10.0)
        return glob, np.concatenate([g, b.ravel()])
