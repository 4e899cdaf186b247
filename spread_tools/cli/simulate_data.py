"""``simulate_data``: SF cache + ground-truth f′/f″ curves → synthetic SPREAD dataset.

Example::

    simulate_data sf_cache.h5 -o dataset.h5 \\
        truth=FE1=test_data/spectra/pf-rd-ox_fftkk.out,FE2=test_data/spectra/pf-rd-red_fftkk.out \\
        lattices=40 seed=1 shoebox_size=7 fluence=1e4
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from spread_tools.cli.common import (
    ConfigFile,
    Overwrite,
    Quiet,
    ShowConfig,
    Words,
    claim_outputs,
    command_settings,
    make_app,
    output_option,
    parse_words,
    require_files,
    require_output,
    user_errors,
)
from spread_tools.config import P
from spread_tools.errors import InputError

SCRIPT = "simulate_data"

SCHEMA = {
    "preset": P("ideal", "a named set of defaults (PRESETS): ideal = bright, clean data with the "
                         "stored crystal models exact; ly99 = beamtime-like (see the README)",
                choices=("ideal", "ly99")),
    "truth": P([], "ground-truth curve of every site of the SF cache, SITE=TABLE, "
                   "comma-separated (TABLE: E f' f'' text, Henke .nff, CSV or a result); "
                   "the curves are interpolated linearly to the channel energies",
               type=list, item_type=str),
    "lattices": P(20, "number of lattices (one crystal in one shot)"),
    "seed": P(1, "random seed (orientations, spectra, scales, backgrounds, noise)"),
    "d_min": P(None, "high-resolution limit of the simulated reflections (None: the cache's)",
               units="Å", type=float, optional=True),
    "d_max": P(None, "low-resolution limit of the simulated reflections (None: the cache's)",
               units="Å", type=float, optional=True),
    "shoebox_size": P(7, "shoebox edge, square boxes centred on the predicted spot", units="px"),
    "fluence": P(1.0e4, "photons per shot in the channel window", units="photons/Å²"),
    "noise": P(True, "Poisson noise (false: store the expected counts)"),
    "n_sigma": P(3.0, "a reflection is simulated when it lies within n_sigma widths "
                      "(domain size + mosaic) of the Ewald sphere of a channel with photons"),
    "min_spot_photons": P(0.0, "keep a reflection only when its expected Bragg photons in the "
                               "central 5x5 pixels reach this (0: keep every reflection in "
                               "diffraction condition)", units="photons"),
    "backend": P("cpu", "kernel for the channel weights (cpu: bit-reproducible on any machine; "
                        "cuda/auto: a GPU, same results to float32 round-off)",
                 choices=("cpu", "cuda", "auto")),
    "chunk_lattices": P(32, "lattices per chunk (bounds memory: pixels x channels x 4 bytes)"),
    "spectrum": {
        "min_ev": P(7070.0, "first channel energy", units="eV"),
        "max_ev": P(7170.0, "last channel energy (included)", units="eV"),
        "step_ev": P(1.0, "channel width", units="eV"),
        "centre_min_ev": P(7085.0, "lowest SASE envelope centre", units="eV"),
        "centre_max_ev": P(7155.0, "highest SASE envelope centre", units="eV"),
        "envelope_fwhm_ev": P(25.0, "FWHM of the Gaussian SASE envelope", units="eV"),
        "n_spikes": P(40, "SASE spikes per shot (exponential heights)"),
        "spike_fwhm_ev": P(1.5, "FWHM of one spike", units="eV"),
        "min_relative_weight": P(1e-4, "channels below this fraction of the shot's maximum "
                                       "get 0 photons"),
    },
    "crystal": {
        "G_median": P(1.0, "median per-lattice scale G"),
        "G_log_sigma": P(0.3, "log-normal spread of G (sigma of ln G)"),
        "mosaic_spread_deg": P(0.0512, "mosaic spread: rms rotation angle of the domains "
                                       "(geometry.mosaic_rotations)", units="deg"),
        "domain_size_cells": P([48.0, 48.0, 24.0], "mosaic domain size N_a, N_b, N_c",
                               units="cells", type=list, item_type=float),
        "n_domains": P(8, "mosaic domains summed per pixel"),
        "cell_sigma_fraction": P(0.0, "per-lattice spread of the true cell edges (relative sigma)"),
        "domain_size_log_sigma": P(0.0, "per-lattice log-normal spread of the true domain size"),
        "mosaic_log_sigma": P(0.0, "per-lattice log-normal spread of the true mosaic spread"),
    },
    "model_error": {
        "rotation_deg": P(0.0, "rms angle between the true and the stored crystal orientation",
                          units="deg"),
        "cell_fraction": P(0.0, "relative sigma of the stored cell edges about the cache's cell "
                                "(0: stored models carry the cache's cell)"),
        "spectrometer_offset_ev": P(0.0, "true photon energy minus the stored channel energy",
                                    units="eV"),
        "spectrum_jitter_ev": P(0.0, "per-shot sigma of a further shift of the stored spectrum",
                                units="eV"),
    },
    "beam": {   # the beam runs along -z (DIALS direction (0, 0, 1)), the detector faces it
        "polarization_normal": P([0.0, 1.0, 0.0], "DIALS polarization_normal",
                                 type=list, item_type=float),
        "polarization_fraction": P(0.999, "DIALS polarization_fraction"),
    },
    "background": {
        "photons": P(0.5, "flat background level (a water ring at 3.7 Å adds up to 1.5x)",
                     units="photons/pixel"),
        "log_sigma": P(0.2, "log-normal spread of the background level across lattices"),
    },
    "detector": {
        "distance_mm": P(100.0, "sample-to-detector distance along the beam", units="mm"),
        "pixel_size_mm": P(0.1, "square pixel size", units="mm"),
        "n_fast": P(None, "pixels along fast of a single flat panel (None: the 16-module "
                          "ePix10k-2M-like detector of 352x384-pixel modules)",
                    type=int, optional=True),
        "n_slow": P(None, "pixels along slow of a single flat panel (None: as n_fast)",
                    type=int, optional=True),
        "gap_mm": P(2.0, "gap between the modules of the 16-module detector", units="mm"),
        "offset_mm": P([0.0, 0.0], "lateral shift (x, y) of the detector in the lab frame",
                       units="mm", type=list, item_type=float),
        "gain_adu_per_photon": P(1.0, "detector gain (the stored counts are photon-converted)",
                                 units="ADU/photon"),
        "read_noise_adu": P(0.0, "Gaussian read noise before the photon conversion", units="ADU"),
    },
}

#: Named sets of defaults (``preset=``); words and a TOML file still win over them.
PRESETS = {
    "ideal": {},
    # beamtime-like: background-dominated shoeboxes, low fluence, every lattice its own
    # crystal, stored models with indexing-size errors, a miscalibrated spectrometer
    "ly99": {
        "shoebox_size": 19,
        "fluence": 1.0e3,
        "background.photons": 2.0,
        "crystal.cell_sigma_fraction": 0.002,
        "crystal.domain_size_log_sigma": 0.2,
        "crystal.mosaic_log_sigma": 0.2,
        "model_error.rotation_deg": 0.05,
        "model_error.spectrometer_offset_ev": 2.0,
        "model_error.spectrum_jitter_ev": 0.25,
        "detector.read_noise_adu": 0.15,
    },
}

Output = output_option("Simulated dataset to write (.h5, format spread_tools.dataset), with "
                       "the ground truth under truth/.")
USAGE = "SF_CACHE.h5 -o DATASET.h5 truth=SITE=TABLE[,...] [key=value ...] [OPTIONS]"
EXAMPLE = ("simulate_data sf_cache.h5 -o dataset.h5 truth=FE1=ox.out,FE2=red.out "
           "--lattices 40 --seed 1")

app = make_app(SCRIPT, "Simulate a SPREAD dataset (XFEL still shots with SASE spectra) from "
                       "an SF cache and ground-truth f'/f'' curves per site. Output: an HDF5 "
                       "spread_tools.dataset file (-o) with the truth (curves at the channel "
                       "energies, G per lattice, background per shoebox) under truth/.")


def settings_from_config(cfg):
    """Build :class:`~spread_tools.simulate.simulator.SimulationSettings` from the parameters.

    Parameters
    ----------
    cfg : spread_tools.config.Config
        Resolved ``simulate_data`` parameters.

    Returns
    -------
    spread_tools.simulate.simulator.SimulationSettings
    """
    from spread_tools.simulate.simulator import SimulationSettings
    sp, cr, bm = cfg.spectrum, cfg.crystal, cfg.beam
    return SimulationSettings(
        n_lattices=cfg.lattices, seed=cfg.seed, d_min_a=cfg.d_min, d_max_a=cfg.d_max,
        shoebox_size=cfg.shoebox_size, fluence=cfg.fluence,
        channel_min_ev=sp.min_ev, channel_max_ev=sp.max_ev, channel_step_ev=sp.step_ev,
        centre_min_ev=sp.centre_min_ev, centre_max_ev=sp.centre_max_ev,
        envelope_fwhm_ev=sp.envelope_fwhm_ev, n_spikes=sp.n_spikes,
        spike_fwhm_ev=sp.spike_fwhm_ev, min_relative_weight=sp.min_relative_weight,
        G_median=cr.G_median, G_log_sigma=cr.G_log_sigma,
        mosaic_spread_deg=cr.mosaic_spread_deg, domain_size_cells=tuple(cr.domain_size_cells),
        n_domains=cr.n_domains,
        polarization_normal=tuple(bm.polarization_normal),
        polarization_fraction=bm.polarization_fraction,
        background_photons=cfg.background.photons, background_log_sigma=cfg.background.log_sigma,
        n_sigma=cfg.n_sigma, min_spot_photons=cfg.min_spot_photons, poisson_noise=cfg.noise,
        chunk_lattices=cfg.chunk_lattices,
        cell_sigma_fraction=cr.cell_sigma_fraction, domain_size_log_sigma=cr.domain_size_log_sigma,
        mosaic_log_sigma=cr.mosaic_log_sigma,
        model_rotation_deg=cfg.model_error.rotation_deg, model_cell_fraction=cfg.model_error.cell_fraction,
        spectrometer_offset_ev=cfg.model_error.spectrometer_offset_ev,
        spectrum_jitter_ev=cfg.model_error.spectrum_jitter_ev,
        gain_adu_per_photon=cfg.detector.gain_adu_per_photon, read_noise_adu=cfg.detector.read_noise_adu,
    ).check()


def read_truth(specs):
    """Read the ``truth`` parameter: SITE=TABLE words → {site: SpectrumTable}.

    A refinement result or ``refine_fdp`` CSV given as TABLE provides the curve of
    the site of the same name (or its only site); other tables hold one curve.

    Parameters
    ----------
    specs : list of str
        ``SITE=TABLE`` entries.

    Returns
    -------
    dict
    """
    from spread_tools.physics.scattering import detect_format, read_table
    out = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            raise InputError(f"parameter truth: {spec!r} is not SITE=TABLE "
                             f"(e.g. FE1=pf-rd-ox_fftkk.out)")
        if name in out:
            raise InputError(f"parameter truth: site {name} given twice")
        if not Path(path).exists():
            raise InputError(f"{path}: no such file (truth curve of {name})")
        if detect_format(path) in ("csv", "result"):
            # a refinement result/CSV: take the curve of the site of the same name if it has one
            try:
                out[name] = read_table(path, site=name)
                continue
            except InputError:
                pass
        out[name] = read_table(path)
    return out


def detector_from_config(cfg):
    """The simulated detector from the ``detector.*`` parameters.

    Parameters
    ----------
    cfg : spread_tools.config.Config
        Resolved parameters.

    Returns
    -------
    spread_tools.model.geometry.Detector
    """
    from spread_tools.simulate.simulator import make_detector
    d = cfg.detector
    if len(d.offset_mm) != 2:
        raise InputError("parameter detector.offset_mm: needs two numbers (fast, slow) in mm")
    if not d.distance_mm > 0 or not d.pixel_size_mm > 0:
        raise InputError("parameter detector.distance_mm/pixel_size_mm: must be positive (mm)")
    for key in ("n_fast", "n_slow"):
        v = getattr(d, key)
        if v is not None and v < 1:
            raise InputError(f"parameter detector.{key}: must be at least 1 pixel, got {v}")
    return make_detector(d.distance_mm, d.pixel_size_mm, d.n_fast, d.n_slow, tuple(d.offset_mm),
                         gap_mm=d.gap_mm)


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, output: Output = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False, quiet: Quiet = False,
        lattices: Annotated[Optional[int], typer.Option(
            "--lattices", help="Number of lattices (same as lattices=N).")] = None,
        seed: Annotated[Optional[int], typer.Option(
            "--seed", help="Random seed (same as seed=N).")] = None):
    """Simulate a SPREAD still-shot dataset with ground truth."""
    with user_errors(SCRIPT):
        from spread_tools.simulate.simulator import simulate_dataset
        from spread_tools.structure.cache import SFCache
        words = list(words or [])
        if lattices is not None:
            words.append(f"lattices={lattices}")
        if seed is not None:
            words.append(f"seed={seed}")
        files, cfg = parse_words(SCHEMA, words, config, show_config, presets=PRESETS)
        (cache_path,) = require_files(files, ["SF cache (.h5 from cache_sf)"], SCRIPT)
        require_output(output, "dataset")
        if not cfg.truth:
            raise InputError("parameter truth: give a curve for every site, e.g. "
                             "truth=FE1=ox.out,FE2=red.out")
        settings = settings_from_config(cfg)
        truth_files = [spec.partition("=")[2].strip() for spec in cfg.truth]
        claim_outputs([output], inputs=[cache_path] + truth_files, overwrite=overwrite)
        cache = SFCache.read(cache_path)
        truth = read_truth(cfg.truth)
        detector = detector_from_config(cfg)

        summary = simulate_dataset(cache, truth, detector, settings, output, overwrite=overwrite,
                                   quiet=quiet, config_json=cfg.to_json(),
                                   weights_backend=cfg.backend)

        def log(msg):
            typer.echo(f"{SCRIPT}: {msg}")
        log(f"SF cache {cache_path}: cell {' '.join(f'{x:g}' for x in cache.cell)}, "
            f"{cache.spacegroup}, sites {', '.join(cache.site_names)}, {cache.n_h} reflections")
        for line in summary.lines():
            log(line)
        log(f"wrote {output} ({summary.n_shoeboxes} shoeboxes, {summary.n_pixels} pixels)")


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
