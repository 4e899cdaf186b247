"""``kk_check``: is a table's f′ consistent with its f″ (Kramers–Kronig)?

Examples::

    kk_check pf-rd-ox_fftkk.out window.min_ev=7070 window.max_ev=7170 -o ox_kk
    kk_check result.h5 site=FE1 --max-rms 0.3 -o fe1_kk

What is computed (``spread_tools.physics.kk.kk_consistency``), on the table's own
energies inside the window::

    KK(f″) = f′_ref + K (f″ − f″_ref),     residual = f′ − KK(f″)

with K the exact operator for piecewise-linear f″ and f_ref the element's
smooth reference (Chantler by default). ``mode=table`` uses every row of the
table (Δf″ over the whole table, zero beyond it; within ``pad`` eV of the
window formed on a 0.1 eV grid, the table interpolated linearly): the
reference only supplies the f″ the table does not tabulate and the
relativistic constant, nothing inside the table is assumed.
``mode=restraint`` uses only the window rows, ramped to zero over ``pad`` eV
on each side — what the refinement's KK restraint sees (the natural choice
for a refinement result on its 4 eV grid).
``mode=auto`` (default) takes ``table`` when the table extends ``pad`` eV
beyond both ends of the window, else ``restraint``. With ``reference=None``
the transform uses the table alone; the untabulated tails then show as a
near-constant offset (printed as ``mean``; ``rms about mean`` removes it).

Output: a report on stdout; with ``-o PREFIX``: ``PREFIX.csv`` (one row per
window energy) and ``PREFIX.png``/``PREFIX.pdf`` (f′, f″, KK(f″), reference,
residual). Exit status 0, 1 when the rms residual exceeds ``max_rms``, 2 on a
user error.
"""

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from spread_tools.cli.common import (
    ConfigFile,
    Output,
    Overwrite,
    ShowConfig,
    Words,
    command_settings,
    make_app,
    parse_words,
    require_files,
    user_errors,
)
from spread_tools.config import P
from spread_tools.errors import InputError

SCRIPT = "kk_check"

SCHEMA = {
    "window": {
        "min_ev": P(7070.0, "lowest energy of the window where the residual is evaluated", units="eV"),
        "max_ev": P(7170.0, "highest energy of the window", units="eV"),
    },
    "element": P("Fe", "element of the reference curve (symbol)"),
    "reference": P("chantler", "smooth reference of the element for the differential form "
                               "(None: plain KK of the table alone)",
                   choices=("chantler", "cromer_liberman"), optional=True),
    "mode": P("auto", "table: KK over every row of the table; restraint: only the window rows, "
                      "ramped to zero over pad (what the refinement restraint sees); auto: table "
                      "if the table extends pad beyond the window, else restraint",
              choices=("auto", "table", "restraint")),
    "pad": P(100.0, "ramp length beyond the window in restraint mode (and the margin of auto)",
             units="eV"),
    "site": P(None, "site name, for refinement results (.h5 or refinement CSV)", type=str),
    "format": P("auto", "input table format",
                choices=("auto", "three-column", "henke", "csv", "result")),
    "max_rms": P(None, "exit status 1 when the rms residual exceeds this", units="e-", type=float),
    "plot": P(True, "with -o, also write PREFIX.png and PREFIX.pdf"),
}

MaxRms = Annotated[Optional[float], typer.Option(
    "--max-rms", help="Exit status 1 when the rms residual (e-) exceeds this (same as max_rms=).",
    show_default=False)]

app = make_app(SCRIPT, "Kramers-Kronig consistency of a tabulated f'(E), f''(E) (or one site of "
                       "a refinement result): rms and largest |f' - KK(f'')| over an energy "
                       "window, in e-. With -o PREFIX writes PREFIX.csv, PREFIX.png, PREFIX.pdf. "
                       "Exit status 1 above --max-rms, 2 on bad input.")


def output_paths(prefix, plot=True):
    """Files written for ``-o PREFIX``: ``PREFIX.csv`` (+ ``.png``, ``.pdf``).

    Parameters
    ----------
    prefix : Path
        Output prefix; a trailing ``.csv``, ``.png`` or ``.pdf`` is removed.
    plot : bool
        Include the figure files.

    Returns
    -------
    dict
        ``{"csv": Path, "png": Path, "pdf": Path}`` (figures only with ``plot``).
    """
    prefix = Path(prefix)
    if prefix.suffix.lower() in (".csv", ".png", ".pdf"):
        prefix = prefix.with_suffix("")
    out = {"csv": Path(f"{prefix}.csv")}
    if plot:
        out["png"] = Path(f"{prefix}.png")
        out["pdf"] = Path(f"{prefix}.pdf")
    return out


def residual_csv(check, header_lines=()):
    """CSV text, one row per window energy.

    Parameters
    ----------
    check : spread_tools.physics.kk.KKCheck
        Result of the check.
    header_lines : sequence of str
        Comment lines written first (prefixed with ``#``).

    Returns
    -------
    str
        Columns ``energy_ev,fp,fdp,fp_kk,residual,fp_ref,fdp_ref`` (e⁻; the
        reference columns are empty without a reference).
    """
    lines = [f"# {h}" for h in header_lines]
    lines.append("energy_ev,fp,fdp,fp_kk,residual,fp_ref,fdp_ref")
    for i, e in enumerate(check.energy_ev):
        ref = ("", "") if check.fp_ref is None else (f"{check.fp_ref[i]:.8g}", f"{check.fdp_ref[i]:.8g}")
        lines.append(f"{e:.6f},{check.fp[i]:.8g},{check.fdp[i]:.8g},{check.fp_kk[i]:.8g},"
                     f"{check.residual[i]:.8g},{ref[0]},{ref[1]}")
    return "\n".join(lines) + "\n"


