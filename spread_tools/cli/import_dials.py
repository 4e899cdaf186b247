"""``import_dials``: DIALS stills (.expt + .refl with shoeboxes + spectra) → SPREAD dataset.

Examples::

    # one experiment list and its reflections, one spectrum for every shot
    import_dials integrated.expt integrated.refl -o dataset.h5 spectrum.file=run12.lam \\
        channels.min_ev=7070 channels.max_ev=7170 d_min=2.5 d_max=4.0

    # many shots: a list file with lines "expt refl [spectrum] [experiment_index]"
    import_dials shots.list -o dataset.h5 crystal.domain_size_cells=48,48,24

    # a table without shoeboxes: cut the pixels from an HDF5 image stack by bbox
    import_dials run.expt run.refl -o dataset.h5 images.file=run.h5 images.dataset=data
"""

from pathlib import Path

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
    require_output,
    user_errors,
)
from spread_tools.config import P
from spread_tools.errors import InputError

SCRIPT = "import_dials"

SCHEMA = {
    "spectrum": {
        "file": P(None, "spectrum for every shot without its own: .lam CSV (header, then "
                        "wavelength in Å, weight) or HDF5 (energy_ev|wavelength_a, weight); "
                        "None: each shot's beam wavelength as one line", type=str, optional=True),
        "offset_ev": P(0.0, "spectrometer calibration: added to every spectrum energy (true photon "
                            "energy minus the reading; refine_geometry refines it further)",
                       units="eV"),
        "fluence": P(None, "scale every shot's spectrum to this total (None: keep the file's "
                           "weights)", units="photons/Å²", type=float, optional=True),
    },
    "channels": {
        "min_ev": P(None, "first channel energy (None: floor of the lowest spectrum energy)",
                    units="eV", type=float, optional=True),
        "max_ev": P(None, "last channel energy, included (None: ceiling of the highest)",
                    units="eV", type=float, optional=True),
        "step_ev": P(1.0, "channel width; spectra are rebinned conserving photons", units="eV"),
    },
    "d_min": P(None, "keep reflections with d >= d_min", units="Å", type=float, optional=True),
    "d_max": P(None, "keep reflections with d <= d_max", units="Å", type=float, optional=True),
    "flags": {
        "require": P(["integrated_sum"], "DIALS flags a reflection must have (all of them)",
                     type=list, item_type=str),
        "reject": P(["bad_shoebox", "failed_during_background_modelling", "failed_during_summation"],
                    "DIALS flags that drop a reflection (any of them)", type=list, item_type=str),
    },
    "mask": {
        "exclude_overlapped": P(True, "drop pixels in another reflection's foreground "
                                      "(mask bit overlapped=32)"),
        "foreground_only": P(False, "use only foreground pixels (mask bit 4; default: the whole "
                                    "valid shoebox, background included)"),
    },
    "crystal": {
        "domain_size_cells": P(None, "mosaic domain size N_a, N_b, N_c (None: ML_domain_size_ang "
                                     "of the crystal / cell edges)", units="cells",
                               type=list, item_type=float, optional=True),
        "mosaic_spread_deg": P(None, "mosaic spread (None: ML_half_mosaicity_deg, else 0)",
                               units="deg", type=float, optional=True),
        "n_domains": P(8, "mosaic domains per lattice (1 when the spread is 0)"),
    },
    "cell": P(None, "dataset cell a,b,c,alpha,beta,gamma (None: mean of the crystals)",
              units="Å, deg", type=list, item_type=float, optional=True),
    "cell_tolerance": P(0.03, "largest relative deviation of a crystal's cell edges from the "
                              "dataset cell"),
    "images": {
        "file": P(None, "HDF5 image stack to cut pixels from (by bbox) when a table has no "
                        "shoebox column; image = the imageset's single_file_indices[0], else the "
                        "experiment index", type=str, optional=True),
        "dataset": P("data", "dataset in images.file: (n_image, n_slow, n_fast) or "
                             "(n_image, n_panel, n_slow, n_fast), raw ADU"),
    },
    "gain": P(None, "detector gain, ADU per photon (None: each panel's gain from the .expt)",
              type=float, optional=True),
}

Output = output_option("Dataset to write (.h5, format spread_tools.dataset).")
USAGE = "(EXPT REFL [SPECTRUM] | SHOT_LIST) -o DATASET.h5 [key=value ...] [OPTIONS]"
EXAMPLE = ("import_dials integrated.expt integrated.refl run12.lam -o dataset.h5 \\\n"
           "    channels.min_ev=7070 channels.max_ev=7170 d_min=2.5 d_max=4.0")

app = make_app(SCRIPT, "Import DIALS stills (experiment list, msgpack reflection table with "
                       "shoeboxes, spectra) into a SPREAD dataset (HDF5 spread_tools.dataset, -o). "
                       "Inputs: EXPT REFL [SPECTRUM], or a shot list file with lines "
                       "'expt refl [spectrum] [experiment_index]'.")


