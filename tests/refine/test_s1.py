"""Tests of the S1 refinement (spread_tools.refine.s1): gradients, curvature, determinism,
checkpoint/resume, input errors. Tiny datasets cut from test_data/dataset.h5."""

import dataclasses
import math
import signal
from pathlib import Path

import numpy as np
import pytest

from spread_tools import refine as R
from spread_tools.config import resolve
from spread_tools.errors import InputError
from spread_tools.io.dataset import Dataset
from spread_tools.refine import mpi, s1
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"


@pytest.fixture(scope="module")
def full():
    return Dataset.read(TEST_DATA / "dataset.h5")


@pytest.fixture(scope="module")
def cache():
    return SFCache.read(TEST_DATA / "sf_cache.h5")


@pytest.fixture(scope="module")
def tiny(full):
    """Two lattices, a third of their shoeboxes (a few thousand pixels)."""
    ds = full.select_lattices([0, 1])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[::3] = True
    return ds.select_shoeboxes(keep)


def cfg_of(*words):
    return resolve(R.REFINE_SCHEMA, overrides=list(words))


def problem(ds, cache, *words):
    cfg = cfg_of(*words)
    prep = R.prepare_data([ds], cache, cfg.shoebox.min_pixels)
    return R.S1Problem(prep, cache, cfg, backend="cpu")


def start_x(p):
    glob, loc = p.start_vector()
    return np.concatenate([glob, loc])


RESTRAINT_CASES = {
    "sauter_fp": ("restraints.fdp.mean=None",),
    "sauter_fdp": ("restraints.fp.mean=None", "restraints.fdp.mean=0.05"),
    "kramers_kronig": ("restraints.fp.mean=None", "restraints.fdp.mean=None",
                       "restraints.kramers_kronig.use=True", "restraints.kramers_kronig.weight=30"),
    "none": ("restraints.fp.mean=None", "restraints.fdp.mean=None"),
    "sauter_edges": ("restraints.fp.edge_sigma=0.5", "restraints.fdp.edge_sigma=1.0"),
}
ACTIVE = {"none": [], "sauter_edges": ["sauter_fp", "sauter_fp_edge", "sauter_fdp", "sauter_fdp_edge"]}


