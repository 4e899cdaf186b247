"""Long test (``-m slow``): the chain a beamline scientist runs on indexed data, on the
beamtime-like ``preset=ly99`` simulation whose stored crystal models carry indexing-size
errors (0.05° orientations, 0.2 % cells, ±20 % mosaic, a 2 eV spectrometer offset).

refine_geometry must bring the crystal models back towards the truth, and S1 after it must
recover f″ better than S1 on the stored models, with σ that are not too small. The figures
are printed (``pytest -m slow -s``) so that a run can be compared with
``benchmarks/RESULTS.md``."""

import json
from pathlib import Path

import numpy as np
import pytest

from spread_tools import refine as R
from spread_tools.cli.simulate_data import PRESETS, SCHEMA as SIM_SCHEMA, settings_from_config
from spread_tools.config import resolve
from spread_tools.io.dataset import Dataset
from spread_tools.model.crystal_params import rotation_angle_deg
from spread_tools.physics.scattering import read_table
from spread_tools.refine.crystal_models import GEOMETRY_SCHEMA, refine_geometry, refined_dataset
from spread_tools.simulate.simulator import make_detector, simulate_dataset
from spread_tools.structure.cache import SFCache

TEST_DATA = Path(__file__).resolve().parents[2] / "test_data"
N_LATTICES = 150


def _site_errors(ds, res):
    """Per site: f″ and f′ rms (7090–7150 eV) against the truth and the rms of error/σ."""
    e = res.energy_ev
    t = ds.truth
    m = (e >= 7090) & (e <= 7150)
    out = {}
    for s, name in enumerate(res.site_names):
        d_fp = res.fp[s] - np.interp(e, t.energy_ev, t.fp[s])
        d_fdp = res.fdp[s] - np.interp(e, t.energy_ev, t.fdp[s])
        out[name] = {"rms_fdp": float(np.sqrt(np.mean(d_fdp[m] ** 2))),
                     "z_fdp": float(np.sqrt(np.mean((d_fdp / res.fdp_sigma[s])[m] ** 2))),
                     "rms_fp": float(np.sqrt(np.mean(d_fp[m] ** 2))),
                     "z_fp": float(np.sqrt(np.mean((d_fp / res.fp_sigma[s])[m] ** 2)))}
    return out


@pytest.mark.slow
def test_refine_geometry_then_s1_on_beamtime_like_data(tmp_path):
    cache = SFCache.read(TEST_DATA / "sf_cache.h5")
    cfg = resolve(SIM_SCHEMA, overrides=["preset=ly99", f"lattices={N_LATTICES}", "seed=23"],
                  presets=PRESETS)
    truth = {"FE1": read_table(TEST_DATA / "spectra" / "pf-rd-ox_fftkk.out"),
             "FE2": read_table(TEST_DATA / "spectra" / "pf-rd-red_fftkk.out")}
    simulate_dataset(cache, truth, make_detector(), settings_from_config(cfg), tmp_path / "ly99.h5")
    ds = Dataset.read(tmp_path / "ly99.h5")
    t = ds.truth

    geo = refine_geometry(ds, cache, resolve(GEOMETRY_SCHEMA))
    refined = refined_dataset(ds, geo)
    keep = np.asarray(geo.kept)
    rot_stored = np.array([rotation_angle_deg(ds.A[j], t.A[j]) for j in keep])
    rot_refined = np.array([rotation_angle_deg(refined.A[i], t.A[j]) for i, j in enumerate(keep)])
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))                  # noqa: E731
    offset_truth = float(np.mean(t.spectrum_offset_ev))
    geo_fig = {"kept": int(keep.size), "rotation_stored_deg": rms(rot_stored),
               "rotation_refined_deg": rms(rot_refined), "offset_ev": geo.energy_offset_ev,
               "offset_sigma_ev": geo.energy_offset_sigma_ev, "offset_truth_ev": offset_truth}
    print("refine_geometry", json.dumps(geo_fig))
    assert keep.size >= 0.9 * ds.n_lattices
    assert rms(rot_refined) < 0.5 * rms(rot_stored)
    assert abs(geo.energy_offset_ev - offset_truth) < max(4 * geo.energy_offset_sigma_ev, 0.5)

    s1_cfg = resolve(R.REFINE_SCHEMA, overrides=["backend=cpu"])
    stored = R.refine([ds], cache, s1_cfg)
    after = R.refine([refined], cache, s1_cfg)
    err_stored, err_after = _site_errors(ds, stored), _site_errors(ds, after)
    print("S1 stored models", stored.converged, json.dumps(err_stored))
    print("S1 after refine_geometry", after.converged, json.dumps(err_after))
    assert after.converged, after.message
    worst = lambda err, k: max(err[s][k] for s in err)                      # noqa: E731
    # measured (seed 23): stored models 3.1 e- (no edge where it is), after 0.66/0.84 e-
    assert worst(err_after, "rms_fdp") < 0.35 * worst(err_stored, "rms_fdp")
    assert worst(err_after, "rms_fdp") < 1.0
    # sigma honest within a factor 2 (a sigma 3x too small is a bug)
    assert worst(err_after, "z_fdp") < 2.0 and worst(err_after, "z_fp") < 2.0
