"""``kk_check``: is a table's f′ consistent with its f″ (Kramers–Kronig)?

Examples::

    kk_check pf-rd-ox_fftkk.out window.min_ev=7070 window.max_ev=7170 -o ox_kk
    kk_check result.h5 site=FE1 --max-rms 0.3 -o fe1_kk

What is computed (``spread_tools.physics.kk.kk_consistency``), on the table's own
energies inside the window::

    KK(f″) = C + KK[f″ of the table, the reference's f″ beyond it],   residual = f′ − KK(f″)

with KK the exact operator for piecewise-linear f″ and the reference (Chantler by
default) made *self-consistent*: its f′ is C + KK of its own f″ (C, the relativistic
and nuclear Thomson constant, −0.075 e⁻ for Fe), so the reference adds no false
floor (tabulated Chantler f′ is 0.34 e⁻ off its own KK at the Fe edge, tabulated
Cromer–Liberman f′ diverges there). ``mode=table`` uses every row of the table;
``mode=restraint`` uses only the window rows joined to the reference by linear ramps
over ``pad`` eV (what the refinement's KK terms see, the natural choice for a refinement
result on its grid); ``mode=auto`` (default) takes ``table`` when the table extends
``pad`` eV beyond both ends of the window, else ``restraint``.

Reported: rms, max, the best constant offset (the mean residual: far tails or another
relativistic convention leave a constant in f′) and the rms about it, the shape
disagreement, on which the threshold acts (``metric=rms_about_mean``, default;
``metric=rms`` or ``max_abs`` instead). What to expect: a KK-consistent 1 eV table,
≤ 0.02 e⁻; the measured ferredoxin tables, 0.15 e⁻ (their rising edge); a 1 e⁻ bump or a
3 eV shift of f′, 0.22–0.27 e⁻: a threshold of 0.1 e⁻ separates them. On a coarse grid
(restraint mode) even a perfect curve leaves the grid's discretisation floor (printed:
0.13 e⁻ for Fe on 4 eV, 0.02 e⁻ on 1 eV); the threshold should stay above it.

Output: a report on stdout; with ``-o PREFIX``: ``PREFIX.csv`` (one row per
window energy) and ``PREFIX.png``/``PREFIX.pdf`` (f′, f″, KK(f″), reference,
residual). Exit status 0, 1 when the thresholded figure exceeds ``max_rms``, 2 on a
user error.
"""

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from spread_tools.cli.common import (
    ConfigFile,
    Overwrite,
    Quiet,
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
    "reference": P("chantler", "reference of the element for the f'' beyond the table (or the "
                               "window) and the constant, made self-consistent (its f' = KK of its "
                               "own f'' + constant); None: plain KK of the table alone",
                   choices=("chantler", "cromer_liberman"), optional=True),
    "mode": P("auto", "table: KK over every row of the table; restraint: only the window rows, "
                      "joined to the reference over pad (what the refinement's KK terms see); auto: table "
                      "if the table extends pad beyond the window, else restraint",
              choices=("auto", "table", "restraint")),
    "pad": P(100.0, "length of the ramps joining the window to the reference in restraint mode (and the margin of auto)",
             units="eV"),
    "site": P(None, "site name, for refinement results (.h5 or refinement CSV)", type=str),
    "format": P("auto", "input table format",
                choices=("auto", "three-column", "henke", "csv", "result")),
    "max_rms": P(None, "exit status 1 when the residual figure named by metric exceeds this "
                       "(recommended 0.1)", units="e-", type=float),
    "metric": P("rms_about_mean", "the figure max_rms applies to: rms about the best constant "
                                  "offset (default), plain rms, or the largest |residual|",
                choices=("rms_about_mean", "rms", "max_abs")),
    "plot": P(True, "with -o, also write PREFIX.png and PREFIX.pdf"),
}

MaxRms = Annotated[Optional[float], typer.Option(
    "--max-rms", help="Exit status 1 when the residual (e-; rms about the best constant offset "
    "unless metric= says otherwise) exceeds this (same as max_rms=; 0.1 recommended).",
    show_default=False)]
Prefix = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Output prefix: writes PREFIX.csv, PREFIX.png and PREFIX.pdf.")]

