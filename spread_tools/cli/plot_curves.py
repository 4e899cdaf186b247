"""``plot_curves``: refined f′/f″ curves (one or several results) → PNG/PDF.

Examples::

    plot_curves result.h5 --truth dataset.h5 -o curves.png
    plot_curves sauter.h5 kk.h5 --label Sauter --label KK --table Fe.dat -o compare.pdf
    plot_curves result.h5 -o curves.png --gallery dataset.h5 --sf-cache sf_cache.h5
    plot_curves result.h5 -o curves.png --convergence

Each result is drawn with its ±1σ band; ``--truth`` (a simulated dataset) adds
the ground truth and residual panels (result − truth); ``--table`` adds
reference curves (any format ``kk_check`` reads). ``--gallery`` writes a second
figure ``<output stem>_gallery<suffix>`` with the strongest shoeboxes: data,
model at the refined values, and normalised residual. ``--convergence`` writes
``<output stem>_convergence<suffix>``: the objective and the largest gradient
(σ units) of every L-BFGS iteration, macrocycles marked.
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
    user_errors,
)
from spread_tools.config import P
from spread_tools.errors import InputError

SCRIPT = "plot_curves"

SCHEMA = {
    "sites": P([], "sites to draw (empty: all)", type=list, item_type=str),
    "energy": {
        "min_ev": P(None, "left end of the energy axis", units="eV", type=float),
        "max_ev": P(None, "right end of the energy axis", units="eV", type=float),
    },
    "residual": P(True, "residual panels (result - truth) when --truth is given"),
    "also": P([], "further formats written next to the output, e.g. pdf", type=list, item_type=str),
    "dpi": P(150, "resolution of raster formats"),
    "title": P(None, "figure title", type=str),
    "gallery": {
        "n_shoeboxes": P(6, "shoeboxes in the gallery (--gallery)"),
    },
}

Truth = Annotated[Optional[Path], typer.Option(
    "--truth", help="Simulated dataset (.h5) whose truth/ curves are drawn, with residuals.")]
Table = Annotated[Optional[list[Path]], typer.Option(
    "--table", help="Reference table (E f' f'', .nff, .csv or result); repeatable.")]
Label = Annotated[Optional[list[str]], typer.Option(
    "--label", help="Legend label of each result, in order; repeatable.")]
Gallery = Annotated[Optional[list[Path]], typer.Option(
    "--gallery", help="Dataset(s) the (first) result was refined from: also draw a shoebox "
                      "gallery (needs --sf-cache).")]
SfCache = Annotated[Optional[Path], typer.Option("--sf-cache", help="SF cache (for --gallery).")]
Convergence = Annotated[bool, typer.Option(
    "--convergence", help="Also draw the convergence trace of the result(s): objective and "
                          "largest gradient (sigma units) per iteration, macrocycles marked, "
                          "into <output stem>_convergence<suffix>.")]

Output = output_option("Figure to write; the format follows the suffix (.png, .pdf, .svg). "
                       "also=pdf adds formats next to it; --gallery writes a second figure "
                       "<stem>_gallery<suffix>.")
USAGE = ("RESULT.h5 [RESULT.h5 ...] -o FIGURE.png [--truth DATASET.h5] [--table TABLE ...] "
         "[key=value ...] [OPTIONS]")
EXAMPLE = "plot_curves sauter.h5 kk.h5 --label Sauter --label KK --truth dataset.h5 -o curves.png"

app = make_app(SCRIPT, "Plot refined f'(E), f''(E) (e-) per site against energy (eV) with "
                       "+-1 sigma bands; several results overlaid; optional truth (with residual "
                       "panels) and reference tables; optional shoebox gallery. Output format "
                       "from the suffix of -o (.png, .pdf, .svg).")


@app.command(**command_settings(SCHEMA, usage=USAGE, example=EXAMPLE))
def run(words: Words = None, output: Output = None, truth: Truth = None, table: Table = None,
        label: Label = None, gallery: Gallery = None, sf_cache: SfCache = None,
        convergence: Convergence = False, config: ConfigFile = None, show_config: ShowConfig = False,
        overwrite: Overwrite = False, quiet: Quiet = False):
    """Plot f'(E), f''(E) (e-) per site against energy (eV) with +-1 sigma bands.

    Several results overlaid (--label each), optional truth from a simulated dataset
    (--truth, adds residual panels) and reference tables (--table), optional shoebox
    gallery (--gallery DATASET --sf-cache CACHE). Format from the suffix of -o
    (.png, .pdf, .svg); also=pdf writes a second format.
    """
    with user_errors(SCRIPT):
        from spread_tools.plots import (
            curves_from_result,
            curves_from_table,
            plot_curves,
            plot_gallery,
            read_truth,
            save_figure,
        )
        files, cfg = parse_words(SCHEMA, words, config, show_config)
        if files:
            require_files(files, ["result (.h5) ..."], SCRIPT)
        if not files and truth is None:
            raise InputError("command line: give at least one result file (or --truth)")
        if output is None:
            raise InputError("command line: give the figure file with -o FILE.png (or .pdf)")
        output = Path(output)
        lo, hi = cfg.energy.min_ev, cfg.energy.max_ev
        if lo is not None and hi is not None and not lo < hi:
            raise InputError(f"parameters energy.min_ev={lo:g}, energy.max_ev={hi:g}: the left end "
                             f"of the energy axis must be below the right end (eV)")
        labels = list(label or [])
        if len(labels) > len(files):
            raise InputError(f"command line: {len(labels)} --label for {len(files)} result(s)")
        outputs = [output] + [output.with_suffix("." + f.lower().lstrip(".")) for f in cfg.also]
        gal_out = output.with_name(output.stem + "_gallery" + output.suffix) if gallery else None
        conv_out = output.with_name(output.stem + "_convergence" + output.suffix) if convergence else None
        if convergence and not files:
            raise InputError("command line: --convergence needs at least one result file")
        for o in outputs + [p for p in (gal_out, conv_out) if p]:
            if o.suffix.lower() not in (".png", ".pdf", ".svg"):
                raise InputError(f"{o}: unknown figure format (use .png, .pdf or .svg)")
        if gallery and (sf_cache is None or not files):
            raise InputError("command line: --gallery needs a result (the first one is used) "
                             "and --sf-cache")
        inputs = list(files) + [truth, sf_cache] + list(table or []) + list(gallery or [])
        for f in inputs:
            if f is not None:
                require_files([f], ["input"], SCRIPT)
        claim_outputs(outputs + ([gal_out] if gal_out else []), inputs=inputs, overwrite=overwrite)
        results = [curves_from_result(f, labels[i] if i < len(labels) else None)
                   for i, f in enumerate(files)]
        tr = read_truth(truth) if truth is not None else None
        sites = list(cfg.sites) or None
        all_sites = sites or (list(results[0]) if results else list(tr))
        tabs = [curves_from_table(t, all_sites) for t in (table or [])]
        rng = None
        if cfg.energy.min_ev is not None and cfg.energy.max_ev is not None and \
                not cfg.energy.min_ev < cfg.energy.max_ev:
            raise InputError(f"parameter energy.max_ev: {cfg.energy.max_ev:g} eV must be above "
                             f"energy.min_ev ({cfg.energy.min_ev:g} eV)")
        if cfg.energy.min_ev is not None or cfg.energy.max_ev is not None:
            es = [c.energy_ev for r in results for c in r.values()] or [c.energy_ev for c in tr.values()]
            rng = (cfg.energy.min_ev if cfg.energy.min_ev is not None else min(e[0] for e in es),
                   cfg.energy.max_ev if cfg.energy.max_ev is not None else max(e[-1] for e in es))
        fig = plot_curves(results, truth=tr, tables=tabs, sites=sites, energy_range_ev=rng,
                          residual=cfg.residual, title=cfg.title)
        for o in outputs:
            save_figure(fig, o, overwrite=overwrite, dpi=cfg.dpi)
            if not quiet:
                typer.echo(f"{SCRIPT}: wrote {o}")
        if convergence:
            from spread_tools.plots import plot_convergence
            from spread_tools.refine.s1 import read_result
            cfig = plot_convergence([read_result(f) for f in files], labels=labels)
            save_figure(cfig, conv_out, overwrite=overwrite, dpi=cfg.dpi)
            if not quiet:
                typer.echo(f"{SCRIPT}: wrote {conv_out}")
        if gallery:
            from spread_tools.io.dataset import Dataset
            from spread_tools.structure.cache import SFCache
            gfig = plot_gallery(files[0], [Dataset.read(p) for p in gallery], SFCache.read(sf_cache),
                                n_shoeboxes=cfg.gallery.n_shoeboxes)
            save_figure(gfig, gal_out, overwrite=overwrite, dpi=cfg.dpi)
            if not quiet:
                typer.echo(f"{SCRIPT}: wrote {gal_out}")


def main():
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