def settings_from_config(cfg):
    """:class:`~spread_tools.io.dials.importer.ImportSettings` from the resolved parameters."""
    from spread_tools.io.dials.importer import ImportSettings
    return ImportSettings(
        channels_min_ev=cfg.channels.min_ev, channels_max_ev=cfg.channels.max_ev,
        channels_step_ev=cfg.channels.step_ev, spectrum_file=cfg.spectrum.file,
        fluence=cfg.spectrum.fluence, energy_offset_ev=cfg.spectrum.offset_ev, d_min_a=cfg.d_min, d_max_a=cfg.d_max,
        flags_require=tuple(cfg.flags.require), flags_reject=tuple(cfg.flags.reject),
        exclude_overlapped=cfg.mask.exclude_overlapped, foreground_only=cfg.mask.foreground_only,
        domain_size_cells=None if cfg.crystal.domain_size_cells is None else tuple(cfg.crystal.domain_size_cells),
        mosaic_spread_deg=cfg.crystal.mosaic_spread_deg, n_domains=cfg.crystal.n_domains,
        gain=cfg.gain, cell=None if cfg.cell is None else tuple(cfg.cell),
        cell_tolerance=cfg.cell_tolerance, images_file=cfg.images.file,
        images_dataset=cfg.images.dataset)


def check_resolution_range(d_min, d_max):
    """InputError unless 0 < d_min < d_max (Å; either may be None)."""
    for key, v in (("d_min", d_min), ("d_max", d_max)):
        if v is not None and not v > 0:
            raise InputError(f"parameter {key}: must be a positive resolution in Å, got {v:g}")
    if d_min is not None and d_max is not None and not d_min < d_max:
        raise InputError(f"parameters d_min={d_min:g}, d_max={d_max:g}: d_min (the high-resolution "
                         f"limit) must be below d_max (the low-resolution limit), in Å")


def shots_from_files(files):
    """Shots from the positional files: ``EXPT REFL [SPECTRUM]`` or one shot-list file."""
    from spread_tools.io.dials.importer import Shot, read_shot_list
    for f in files:
        if not Path(f).exists():
            raise InputError(f"{f}: no such file")
    if len(files) == 1:
        if Path(files[0]).suffix in (".expt", ".refl", ".json"):
            raise InputError(f"command line: {files[0]}: give the .expt and the .refl together "
                             f"(or a shot list file)")
        return read_shot_list(files[0])
    if len(files) in (2, 3):
        expt, refl = Path(files[0]), Path(files[1])
        if expt.suffix == ".refl" and refl.suffix == ".expt":
            expt, refl = refl, expt
        return [Shot(expt, refl, str(files[2]) if len(files) == 3 else None, None)]
    raise InputError(f"command line: {SCRIPT} expects EXPT REFL [SPECTRUM] or one shot list; "
                     f"got {len(files)} files")


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, output: Output = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False, quiet: Quiet = False):
    """Import DIALS stills into a SPREAD dataset."""
    with user_errors(SCRIPT):
        from spread_tools.io.dials.importer import build_dataset
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        require_output(output, "dataset")
        if not files:
            raise InputError("command line: give EXPT REFL [SPECTRUM] or a shot list file")
        check_resolution_range(cfg.d_min, cfg.d_max)
        shots = shots_from_files(files)
        settings = settings_from_config(cfg)
        inputs = list(files) + [cfg.spectrum.file, cfg.images.file]
        for shot in shots:
            inputs += [getattr(shot, k, None) for k in ("expt", "refl", "spectrum")]
        claim_outputs([output], inputs=inputs, overwrite=overwrite)

        def log(msg):
            if not quiet:
                typer.echo(f"{SCRIPT}: {msg}")
        ds, s = build_dataset(shots, settings, config_json=cfg.to_json(), log=log)
        if ds.n_shoeboxes == 0:
            raise InputError(f"{files[0]}: no reflection left of {s['reflections']} ({s['flags']} "
                             f"dropped by flags, {s['resolution']} by resolution, "
                             f"{s['no_shoebox_data'] + s['no_pixels']} without usable pixels); "
                             f"nothing written")
        ds.write(output, overwrite=overwrite)
        log(f"{s['reflections']} reflections: dropped {s['flags']} by flags, "
            f"{s['resolution']} by resolution, {s['no_shoebox_data']} without shoebox pixels, "
            f"{s['no_pixels']} with no usable pixel on the panel")
        typer.echo(f"{SCRIPT}: wrote {output} ({s['lattices']} lattices, {s['shoeboxes']} shoeboxes, "
                   f"{s['pixels']} pixels of which {s['used_pixels']} used, {s['channels']} channels "
                   f"{ds.energy_ev[0]:g}-{ds.energy_ev[-1]:g} eV)")


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