@pytest.mark.parametrize("case", list(RESTRAINT_CASES))
def test_gradient_matches_finite_differences(tiny, cache, case, gradient_check):
    p = problem(tiny, cache, *RESTRAINT_CASES[case])
    assert p.restraints.active == ACTIVE.get(case, [case])
    rng = np.random.default_rng(3)
    x = start_x(p)
    x[:p.n_glob] += rng.normal(0, 0.3, p.n_glob)         # off the optimum: large gradients
    x[p.n_glob:] += rng.normal(0, 0.05, p.n_x - p.n_glob)
    f0 = p.evaluate(x)[0]
    n = p.n_ref * p.n_grid
    ng = p.n_grid
    # every site's grid ends and a middle point, for fp and fdp; some g and b entries
    idx = []
    for s in range(p.n_ref):
        for k in (0, ng // 2, ng - 1):
            idx += [s * ng + k, n + s * ng + k]
    idx += [p.n_glob, p.n_glob + 1]
    b0 = p.n_glob + p.n_lat
    idx += [b0, b0 + 1, b0 + 2, p.n_x - 1]
    gradient_check(p.evaluate, x, idx, abs_tol=2e-7 * max(1.0, abs(f0)))


def test_objective_twice_bit_identical(tiny, cache):
    p = problem(tiny, cache, "restraints.kramers_kronig.use=True")
    x = start_x(p)
    f1, g1 = p.evaluate(x)
    f2, g2 = p.evaluate(x.copy())
    assert f1 == f2
    assert np.array_equal(g1, g2)


def test_objective_is_poisson_nll_brute_force(tiny, cache):
    """Data term against λ computed independently (direct_lambda) and the saturated constant,
    plus the priors written out here: ln G ((g - median start g)² / (2 σ²)) and the
    background slopes (b1² + b2²) / (2 σ_s²)."""
    from spread_tools.model.pixel import direct_lambda
    p = problem(tiny, cache, "restraints.fp.mean=None", "restraints.fdp.mean=None",
                "lattice.ln_G_sigma=0.5")
    x = start_x(p)
    x[p.n_glob:p.n_glob + p.n_lat] += [0.3, -0.2]          # off the prior's centre
    f, _ = p.evaluate(x)
    fp, fdp, g, b = p.split(x)
    I, _, _ = p._intensities(fp, fdp, grad=False)
    pix = np.arange(0, p.local.n_pixels, 7)
    lam_direct = direct_lambda(p.local, p.pm.hkl, I, np.exp(g), b, pixels=pix)
    lam = p.pm.expected_counts(I, np.exp(g), b)
    np.testing.assert_allclose(lam[pix], lam_direct, rtol=2e-5)
    k = p.local.counts.astype(float)
    m = p.local.mask
    sat = np.where(k > 0, k - k * np.log(np.where(k > 0, k, 1)), 0.0)
    expect = np.sum((lam - k * np.log(lam))[m]) - np.sum(sat[m])
    g_start = start_x(p)[p.n_glob:p.n_glob + p.n_lat]
    assert p.lnG_mu == pytest.approx(np.median(g_start), abs=0.3)   # fitted again with the prior
    expect += np.sum((g - p.lnG_mu) ** 2) / (2 * 0.5 ** 2)
    assert np.any(b[:, 1:] != 0)
    expect += np.sum(b[:, 1:] ** 2) / (2 * 0.1 ** 2)
    assert f == pytest.approx(expect, rel=1e-9)


def test_profiled_fisher_matches_brute_force_schur(full, cache):
    """Fisher information with the local parameters profiled out, against the Schur complement
    of the full Jᵀ diag(1/λ) J with J from finite differences of λ."""
    ds = full.select_lattices([3])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[:12] = True
    ds = ds.select_shoeboxes(keep)
    p = problem(ds, cache, "restraints.fp.mean=None", "restraints.fdp.mean=None")
    x = start_x(p)
    lam0 = p.predicted(x)
    J = np.empty((len(lam0), p.n_x))
    h = 1e-5
    for i in range(p.n_x):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        J[:, i] = (p.predicted(xp) - p.predicted(xm)) / (2 * h)
    W = np.where(p.local.mask, 1 / lam0, 0.0)
    F = J.T @ (W[:, None] * J)
    ng = p.n_glob
    A, B, C = F[:ng, :ng], F[:ng, ng:], F[ng:, ng:]
    schur = A - B @ np.linalg.pinv(C) @ B.T
    got = p.local_fisher_profiled(x)
    dA = np.diag(A)
    assert np.sum(dA > 0) > 20                      # this lattice's spectrum covers part of the grid
    scale = np.sqrt(np.outer(dA, dA)) + 1e-12 * dA.max()
    assert np.max(np.abs(got - schur) / scale) < 2e-4      # FD noise amplified by the Schur cancellation
    # the diagonal used for preconditioning is the unprofiled one
    dg, dl = p.local_fisher_diag(x)
    np.testing.assert_allclose(dg, np.diag(A), rtol=1e-5, atol=1e-9 * dA.max())
    np.testing.assert_allclose(dl, np.diag(C), rtol=1e-5, atol=1e-9 * np.diag(C).max())


def test_restraint_hessian_exact(tiny, cache):
    p = problem(tiny, cache, "restraints.kramers_kronig.use=True")
    x = start_x(p)
    H = p.restraint_hessian(x)
    rng = np.random.default_rng(0)
    d = np.zeros(p.n_x)
    d[:p.n_glob] = rng.normal(size=p.n_glob)
    f0, g0 = p.restraint_terms(x)
    f1, _ = p.restraint_terms(x + d)
    # quadratic: f(x+d) = f + g·d + ½ dᵀHd exactly (to round-off)
    assert f1 == pytest.approx(f0 + g0 @ d[:p.n_glob] + 0.5 * d[:p.n_glob] @ H @ d[:p.n_glob], rel=1e-8)


def test_interpolation_matrix_linear_and_adjoint():
    grid = np.arange(7070.0, 7171.0, 4.0)
    chan = np.arange(7070.0, 7170.5, 1.0)
    M = R.interpolation_matrix(chan, grid)
    assert M.shape == (len(chan), len(grid))
    assert M.nnz <= 2 * len(chan)
    u = 0.3 * grid - 7.0
    np.testing.assert_allclose(M @ u, 0.3 * chan - 7.0, rtol=1e-12)
    np.testing.assert_allclose(M @ np.ones(len(grid)), 1.0)
    v = np.random.default_rng(1).normal(size=len(chan))
    assert v @ (M @ u) == pytest.approx((M.T @ v) @ u, rel=1e-12)


def test_energy_grid_covers_and_errors():
    chan = np.arange(7070.0, 7171.0, 1.0)
    w = np.ones((2, len(chan)))
    g = R.energy_grid(chan, w, 4.0)
    assert g[0] == 7070 and g[-1] >= 7170 and len(g) == 26
    with pytest.raises(InputError, match="does not cover"):
        R.energy_grid(chan, w, 4.0, min_ev=7080.0)
    w2 = w.copy()
    w2[:, :20] = 0.0                               # no photons below 7090 eV: allowed
    assert R.energy_grid(chan, w2, 4.0, min_ev=7086.0)[0] == 7086
    with pytest.raises(InputError, match="grid.step_ev"):
        R.energy_grid(chan, w, 0.0)


def test_edge_position_closed_form_and_propagation():
    e = np.arange(0.0, 50.0, 5.0)
    f = np.where(e < 20, 1.0, 5.0)
    f[4] = 2.0                                      # 20 eV: 2.0, 25 eV: 5.0; level 3.0
    edge, _ = R.edge_position(e, f)
    assert edge == pytest.approx(20 + (3 - 2) / (5 - 2) * 5)
    cov = np.diag(np.full(len(e), 0.01))
    edge, sig = R.edge_position(e, f, cov)
    # brute-force propagation by finite differences
    grad = np.zeros(len(e))
    for i in range(len(e)):
        fp, fm = f.copy(), f.copy()
        fp[i] += 1e-6
        fm[i] -= 1e-6
        grad[i] = (R.edge_position(e, fp)[0] - R.edge_position(e, fm)[0]) / 2e-6
    assert sig == pytest.approx(math.sqrt(grad @ cov @ grad), rel=1e-6)
    assert math.isnan(R.edge_position(e, f[::-1])[0])


def test_bad_inputs(tiny, cache):
    with pytest.raises(InputError, match="sites: FE9"):
        problem(tiny, cache, "sites=FE1,FE9")
    with pytest.raises(InputError, match="does not cover"):
        problem(tiny, cache, "grid.min_ev=7160")
    other = dataclasses.replace(tiny, cell=np.asarray(tiny.cell) * np.array([1.1, 1, 1, 1, 1, 1]))
    with pytest.raises(InputError, match="cell"):
        R.prepare_data([other], cache)
    other = dataclasses.replace(tiny, spacegroup="P 1")
    with pytest.raises(InputError, match="space group"):
        R.prepare_data([other], cache)
    mi = tiny.sb_miller_index.copy()
    mi[0] = (40, 40, 40)
    other = dataclasses.replace(tiny, sb_miller_index=mi)
    with pytest.raises(InputError, match="not in"):
        R.prepare_data([other], cache)
    none = dataclasses.replace(tiny, mask=np.zeros_like(tiny.mask))
    with pytest.raises(InputError, match="no usable shoebox"):
        R.prepare_data([none], cache)


def test_all_masked_shoebox_dropped_with_warning(tiny, cache):
    mask = tiny.mask.copy()
    mask[tiny.pixel_offset[1]:tiny.pixel_offset[2]] = False       # shoebox 1 all masked
    ds = dataclasses.replace(tiny, mask=mask)
    prep = R.prepare_data([ds], cache)
    assert prep.ds.n_shoeboxes == tiny.n_shoeboxes - 1
    assert any("all masked" in w for w in prep.warnings)
    assert 1 not in prep.shoebox_orig
    np.testing.assert_array_equal(prep.ds.sb_miller_index, tiny.sb_miller_index[prep.shoebox_orig])


def test_select_order_mapping(full, cache):
    """Shoeboxes not grouped by lattice: the canonical order maps back to the input order."""
    ds = full.select_lattices([2, 0, 1])
    prep = R.prepare_data([ds], cache)
    np.testing.assert_array_equal(prep.ds.sb_miller_index, ds.sb_miller_index[prep.shoebox_orig])
    np.testing.assert_array_equal(prep.ds.A, ds.A[prep.lattice_orig])


@pytest.fixture(scope="module")
def run_full(tiny, cache, tmp_path_factory):
    cfg = cfg_of("optimizer.iterations=4", "restraints.kramers_kronig.use=True")
    ck = tmp_path_factory.mktemp("ck") / "full.ckpt.h5"
    res = R.refine([tiny], cache, cfg, checkpoint=ck, backend="cpu")
    return res


def test_refine_converges_and_reports(run_full, tiny):
    res = run_full
    assert res.converged, res.message
    assert res.fp.shape == res.fp_sigma.shape == (2, 26)
    assert np.all(np.isfinite(res.fp_sigma)) and np.all(res.fp_sigma > 0)
    assert np.all(np.isfinite(res.edge_ev))
    assert res.lattice_G.shape == (tiny.n_lattices,)
    assert res.shoebox_background.shape == (tiny.n_shoeboxes, 3)
    h = res.history
    assert len(h["objective"]) == len(h["gradient_norm"]) == len(h["time_s"]) > 0
    assert res.message.startswith("converged") and np.all(np.diff(h["time_s"]) >= 0)
    assert h["objective"][-1] <= h["objective"][0]
    # σ include the restraints' bias: never below the posterior σ; the Sauter f' scale is estimated
    assert res.uncertainty == "calibrated"
    assert np.all(res.fp_sigma >= res.fp_sigma_posterior) and np.all(res.fdp_sigma >= res.fdp_sigma_posterior)
    assert np.any(res.fp_sigma > res.fp_sigma_posterior)
    assert set(res.restraint_scales) == {"sauter_fp", "sauter_fdp", "kramers_kronig"}
    assert res.restraint_scales["kramers_kronig"] == 1.0 and res.restraint_scales["sauter_fp"] > 0


def test_resume_after_stop_gives_same_answer(run_full, tiny, cache, tmp_path):
    ck = tmp_path / "r.ckpt.h5"
    base = ("optimizer.iterations=4", "restraints.kramers_kronig.use=True")
    first = R.refine([tiny], cache, cfg_of(*base, "optimizer.max_macrocycles=1"), checkpoint=ck,
                     backend="cpu")
    assert not first.converged and ck.exists()
    again = R.refine([tiny], cache, cfg_of(*base), checkpoint=ck, resume=True, backend="cpu")
    assert again.converged
    np.testing.assert_array_equal(again.x, run_full.x)          # bit for bit
    np.testing.assert_array_equal(again.history["objective"], run_full.history["objective"])
    # a checkpoint from another configuration is refused
    with pytest.raises(InputError, match="another configuration.*restraints.fp.sigma"):
        R.refine([tiny], cache, cfg_of(*base, "restraints.fp.sigma=0.05"), checkpoint=ck,
                 resume=True, backend="cpu")
    # ... and one from other data
    other = tiny.select_shoeboxes(np.arange(tiny.n_shoeboxes) > 0)
    with pytest.raises(InputError, match="other input data"):
        R.refine([other], cache, cfg_of(*base), checkpoint=ck, resume=True, backend="cpu")


class _StopAfter:
    """A stop request (SIGTERM) that appears after ``n`` looks, i.e. at a chosen evaluation."""

    def __init__(self, n):
        self.n = n

    @property
    def requested(self):
        self.n -= 1
        return signal.SIGTERM if self.n < 0 else None


def test_resume_inside_a_macrocycle_is_bit_identical(run_full, tiny, cache, tmp_path):
    """Stopped twice inside macrocycles (mid line search too): the checkpoint holds the L-BFGS-B
    state, and the resumed run ends bit for bit where the uninterrupted one does."""
    import h5py

    from spread_tools.refine.checkpoint import Interrupted
    ck = tmp_path / "m.ckpt.h5"
    cfg = cfg_of("optimizer.iterations=4", "restraints.kramers_kronig.use=True")
    with pytest.raises(Interrupted) as info:
        R.refine([tiny], cache, cfg, checkpoint=ck, backend="cpu", stop=_StopAfter(14))
    assert info.value.signum == signal.SIGTERM and info.value.checkpoint == ck
    with h5py.File(ck) as h5:
        assert h5.attrs["phase"] == "lbfgs" and "lbfgs/wa" in h5 and h5.attrs["macrocycle"] >= 1
    with pytest.raises(Interrupted):
        R.refine([tiny], cache, cfg, checkpoint=ck, resume=True, backend="cpu", stop=_StopAfter(7))
    again = R.refine([tiny], cache, cfg, checkpoint=ck, resume=True, backend="cpu")
    np.testing.assert_array_equal(again.x, run_full.x)
    np.testing.assert_array_equal(again.history["objective"], run_full.history["objective"])
    np.testing.assert_array_equal(again.fp_sigma, run_full.fp_sigma)
    assert again.n_evaluations == run_full.n_evaluations


def test_posterior_sigma_when_calibration_is_off(run_full, tiny, cache):
    cfg = cfg_of("optimizer.iterations=4", "restraints.kramers_kronig.use=True",
                 "uncertainty.calibrate=False")
    res = R.refine([tiny], cache, cfg, backend="cpu")
    np.testing.assert_array_equal(res.x, run_full.x)                  # the estimate is the same
    assert res.uncertainty == "posterior"
    np.testing.assert_array_equal(res.fp_sigma, run_full.fp_sigma_posterior)


def test_nonsense_optimizer_settings_refused(tiny, cache):
    for word, frag in (("optimizer.iterations=-1", "optimizer.iterations: must be at least 1"),
                       ("optimizer.max_macrocycles=0", "max_macrocycles"),
                       ("checkpoint.interval_s=-5", "interval_s")):
        with pytest.raises(InputError, match=frag):
            R.refine([tiny], cache, cfg_of(word), backend="cpu")


def test_result_roundtrip(run_full, tmp_path):
    from spread_tools.physics.scattering import read_table
    out = tmp_path / "res.h5"
    csv = R.write_result(out, run_full)
    assert csv == tmp_path / "res.csv"
    back = R.read_result(out)
    np.testing.assert_array_equal(back["fdp"], run_full.fdp)
    np.testing.assert_array_equal(back["fp_sigma"], run_full.fp_sigma)
    np.testing.assert_array_equal(back["fdp_sigma_posterior"], run_full.fdp_sigma_posterior)
    assert back["uncertainty"] == "calibrated"
    t = read_table(out, site="FE2")
    np.testing.assert_array_equal(t.fdp, run_full.fdp[1])
    t = read_table(csv, site="FE1")
    np.testing.assert_allclose(t.fp, run_full.fp[0], atol=1e-6)
    with pytest.raises(InputError, match="exists"):
        R.write_result(out, run_full)


def test_start_from_previous_result(run_full, tiny, cache, tmp_path):
    out = tmp_path / "prev.h5"
    R.write_result(out, run_full)
    cfg = cfg_of("optimizer.iterations=4", "restraints.kramers_kronig.use=True", f"start.result={out}")
    p = R.S1Problem(R.prepare_data([tiny], cache), cache, cfg, backend="cpu")
    fp, fdp = s1._start_curves(cfg, p)
    np.testing.assert_allclose(fp, run_full.fp)
    np.testing.assert_allclose(fdp, run_full.fdp)


# --------------------------------------------------------------------------- recovery (slow)

def _simulate(tmp_path, name, n_lattices, swap=False, seed=11):
    from spread_tools.physics.scattering import read_table
    from spread_tools.simulate.simulator import (
        SimulationSettings,
        make_detector,
        simulate_dataset,
    )
    spectra = TEST_DATA / "spectra"
    ox = read_table(spectra / "pf-rd-ox_fftkk.out")
    red = read_table(spectra / "pf-rd-red_fftkk.out")
    truth = {"FE1": red, "FE2": ox} if swap else {"FE1": ox, "FE2": red}
    out = tmp_path / f"{name}.h5"
    simulate_dataset(SFCache.read(TEST_DATA / "sf_cache.h5"), truth, make_detector(),
                     SimulationSettings(n_lattices=n_lattices, seed=seed, shoebox_size=9), out)
    return Dataset.read(out)


def _recovery(ds, res):
    """rms of fp/fdp against the truth over 7090-7150 eV, edges, and the FE1-FE2 difference
    projected on the true difference (> 0: the sites are told apart the right way round)."""
    e = res.energy_ev
    t = ds.truth
    m = (e >= 7090) & (e <= 7150)
    out = {}
    tf = {}
    for s, name in enumerate(res.site_names):
        tfp = np.interp(e, t.energy_ev, t.fp[s])
        tfdp = np.interp(e, t.energy_ev, t.fdp[s])
        tf[name] = (tfp, tfdp)
        out[name] = {"rms_fp": float(np.sqrt(np.mean((res.fp[s] - tfp)[m] ** 2))),
                     "rms_fdp": float(np.sqrt(np.mean((res.fdp[s] - tfdp)[m] ** 2))),
                     "edge_ev": float(res.edge_ev[s]), "edge_sigma_ev": float(res.edge_sigma_ev[s]),
                     "truth_edge_ev": R.edge_position(e, tfdp, None, *res.edge_window_ev[s])[0]}
    out["edge_shift_ev"] = out["FE1"]["edge_ev"] - out["FE2"]["edge_ev"]
    out["edge_shift_sigma_ev"] = float(np.hypot(*res.edge_sigma_ev))
    out["truth_edge_shift_ev"] = out["FE1"]["truth_edge_ev"] - out["FE2"]["truth_edge_ev"]
    d_ref = np.concatenate([res.fp[0] - res.fp[1], res.fdp[0] - res.fdp[1]])
    d_true = np.concatenate([tf["FE1"][0] - tf["FE2"][0], tf["FE1"][1] - tf["FE2"][1]])
    out["difference_projection"] = float(d_ref @ d_true / (d_true @ d_true))
    return out


RESTRAINTS = {"sauter": (), "kk": ("restraints.fdp.mean=None", "restraints.kramers_kronig.use=True")}


@pytest.mark.slow
def test_recovery_and_negative_control(tmp_path, cache):
    """6lk1, FE1 <- oxidized, FE2 <- reduced ferredoxin; then the truth swapped."""
    import json
    ds = _simulate(tmp_path, "normal", 400)
    swapped = _simulate(tmp_path, "swapped", 400, swap=True)
    for label, words in RESTRAINTS.items():
        res = R.refine([ds], cache, cfg_of(*words), backend="cpu")
        rec = _recovery(ds, res)
        print("recovery", label, json.dumps(rec))
        assert res.converged
        for site in ("FE1", "FE2"):
            assert rec[site]["rms_fdp"] < 1.2 and rec[site]["rms_fp"] < 1.2
        assert rec["difference_projection"] > 0.1     # > 0: FE1 - FE2 follows the truth (shrunk by the restraints)
        neg = _recovery(swapped, R.refine([swapped], cache, cfg_of(*words), backend="cpu"))
        print("negative control (truth swapped)", label, json.dumps(neg))
        # refined curves swap with the truth: the difference FE1 - FE2 changes sign
        assert neg["difference_projection"] > 0.1              # measured against the swapped truth
        assert np.sign(neg["edge_shift_ev"]) != np.sign(rec["edge_shift_ev"]) or \
            abs(neg["edge_shift_ev"]) < 2 * neg["edge_shift_sigma_ev"]


def test_two_datasets_refine_as_one(full, cache):
    a = full.select_lattices([0])
    b = full.select_lattices([1, 2])
    prep = R.prepare_data([a, b], cache)
    assert prep.n_lat_total == 3 and prep.n_sb_total == a.n_shoeboxes + b.n_shoeboxes
    np.testing.assert_array_equal(prep.ds.sb_miller_index,
                                  np.concatenate([a.sb_miller_index, b.sb_miller_index])[prep.shoebox_orig])


def test_single_rank_without_mpi4py(monkeypatch):
    def no_mpi():
        raise ImportError("no mpi4py")
    monkeypatch.setattr(mpi, "_mpi", no_mpi)
    comm = R.get_comm()
    assert comm.rank == 0 and comm.size == 1
    x = np.arange(4.0)
    np.testing.assert_array_equal(comm.sum_in_order(x), x)
    np.testing.assert_array_equal(comm.concat(x, [4]), x)
    np.testing.assert_array_equal(comm.bcast_array(x, 4), x)


def test_rank_blocks_balanced_and_contiguous(full):
    blocks = R.rank_blocks(full, 3)
    assert blocks[0][0] == 0 and blocks[-1][1] == full.n_lattices
    assert all(blocks[i][1] == blocks[i + 1][0] for i in range(2))
    pix = np.bincount(full.sb_lattice, weights=np.diff(full.pixel_offset), minlength=full.n_lattices)
    share = [pix[a:b].sum() / pix.sum() for a, b in blocks]
    assert max(share) < 0.45


def test_channel_space_fisher_matches_pixel_route(full, cache):
    """The fast channel-space Fisher (used by refine) equals the per-pixel Jacobian route."""
    ds = full.select_lattices([0, 5])
    p = problem(ds, cache)
    x = start_x(p)
    F, dg, dl = p.local_fisher(x, chunk=17, route="channel")
    F_ref = p.local_fisher_profiled(x)
    dg_ref, dl_ref = p.local_fisher_diag(x)
    dl_ref[:p.n_lat] += 1.0 / p.lnG_sigma ** 2           # the ln G prior's curvature
    dl_ref[p.n_lat:].reshape(-1, 3)[:, 1:] += 1.0 / p.slope_sigma ** 2   # and the slope prior's
    scale = np.abs(F_ref).max()
    assert np.max(np.abs(F - F_ref)) < 1e-9 * scale
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-9, atol=1e-12 * dg_ref.max())
    np.testing.assert_allclose(dl, dl_ref, rtol=1e-9, atol=1e-12 * dl_ref.max())


