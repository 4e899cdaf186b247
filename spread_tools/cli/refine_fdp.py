"""``refine_fdp``: dataset(s) + SF cache → per-site f′(E), f″(E) with uncertainties (S1).

Examples::

    refine_fdp dataset.h5 --sf-cache sf_cache.h5 -o result.h5
    refine_fdp shift2.h5 shift3.h5 --sf-cache sf_cache.h5 -o result_kk.h5 \\
        restraints.fdp.mean=None restraints.kramers_kronig.use=True
    mpiexec -n 4 refine_fdp dataset.h5 --sf-cache sf_cache.h5 -o result.h5 --resume

Writes ``result.h5`` (``format = "spread_tools.result"``) and ``result.csv`` as
one unit; a checkpoint ``result.ckpt.h5`` after every macrocycle and every
``checkpoint.interval_s`` (300 s) inside one (removed after a converged run unless
``checkpoint.keep=True``); ``--resume`` continues from it to the same answer.
SIGTERM (SLURM's time limit or requeue) or Ctrl-C writes a checkpoint, prints one
line with the command that continues, and exits 128 + the signal number.
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
from spread_tools.refine.s1 import REFINE_SCHEMA

SCRIPT = "refine_fdp"
SCHEMA = REFINE_SCHEMA

Output = output_option("Result file to write (.h5); the table goes next to it as <stem>.csv "
                       "and the checkpoint as <stem>.ckpt.h5.")

app = make_app(SCRIPT, "Refine per-site anomalous scattering factors f'(E), f''(E) (e-) on an "
                       "energy grid (eV) from SPREAD still-shot datasets (the S1 step): Poisson "
                       "likelihood of every unmasked pixel, per-lattice scales and per-shoebox "
                       "backgrounds, Sauter and/or Kramers-Kronig restraints. Runs under mpiexec "
                       "(lattices split over ranks). Output: result .h5 (-o) and .csv.")


USAGE = "DATASET.h5 [DATASET.h5 ...] --sf-cache SF_CACHE.h5 -o RESULT.h5 [key=value ...] [OPTIONS]"
EXAMPLE = "refine_fdp dataset.h5 --sf-cache sf_cache.h5 -o result.h5 restraints.fp.sigma=0.1"


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, sf_cache: SfCache = None, output: Output = None,
        config: ConfigFile = None, show_config: ShowConfig = False, overwrite: Overwrite = False,
        resume: Resume = False, quiet: Quiet = False):
    """Refine per-site f'(E), f''(E) (e-) on an energy grid (eV) from SPREAD datasets (S1).

    Poisson likelihood of every unmasked pixel with per-lattice scales and per-shoebox
    backgrounds, Sauter and/or Kramers-Kronig restraints; standard uncertainties from the
    Fisher information. Runs under mpiexec/srun (lattices split over ranks). Writes
    -o result.h5 and result.csv; checkpoints after every macrocycle and every
    checkpoint.interval_s seconds (--resume continues to the same answer); SIGTERM or
    Ctrl-C writes a checkpoint and exits with the command that continues.
    """
    from spread_tools.refine.mpi import get_comm
    comm = get_comm()
    root = comm.rank == 0
    if not root:
        try:
            _run(comm, words, sf_cache, output, config, False, overwrite, resume, True)
        except InputError:
            raise typer.Exit(2) from None          # rank 0 reports the same error once
        except BaseException:
            comm.comm.Abort(1)                      # never leave rank 0 waiting in a collective
            raise
        return
    _run(comm, words, sf_cache, output, config, show_config, overwrite, resume, quiet)


def _run(comm, words, sf_cache, output, config, show_config, overwrite, resume, quiet):
    root = comm.rank == 0
    with (user_errors(SCRIPT) if root else _plain()):
        from spread_tools.io.dataset import Dataset
        from spread_tools.refine.checkpoint import Interrupted, StopSignals
        from spread_tools.refine.mpi import select_device_for_rank
        from spread_tools.refine.s1 import (
            check_optimizer_config,
            edge_shifts,
            log_to_stderr,
            refine,
            write_result,
        )
        from spread_tools.structure.cache import SFCache
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        check_optimizer_config(cfg)
        paths = require_files(files, ["dataset (.h5) ..."], SCRIPT)
        if sf_cache is None:
            raise InputError("command line: give the structure-factor cache with --sf-cache FILE.h5")
        require_files([sf_cache], ["SF cache"], SCRIPT)
        require_output(output, "result")
        output = Path(output)
        csv_path = output.with_suffix(".csv")
        ckpt = Path(cfg.checkpoint.path) if cfg.checkpoint.path else \
            output.with_name(output.stem + ".ckpt.h5")
        # rank 0 checks (and locks) the outputs; every rank learns the verdict, so that
        # no rank enters refine() alone
        inputs = list(paths) + [sf_cache] + ([cfg.start.result] if cfg.start.result else [])
        claim_checkpointed_outputs(comm, [output, csv_path], ckpt, inputs, overwrite, resume)
        if cfg.backend != "cpu":
            select_device_for_rank(comm)
        t0 = time.perf_counter()
        cache = SFCache.read(sf_cache)
        datasets = [Dataset.read(p) for p in paths]
        log = (lambda s: None) if quiet else log_to_stderr
        if root and not quiet:
            log_to_stderr(f"{SCRIPT}: {len(paths)} dataset(s), SF cache {sf_cache}, output {output}")
        with StopSignals() as stop:
            try:
                result = refine(datasets, cache, cfg, comm=comm, checkpoint=ckpt, resume=resume,
                                log=(lambda s: log(f"{SCRIPT}: {s}")), quiet=quiet,
                                dataset_names=[str(p) for p in paths], cache_name=str(sf_cache),
                                stop=stop)
            except Interrupted as exc:
                typer.echo(f"{SCRIPT}: {exc}; continue with: {resume_command(SCRIPT)}", err=True)
                raise typer.Exit(exc.exit_code) from None
        if root:
            csv = write_result(output, result, overwrite=overwrite or resume)
            if result.control:
                typer.echo(f"{SCRIPT}: control {result.control}: the edge must vanish (edge step "
                           f"within about 2 sigma of 0)")
            for i, name in enumerate(result.site_names):
                typer.echo(f"{SCRIPT}: {name}: edge {result.edge_ev[i]:.2f} ± "
                           f"{result.edge_sigma_ev[i]:.2f} eV (f'' half step, levels from the pre/post-edge means); edge step "
                           f"{result.edge_step[i]:.3f} ± {result.edge_step_sigma[i]:.3f} e-; median sigma "
                           f"f' {_median(result.fp_sigma[i]):.3f} e-, f'' {_median(result.fdp_sigma[i]):.3f} e-")
            for name, first, shift, sig in edge_shifts(result):
                typer.echo(f"{SCRIPT}: edge shift {name} - {first}: {shift:.2f} ± {sig:.2f} eV")
            dropped = {k: v for k, v in result.dropped.items() if v}
            if dropped:
                typer.echo(f"{SCRIPT}: dropped " + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                             for k, v in dropped.items()))
            typer.echo(f"{SCRIPT}: {result.message}; {len(result.history['objective'])} iterations, "
                       f"{result.n_evaluations} evaluations on {result.n_ranks} rank(s), "
                       f"{time.perf_counter() - t0:.1f} s")
            typer.echo(f"{SCRIPT}: wrote {output} and {csv}")
            if result.converged and not cfg.checkpoint.keep and ckpt.exists():
                ckpt.unlink()
            if not result.converged:
                typer.echo(f"{SCRIPT}: warning: not converged; checkpoint kept in {ckpt} "
                           f"(continue with --resume)", err=True)


@contextlib.contextmanager
def _plain():
    yield


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
