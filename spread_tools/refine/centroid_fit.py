"""Crystal models refined to observed spot centroids, with the pixel model's spots.

For data without pixels (a DIALS table without shoeboxes, only observed centroids
``xyzobs.px``), and as a check of the pixel model on real stills: the model spot of each
reflection is the Bragg part of λ over its bounding box (lattice transform, mosaic domains,
spectrum, polarization, solid angle), its centroid is mapped to DIALS pixel coordinates
(with DIALS' parallax correction when the panel has one), and the weighted squared distance
to the observed centroids is minimised per lattice over the orientation and the free cell
constants (Gauss–Newton with a Levenberg–Marquardt damping; the centroid derivatives are
exact through the pixel model's Jacobian, the parallax map is taken as the identity in the
step, which only slows convergence, not where it converges).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools.model.crystal_params import CellParameterization, domain_matrices, split_orientation
from spread_tools.model.geometry import pixel_to_lab_mm
from spread_tools.model.lattice_batch import LatticeBatch
from spread_tools.refine.lattice_fit import FitSettings, LatticeProblem, solve_batched

__all__ = ["CentroidFit", "fit_centroids", "model_centroids", "parallax_map"]


@dataclasses.dataclass
class CentroidFit:
    """Result of :func:`fit_centroids`.

    Attributes
    ----------
    A : ndarray (n_lat, 3, 3)
        Refined orientation matrices.
    centroid_start_px, centroid_px : ndarray (n_sb, 2)
        Model centroids (DIALS pixel coordinates) at the stored and at the refined models.
    iterations : ndarray (n_lat,)
    """

    A: np.ndarray
    centroid_start_px: np.ndarray
    centroid_px: np.ndarray
    iterations: np.ndarray


def model_centroids(prob, st, to_dials=None):
    """Model spot centroids (n_sb, 2) and their derivatives (n_sb, 2, m) over x's columns.

    Parameters
    ----------
    prob : LatticeProblem
    st : CrystalState
    to_dials : callable, optional
        ``(k, xy_px) -> xy_px`` mapping a thin-sensor pixel position of shoebox k to DIALS
        pixel coordinates (parallax).
    """
    ds, lay = prob.ds, prob.layout
    ev = prob.evaluate(st, want_lam=True, want_jac=True)
    sb = ds.pixel_shoebox()
    xy = ds.pixel_xy() + 0.5
    w = ev.bragg
    T = lay.transform(st)[:, :lay.nG, :lay.m][prob.sb_lat][sb]
    dB = np.einsum("pi,pim->pm", ev.jac[:, :lay.nG], T)
    n = ds.n_shoeboxes
    tot = np.bincount(sb, weights=w, minlength=n)
    # a spot the model puts outside its box has no centroid (NaN), and is left out of fits
    tot = np.where(tot > 0, tot, np.nan)
    cen = np.stack([np.bincount(sb, weights=w * xy[:, i], minlength=n) for i in (0, 1)], 1) / tot[:, None]
    d = xy - cen[sb]
    dcen = np.zeros((n, 2, lay.m))
    for i in (0, 1):
        for c in range(lay.m):
            dcen[:, i, c] = np.bincount(sb, weights=d[:, i] * dB[:, c], minlength=n) / tot
    if to_dials is not None:
        cen = np.array([to_dials(k, cen[k]) for k in range(n)])
    return cen, dcen


def fit_centroids(ds, observed_px, weight, to_dials=None, rotation=True, cell=True, mosaic=False,
                  domain_size="off", backend="cpu", max_iterations=30, tol=1e-8):
    """Refine every lattice's orientation (and cell) to observed spot centroids.

    Parameters
    ----------
    ds : spread_tools.io.dataset.Dataset
        The reflections as shoeboxes (their bounding boxes; counts are not used).
    observed_px : ndarray (n_sb, 2)
        Observed centroids (fast, slow pixels).
    weight : ndarray (n_sb, 2)
        Weights of the squared residuals (1/variance).
    to_dials : callable, optional
        See :func:`model_centroids`.
    rotation, cell, mosaic : bool
        Families to refine.
    domain_size : {"off", "isotropic", "anisotropic"}
    backend : str
    max_iterations : int
    tol : float
        Relative decrease of the weighted sum of squares that ends the iterations.

    Returns
    -------
    CentroidFit
    """
    param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
    fs = FitSettings(rotation=rotation, cell=cell, domain_size=domain_size, mosaic=mosaic, offset="off")

    def unit_intensity(energies):       # centroids do not depend on the spot's intensity
        shape = (ds.n_shoeboxes, energies.shape[1])
        return np.ones(shape), np.zeros(shape)
    prob = LatticeProblem(LatticeBatch(ds, backend=backend), ds, param, fs, unit_intensity)
    U0, p0 = zip(*[split_orientation(ds.A[j], param) for j in range(ds.n_lattices)])
    st = prob.initial_state(np.array(U0), np.array(p0))
    lay = prob.layout
    geo = np.concatenate([lay.cols[f] for f in ("theta", "p", "mosaic", "N") if f in lay.cols])
    obs = np.asarray(observed_px, float)
    wt = np.asarray(weight, float)

    def cost(cen):
        r = np.where(np.isfinite(cen), cen - obs, 0.0)
        return prob._per_lattice(np.sum(wt * r * r, axis=1))

    cen0, dcen = model_centroids(prob, st, to_dials)
    dcen = dcen.copy()
    cen = cen0.copy()
    f = cost(cen)
    mu = np.full(ds.n_lattices, 1e-3)
    iterations = np.zeros(ds.n_lattices, np.int64)
    active = np.ones(ds.n_lattices, bool)
    for _ in range(max_iterations):
        if not active.any():
            break
        ok = np.isfinite(cen).all(axis=1)
        r = np.where(ok[:, None], cen - obs, 0.0)
        J = np.where(ok[:, None, None], dcen[:, :, geo], 0.0)
        H = prob._per_lattice(np.einsum("si,sim,sin->smn", wt, J, J))
        g = prob._per_lattice(np.einsum("si,si,sim->sm", wt, r, J))
        H = H + mu[:, None, None] * np.diagonal(H, axis1=1, axis2=2)[:, :, None] * np.eye(len(geo))
        dx = np.zeros((ds.n_lattices, lay.m))
        dx[:, geo] = -solve_batched(H, g)
        idx = np.flatnonzero(active)
        trial = prob.apply(st, idx, dx[idx], np.zeros((0, 3)), np.zeros(0, np.int64))
        cen_t, dcen_t = model_centroids(prob, trial, to_dials)
        f_t = cost(cen_t)
        better = active & (f_t < f)
        worse = active & ~better
        sbs = prob.shoeboxes_of(np.flatnonzero(better))
        st.take(trial, np.flatnonzero(better), sbs)
        cen[sbs], dcen[sbs] = cen_t[sbs], dcen_t[sbs]
        small = better & ((f - f_t) < tol * f)
        f = np.where(better, f_t, f)
        mu = np.where(better, mu / 3, mu * 8)
        iterations += active
        active &= ~small & (mu < 1e8)
        active &= ~(worse & (mu >= 1e8))
    A = np.stack([domain_matrices(st.U0[j], st.theta[j], param, st.p[j], st.mosaic_deg[j], 1,
                                  False, False, False)[2] for j in range(ds.n_lattices)])
    return CentroidFit(A=A, centroid_start_px=cen0, centroid_px=cen, iterations=iterations)


def parallax_map(ds, detector, info):
    """``to_dials`` for :func:`model_centroids`: thin-sensor pixel position → DIALS pixel
    coordinates through the lab ray (DIALS' parallax correction where the panel has one)."""
    from spread_tools.io.dials.expt import s1_to_px

    def to_dials(k, xy):
        p = int(ds.sb_panel[k])
        r = pixel_to_lab_mm(detector[p], xy[0], xy[1])
        x, y = s1_to_px(detector[p], info[p], r / np.linalg.norm(r))
        return np.array([float(np.squeeze(x)), float(np.squeeze(y))])
    return to_dials
