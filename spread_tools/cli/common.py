"""What every spread_tools script shares: options, parameter words, one-line errors.

A script looks like::

    app = make_app("cache_sf", "Cache model structure factors.")

    @app.command(**command_settings(SCHEMA))
    def run(words: Words = None, output: Output = None, config: ConfigFile = None,
            show_config: ShowConfig = False, overwrite: Overwrite = False):
        with user_errors("cache_sf"):
            files, cfg = parse_words(SCHEMA, words, config, show_config)
            ...

    def main():
        app()

Positional words holding ``=`` are parameter overrides (``d_min=2.5``); the
others are input files. A user mistake raises
:class:`~spread_tools.errors.InputError`; :func:`user_errors` prints it as one
line ``<script>: error: <message>`` and exits with status 2.
"""

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from spread_tools.config import help_table, resolve
from spread_tools.errors import InputError

Words = Annotated[Optional[list[str]], typer.Argument(
    help="Input files, then key=value parameter words (see the list below).",
    show_default=False)]
Output = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file.")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML file with parameters (key=value words win over it).")]
ShowConfig = Annotated[bool, typer.Option(
    "--show-config", help="Print the effective parameters as TOML and exit.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, fewer log lines.")]


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
    return typer.Typer(name=name, help=help_text, add_completion=False,
                       no_args_is_help=False, rich_markup_mode=None,
                       pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def command_settings(schema):
    """Keyword arguments for ``app.command`` that list the parameters in ``--help``.

    Parameters
    ----------
    schema : dict
        The script's parameter schema (see :mod:`spread_tools.config`).

    Returns
    -------
    dict
    """
    # "\b" keeps click from re-wrapping the table.
    table = "\n".join(["\b"] + help_table(schema).splitlines())
    return {"epilog": "Parameters (key=value words or a TOML file; type and units in "
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
    for f in files:
        if not f.exists():
            raise InputError(f"{f}: no such file")
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


@contextlib.contextmanager
def user_errors(script):
    """Turn :class:`InputError` into one line on stderr and exit status 2."""
    try:
        yield
    except InputError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