def plot_check(check, title, paths, overwrite=False):
    """Figure of f′, f″, KK(f″), the reference and the residual, written atomically.

    Parameters
    ----------
    check : spread_tools.physics.kk.KKCheck
        Result of the check.
    title : str
        Figure title.
    paths : sequence of Path
        Files to write (format from the suffix, e.g. ``.png``, ``.pdf``).
    overwrite : bool
        Replace existing files.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spread_tools.io.h5io import atomic_output
    fig, (ax, axr) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    e = check.energy_ev
    if check.fp_ref is not None:
        ax.plot(e, check.fp_ref, color="0.6", lw=1, ls=":", label="f′ reference")
        ax.plot(e, check.fdp_ref, color="0.6", lw=1, ls="-.", label="f″ reference")
    ax.plot(e, check.fp, color="C0", lw=1.5, label="f′ (table)")
    ax.plot(e, check.fdp, color="C3", lw=1.5, label="f″ (table)")
    ax.plot(e, check.fp_kk, color="k", lw=1.2, ls="--", label="KK(f″)")
    ax.set_ylabel("e⁻")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title, fontsize=9)
    axr.axhline(0, color="0.7", lw=0.8)
    axr.plot(e, check.residual, color="C2", lw=1.2)
    axr.plot([check.energy_at_max_ev], [check.residual[np.argmax(np.abs(check.residual))]],
             "o", color="C2", ms=4)
    axr.set_ylabel("f′ − KK(f″), e⁻")
    axr.set_xlabel("energy (eV)")
    axr.set_title(f"rms {check.rms:.3g} e⁻, max {check.max_abs:.3g} e⁻ at "
                  f"{check.energy_at_max_ev:g} eV", fontsize=8)
    fig.tight_layout()
    try:
        for path in paths:
            with atomic_output(path, overwrite, suffix=Path(path).suffix) as tmp:
                fig.savefig(tmp, dpi=150, format=Path(path).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)


@app.command(**command_settings(SCHEMA))
def run(words: Words = None, output: Output = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False, max_rms: MaxRms = None):
    """Kramers-Kronig consistency check of a tabulated f', f''."""
    with user_errors(SCRIPT):
        from spread_tools.io.h5io import atomic_write_text, check_writable
        from spread_tools.physics.kk import kk_consistency
        from spread_tools.physics.scattering import read_table
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        (path,) = require_files(files, ["table (E f' f'', .nff, .csv or result .h5)"], SCRIPT)
        threshold = max_rms if max_rms is not None else cfg.max_rms
        if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
            raise InputError(f"parameter max_rms: must be >= 0, got {threshold}")
        if not (np.isfinite(cfg.pad) and cfg.pad > 0):
            raise InputError(f"parameter pad: must be > 0 eV, got {cfg.pad}")
        outs = output_paths(output, cfg.plot) if output is not None else {}
        for p in outs.values():
            check_writable(p, overwrite)
        table = read_table(path, site=cfg.site, format=cfg.format)
        reference = cfg.reference or "none"
        check = kk_consistency(table.energy_ev, table.fp, table.fdp, cfg.window.min_ev,
                               cfg.window.max_ev, element=cfg.element, reference=reference,
                               mode=cfg.mode, pad_ev=cfg.pad, source=table.source)
        ref = "none" if reference == "none" else f"{reference} {cfg.element}"
        info = [f"{SCRIPT}: {table.source}: {len(table)} rows {table.energy_ev[0]:g}-"
                f"{table.energy_ev[-1]:g} eV; window {cfg.window.min_ev:g}-{cfg.window.max_ev:g} eV "
                f"({check.energy_ev.size} energies); mode {check.mode}"
                + (f" (pad {cfg.pad:g} eV)" if check.mode == "restraint" else "")
                + f"; reference {ref}",
                f"{SCRIPT}: rms |f' - KK(f'')| = {check.rms:.4f} e-, max = {check.max_abs:.4f} e- "
                f"at {check.energy_at_max_ev:g} eV; mean {check.mean:+.4f} e-, "
                f"rms about mean {check.rms_about_mean:.4f} e-"]
        for line in info:
            typer.echo(line)
        if outs:
            atomic_write_text(outs["csv"], residual_csv(check, [i.split(": ", 1)[1] for i in info]),
                              overwrite=overwrite)
            figs = [outs[k] for k in ("png", "pdf") if k in outs]
            if figs:
                plot_check(check, f"{Path(table.source).name if '[' not in table.source else table.source}"
                                  f" — Kramers–Kronig check ({check.mode}, reference {ref})",
                           figs, overwrite=overwrite)
            typer.echo(f"{SCRIPT}: wrote {', '.join(str(p) for p in outs.values())}")
        if threshold is not None and check.rms > threshold:
            typer.echo(f"{SCRIPT}: rms residual {check.rms:.4f} e- exceeds max_rms {threshold:g} e-",
                       err=True)
            raise typer.Exit(1)


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
