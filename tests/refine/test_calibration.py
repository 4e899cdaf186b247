"""spread_tools.refine.calibration: σ that include the restraints' bias, on a linear Gaussian toy
where everything is known in closed form (direct noisy measurements of a curve with an edge,
smoothed by an adjacent-difference restraint that is too stiff for the edge)."""

import numpy as np
import pytest

from spread_tools.refine.calibration import RestraintPart, calibrated_covariance

N = 30


def toy(truth, sigma_data, sigma_restraint, rng):
    """One noisy data set: x̂ = (F + H)⁻¹ F y, posterior (F + H)⁻¹, the calibrated covariance."""
    F = np.diag(1.0 / sigma_data ** 2)
    D = np.diff(np.eye(N), axis=0)
    H = D.T @ D / sigma_restraint ** 2
    y = truth + rng.normal(0.0, sigma_data)
    post = np.linalg.inv(F + H)
    x = post @ (F @ y)
    part = RestraintPart("sauter_fp", 0.5 * x @ H @ x, H @ x, H, scalable=True)
    cal = calibrated_covariance(F, [part], x, post)
    return x, post, cal


def rms_z(truth, sigma_data, sigma_restraint, n_rep=25, seed=1):
    rng = np.random.default_rng(seed)
    zp, zc, taus = [], [], []
    for _ in range(n_rep):
        x, post, cal = toy(truth, sigma_data, sigma_restraint, rng)
        zp.append((x - truth) / np.sqrt(np.diag(post)))
        zc.append((x - truth) / np.sqrt(np.diag(cal["covariance"])))
        taus.append(cal["tau"][0])
    return np.sqrt(np.mean(np.square(zp))), np.sqrt(np.mean(np.square(zc))), np.median(taus)


EDGE = 3.0 / (1.0 + np.exp(-(np.arange(N) - 15.0) / 1.2))      # a 3 e- step over ~5 points


def test_stiff_restraint_on_an_edge_undercovers_and_calibration_repairs_it():
    """About the embedded example's regime: the posterior σ is 1.6× too small, calibrated ≈ 1."""
    post, cal, tau = rms_z(EDGE, np.full(N, 0.5), 0.15)
    assert post > 1.4                     # the posterior σ counts the restraint as information
    assert 0.8 < cal < 1.25               # with the bias included the errors are about σ
    assert tau > 2                        # the data ask for a looser restraint


def test_extreme_stiffness_is_only_partly_repaired():
    """Documented limit: when the restraint supplies nearly all the information the pull is
    evaluated at a curve that is still too smooth, and σ stays somewhat small."""
    post, cal, _ = rms_z(EDGE, np.full(N, 1.0), 0.1, n_rep=15)
    assert post > 2.5 and cal < 0.55 * post


def test_smooth_truth_keeps_the_posterior_sigma():
    """A truth the restraint describes: the posterior σ is honest and calibration keeps it."""
    ramp = 0.05 * np.arange(N)
    post, cal, tau = rms_z(ramp, np.full(N, 0.3), 0.3)
    assert 0.6 < post < 1.2 and 0.6 < cal <= post + 1e-12 and tau < 1
    x, p, c = toy(ramp, np.full(N, 0.3), 0.3, np.random.default_rng(0))
    assert np.max(np.abs(c["pull"])) < 0.5 * np.sqrt(np.min(np.diag(p)))


def test_strong_data_leave_sigma_alone():
    post, cal, _ = rms_z(EDGE, np.full(N, 0.02), 0.1, n_rep=15)
    assert 0.85 < post < 1.2 and 0.85 < cal < 1.2


def test_fixed_terms_and_no_restraints():
    F = np.eye(4)
    H = np.diff(np.eye(4), axis=0).T @ np.diff(np.eye(4), axis=0)
    x = np.array([0.0, 1.0, 3.0, 2.0])
    post = np.linalg.inv(F + H)
    out = calibrated_covariance(F, [], x, post)
    np.testing.assert_array_equal(out["covariance"], post)
    fixed = RestraintPart("kramers_kronig", 0.5 * x @ H @ x, H @ x, H, scalable=False)
    out = calibrated_covariance(F, [fixed], x, post)
    assert out["tau"] == [1.0] and out["iterations"] == 0
    # the pull of a fixed term is (F + H)⁻¹ ∇R(x̂), and the covariance grows by its outer product
    np.testing.assert_allclose(out["pull"], post @ (H @ x))
    np.testing.assert_allclose(out["covariance"], post + np.outer(out["pull"], out["pull"]))
    assert fixed.rank == 3
    with pytest.raises(ValueError):
        calibrated_covariance(F, [fixed], x[:3], post)
