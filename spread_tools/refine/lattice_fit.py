"""Per-lattice crystal-model refinement: the parameters, the objective and the solver.

Objective of lattice j (Poisson likelihood of its unmasked shoebox pixels plus priors)::

    f_j = Σ_p (λ_p − k_p ln λ_p) + Σ_i (p_ji − p_target,i)² / (2σ_i²) + δ_j² / (2σ_δ²)
    λ_p = G_j S_p(θ_j, p_j, N_j, η_j, δ + δ_j) + exp(b0 + b1 x̂ + b2 ŷ)

with S_p the Bragg part at unit scale (:mod:`spread_tools.model.kernels.pixel_terms`).
Parameters of a lattice (each family switchable, :class:`FitSettings`):

* θ (rad): three small rotations about the lab axes, A = R(θ)·U0·B(p);
* p: the free cell constants of the crystal system (Å, °), restrained to the dataset's cell;
* η: mosaic spread (°) and N: domain size (cells), one factor or N_a, N_b, N_c; both
  bounded, through ln x = lo + (hi − lo)·σ(u) with σ the logistic function, so the
  optimizer never leaves [lo, hi] and the derivatives stay smooth;
* δ_j (eV, optional): a per-shot energy offset of the spectrometer, around the global δ;
* g = ln G, and the log-linear background (b0, b1, b2) of every shoebox.

The global energy offset δ (eV) is shared by all lattices. It moves the channels' photon
energies in the geometry (the Ewald spheres); the intensities stay at the starting
energies unless ``offset_moves_intensity`` (see :meth:`LatticeProblem.prepare_intensities`).

Solver
------
Levenberg–Marquardt on the expected (Fisher) information, every lattice on its own but
all of them in one kernel call per iteration. The background planes are eliminated per
shoebox (Schur complement, exact), so a lattice's system has only its own handful of
crystal parameters plus g. A step is accepted when it lowers f_j (μ_j ÷ 3), else μ_j × 8.
A lattice has converged when the Newton decrement gᵀF⁻¹g (the objective change that
the full Gauss–Newton step predicts, × 2) is below ``tol``. The global δ is updated
between such per-lattice fits by a profiled Newton step: each lattice contributes its
Schur-reduced curvature and gradient in δ, the sums (over lattices in index order, hence
over MPI ranks in the same order) give Δδ, and the lattices follow by their linear
response before they are refitted.

Every sum is in a fixed order, so a lattice's result does not depend on which other
lattices share its batch or its MPI rank.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.crystal_params import domain_matrices
from spread_tools.model.kernels.shoebox_sums import shoebox_moments
from spread_tools.model.lattice_batch import DEFAULT_CUT

__all__ = ["FitSettings", "Layout", "CrystalState", "Evaluation", "LatticeProblem", "solve_batched"]


@dataclasses.dataclass
class FitSettings:
    """What is refined and how (see the module docstring)."""

    rotation: bool = True
    cell: bool = True
    domain_size: str = "off"            # off | isotropic | anisotropic
    mosaic: bool = False
    offset: str = "global"              # off | global | per_lattice
    cell_sigma: np.ndarray = None       # (n_free,) σ of the cell prior, None: no prior
    cell_target: np.ndarray = None      # (n_free,) its centre
    offset_sigma_ev: float = 0.5        # per-lattice δ_j prior
    mosaic_log_sigma: float = 0.3       # prior on ln η about the stored value (None: none)
    domain_size_log_sigma: float = 0.3  # prior on ln N about the stored value (None: none)
    domain_size_bounds: tuple = (3.0, 2000.0)
    mosaic_bounds_deg: tuple = (1e-3, 2.0)
    max_iterations: int = 40
    tol: float = 1e-3
    max_macrocycles: int = 8
    offset_tol_ev: float = 0.01
    cut: float = DEFAULT_CUT
    offset_moves_intensity: bool = False

    def check(self):
        """Raise InputError for settings that make no sense."""
        if self.domain_size not in ("off", "isotropic", "anisotropic"):
            raise InputError(f"parameter refine.domain_size: {self.domain_size!r} is not one of off, "
                             f"isotropic, anisotropic")
        if self.offset not in ("off", "global", "per_lattice"):
            raise InputError(f"parameter refine.energy_offset: {self.offset!r} is not one of off, global, "
                             f"per_lattice")
        lo, hi = self.domain_size_bounds
        if not 0 < lo < hi:
            raise InputError("parameter domain_size.min_cells/max_cells: need 0 < min < max")
        lo, hi = self.mosaic_bounds_deg
        if not 0 < lo < hi:
            raise InputError("parameter mosaic.min_deg/max_deg: need 0 < min < max")
        if self.cell_sigma is not None and not np.all(np.asarray(self.cell_sigma) > 0):
            raise InputError("parameter cell.sigma: every restraint sigma must be positive")
        if not self.offset_sigma_ev > 0:
            raise InputError("parameter energy_offset.per_lattice_sigma_ev: must be positive")
        for key, v in (("mosaic.log_sigma", self.mosaic_log_sigma),
                       ("domain_size.log_sigma", self.domain_size_log_sigma)):
            if v is not None and not v > 0:
                raise InputError(f"parameter {key}: must be positive (or None), got {v}")
        return self


class Layout:
    """Columns of a lattice's parameter vector and the map from the kernel's local columns.

    The vector x of lattice j is [θ (3), p (n_free), u_η, u_N (1 or 3), δ_j, g] for the
    families refined, in this order (m entries), and the systems carry one more column,
    index m, for the global δ. The kernel's local columns are [q (n_q), ln N (3), δ, g,
    b (3)] with q the matrix parameters refined (θ, then p, then η).
    """

    def __init__(self, fs, n_free):
        self.fs = fs
        self.n_free = n_free
        self.n_q = 3 * fs.rotation + n_free * fs.cell + int(fs.mosaic)
        self.nG = self.n_q + 5
        cols, c = {}, 0
        if fs.rotation:
            cols["theta"] = np.arange(c, c + 3)
            c += 3
        if fs.cell:
            cols["p"] = np.arange(c, c + n_free)
            c += n_free
        if fs.mosaic:
            cols["mosaic"] = np.array([c])
            c += 1
        if fs.domain_size != "off":
            k = 3 if fs.domain_size == "anisotropic" else 1
            cols["N"] = np.arange(c, c + k)
            c += k
        if fs.offset == "per_lattice":
            cols["dlat"] = np.array([c])
            c += 1
        cols["g"] = np.array([c])
        c += 1
        self.cols = cols
        self.m = c

    def names(self, cell_names):
        """Name of every column of x (``cell_names``: the free cell parameters)."""
        out = [""] * self.m
        for fam, idx in self.cols.items():
            for k, i in enumerate(idx):
                if fam == "theta":
                    out[i] = f"rot_{'xyz'[k]}"
                elif fam == "p":
                    out[i] = f"cell_{cell_names[k]}"
                elif fam == "N":
                    out[i] = f"N_{'abc'[k]}" if len(idx) == 3 else "N"
                else:
                    out[i] = {"mosaic": "mosaic", "dlat": "energy_offset", "g": "lnG"}[fam]
        return out

    def transform(self, state):
        """T (n_lat, nG, m + 1): ∂(kernel local column)/∂(x column) for every lattice."""
        n = state.n_lat
        T = np.zeros((n, self.nG, self.m + 1))
        q = 0
        if self.fs.rotation:
            T[:, [0, 1, 2], self.cols["theta"]] = 1.0
            q = 3
        if self.fs.cell:
            T[:, q + np.arange(self.n_free), self.cols["p"]] = 1.0
            q += self.n_free
        if self.fs.mosaic:
            T[:, q, self.cols["mosaic"][0]] = state.mosaic_deg * state.mosaic_dlog
        if self.fs.domain_size == "anisotropic":
            for k in range(3):
                T[:, self.n_q + k, self.cols["N"][k]] = state.N_dlog[:, k]
        elif self.fs.domain_size == "isotropic":
            for k in range(3):
                T[:, self.n_q + k, self.cols["N"][0]] = state.N_dlog[:, 0]
        if self.fs.offset == "per_lattice":
            T[:, self.n_q + 3, self.cols["dlat"][0]] = 1.0
        T[:, self.n_q + 4, self.cols["g"][0]] = 1.0
        T[:, self.n_q + 3, self.m] = 1.0
        return T


def _logistic(u):
    from scipy.special import expit
    return expit(u)


def _logit(s):
    s = np.clip(s, 1e-9, 1 - 1e-9)
    return np.log(s / (1 - s))


@dataclasses.dataclass
class CrystalState:
    """Parameters of every lattice (and the global δ) in physical and free form.

    ``mosaic_deg`` and ``N`` are the physical values; ``u_mosaic`` and ``u_N`` the free
    parameters of the bounded families (only used for the families refined).
    """

    U0: np.ndarray
    theta: np.ndarray
    p: np.ndarray
    mosaic_deg: np.ndarray
    N: np.ndarray
    N0: np.ndarray
    mosaic0: np.ndarray
    u_mosaic: np.ndarray
    u_N: np.ndarray
    dlat: np.ndarray
    g: np.ndarray
    bg: np.ndarray
    delta: float = 0.0
    mosaic_dlog: np.ndarray = None      # ∂ ln η / ∂u
    N_dlog: np.ndarray = None           # ∂ ln N / ∂u  (n_lat, 3 or 1)

    @property
    def n_lat(self):
        """Number of lattices."""
        return len(self.theta)

    def copy(self):
        """A deep copy."""
        return dataclasses.replace(self, **{f.name: (getattr(self, f.name).copy()
                                                     if isinstance(getattr(self, f.name), np.ndarray)
                                                     else getattr(self, f.name))
                                            for f in dataclasses.fields(self)})

    def take(self, other, lattices, shoeboxes):
        """Copy the given lattices' (and shoeboxes') parameters from ``other`` (in place)."""
        for f in dataclasses.fields(self):
            a = getattr(self, f.name)
            if isinstance(a, np.ndarray) and f.name != "bg":
                a[lattices] = getattr(other, f.name)[lattices]
        self.bg[shoeboxes] = other.bg[shoeboxes]


@dataclasses.dataclass
class Evaluation:
    """Kernel results at one state: per shoebox, and the objective per lattice."""

    nll_sb: np.ndarray
    grad_sb: np.ndarray
    fisher_sb: np.ndarray
    f_lat: np.ndarray
    lam: np.ndarray = None
    bragg: np.ndarray = None
    jac: np.ndarray = None

    def take(self, other, lattices, shoeboxes):
        """Copy rows of ``other`` for the given lattices/shoeboxes (in place)."""
        for name in ("nll_sb", "grad_sb", "fisher_sb"):
            getattr(self, name)[shoeboxes] = getattr(other, name)[shoeboxes]
        self.f_lat[lattices] = other.f_lat[lattices]


class LatticeProblem:
    """The per-lattice refinement of one set of lattices (one MPI rank's).

    Parameters
    ----------
    batch : spread_tools.model.lattice_batch.LatticeBatch
        Pixel data of the lattices (shoeboxes grouped by lattice, in lattice order).
    ds : spread_tools.io.dataset.Dataset
        The same lattices (for n_domains and the Miller indices).
    param : spread_tools.model.crystal_params.CellParameterization
    fs : FitSettings
    intensity : callable
        ``intensity(energies_ev (n_lat, n_chan)) -> (I_sb, dI_sb)`` (n_sb, n_chan): the
        intensity of each shoebox's reflection at its lattice's photon energies and its slope.
    """

    def __init__(self, batch, ds, param, fs, intensity):
        self.batch, self.ds, self.param, self.fs = batch, ds, param, fs.check()
        self.layout = Layout(fs, param.n_free)
        self.intensity = intensity
        sb_lat = np.asarray(ds.sb_lattice, dtype=np.int64)
        if np.any(np.diff(sb_lat) < 0):
            raise InputError(f"{ds.path}: shoeboxes are not grouped by lattice")
        counts = np.bincount(sb_lat, minlength=ds.n_lattices)
        if np.any(counts == 0):
            raise InputError(f"{ds.path}: a lattice without shoeboxes reached the refinement")
        self.sb_lat = sb_lat
        self.lat_sb_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_dom = np.asarray(ds.n_domains, dtype=np.int64)
        self.dom_off = np.concatenate([[0], np.cumsum(self.n_dom)]).astype(np.int64)
        n_q = self.layout.n_q
        self._minv = np.zeros((self.dom_off[-1], 3, 3))
        self._dminv = np.zeros((self.dom_off[-1], n_q, 3, 3))
        self._I = None
        self._I_dlat = None

    # ------------------------------------------------------------------ state
    def initial_state(self, U0, p0, delta=0.0):
        """State at the stored crystal models, with G and backgrounds estimated from the counts."""
        ds, fs = self.ds, self.fs
        n = ds.n_lattices
        N = np.asarray(ds.domain_size_cells, dtype=np.float64).reshape(n, 3).copy()
        mos = np.asarray(ds.mosaic_spread_deg, dtype=np.float64).copy()
        st = CrystalState(U0=np.asarray(U0, float), theta=np.zeros((n, 3)), p=np.asarray(p0, float).copy(),
                          mosaic_deg=mos, N=N, N0=N.copy(), mosaic0=mos.copy(), u_mosaic=np.zeros(n),
                          u_N=np.zeros((n, 3 if fs.domain_size == "anisotropic" else 1)),
                          dlat=np.zeros(n), g=np.zeros(n), bg=self._initial_background(), delta=float(delta))
        if fs.mosaic:
            lo, hi = np.log(fs.mosaic_bounds_deg)
            st.u_mosaic = _logit((np.log(np.clip(mos, *fs.mosaic_bounds_deg)) - lo) / (hi - lo))
        if fs.domain_size == "anisotropic":
            lo, hi = np.log(fs.domain_size_bounds)
            st.u_N = _logit((np.log(np.clip(N, *fs.domain_size_bounds)) - lo) / (hi - lo))
        elif fs.domain_size == "isotropic":
            lo_s, hi_s = self._iso_bounds(st)
            st.u_N = _logit((0.0 - lo_s) / (hi_s - lo_s))[:, None]
        self._update_physical(st)
        self.prepare_intensities(st)
        # G from the photons above the background estimate over the Bragg photons at G = 1
        ev = self.forward(st, g_override=np.zeros(n))
        bragg = self._per_lattice(shoebox_moments(ds, ev.bragg)[:, 0])
        excess = self._per_lattice(shoebox_moments(ds, np.asarray(ds.counts, dtype=np.float64)
                                                    - (ev.lam - ev.bragg))[:, 0])
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.where(bragg > 0, np.maximum(excess, 0.0) / bragg, 1.0)
        st.g = np.log(np.clip(G, 1e-3, 1e6))
        return st

    def _per_lattice(self, per_sb):
        """Sum of a per-shoebox quantity over each lattice's shoeboxes."""
        return np.add.reduceat(per_sb, self.lat_sb_off[:-1], axis=0)

    def _iso_bounds(self, st):
        lo, hi = np.log(self.fs.domain_size_bounds)
        lnN0 = np.log(st.N0)
        return (lo - lnN0).max(axis=1), (hi - lnN0).min(axis=1)

    def _update_physical(self, st, lattices=None):
        """Physical mosaic and N (and their log-derivatives) from the free parameters."""
        fs = self.fs
        sel = slice(None) if lattices is None else lattices
        if fs.mosaic:
            lo, hi = np.log(fs.mosaic_bounds_deg)
            s = _logistic(st.u_mosaic[sel])
            st.mosaic_deg[sel] = np.exp(lo + (hi - lo) * s)
            if st.mosaic_dlog is None:
                st.mosaic_dlog = np.zeros(st.n_lat)
            st.mosaic_dlog[sel] = (hi - lo) * s * (1 - s)
        if fs.domain_size == "anisotropic":
            lo, hi = np.log(fs.domain_size_bounds)
            s = _logistic(st.u_N[sel])
            st.N[sel] = np.exp(lo + (hi - lo) * s)
            if st.N_dlog is None:
                st.N_dlog = np.zeros((st.n_lat, 3))
            st.N_dlog[sel] = (hi - lo) * s * (1 - s)
        elif fs.domain_size == "isotropic":
            lo_s, hi_s = self._iso_bounds(st)
            s = _logistic(st.u_N[sel, 0])
            t = lo_s[sel] + (hi_s[sel] - lo_s[sel]) * s
            st.N[sel] = st.N0[sel] * np.exp(t)[:, None]
            if st.N_dlog is None:
                st.N_dlog = np.zeros((st.n_lat, 1))
            st.N_dlog[sel, 0] = (hi_s[sel] - lo_s[sel]) * s * (1 - s)

    def _initial_background(self):
        """Per shoebox b0 = ln(trimmed mean of the counts), flat."""
        ds = self.ds
        bg = np.zeros((ds.n_shoeboxes, 3))
        for k in range(ds.n_shoeboxes):
            a, b = ds.pixel_offset[k], ds.pixel_offset[k + 1]
            c = np.asarray(ds.counts[a:b], dtype=np.float64)[ds.mask[a:b]]
            if len(c):
                c = np.sort(c)[: max(1, int(0.75 * len(c)))]
            bg[k, 0] = math.log(max(float(c.mean()) if len(c) else 0.0, 0.02))
        return bg

    # ------------------------------------------------------------------ evaluation
    def energies(self, st, dlat=None):
        """(n_lat, n_chan) photon energies of every lattice's channels."""
        d = st.dlat if dlat is None else dlat
        return self.batch.energy_ev[None, :] + (st.delta + d)[:, None]

    def prepare_intensities(self, st):
        """Intensities at the current global δ and per-lattice δ_j (exact, then linear in δ_j).

        Unless ``offset_moves_intensity``, the intensities stay those at the first state's
        energies and do not move with the offsets: the held f′/f″ are what S1 refines next,
        and letting their edge pull the energy offset would write the reference's edge into
        the data (on simulated data with a measured edge 5 eV above Chantler's, the offset
        then comes out 5 eV off). The offset is then determined by the geometry alone.
        """
        if self.fs.offset_moves_intensity or self._I is None:
            self._I, self._dI = self.intensity(self.energies(st))
            if not self.fs.offset_moves_intensity:
                self._dI = np.zeros_like(self._dI)
            self._I_dlat = st.dlat.copy()

    def shoeboxes_of(self, lattices):
        """Shoebox indices of the given lattices (in order)."""
        lattices = np.asarray(lattices, dtype=np.int64)
        if len(lattices) == 0:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(self.lat_sb_off[j], self.lat_sb_off[j + 1]) for j in lattices])

    def evaluate(self, st, lattices=None, want_lam=False, g_override=None, want_jac=False):
        """Kernel results and f_j at ``st`` for the given lattices (default all); with
        ``want_jac`` also every pixel's Jacobian row of λ over the kernel's local columns."""
        return self._evaluate(st, lattices, want_lam, g_override, want_jac, True)

    def forward(self, st, g_override=None):
        """λ, its Bragg part and the NLL at ``st`` without the matrix-parameter derivatives.

        The same λ, Bragg part, ``nll_sb`` and ``f_lat`` as ``evaluate(st, want_lam=True)``
        (bit for bit) at a fraction of the cost: the kernel skips ∂/∂q of every domain in a
        band. ``grad_sb``/``fisher_sb`` of the result hold only the 8 columns after q
        (ln N, δ, g, background plane) and are not meant for use.
        """
        return self._evaluate(st, None, True, g_override, False, False)

    def _evaluate(self, st, lattices, want_lam, g_override, want_jac, derivatives):
        fs = self.fs
        lat = np.arange(st.n_lat) if lattices is None else np.asarray(lattices, dtype=np.int64)
        for j in lat:
            a, b = self.dom_off[j], self.dom_off[j + 1]
            mi, dm, _ = domain_matrices(st.U0[j], st.theta[j], self.param, st.p[j], st.mosaic_deg[j],
                                        int(self.n_dom[j]), want_rotation=fs.rotation and derivatives,
                                        want_cell=fs.cell and derivatives, want_mosaic=fs.mosaic and derivatives)
            self._minv[a:b] = mi
            if derivatives:
                self._dminv[a:b] = dm
        dminv = self._dminv if derivatives else self._dminv[:, :0]
        il = self.batch.inverse_wavelength(st.delta + st.dlat)
        shift = (st.dlat - self._I_dlat)[self.sb_lat]
        I_sb = self._I + self._dI * shift[:, None] if (np.any(shift) and self.fs.offset_moves_intensity) \
            else self._I
        g = st.g if g_override is None else g_override
        sbs = self.shoeboxes_of(lat) if lattices is not None else None
        out = self.batch.evaluate(self._minv, dminv, self.dom_off, st.N, il, I_sb, self._dI,
                                  np.exp(g), st.bg, want_lam=want_lam, shoeboxes=sbs, want_jac=want_jac)
        f_lat = self._per_lattice(out.nll_sb) + self.prior(st)[0]
        return Evaluation(out.nll_sb, out.grad_sb, out.fisher_sb, f_lat, out.lam, out.bragg, out.jac)

    def prior(self, st):
        """Priors per lattice: value (n_lat,), gradient (n_lat, m+1), Hessian diagonal (n_lat, m+1)."""
        fs, lay = self.fs, self.layout
        f = np.zeros(st.n_lat)
        g = np.zeros((st.n_lat, lay.m + 1))
        h = np.zeros((st.n_lat, lay.m + 1))
        if fs.cell and fs.cell_sigma is not None:
            d = st.p - fs.cell_target[None, :]
            inv2 = 1.0 / np.asarray(fs.cell_sigma) ** 2
            f += 0.5 * np.sum(d * d * inv2, axis=1)
            g[:, lay.cols["p"]] = d * inv2
            h[:, lay.cols["p"]] = inv2
        if fs.offset == "per_lattice":
            inv2 = 1.0 / fs.offset_sigma_ev ** 2
            f += 0.5 * st.dlat ** 2 * inv2
            g[:, lay.cols["dlat"][0]] = st.dlat * inv2
            h[:, lay.cols["dlat"][0]] = inv2
        # weak priors on ln η and ln N about the stored values (Gauss–Newton curvature)
        if fs.mosaic and fs.mosaic_log_sigma is not None:
            inv2 = 1.0 / fs.mosaic_log_sigma ** 2
            d = np.log(st.mosaic_deg / st.mosaic0)
            c = lay.cols["mosaic"][0]
            f += 0.5 * d * d * inv2
            g[:, c] = d * inv2 * st.mosaic_dlog
            h[:, c] = inv2 * st.mosaic_dlog ** 2
        if fs.domain_size != "off" and fs.domain_size_log_sigma is not None:
            inv2 = 1.0 / fs.domain_size_log_sigma ** 2
            d = np.log(st.N / st.N0)
            if fs.domain_size == "isotropic":
                d = d[:, :1]
            for i, c in enumerate(lay.cols["N"]):
                f += 0.5 * d[:, i] ** 2 * inv2
                g[:, c] = d[:, i] * inv2 * st.N_dlog[:, i]
                h[:, c] = inv2 * st.N_dlog[:, i] ** 2
        return f, g, h

    # ------------------------------------------------------------------ linear algebra
    def systems(self, st, ev, mu, lattices, with_delta=False):
        """Per-lattice reduced systems (background planes eliminated).

        Returns
        -------
        S : (n_sel, k, k), rhs : (n_sel, k), parts : dict
            k = m (+1 with the global δ); μ-damped (Marquardt, on the diagonal of the full
            information); ``parts`` holds what the back-substitution needs.
        """
        return self.reduce(self.blocks(st, ev, lattices, with_delta), mu)

    def blocks(self, st, ev, lattices, with_delta=False):
        """The μ-independent part of :meth:`systems`: every shoebox's information and gradient
        in the lattice's columns (x and the background plane), and the priors."""
        lay = self.layout
        k = lay.m + 1 if with_delta else lay.m
        lattices = np.asarray(lattices, dtype=np.int64)
        sbs = self.shoeboxes_of(lattices)
        T = lay.transform(st)[:, :, :k]
        Tsb = T[self.sb_lat[sbs]]
        nG = lay.nG
        F = ev.fisher_sb[sbs]
        gsb = ev.grad_sb[sbs]
        Tt = np.ascontiguousarray(np.transpose(Tsb, (0, 2, 1)))
        A = Tt @ F[:, :nG, :nG] @ Tsb          # batched matmul (BLAS), not a 3-operand einsum
        C = Tt @ F[:, :nG, nG:]
        r = (Tt @ gsb[:, :nG, None])[:, :, 0]
        n_sb_lat = np.diff(self.lat_sb_off)[lattices]
        starts = np.concatenate([[0], np.cumsum(n_sb_lat)[:-1]])
        _, gp, hp = self.prior(st)
        return {"k": k, "lattices": lattices, "sbs": sbs, "A": A, "C": C, "r": r, "gB": gsb[:, nG:],
                "FBB": F[:, nG:, nG:], "starts": starts,
                "lat_of_sb": np.repeat(np.arange(len(lattices)), n_sb_lat),
                "adiag": np.add.reduceat(np.diagonal(A, axis1=1, axis2=2), starts, axis=0),
                "gp": gp[lattices, :k], "hp": hp[lattices, :k]}

    def reduce(self, blk, mu):
        """:meth:`systems` from :meth:`blocks` at damping ``mu`` (n_sel,)."""
        k, A, C, gB, FBB, starts = blk["k"], blk["A"], blk["C"], blk["gB"], blk["FBB"], blk["starts"]
        lat_of_sb = blk["lat_of_sb"]
        mu_sb = np.asarray(mu)[lat_of_sb]
        D = FBB + mu_sb[:, None, None] * (np.eye(3)[None] * FBB)
        Dinv = np.linalg.inv(D)
        W = C @ Dinv
        S_sb = A - W @ np.transpose(C, (0, 2, 1))
        rhs_sb = blk["r"] - (W @ gB[:, :, None])[:, :, 0]
        S = np.add.reduceat(S_sb, starts, axis=0)
        rhs = np.add.reduceat(rhs_sb, starts, axis=0)
        rhs = rhs + blk["gp"]
        hdiag = blk["hp"]
        S = S + hdiag[:, :, None] * np.eye(k)[None]
        S = S + (np.asarray(mu)[:, None] * (blk["adiag"] + hdiag))[:, :, None] * np.eye(k)[None]
        gBDg = np.sum(gB * (Dinv @ gB[:, :, None])[:, :, 0], axis=1)
        parts = {"sbs": blk["sbs"], "C": C, "Dinv": Dinv, "gB": gB, "starts": starts,
                 "gBDg": np.add.reduceat(gBDg, starts), "lat_of_sb": lat_of_sb}
        return S, rhs, parts

    def gradient(self, st, ev):
        """Gradient of every f_j: with respect to x (n_lat, m + 1, the last column the global
        δ) and to the background planes (n_sb, 3)."""
        lay = self.layout
        T = lay.transform(st)[self.sb_lat]
        g_x = self._per_lattice(np.einsum("sik,si->sk", T, ev.grad_sb[:, :lay.nG])) + self.prior(st)[1]
        return g_x, ev.grad_sb[:, lay.nG:]

    def step(self, st, ev, mu, lattices, blocks=None):
        """Damped Gauss–Newton steps of the given lattices (global δ fixed).

        ``blocks``: :meth:`blocks` of these lattices at (st, ev) when already at hand.

        Returns
        -------
        dx : (n_sel, m), dB : (n_sel_sb, 3), decrement : (n_sel,)
            ``decrement`` = −gᵀΔ (with μ = 0 it is gᵀF⁻¹g).
        """
        S, rhs, parts = self.reduce(self.blocks(st, ev, lattices) if blocks is None else blocks, mu)
        dx = -solve_batched(S, rhs)
        dxs = dx[parts["lat_of_sb"]]
        dB = -np.einsum("sij,sj->si", parts["Dinv"], parts["gB"] + np.einsum("skj,sk->sj", parts["C"], dxs))
        dec = -np.einsum("lk,lk->l", rhs, dx) + parts["gBDg"]
        return dx, dB, dec

    def apply(self, st, lattices, dx, dB, sbs):
        """A new state: ``st`` moved by the steps of the given lattices."""
        lay = self.layout
        new = st.copy()
        lattices = np.asarray(lattices, dtype=np.int64)
        if "theta" in lay.cols:
            new.theta[lattices] += dx[:, lay.cols["theta"]]
        if "p" in lay.cols:
            new.p[lattices] += dx[:, lay.cols["p"]]
        if "mosaic" in lay.cols:
            new.u_mosaic[lattices] += dx[:, lay.cols["mosaic"][0]]
        if "N" in lay.cols:
            new.u_N[lattices] += dx[:, lay.cols["N"]]
        if "dlat" in lay.cols:
            new.dlat[lattices] += dx[:, lay.cols["dlat"][0]]
        new.g[lattices] += dx[:, lay.cols["g"][0]]
        new.bg[sbs] += dB
        self._update_physical(new, lattices)
        return new

    # ------------------------------------------------------------------ solver
    def fit(self, st, ev=None, log=None, resume=None, on_iteration=None, lattices=None):
        """Levenberg–Marquardt on every lattice until each converges or stalls.

        Parameters
        ----------
        st : CrystalState
            Start (changed in place).
        ev : Evaluation, optional
            The evaluation at ``st`` (computed when not given).
        log : callable, optional
        resume : dict, optional
            Progress saved by ``on_iteration`` (continues exactly where it was taken).
        on_iteration : callable, optional
            Called after every iteration with a function that returns the progress
            (``mu``, ``active``, ``converged``, ``iterations``, ``decrement``, ``it``,
            ``n_eval``); a checkpoint stores it together with ``st``.
        lattices : int array, optional
            Fit only these lattices (default all); the others are left as they are and
            reported as not converged with no iterations.

        Returns
        -------
        st : CrystalState
        ev : Evaluation
            At the returned state.
        info : dict
            ``converged`` (n_lat,) bool, ``iterations`` (n_lat,), ``evaluations`` (int),
            ``decrement`` (n_lat,).
        """
        fs = self.fs
        n = st.n_lat
        ev = ev or self.evaluate(st)
        mu = np.full(n, 1e-3)
        active = np.ones(n, bool)
        if lattices is not None:
            active[:] = False
            active[np.asarray(lattices, dtype=np.int64)] = True
        converged = np.zeros(n, bool)
        iterations = np.zeros(n, np.int64)
        decrement = np.full(n, np.inf)
        n_eval, it0 = 1, 0
        if resume is not None:
            mu, active, converged = resume["mu"].copy(), resume["active"].astype(bool), resume["converged"].astype(bool)
            iterations, decrement = resume["iterations"].astype(np.int64), resume["decrement"].copy()
            n_eval, it0 = int(resume["n_eval"]), int(resume["it"])
        for it in range(it0, fs.max_iterations + 1):
            idx = np.flatnonzero(active)
            if len(idx) == 0:
                break
            # one set of blocks for the decrement (μ = 0) and the damped step; the step of a
            # lattice does not depend on which others are in the set
            blk = self.blocks(st, ev, idx)
            _, _, dec = self.step(st, ev, np.zeros(len(idx)), idx, blocks=blk)
            decrement[idx] = dec
            done = dec < fs.tol
            converged[idx[done]] = True
            active[idx[done]] = False
            if np.all(done) or it == fs.max_iterations:
                break
            dx, dB, _ = self.step(st, ev, mu[idx], idx, blocks=blk)
            moving = np.repeat(~done, np.diff(self.lat_sb_off)[idx])
            idx, dx, dB = idx[~done], dx[~done], dB[moving]
            sbs = self.shoeboxes_of(idx)
            trial = self.apply(st, idx, dx, dB, sbs)
            ev_t = self.evaluate(trial, lattices=idx)
            n_eval += 1
            better = ev_t.f_lat[idx] < ev.f_lat[idx]
            good = idx[better]
            gsb = self.shoeboxes_of(good)
            st.take(trial, good, gsb)
            ev.take(ev_t, good, gsb)
            mu[good] = np.maximum(mu[good] / 3.0, 1e-9)
            bad = idx[~better]
            mu[bad] *= 8.0
            stalled = bad[mu[bad] > 1e8]
            active[stalled] = False
            iterations[idx] += 1
            if log:
                log(f"iteration {it + 1}: {len(idx)} lattices moving, {int(converged.sum())} converged, "
                    f"{len(good)} steps accepted")
            if on_iteration is not None:
                on_iteration(lambda: {"mu": mu, "active": active, "converged": converged,
                                      "iterations": iterations, "decrement": decrement,
                                      "it": it + 1, "n_eval": n_eval})
        return st, ev, {"converged": converged, "iterations": iterations, "evaluations": n_eval,
                        "decrement": decrement}

    def offset_terms(self, st, ev):
        """Per-lattice profiled gradient and curvature of the objective in the global δ.

        Returns
        -------
        h, c : (n_lat,)
            With every lattice's own parameters at their linear response, the objective
            changes by Σ_j (h_j Δδ + ½ c_j Δδ²).
        """
        lat = np.arange(st.n_lat)
        S, rhs, parts = self.systems(st, ev, np.zeros(st.n_lat), lat, with_delta=True)
        m = self.layout.m
        Sxx, Sxd = S[:, :m, :m], S[:, :m, m]
        a = solve_batched(Sxx, rhs[:, :m])
        b = solve_batched(Sxx, Sxd)
        h = rhs[:, m] - np.einsum("lk,lk->l", Sxd, a)
        c = S[:, m, m] - np.einsum("lk,lk->l", Sxd, b)
        self._offset_parts = (S, rhs, parts)
        return h, c

    def follow_offset(self, st, d_delta):
        """State moved by a global Δδ with every lattice at its linear response."""
        S, rhs, parts = self._offset_parts
        m = self.layout.m
        dx = -solve_batched(S[:, :m, :m], rhs[:, :m] + S[:, :m, m] * d_delta)
        C = parts["C"]
        dxs = dx[parts["lat_of_sb"]]
        dB = -np.einsum("sij,sj->si", parts["Dinv"], parts["gB"] + np.einsum("skj,sk->sj", C[:, :m], dxs)
                        + C[:, m] * d_delta)
        new = self.apply(st, np.arange(st.n_lat), dx, dB, parts["sbs"])
        new.delta = st.delta + d_delta
        return new

    def covariance(self, st, ev):
        """Inverse of each lattice's reduced information (n_lat, m, m), priors included."""
        S, _, _ = self.systems(st, ev, np.zeros(st.n_lat), np.arange(st.n_lat))
        return np.linalg.pinv(S)


def solve_batched(S, b):
    """Batched solve of symmetric systems, falling back to the pseudo-inverse when singular."""
    try:
        return np.linalg.solve(S, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("lij,lj->li", np.linalg.pinv(S), b)