def test_non_finite_trial_points_are_refused_not_fatal():
    """A line-search step so long that λ overflows must be refused, not crash L-BFGS-B."""
    assert s1._is_finite(1.0, np.zeros(3))
    assert not s1._is_finite(np.nan, np.zeros(3))
    assert not s1._is_finite(1.0, np.array([0.0, np.inf, 0.0]))
    assert s1._REFUSED_OBJECTIVE > 1e200 and np.isfinite(s1._REFUSED_OBJECTIVE)


def test_channel_fisher_independent_of_chunks_and_close_to_the_exact_cut(full, cache):
    """The banded channel-space Fisher does not depend on how shoeboxes are split into ranges
    (beyond round-off), and the default cut changes it by far less than the exact cut's scale."""
    ds = full.select_lattices([2, 7])
    p = problem(ds, cache)
    x = start_x(p)
    F1, d1, l1 = p.local_fisher(x, chunk=1)
    F2, d2, l2 = p.local_fisher(x, chunk=13)
    scale = np.abs(F1).max()
    assert scale > 0 and np.max(np.abs(F1 - F2)) < 1e-12 * scale
    np.testing.assert_allclose(d1, d2, rtol=1e-12, atol=1e-14 * d1.max())
    assert np.array_equal(l1, l2)
    p0 = problem(ds, cache, "pixel_model.band_rtol=0", "pixel_model.band_floor=0")
    assert p0.pm.bands.n_values > p.pm.bands.n_values          # the default cut stored fewer weights
    F0, d0, _ = p0.local_fisher(x)
    assert np.max(np.abs(F1 - F0)) < 1e-5 * scale
    np.testing.assert_allclose(d1, d0, rtol=1e-5, atol=1e-9 * d0.max())


