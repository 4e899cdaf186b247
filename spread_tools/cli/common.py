"""What every spread_tools script shares: options, parameter words, one-line errors, outputs.

A script looks like::

    app = make_app("cache_sf", "Cache model structure factors.")
    Output = output_option("Structure-factor cache to write (.h5).")

    @app.command(**command_settings(SCHEMA, usage="MODEL.pdb -o SF_CACHE.h5 [key=value ...]",
                                    example="cache_sf 6lk1.pdb -o sf.h5 sites=FE1=FES/FE1"))
    def run(words: Words = None, output: Output = None, config: ConfigFile = None,
            show_config: ShowConfig = False, overwrite: Overwrite = False, quiet: Quiet = False):
        with user_errors("cache_sf"):
            files, cfg = parse_words(SCHEMA, words, config, show_config)
            (model,) = require_files(files, ["model (PDB/mmCIF)"], "cache_sf")
            claim_outputs([output], inputs=[model], overwrite=overwrite)
            ...

    def main():
        app()

Positional words holding ``=`` are parameter overrides (``d_min=2.5``); the
others are input files. A user mistake raises
:class:`~spread_tools.errors.InputError`; :func:`user_errors` prints it as one
line ``<script>: error: <message>`` and exits with status 2. So do an ``OSError``
(a file that cannot be read or written: the line names it) and a malformed
option (``--lattices abc``: :class:`SpreadCommand`).

:func:`user_errors` also opens the run scope of :func:`spread_tools.io.h5io.script_run`:
every file the script reads is remembered as an input, and :func:`claim_outputs`
(or :func:`spread_tools.io.h5io.check_writable`) checks each output before the work
(folder exists and is writable, not an input, nothing there without
``--overwrite``) and locks it (``<output>.lock``) until the script ends, so a second
run writing the same file is refused at once with the host and PID of the first.
"""

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

try:                                   # newer typer vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:                    # pragma: no cover - typer on top of click
    from click.exceptions import ClickException, UsageError

from spread_tools.config import help_table, resolve
from spread_tools.errors import InputError
from spread_tools.io.h5io import check_writable, note_input, os_error_message, script_run

Words = Annotated[Optional[list[str]], typer.Argument(
    help="Input files, then key=value parameter words (see the list below).",
    show_default=False)]


def output_option(help_text):
    """The ``-o/--output`` option of a script with its own description.

    Parameters
    ----------
    help_text : str
        What ``-o`` names for this script, e.g. ``"Result file (.h5); the CSV is written
        next to it (<stem>.csv)."``.

    Returns
    -------
    typing.Annotated
        Use as the type of the ``output`` parameter.
    """
    return Annotated[Optional[Path], typer.Option("-o", "--output", help=help_text,
                                                  show_default=False)]


Output = output_option("Output file.")
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML file with parameters (key=value words win over it).")]
ShowConfig = Annotated[bool, typer.Option(
    "--show-config", help="Print the effective parameters as TOML and exit.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, fewer log lines.")]
#: ``--sf-cache`` of the refinement scripts.
SfCache = Annotated[Optional[Path], typer.Option(
    "--sf-cache", "-s", help="Structure-factor cache (.h5) from cache_sf, same model and cell "
                             "as the dataset(s).")]
#: ``--resume`` of the scripts that checkpoint.
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue from the checkpoint (<output stem>.ckpt.h5 or checkpoint.path) "
                     "when it exists; it must come from the same inputs and parameters.")]


class _OneLineUsageError(ClickException):
    """A malformed command line (bad option value, unknown option) as one line, exit 2."""

    exit_code = 2

    def __init__(self, script, message):
        super().__init__(message)
        self.script = script

    def show(self, file=None):
        """Print ``<script>: error: command line: <message>`` on stderr."""
        text = " ".join(str(self.message).split())
        print(f"{self.script}: error: command line: {text} (see {self.script} --help)",
              file=sys.stderr if file is None else file)


