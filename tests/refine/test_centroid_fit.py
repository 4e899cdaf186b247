"""Tests of the centroid refinement (spread_tools.refine.centroid_fit) on real DIALS stills:
centroid derivatives against finite differences, and a fit that lowers its objective."""

from pathlib import Path

import numpy as np
import pytest

from spread_tools.io.dials.expt import read_expt
from spread_tools.io.dials.importer import ImportSettings, Shot, build_dataset
from spread_tools.io.dials.refl import read_refl
from spread_tools.model.crystal_params import CellParameterization, split_orientation
from spread_tools.model.geometry import HC_EV_A
from spread_tools.model.lattice_batch import LatticeBatch
from spread_tools.refine.centroid_fit import fit_centroids, model_centroids, parallax_map
from spread_tools.refine.lattice_fit import FitSettings, LatticeProblem

D = Path(__file__).resolve().parents[2] / "test_data" / "dials"


@pytest.fixture(scope="module")
def cunir():
    el = read_expt(D / "CuNiR_integrated.expt")
    table = read_refl(D / "CuNiR_integrated.refl")
    k = 1
    e = HC_EV_A / el.beams[el.experiments[k].beam].wavelength_a
    ds, _ = build_dataset([Shot(D / "CuNiR_integrated.expt", D / "CuNiR_integrated.refl", None, k)],
                          ImportSettings(predictions_only=True, cell_tolerance=0.1, channels_min_ev=e,
                                         channels_max_ev=e))
    rows = np.flatnonzero(np.asarray(table["id"]) == k)
    rows = rows[(np.asarray(table["flags"])[rows] & 256) > 0]
    keep = np.arange(0, ds.n_shoeboxes, 8)            # 61 reflections, for speed
    obs = np.asarray(table["xyzobs.px.value"])[rows, :2][keep]
    return ds.select_shoeboxes(keep), obs, el.detectors[el.experiments[k].detector]


def _problem(ds):
    param = CellParameterization.for_spacegroup(ds.spacegroup, ds.cell)
    fs = FitSettings(rotation=True, cell=True, domain_size="off", mosaic=False, offset="off")
    ones = lambda e: (np.ones((ds.n_shoeboxes, e.shape[1])), np.zeros((ds.n_shoeboxes, e.shape[1])))  # noqa: E731
    prob = LatticeProblem(LatticeBatch(ds, backend="cpu", cut=30.0), ds, param, fs, ones)
    U0, p0 = zip(*[split_orientation(ds.A[j], param) for j in range(ds.n_lattices)])
    return prob, prob.initial_state(np.array(U0), np.array(p0))


def test_centroid_derivatives_match_finite_differences(cunir):
    ds, _, _ = cunir
    prob, st = _problem(ds)
    cen, dcen = model_centroids(prob, st)
    ok = np.isfinite(cen).all(axis=1)
    assert ok.sum() > 40
    for c, h in ((0, 1e-7), (1, 1e-7), (2, 1e-7), (3, 1e-5)):       # θx, θy, θz (rad), a (Å)
        dx = np.zeros((1, prob.layout.m))
        dx[0, c] = h
        none = np.zeros((0, 3)), np.zeros(0, np.int64)
        cp, _ = model_centroids(prob, prob.apply(st, [0], dx, *none))
        cm, _ = model_centroids(prob, prob.apply(st, [0], -dx, *none))
        numeric = (cp - cm)[ok] / (2 * h)
        np.testing.assert_allclose(dcen[ok][:, :, c], numeric, rtol=2e-3, atol=1e-3 * np.abs(numeric).max())


def test_fit_moves_the_model_towards_the_observed_centroids(cunir):
    ds, obs, det = cunir
    fit = fit_centroids(ds, obs, np.ones_like(obs), to_dials=parallax_map(ds, det.detector, det.info))

    def cost(c):
        ok = np.isfinite(c).all(axis=1)
        return np.sum((c[ok] - obs[ok]) ** 2)
    assert cost(fit.centroid_px) < cost(fit.centroid_start_px)
    assert np.isfinite(fit.A).all() and fit.iterations[0] >= 1