app = make_app(SCRIPT, "Kramers-Kronig consistency of a tabulated f'(E), f''(E) (or one site of "
                       "a refinement result): rms, largest |f' - KK(f'')|, best constant offset and "
                       "rms about it over an energy window, in e-, against a self-consistent "
                       "reference. With -o PREFIX writes PREFIX.csv, PREFIX.png, PREFIX.pdf. "
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


def plot_check(check, title, paths, overwrite=False, kind="table"):
    """Figure of f′, f″, KK(f″), the reference and the residual, written atomically.

    Parameters
    ----------
    check : spread_tools.physics.kk.KKCheck
        Result of the check.
    title : str
        Figure title (a short name of the curve, not a path).
    paths : sequence of Path
        Files to write (format from the suffix, e.g. ``.png``, ``.pdf``).
    overwrite : bool
        Replace existing files.
    kind : str
        What the curve is, for the legend: ``"table"`` or ``"result"``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spread_tools.io.h5io import atomic_output
    fig, (ax, axd, axr) = plt.subplots(3, 1, figsize=(7.5, 8.0), sharex=True,
                                       gridspec_kw={"height_ratios": [2.2, 1.6, 1.3]})
    e = check.energy_ev
    if check.fp_ref is not None:
        ax.plot(e, check.fp_ref, color="0.6", lw=1, ls=":", label="reference f′ (self-consistent)")
        axd.plot(e, check.fdp_ref, color="0.6", lw=1, ls=":", label="reference f″")
    ax.plot(e, check.fp, color="C0", lw=1.5, label=f"f′ ({kind})")
    ax.plot(e, check.fp_kk, color="k", lw=1.2, ls="--", label="KK(f″)")
    ax.set_ylabel("f′ (e⁻)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    axd.plot(e, check.fdp, color="C3", lw=1.5, label=f"f″ ({kind})")
    axd.set_ylabel("f″ (e⁻)")
    axd.legend(fontsize=8)
    axr.axhline(0, color="0.7", lw=0.8)
    axr.axhline(check.offset, color="C2", lw=0.8, ls=":", label=f"best offset {check.offset:+.3f} e⁻")
    axr.plot(e, check.residual, color="C2", lw=1.2, label="f′ − KK(f″)")
    axr.plot([check.energy_at_max_ev], [check.residual[np.argmax(np.abs(check.residual))]],
             "o", color="C2", ms=4)
    axr.set_ylabel("residual (e⁻)")
    axr.set_xlabel("energy (eV)")
    axr.legend(fontsize=7)
    axr.set_title(f"rms {check.rms:.3g} e⁻, about the offset {check.rms_about_mean:.3g} e⁻, "
                  f"max {check.max_abs:.3g} e⁻ at {check.energy_at_max_ev:g} eV", fontsize=8)
    fig.tight_layout()
    try:
        for path in paths:
            with atomic_output(path, overwrite, suffix=Path(path).suffix) as tmp:
                fig.savefig(tmp, dpi=150, format=Path(path).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)


@app.command(**command_settings(SCHEMA))
def run(words: Words = None, output: Prefix = None, config: ConfigFile = None,
        show_config: ShowConfig = False, overwrite: Overwrite = False, max_rms: MaxRms = None,
        quiet: Quiet = False):
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
        ref = "none" if reference == "none" else f"{reference} {cfg.element} (self-consistent)"
        floor = None
        if check.mode == "restraint" and reference != "none" and check.energy_ev.size >= 3:
            from spread_tools.physics.kk_reference import (
                WindowKK,
                discretisation_floor,
                reference_curve,
            )
            floor = discretisation_floor(WindowKK(check.energy_ev,
                                                  reference_curve(cfg.element, reference), cfg.pad))
        info = [f"{SCRIPT}: {table.source}: {len(table)} rows {table.energy_ev[0]:g}-"
                f"{table.energy_ev[-1]:g} eV; window {cfg.window.min_ev:g}-{cfg.window.max_ev:g} eV "
                f"({check.energy_ev.size} energies); mode {check.mode}"
                + (f" (pad {cfg.pad:g} eV)" if check.mode == "restraint" else "")
                + f"; reference {ref}",
                f"{SCRIPT}: rms |f' - KK(f'')| = {check.rms:.4f} e-, max = {check.max_abs:.4f} e- "
                f"at {check.energy_at_max_ev:g} eV; best constant offset {check.offset:+.4f} e-, "
                f"rms about it {check.rms_about_mean:.4f} e-"]
        if floor is not None:
            info.append(f"{SCRIPT}: discretisation floor of this grid: {floor['rms']:.4f} e- rms "
                        f"(a KK-consistent edge between {floor['step_ev']:g} eV nodes)")
        if not quiet:
            for line in info:
                typer.echo(line)
        if outs:
            atomic_write_text(outs["csv"], residual_csv(check, [i.split(": ", 1)[1] for i in info]),
                              overwrite=overwrite)
            figs = [outs[k] for k in ("png", "pdf") if k in outs]
            if figs:
                is_result = table.source.endswith("]")
                name = Path(table.source.split(" [")[0]).name
                site = table.source.rsplit("[", 1)[1].rstrip("]") if is_result else None
                title = (f"{name}, site {site}" if site else name) + \
                    f": Kramers–Kronig check ({check.mode} mode, reference {ref})"
                plot_check(check, title, figs, overwrite=overwrite,
                           kind="result" if is_result else "table")
            if not quiet:
                typer.echo(f"{SCRIPT}: wrote {', '.join(str(p) for p in outs.values())}")
        figure = check.metric(cfg.metric)
        if threshold is not None and figure > threshold:
            typer.echo(f"{SCRIPT}: {cfg.metric} {figure:.4f} e- exceeds max_rms {threshold:g} e-",
                       err=True)
            raise typer.Exit(1)


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
