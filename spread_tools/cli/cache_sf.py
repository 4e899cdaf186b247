"""``cache_sf``: model → structure-factor cache (base F and per-site geometric sums).

Example::

    cache_sf 6lk1.pdb -o sf_cache.h5 sites=FE1=FES/FE1,FE2=FES/FE2 \\
        d_min=2.5 d_max=4.0 energy.min_ev=7070 energy.max_ev=7170 energy.step_ev=4
"""

import time

import numpy as np
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
from spread_tools.model.spectra import channel_grid

SCRIPT = "cache_sf"

SCHEMA = {
    "sites": P([], "metal sites, NAME=SELECTION, comma-separated; SELECTION is RES/ATOM "
                   "(FES/FE1: atom FE1 of residue FES in every chain) or a gemmi selection "
                   "(//*/(FES)/FE1); for selections holding commas use a TOML list",
               type=list, item_type=str),
    "d_min": P(2.5, "high-resolution limit of the cached reflections", units="Å"),
    "d_max": P(4.0, "low-resolution limit of the cached reflections (None: no limit)",
               units="Å", optional=True),
    "energy": {
        "min_ev": P(7070.0, "first energy of the grid", units="eV"),
        "max_ev": P(7170.0, "last energy of the grid (included)", units="eV"),
        "step_ev": P(4.0, "grid step", units="eV"),
        "list_ev": P(None, "explicit energy grid, strictly increasing (replaces min/max/step)",
                     units="eV", type=list, item_type=float, optional=True),
    },
    "route": P("auto", "how F_base and S_el are computed: direct summation, gemmi density+FFT, "
                       "or auto (FFT for large cells); sites are always summed directly",
               choices=("auto", "direct", "fft")),
    "fft": {
        "rate": P(2.5, "FFT grid oversampling (grid spacing d_min/(2 rate))"),
        "cutoff": P(1e-7, "relative density cutoff for the atom radius on the FFT route"),
    },
    "bulk_solvent": {
        "k_sol": P(None, "flat bulk-solvent density (typically 0.35); None = no solvent",
                   units="e-/Å³", type=float, optional=True),
        "b_sol": P(46.0, "bulk-solvent B factor", units="Å²"),
    },
}

Output = output_option("Structure-factor cache to write (.h5, format spread_tools.sf_cache).")
USAGE = "MODEL.pdb|MODEL.cif -o SF_CACHE.h5 sites=NAME=RES/ATOM[,...] [key=value ...] [OPTIONS]"
EXAMPLE = ("cache_sf 6lk1.pdb -o sf_cache.h5 sites=FE1=FES/FE1,FE2=FES/FE2 d_min=2.5 d_max=4.0 \\\n"
           "    energy.min_ev=7070 energy.max_ev=7170 energy.step_ev=4")

app = make_app(SCRIPT, "Cache structure factors of a PDB/mmCIF model: F_base (non-site atoms, "
                       "f0 only), per-element and per-site geometric sums, for every P1 "
                       "Miller index (both Friedel mates) with d_min <= d <= d_max. Output: "
                       "an HDF5 spread_tools.sf_cache file (-o).")


def energy_grid(cfg):
    """Energy grid (eV) from the ``energy.*`` parameters.

    Parameters
    ----------
    cfg : spread_tools.config.Config
        Resolved parameters.

    Returns
    -------
    numpy.ndarray
    """
    if cfg.energy.list_ev is not None:
        e = np.asarray(cfg.energy.list_ev, dtype=np.float64)
        if len(e) == 0:
            raise InputError("parameter energy.list_ev: empty list")
        if len(e) > 1 and np.any(np.diff(e) <= 0):
            raise InputError("parameter energy.list_ev: energies must be strictly increasing")
    else:
        lo, hi, step = cfg.energy.min_ev, cfg.energy.max_ev, cfg.energy.step_ev
        if not step > 0:
            raise InputError(f"parameter energy.step_ev: must be positive, got {step}")
        if not hi >= lo:
            raise InputError(f"parameter energy.max_ev: {hi} eV is below energy.min_ev ({lo} eV); "
                             f"the energy grid must increase")
        e = channel_grid(lo, hi, step)
    if np.any(e <= 0) or not np.all(np.isfinite(e)):
        raise InputError("parameter energy: energies must be positive")
    return e


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, output: Output = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False, quiet: Quiet = False):
    """Cache structure factors of a model for SPREAD refinement."""
    with user_errors(SCRIPT):
        from spread_tools.structure.build import build_sf_cache, parse_sites, read_model
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        (model_path,) = require_files(files, ["model (PDB/mmCIF)"], SCRIPT)
        require_output(output, "cache")
        if not cfg.sites:
            raise InputError("parameter sites: give at least one site, e.g. sites=FE1=FES/FE1")
        if not cfg.d_min > 0:
            raise InputError(f"parameter d_min: must be positive, got {cfg.d_min} Å")
        d_max = float("inf") if cfg.d_max is None else cfg.d_max
        if not cfg.d_min < d_max:
            raise InputError(f"parameter d_min: {cfg.d_min} Å must be smaller than "
                             f"d_max ({cfg.d_max} Å)")
        if not cfg.fft.rate >= 1.0:
            raise InputError(f"parameter fft.rate: must be >= 1, got {cfg.fft.rate}")
        energy_ev = energy_grid(cfg)
        sites = parse_sites(cfg.sites)
        claim_outputs([output], inputs=[model_path], overwrite=overwrite)
        t0 = time.perf_counter()
        st = read_model(model_path)
        timings = {}
        cache = build_sf_cache(st, sites, cfg.d_min, d_max, energy_ev, route=cfg.route,
                               k_sol=cfg.bulk_solvent.k_sol, b_sol=cfg.bulk_solvent.b_sol,
                               fft_rate=cfg.fft.rate, fft_cutoff=cfg.fft.cutoff,
                               model_file=str(model_path), config=cfg.to_json(), quiet=quiet,
                               timings=timings)
        t_write = time.perf_counter()
        cache.write(output, overwrite=overwrite)
        t_end = time.perf_counter()
        n_ops = len(st.find_spacegroup().operations())
        typer.echo(f"{SCRIPT}: model {model_path}: cell {' '.join(f'{x:g}' for x in cache.cell)}, "
                   f"space group {cache.spacegroup} ({n_ops} operations)")
        for name, el in zip(cache.site_names, cache.site_elements):
            n = timings["site_atoms"][name]
            typer.echo(f"{SCRIPT}: site {name} ({el}): {n} atom(s), {n * n_ops} in the unit cell")
        typer.echo(f"{SCRIPT}: non-site atoms in the unit cell: {timings['atom_copies']} "
                   f"({', '.join(cache.elements)})")
        typer.echo(f"{SCRIPT}: {cache.n_h} P1 reflections (both Friedel mates), "
                   f"{d_max:g}-{cfg.d_min:g} Å; {len(energy_ev)} energies "
                   f"{energy_ev[0]:g}-{energy_ev[-1]:g} eV")
        solvent = (f"bulk solvent {timings['solvent_s']:.2f} s, " if "solvent_s" in timings
                   else "")
        typer.echo(f"{SCRIPT}: route {timings['route']}; time: sites {timings['sites_s']:.2f} s, "
                   f"other atoms {timings['atoms_s']:.2f} s, {solvent}write "
                   f"{t_end - t_write:.2f} s, total {t_end - t0:.2f} s")
        typer.echo(f"{SCRIPT}: wrote {output}")


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