class SpreadCommand(typer.core.TyperCommand):
    """The click command of every script: one-line usage errors, usage line, example.

    Subclasses made by :func:`command_settings` set ``usage_line`` (what follows the
    script name in ``Usage:``) and ``example`` (a command shown in ``--help``).
    """

    usage_line = None
    example = None
    script = None

    def make_context(self, info_name, args, parent=None, **extra):
        """Parse the command line; a usage error becomes one line (exit status 2)."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            raise _OneLineUsageError(self.script or info_name or self.name,
                                     exc.format_message()) from None

    def collect_usage_pieces(self, ctx):
        """The usage line naming the inputs (``usage_line``), else click's."""
        if self.usage_line:
            return [self.usage_line]
        return super().collect_usage_pieces(ctx)

    def format_epilog(self, ctx, formatter):
        """The example, then the parameter table."""
        if self.example:
            formatter.write_paragraph()
            formatter.write_text("Example:")
            with formatter.indentation():
                for line in self.example.splitlines():
                    formatter.write(" " * formatter.current_indent + line + "\n")
        super().format_epilog(ctx, formatter)


class _App(typer.Typer):
    """A typer app whose commands are :class:`SpreadCommand` s that know the script name."""

    def command(self, *args, cls=None, **kwargs):
        cls = cls or SpreadCommand
        if isinstance(cls, type) and issubclass(cls, SpreadCommand):
            cls = type("Command", (cls,), {"script": self.info.name})
        return super().command(*args, cls=cls, **kwargs)


