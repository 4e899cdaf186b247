"""The S1 objective: parameter vector layout, Poisson NLL + restraints, and its gradient.

The gradient runs from ∂f/∂I[h, c] of the pixel model through ∂I/∂f′, ∂I/∂f″ of the
structure factors at the channel energies to the grid with ``Mᵀ`` (see
:mod:`spread_tools.refine.s1`, section *Objective*). The curvature methods come from
:class:`spread_tools.refine.uncertainty.FisherInformationMixin`.

The weak prior on ln G (``lattice.ln_G_sigma``) is part of the objective: every lattice
adds ``(g_j − μ)² / (2 σ_G²)``, with μ the median over all lattices of ln G fitted at the
start curves (:meth:`S1Problem.start_vector`, the same on every rank and for any number of
ranks). The local parameters are fitted exactly at fixed curves by
:func:`spread_tools.refine.local_fit.fit_locals` (start values, and before every macrocycle).
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError
from spread_tools.refine.grid import energy_grid, interpolation_matrix
from spread_tools.refine.mpi import Comm, rank_blocks
from spread_tools.refine.prepare import build_pixel_model
from spread_tools.refine.restraints import build_restraints
from spread_tools.refine.uncertainty import FisherInformationMixin

__all__ = ["S1Problem", "BOUND_LN_G", "BOUND_B0", "BOUND_SLOPE"]

#: Box constraints of the local parameters (:mod:`spread_tools.refine.s1`, *Optimizer*):
#: |g − μ| ≤ BOUND_LN_G, |b0| ≤ BOUND_B0 (3e-7 to 3e6 photons per pixel), |b1|, |b2| ≤ BOUND_SLOPE.
BOUND_LN_G = 30.0
BOUND_B0 = 15.0
BOUND_SLOPE = 2.0


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
        self.lat_counts = [int(hi - lo) for lo, hi in blocks]
        sigma = cfg.lattice.ln_G_sigma
        if sigma is not None and not sigma > 0:
            raise InputError(f"parameter lattice.ln_G_sigma: must be positive (or None: no prior), "
                             f"got {sigma:g}")
        self.lnG_sigma = None if sigma is None else float(sigma)
        self.lnG_mu = None          # set by start_vector (collective)
        ss = cfg.shoebox.slope_sigma
        if ss is not None and not ss > 0:
            raise InputError(f"parameter shoebox.slope_sigma: must be positive (or None: no prior), "
                             f"got {ss:g}")
        self.slope_sigma = None if ss is None else float(ss)
        self.pm = None
        self.lookup = None
        shuffle = getattr(cfg, "control", None) == "shuffle_channels"
        if self.local.n_shoeboxes:
            self.pm = build_pixel_model(self.local, cfg, backend, per_shoebox=shuffle)
            self.h_rows = cache.index_of(self.pm.hkl)
            if shuffle:
                from spread_tools.refine.controls import channel_permutations
                perms = channel_permutations(self.n_lat, len(self.channel_ev), cfg.control_seed)
                self.lookup = np.ascontiguousarray(perms[self.lat0 + self.pm.sb_lattice])
            self.xh, self.yh = self.pm.pixel_offsets_xy()
            k = self.pm.counts.astype(np.float64)
            m = self.pm.mask
            kk = k[m]
            pos = kk > 0
            self.const = float(np.sum(kk) - np.sum(kk[pos] * np.log(kk[pos])))
        else:
            self.const = 0.0
        self._set_lookup_maps()

    def _set_lookup_maps(self):
        """Grid interpolation of every row of I at every channel, for the Fisher kernels.

        ``_map_k0[_h_map[h], c]`` and ``_map_t[...]``: the two entries of row ``lookup[h, c]``
        of M (one shared row of maps without a control; one per row of I with
        ``shuffle_channels``).
        """
        if self.lookup is None:
            self._map_k0 = self._m_k0[None, :].copy()
            self._map_t = self._m_t[None, :].copy()
            self._h_map = np.zeros(self.pm.n_h if self.pm is not None else 0, dtype=np.int64)
        else:
            self._map_k0 = np.ascontiguousarray(self._m_k0[self.lookup])
            self._map_t = np.ascontiguousarray(self._m_t[self.lookup])
            self._h_map = np.arange(self.pm.n_h, dtype=np.int64)

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
        if self.lookup is not None:
            return self._shuffled_intensities(fpc, fdpc, grad)
        if not grad:
            F = structure_factors(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                  reference=self.cfg.reference)
            return np.ascontiguousarray((F.real ** 2 + F.imag ** 2).T), None, None
        I, dfp, dfdp = intensity_and_gradients(self.cache, self.channel_ev, fpc, fdpc, self.h_rows,
                                               reference=self.cfg.reference)
        return np.ascontiguousarray(I.T), dfp[self.ref_sites], dfdp[self.ref_sites]

    def _shuffled_intensities(self, fpc, fdpc, grad):
        """I (n_rows, n_chan) and ∂I/∂u of the refined sites with each row's channels looked up
        at ``lookup`` (the ``shuffle_channels`` control; one row per shoebox)."""
        from spread_tools.structure.factors import intensity_site_derivatives, structure_factors
        ref = self.ref_sites
        fpz, fdpz = fpc.copy(), fdpc.copy()
        fpz[ref] = 0.0
        fdpz[ref] = 0.0
        F = structure_factors(self.cache, self.channel_ev, fpz, fdpz, self.h_rows,
                              reference=self.cfg.reference).T              # (n_rows, n_chan)
        S = self.cache.S_site[ref][:, self.h_rows]                          # (n_ref, n_rows)
        for i, s in enumerate(ref):
            F += (fpc[s][self.lookup] + 1j * fdpc[s][self.lookup]) * S[i][:, None]
        I = np.ascontiguousarray(F.real ** 2 + F.imag ** 2)
        if not grad:
            return I, None, None
        return (I, *intensity_site_derivatives(F.T, S))

    def _channel_sums(self, d, dI):
        """Σ_h ∂f/∂I[h, c] ∂I[h, c]/∂u[s, ·] per site and lookup channel, (n_ref, n_chan).

        Without a control the lookup channel is the channel itself; with ``shuffle_channels``
        row h's channel c is credited to ``lookup[h, c]``.
        """
        if self.lookup is None:
            return np.einsum("sch,hc->sc", d, dI)
        prod = d * dI.T[None]                                               # (n_ref, n_chan, n_rows)
        idx = self.lookup.T.ravel()
        n = len(self.channel_ev)
        return np.stack([np.bincount(idx, weights=prod[s].ravel(), minlength=n) for s in range(len(d))])

    def local_geometry_information(self, x, profile):
        """This rank's share of the information that profiling out the crystal models removes,
        and the pixel models' agreement (:func:`spread_tools.refine.geometry_uncertainty.local_geometry_correction`)."""
        from spread_tools.refine.geometry_uncertainty import local_geometry_correction
        return local_geometry_correction(self, x, profile)

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
        f_prior, g_prior = self.lnG_prior_terms(g)
        if self.slope_sigma is not None:
            w = 1.0 / self.slope_sigma ** 2
            f_prior += 0.5 * w * float(np.sum(b[:, 1:] ** 2))
            dbg = dbg.copy()
            dbg[:, 1:] += w * b[:, 1:]
        # chain rule: ∂f/∂u_chan[s, c] = Σ_h ∂f/∂I[h, c] ∂I[h, c]/∂u[s, c]
        gfp_c = self._channel_sums(dfp, dI)
        gfdp_c = self._channel_sums(dfdp, dI)
        gfp = (self.M.T @ gfp_c.T).T
        gfdp = (self.M.T @ gfdp_c.T).T
        g_glob = np.concatenate([gfp.ravel(), gfdp.ravel()])
        g_loc = np.concatenate([dG * G + g_prior, dbg.ravel()])
        return float(nll) - self.const + f_prior, g_glob, g_loc

    def lnG_prior(self):
        """(μ, σ_G) of the prior on ln G, or ``None`` when it is off or not set up yet."""
        if self.lnG_sigma is None or self.lnG_mu is None:
            return None
        return self.lnG_mu, self.lnG_sigma

    def lnG_prior_terms(self, g):
        """Prior loss (summed) and its gradient for this rank's ln G values ``g``."""
        prior = self.lnG_prior()
        if prior is None:
            return 0.0, np.zeros_like(g)
        r = (g - prior[0]) / prior[1]
        return 0.5 * float(r @ r), r / prior[1]

    def local_fisher(self, x, chunk=2048, route="auto"):
        """:meth:`FisherInformationMixin.local_fisher` with the prior's curvature 1/σ_G² on the
        diagonal of every ln G (the profiled block leaves it out: it changes the information of a
        lattice with Bragg signal by less than 1e-3 relative)."""
        F, dglob, dloc = super().local_fisher(x, chunk=chunk, route=route)
        if self.pm is None:
            return F, dglob, dloc
        dloc = dloc.copy()
        prior = self.lnG_prior()
        if prior is not None:
            dloc[:self.pm.n_lat] += 1.0 / prior[1] ** 2
        if self.slope_sigma is not None:
            db = dloc[self.pm.n_lat:].reshape(-1, 3)
            db[:, 1:] += 1.0 / self.slope_sigma ** 2
        return F, dglob, dloc

    def local_bounds(self):
        """Lower and upper bounds of every entry of ``x`` (the globals are free).

        Returns
        -------
        lo, hi : arrays (n_x,)
        """
        mu = 0.0 if self.lnG_mu is None else self.lnG_mu
        lo = np.full(self.n_x, -np.inf)
        hi = np.full(self.n_x, np.inf)
        ng, nl = self.n_glob, self.n_lat
        lo[ng:ng + nl] = mu - BOUND_LN_G
        hi[ng:ng + nl] = mu + BOUND_LN_G
        b_lo, b_hi = self._b_bounds()
        lo[ng + nl:] = np.tile(b_lo, self.n_sb)
        hi[ng + nl:] = np.tile(b_hi, self.n_sb)
        return lo, hi

    @staticmethod
    def _b_bounds():
        return (np.array([-BOUND_B0, -BOUND_SLOPE, -BOUND_SLOPE]),
                np.array([BOUND_B0, BOUND_SLOPE, BOUND_SLOPE]))

    # ------------------------------------------------------------------ local parameters
    def _bragg_at(self, fp, fdp):
        I, _, _ = self._intensities(fp, fdp, grad=False)
        return self.pm.bragg_counts(I)

    def _fit_locals(self, S, g, b, prior, max_rounds=50):
        from spread_tools.refine.local_fit import fit_locals
        pm = self.pm
        g_bounds = (-np.inf, np.inf) if self.lnG_mu is None else \
            (self.lnG_mu - BOUND_LN_G, self.lnG_mu + BOUND_LN_G)
        return fit_locals(S, pm.counts, pm.mask, pm.pixel_offset, pm.sb_lattice, self.xh, self.yh,
                          g, b, prior=prior, max_rounds=max_rounds, slope_sigma=self.slope_sigma,
                          g_bounds=g_bounds, b_bounds=self._b_bounds())

    def refit_locals(self, x):
        """This rank's g and b refitted exactly at the curves of ``x`` (from ``x``'s locals).

        Returns
        -------
        array (n_lat_rank + 3 n_sb_rank,)
            In the order of :meth:`local_slices`.
        """
        fp, fdp, g, b = self._local_params(x)
        if self.pm is None:
            return np.zeros(0)
        fit = self._fit_locals(self._bragg_at(fp, fdp), g, b, self.lnG_prior())
        return np.concatenate([fit.g, fit.b.ravel()])

    def _set_lnG_mu(self, g_local):
        """μ = median of every rank's start ln G (collective)."""
        c = self.comm
        allg = c.concat(g_local, self.lat_counts)
        mu = float(np.median(allg)) if c.rank == 0 and len(allg) else 0.0
        self.lnG_mu = float(c.bcast_array([mu], 1)[0])

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
        """Start values of ``x`` on this rank's part (collective: every rank calls it).

        Reference (or given) curves; G from a moment match and backgrounds from each shoebox's
        border pixels, then both fitted exactly at the start curves
        (:func:`~spread_tools.refine.local_fit.fit_locals`); μ of the ln G prior is the median
        of those fitted ln G over all lattices, and the locals are fitted once more with it.

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
            self._set_lnG_mu(np.zeros(0))
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
        b[:, 0] = np.clip(np.log(np.maximum(mean, 0.05)), -BOUND_B0, BOUND_B0)
        I, _, _ = self._intensities(fp, fdp, grad=False)
        S = pm.bragg_counts(I)
        bgp = np.exp(b[sb, 0])
        lat = pm.sb_lattice[sb]
        excess = np.bincount(lat, weights=np.where(pm.mask, pm.counts - bgp, 0.0), minlength=pm.n_lat)
        ssum = np.bincount(lat, weights=np.where(pm.mask, S, 0.0), minlength=pm.n_lat)
        ratio = np.where((excess > 0) & (ssum > 0), excess / np.where(ssum > 0, ssum, 1.0), 1.0)
        g = np.clip(np.log(ratio), -10.0, 10.0)
        # the moment match is noisy for background-dominated shoeboxes (G off by 100x seen):
        # fit the locals exactly at the start curves, without and then with the prior
        self.lnG_mu = None
        fit = self._fit_locals(S, g, b, None)
        self._set_lnG_mu(fit.g)
        fit = self._fit_locals(S, fit.g, fit.b, self.lnG_prior())
        return glob, np.concatenate([fit.g, fit.b.ravel()])