def test_band_rtol_parameter_checked(tiny, cache):
    with pytest.raises(InputError, match="pixel_model.band_rtol"):
        problem(tiny, cache, "pixel_model.band_rtol=2")
    with pytest.raises(InputError, match="pixel_model.band_floor"):
        problem(tiny, cache, "pixel_model.band_floor=-1")


# --------------------------------------------------------------------------- well-posed locals, convergence record

def test_lattices_with_few_shoeboxes_dropped_counted(full, cache):
    ds = full.select_lattices([0, 1, 2])
    keep = np.ones(ds.n_shoeboxes, bool)
    on1 = np.flatnonzero(ds.sb_lattice == 1)
    keep[on1[2:]] = False                                  # lattice 1 keeps 2 shoeboxes
    ds = ds.select_shoeboxes(keep)
    prep = R.prepare_data([ds], cache, 4, min_shoeboxes=3)
    assert prep.ds.n_lattices == 2 and list(prep.lattice_orig) == [0, 2]
    assert prep.dropped["lattices_few_shoeboxes"] == 1
    assert prep.dropped["shoeboxes_of_dropped_lattices"] == 2
    assert any("lattice.min_shoeboxes" in w for w in prep.warnings)
    assert R.prepare_data([ds], cache, 4, min_shoeboxes=2).ds.n_lattices == 3
    with pytest.raises(InputError, match="min_shoeboxes"):
        R.prepare_data([ds], cache, 4, min_shoeboxes=0)


