"""``refine_geometry``: dataset + SF cache → the same dataset with refined crystal models.

Examples::

    refine_geometry dataset.h5 --sf-cache sf_cache.h5 -o refined.h5
    refine_geometry dataset.h5 --sf-cache sf_cache.h5 -o refined.h5 \\
        cell.sigma_edges_a=0.04,0.04,0.15 refine.energy_offset=per_lattice
    mpiexec -n 4 refine_geometry dataset.h5 --sf-cache sf_cache.h5 -o refined.h5
    # a second macrocycle, with f'/f'' held at the S1 result of the first
    refine_geometry dataset.h5 --sf-cache sf_cache.h5 -o refined2.h5 curves.result=result.h5

Writes ``refined.h5`` (``format = "spread_tools.dataset"``: the kept lattices with their
refined A, domain size, mosaic spread and spectra, and the per-lattice table under
``geometry_refinement/``) and ``refined.lattices.csv`` (one row per input lattice: spots,
NLL before/after, rotation change, cell, N, mosaic, G, centroid RMSD before/after, status).
"""

import contextlib
import time
from pathlib import Path

import typer

from spread_tools.cli.common import (
    ConfigFile,
    Overwrite,
    Quiet,
    Resume,
    SfCache,
    ShowConfig,
    Words,
    claim_checkpointed_outputs,
    command_settings,
    make_app,
    output_option,
    parse_words,
    require_files,
    require_output,
    resume_command,
    user_errors,
)
from spread_tools.errors import InputError
from spread_tools.refine.crystal_models import GEOMETRY_SCHEMA

SCRIPT = "refine_geometry"
SCHEMA = GEOMETRY_SCHEMA

Output = output_option("Refined dataset to write (.h5); the per-lattice table goes next to it as "
                       "<stem>.lattices.csv and the checkpoint as <stem>.ckpt.h5.")
USAGE = "DATASET.h5 --sf-cache SF_CACHE.h5 -o REFINED.h5 [key=value ...] [OPTIONS]"
EXAMPLE = "refine_geometry dataset.h5 --sf-cache sf_cache.h5 -o refined.h5 cell.sigma_fraction=0.003"

app = make_app(SCRIPT, "Refine the crystal model of every lattice (orientation, unit cell, mosaic "
                       "domain size and spread, G, shoebox backgrounds) and the spectrometer's energy "
                       "offset (eV) by the Poisson likelihood of the shoebox pixels, with f'/f'' of "
                       "the sites held fixed. Runs under mpiexec (lattices split over ranks). Output: "
                       "the refined dataset (-o, .h5) and a per-lattice table (.lattices.csv).")


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, sf_cache: SfCache = None, output: Output = None,
        config: ConfigFile = None, show_config: ShowConfig = False, overwrite: Overwrite = False,
        resume: Resume = False, quiet: Quiet = False):
    """Refine per-lattice crystal models of a SPREAD dataset before S1 (refine_fdp).

    Orientation, cell, mosaic domain size and spread, G and backgrounds per lattice and the
    spectrometer's energy offset, by the Poisson likelihood of the shoebox pixels with f'/f''
    held fixed. Runs under mpiexec/srun (lattices split over ranks). Writes -o refined.h5
    and refined.lattices.csv; checkpoints after every fit and every checkpoint.interval_s
    seconds (--resume continues to the same answer); SIGTERM or Ctrl-C writes a checkpoint
    and exits with the command that continues.
    """
    from spread_tools.refine.mpi import get_comm
    comm = get_comm()
    if comm.rank != 0:
        try:
            _run(comm, words, sf_cache, output, config, False, overwrite, resume, True)
        except InputError:
            raise typer.Exit(2) from None           # rank 0 reports the same error once
        except BaseException:
            comm.comm.Abort(1)
            raise
        return
    _run(comm, words, sf_cache, output, config, show_config, overwrite, resume, quiet)


def _run(comm, words, sf_cache, output, config, show_config, overwrite, resume, quiet):
    root = comm.rank == 0
    with (user_errors(SCRIPT) if root else contextlib.nullcontext()):
        from spread_tools.io.dataset import Dataset
        from spread_tools.io.h5io import atomic_write_text
        from spread_tools.refine.checkpoint import Interrupted, StopSignals
        from spread_tools.refine.crystal_models import (lattice_table_csv, refine_geometry,
                                                        refined_dataset, table_extras)
        from spread_tools.refine.mpi import select_device_for_rank
        from spread_tools.structure.cache import SFCache
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        (path,) = require_files(files, ["dataset (.h5)"], SCRIPT)
        if sf_cache is None:
            raise InputError("command line: give the structure-factor cache with --sf-cache FILE.h5")
        require_files([sf_cache], ["SF cache"], SCRIPT)
        output = Path(require_output(output, "refined dataset"))
        csv = output.with_name(output.stem + ".lattices.csv")
        ckpt = Path(cfg.checkpoint.path) if cfg.checkpoint.path else output.with_name(output.stem + ".ckpt.h5")
        claim_checkpointed_outputs(comm, [output, csv], ckpt, [path, sf_cache, cfg.curves.result],
                                   overwrite, resume)
        if cfg.backend != "cpu":
            select_device_for_rank(comm)
        t0 = time.perf_counter()
        ds = Dataset.read(path)
        cache = SFCache.read(sf_cache)

        def log(s):
            if root and not quiet:
                typer.echo(f"{SCRIPT}: {s}", err=True)
        with StopSignals() as stop:
            try:
                result = refine_geometry(ds, cache, cfg, comm=comm, log=log, checkpoint=ckpt,
                                         resume=resume, stop=stop)
            except Interrupted as exc:
                if root:
                    typer.echo(f"{SCRIPT}: {exc}; continue with: {resume_command(SCRIPT)}", err=True)
                raise typer.Exit(exc.exit_code) from None
        if not root:
            return
        refined = refined_dataset(ds, result, cfg.to_json())
        refined.write(output, overwrite=overwrite or resume, extra=table_extras(result))
        atomic_write_text(csv, lattice_table_csv(result.table), overwrite=overwrite or resume)
        if not cfg.checkpoint.keep and ckpt.exists():
            ckpt.unlink()
        t = result.table
        k = result.kept
        typer.echo(f"{SCRIPT}: kept {len(k)} of {ds.n_lattices} lattices; energy offset "
                   f"{result.energy_offset_ev:+.3f} ± {result.energy_offset_sigma_ev:.3f} eV; median rotation change "
                   f"{_median(t['rotation_change_deg'][k]):.4f} deg; median centroid RMSD "
                   f"{_median(t['centroid_rmsd_start_px'][k]):.3f} -> "
                   f"{_median(t['centroid_rmsd_final_px'][k]):.3f} px; "
                   f"{time.perf_counter() - t0:.1f} s on {comm.size} rank(s)")
        typer.echo(f"{SCRIPT}: wrote {output} and {csv}")


def _median(a):
    import numpy as np
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