def make_app(name, help_text):
    """A typer application configured the same way for every script.

    Parameters
    ----------
    name : str
        Script name.
    help_text : str
        First line(s) of ``--help``.

    Returns
    -------
    typer.Typer
    """
    return _App(name=name, help=help_text, add_completion=False,
                       no_args_is_help=False, rich_markup_mode=None,
                       pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def command_settings(schema, usage=None, example=None):
    """Keyword arguments for ``app.command``: parameter table, usage line, example.

    Parameters
    ----------
    schema : dict
        The script's parameter schema (see :mod:`spread_tools.config`).
    usage : str, optional
        What follows the script name on the ``Usage:`` line, naming the inputs,
        e.g. ``"DATASET.h5 [...] --sf-cache SF_CACHE.h5 -o RESULT.h5 [key=value ...]"``.
    example : str, optional
        One example command (may span lines), shown in ``--help``.

    Returns
    -------
    dict
        ``cls`` (a :class:`SpreadCommand`) and ``epilog``.
    """
    # "\b" keeps click from re-wrapping the table.
    table = "\n".join(["\b"] + help_table(schema).splitlines())
    cls = type("Command", (SpreadCommand,), {"usage_line": usage, "example": example})
    return {"cls": cls,
            "epilog": "Parameters (key=value words or a TOML file; type and units in "
                      "parentheses):\n\n" + table}


def parse_words(schema, words, config_path=None, show_config=False, presets=None):
    """Split positional words into input files and parameter overrides, then resolve.

    Parameters
    ----------
    schema : dict
        The script's parameter schema.
    words : list of str or None
        Positional command-line words.
    config_path : Path, optional
        TOML file given with ``--config``.
    show_config : bool
        Print the effective configuration as TOML and exit 0.
    presets : dict, optional
        Named sets of defaults (see :func:`spread_tools.config.resolve`).

    Returns
    -------
    files : list of Path
        Words without ``=``, in order.
    cfg : spread_tools.config.Config
        Effective parameters.
    """
    words = words or []
    files = [Path(w) for w in words if "=" not in w]
    overrides = [w for w in words if "=" in w]
    cfg = resolve(schema, toml_path=config_path, overrides=overrides, presets=presets)
    if show_config:
        typer.echo(cfg.to_toml(), nl=False)
        raise typer.Exit(0)
    return files, cfg


def require_files(files, names, script):
    """Check the number of input files and that each exists.

    Parameters
    ----------
    files : list of Path
        Input files from :func:`parse_words`.
    names : sequence of str
        What each expected file is (for the message), e.g. ``["model (PDB/mmCIF)"]``.
        A name ending in ``...`` accepts one or more files for the last slot.
    script : str
        Script name for the message.

    Returns
    -------
    list of Path
    """
    variadic = bool(names) and names[-1].endswith("...")
    need = len(names)
    if len(files) < need or (not variadic and len(files) > need):
        raise InputError(f"command line: {script} expects {need}{'+' if variadic else ''} input "
                         f"file(s): {', '.join(names)}; got {len(files)}")
    from spread_tools.io.h5io import check_readable
    for f in files:
        check_readable(f)
    return files


def require_output(output, what):
    """Check that ``-o`` was given.

    Parameters
    ----------
    output : Path or None
        Value of ``-o/--output``.
    what : str
        What the output is, for the message (``"cache"``, ``"dataset"``, ``"result"``).

    Returns
    -------
    Path
    """
    if output is None:
        raise InputError(f"command line: give the output {what} file with -o FILE.h5")
    return output


def claim_outputs(outputs, inputs=(), overwrite=False):
    """Check every output before the work and lock it for this run (one call per script).

    Each output's folder must exist and be writable, the output must not be one of
    ``inputs`` (nor any file the run has read so far), it must not exist unless
    ``overwrite``, and no other run may be writing it: inside :func:`user_errors` a
    lock ``<output>.lock`` is taken and held until the script ends.

    Parameters
    ----------
    outputs : sequence of str or Path or None
        Files the script will write (``None`` entries are skipped).
    inputs : sequence of str or Path or None
        Files the script will read (``None`` entries and missing files are skipped).
    overwrite : bool or sequence of bool
        Allow replacing existing outputs (one flag for all, or one per output).

    Returns
    -------
    list of Path
        The outputs, as paths.

    Raises
    ------
    InputError
        For the first output that fails a check.
    """
    inputs = [Path(i) for i in inputs if i is not None]
    for i in inputs:
        if i.exists():
            note_input(i)
    outs = [Path(o) for o in outputs if o is not None]
    flags = [overwrite] * len(outs) if isinstance(overwrite, bool) else list(overwrite)
    for o, ok in zip(outs, flags):
        check_writable(o, ok, inputs=inputs)
    return outs


def claim_checkpointed_outputs(comm, outputs, checkpoint, inputs, overwrite, resume):
    """:func:`claim_outputs` for a stage that checkpoints, under MPI.

    Rank 0 refuses an existing checkpoint without ``--resume`` or ``--overwrite``, then
    claims ``outputs`` (``--resume`` may replace the result of the interrupted run) and the
    checkpoint; every rank learns the verdict, so that no rank starts the work alone.

    Raises
    ------
    InputError
        On rank 0 the reason; on the other ranks "rank 0 refused the command line".
    """
    failure = None
    if comm.rank == 0:
        try:
            if checkpoint.exists() and not resume and not overwrite:
                raise InputError(f"{checkpoint}: a checkpoint exists; continue with --resume, or "
                                 f"start afresh with --overwrite")
            claim_outputs(outputs, inputs=inputs, overwrite=overwrite or resume)
            claim_outputs([checkpoint], inputs=inputs, overwrite=True)
        except InputError as exc:
            failure = exc
    if comm.size > 1 and int(comm.bcast_obj(failure is not None)):
        if comm.rank == 0:
            raise failure
        raise InputError("rank 0 refused the command line")
    if failure is not None:
        raise failure


def resume_command(script, flag="--resume"):
    """The command line that continues this run: the same words plus ``flag``.

    Parameters
    ----------
    script : str
    flag : str

    Returns
    -------
    str
        A shell-quoted command, or a description when the process was not started as
        ``script`` (e.g. from a test runner).
    """
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == script:
        words = argv[1:]
        if flag not in words:
            words.append(flag)
        return shlex.join([script] + words)
    return f"the same {script} command with {flag}"


@contextlib.contextmanager
def user_errors(script):
    """Run a script body: user mistakes and file errors become one line on stderr, exit 2.

    :class:`InputError` and ``OSError`` (naming the file) print
    ``<script>: error: <message>`` and exit with status 2; Ctrl-C prints
    ``<script>: interrupted`` and exits 130. Opens the run scope of
    :func:`spread_tools.io.h5io.script_run` (inputs remembered, outputs locked until
    the block ends). With the environment variable ``SPREAD_TRACEBACK=1`` an
    ``OSError`` is re-raised with its traceback (for bug reports).
    """
    try:
        with script_run(script):
            yield
    except InputError as exc:
        print(f"{script}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise typer.Exit(2) from None
    except OSError as exc:
        if os.environ.get("SPREAD_TRACEBACK"):
            raise
        print(f"{script}: error: {os_error_message(exc)}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