@pytest.mark.parametrize("word, fragment", [("optimizer.iterations=-1", "optimizer.iterations"),
                                            ("optimizer.iterations=0", "optimizer.iterations"),
                                            ("optimizer.max_macrocycles=0", "max_macrocycles"),
                                            ("optimizer.gtol=0", "optimizer.gtol"),
                                            ("optimizer.memory=0", "optimizer.memory"),
                                            ("lattice.ln_G_sigma=-1", "ln_G_sigma"),
                                            ("lattice.min_shoeboxes=0", "min_shoeboxes")])
def test_optimizer_settings_that_cannot_work_are_refused(tiny, cache, word, fragment):
    with pytest.raises(InputError, match=fragment):
        R.refine([tiny], cache, cfg_of(word), backend="cpu")


def test_bounds_keep_every_trial_point_finite(tiny, cache):
    p = problem(tiny, cache)
    x = start_x(p)
    lo, hi = p.local_bounds()
    assert np.all(np.isinf(lo[:p.n_glob])) and np.all(lo[p.n_glob:] < x[p.n_glob:])
    assert np.all(hi[p.n_glob:] > x[p.n_glob:])
    # the worst point inside the bounds: finite objective and gradient, no overflow warning
    worst = np.where(np.arange(p.n_x) < p.n_glob, x, hi)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f, g = p.evaluate(worst)
    assert np.isfinite(f) and np.all(np.isfinite(g))
    gz = np.array([1.0, -1.0, 1.0, -1.0])
    z = np.array([0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(s1._projected(gz, z, np.array([0.0, 0, -5, -5]),
                                                np.array([5.0, 5, 1, 1])), [0.0, -1.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def bad_start(tiny):
    """Counts of lattice 1 scaled by 1/300: its moment-match start is far off and nearly empty."""
    k = tiny.counts.astype(np.float64).copy()
    on1 = np.repeat(tiny.sb_lattice == 1, np.diff(tiny.pixel_offset))
    rng = np.random.default_rng(0)
    k[on1] = rng.poisson(k[on1] / 300.0 + 0.01)
    return dataclasses.replace(tiny, counts=k.astype(tiny.counts.dtype))


def test_refine_converges_without_overflow_and_records_macrocycles(bad_start, cache, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # an overflow in exp(g) would raise
        res = R.refine([bad_start], cache, cfg_of("optimizer.iterations=3"), backend="cpu")
    assert res.converged, res.message
    c = res.convergence
    n_mc = len(c["objective_end"])
    assert n_mc >= 2 and all(len(v) == n_mc for v in c.values())
    assert np.all(c["objective_end"] <= c["objective_start"])
    assert np.all(c["local_fit_drop"] >= 0) and c["gradient_max"][-1] <= 1e-3
    assert c["iterations"].sum() == len(res.history["objective"])
    np.testing.assert_array_equal(np.unique(res.history["macrocycle"]), np.arange(1, n_mc + 1))
    assert res.history["gradient_norm"][-1] == pytest.approx(c["gradient_max"][-1], rel=0.5)
    assert np.all(np.isfinite(res.lattice_G)) and res.lattice_G[1] < 0.1 * res.lattice_G[0]
    out = tmp_path / "r.h5"
    R.write_result(out, res)
    back = R.read_result(out)
    for k, v in c.items():
        np.testing.assert_array_equal(back["convergence"][k], v)
    np.testing.assert_array_equal(back["history"]["macrocycle"], res.history["macrocycle"])
    assert back["dropped"] == res.dropped


def test_resume_keeps_the_convergence_record(tiny, cache, tmp_path):
    ck = tmp_path / "c.ckpt.h5"
    base = ("optimizer.iterations=2",)
    whole = R.refine([tiny], cache, cfg_of(*base), backend="cpu")
    first = R.refine([tiny], cache, cfg_of(*base, "optimizer.max_macrocycles=1"), checkpoint=ck,
                     backend="cpu")
    assert not first.converged
    again = R.refine([tiny], cache, cfg_of(*base), checkpoint=ck, resume=True, backend="cpu")
    assert again.converged
    np.testing.assert_array_equal(again.x, whole.x)
    for k in ("objective_start", "objective_end", "gradient_max", "iterations", "evaluations"):
        np.testing.assert_array_equal(again.convergence[k], whole.convergence[k])
