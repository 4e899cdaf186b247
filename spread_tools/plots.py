"""Figures: refined f′/f″ curves with uncertainty bands, truth and reference tables,
residuals against the truth, and a shoebox gallery (data, model, residual).

All functions draw with matplotlib's object API (no global state) and write
through :func:`spread_tools.io.h5io.atomic_output`, so a failed plot never leaves
a half-written file. The format follows the file suffix (``.png``, ``.pdf``,
``.svg``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spread_tools.errors import InputError

__all__ = ["read_truth", "Curve", "curves_from_result", "curves_from_table", "plot_curves",
           "plot_gallery", "save_figure", "plot_convergence"]

_FORMATS = (".png", ".pdf", ".svg")


class Curve:
    """One labelled curve of one site: energy, f′, f″ and optional standard uncertainties."""

    def __init__(self, label, site, energy_ev, fp, fdp, fp_sigma=None, fdp_sigma=None, kind="result"):
        self.label = label
        self.site = site
        self.energy_ev = np.asarray(energy_ev, dtype=np.float64)
        self.fp = np.asarray(fp, dtype=np.float64)
        self.fdp = np.asarray(fdp, dtype=np.float64)
        self.fp_sigma = None if fp_sigma is None else np.asarray(fp_sigma, dtype=np.float64)
        self.fdp_sigma = None if fdp_sigma is None else np.asarray(fdp_sigma, dtype=np.float64)
        self.kind = kind


def read_truth(path):
    """Ground-truth curves stored by ``simulate_data`` in a dataset file.

    Parameters
    ----------
    path : str or Path
        Dataset ``.h5`` with a ``truth/`` group.

    Returns
    -------
    dict
        Site name -> :class:`Curve` (kind ``"truth"``).
    """
    from spread_tools.io.h5io import open_checked, read_array
    with open_checked(path, "spread_tools.dataset") as h5:
        if "truth" not in h5:
            raise InputError(f"{path}: has no truth/ group (only simulated datasets do)")
        e = read_array(h5, "truth/energy_ev", np.float64)
        names = [str(s) for s in np.atleast_1d(read_array(h5, "truth/site_names"))]
        fp = read_array(h5, "truth/fp", np.float64, shape=(len(names), len(e)))
        fdp = read_array(h5, "truth/fdp", np.float64, shape=(len(names), len(e)))
    return {n: Curve("truth", n, e, fp[i], fdp[i], kind="truth") for i, n in enumerate(names)}


def curves_from_result(path, label=None):
    """Curves of every site of a ``refine_fdp`` result.

    Returns
    -------
    dict
        Site name -> :class:`Curve`.
    """
    from spread_tools.refine.s1 import read_result
    res = read_result(path)
    label = label or Path(path).name
    return {n: Curve(label, n, res["energy_ev"], res["fp"][i], res["fdp"][i], res["fp_sigma"][i],
                     res["fdp_sigma"][i]) for i, n in enumerate(res["site_names"])}


def curves_from_table(path, sites, label=None):
    """Reference curves from any table :func:`spread_tools.physics.scattering.read_table` reads.

    A one-curve table (three-column, Henke) is drawn for every site; result files
    and refinement CSVs give each site its own curve.

    Returns
    -------
    dict
        Site name -> :class:`Curve` (kind ``"table"``).
    """
    from spread_tools.physics.scattering import detect_format, read_table
    label = label or Path(path).name
    fmt = detect_format(path)
    out = {}
    for s in sites:
        try:
            t = read_table(path, site=s if fmt in ("result", "csv") else None)
        except InputError:
            if fmt in ("result", "csv"):
                continue
            raise
        out[s] = Curve(label, s, t.energy_ev, t.fp, t.fdp, t.fp_sigma, t.fdp_sigma, kind="table")
    return out


def save_figure(fig, output, overwrite=False, dpi=150):
    """Write a figure atomically; the format follows the suffix of ``output``."""
    from spread_tools.io.h5io import atomic_output
    output = Path(output)
    if output.suffix.lower() not in _FORMATS:
        raise InputError(f"{output}: unknown figure format (use {', '.join(_FORMATS)})")
    with atomic_output(output, overwrite=overwrite, suffix=output.suffix) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=output.suffix[1:].lower())


def _legend_label(curve):
    """What a curve is, for the legend: a refinement result, a reference table or the truth."""
    if curve.kind == "truth":
        return "truth (simulation)"
    if curve.kind == "table":
        return f"table: {curve.label}"
    return f"result: {curve.label}"


def plot_curves(results, truth=None, tables=(), sites=None, energy_range_ev=None, residual=True,
                title=None):
    """Figure of f′ and f″ per site: results with ±1σ bands, truth, reference tables.

    One row of panels per site (titled with the site name; f′ left, f″ right), with a
    residual panel (result − truth) under each when a truth is given, and one legend
    for the whole figure that names what every curve is (``result: <label> ± 1σ``,
    ``table: <file>``, ``truth (simulation)``).

    Parameters
    ----------
    results : list of dict
        Each site name -> :class:`Curve` (e.g. :func:`curves_from_result`), one per result.
    truth : dict, optional
        Site name -> :class:`Curve` (:func:`read_truth`); adds residual panels
        (result − truth, with the ±1σ band) when ``residual``.
    tables : list of dict
        Reference curves (:func:`curves_from_table`).
    sites : list of str, optional
        Sites to draw (default: those of the first result, or of the truth).
    energy_range_ev : (float, float), optional
        x range (default: the results' grid).
    residual : bool
        Draw residual panels when a truth is given.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    results = list(results)
    if sites is None:
        sites = list(results[0]) if results else list(truth or {})
    if not sites:
        raise InputError("plot_curves: nothing to plot (no result and no truth)")
    for s in sites:
        if results and not any(s in r for r in results) and not (truth and s in truth):
            known = sorted({k for r in results for k in r})
            raise InputError(f"parameter sites: {s} is in no result (sites: {', '.join(known)})")
    with_res = bool(truth) and residual and bool(results)
    if energy_range_ev is None:
        es = [c.energy_ev for r in results for c in r.values()] or [c.energy_ev for c in (truth or {}).values()]
        energy_range_ev = (min(e[0] for e in es), max(e[-1] for e in es))
    lo, hi = energy_range_ev
    if not lo < hi:
        raise InputError(f"plot_curves: energy range {lo:g}-{hi:g} eV is empty or reversed")
    n = len(sites)
    rows = 2 * n if with_res else n
    ratios = [3, 1] * n if with_res else [1] * n
    fig = Figure(figsize=(11, (3.4 + (1.1 if with_res else 0)) * n + 0.6), layout="constrained")
    gs = fig.add_gridspec(rows, 2, height_ratios=ratios)
    colors = ["C0", "C3", "C2", "C4", "C1", "C5", "C6"]
    legend = {}                                   # label -> handle, in drawing order

    def remember(label, handle):
        legend.setdefault(label, handle)

    for i, s in enumerate(sites):
        r0 = 2 * i if with_res else i
        for j, key in enumerate(("fp", "fdp")):
            ax = fig.add_subplot(gs[r0, j])
            name = "f′" if key == "fp" else "f″"
            ax.set_title(f"{s} — {name}", fontsize=10, loc="left")
            for t_i, tab in enumerate(tables):
                if s in tab:
                    c = tab[s]
                    m = (c.energy_ev >= lo - 5) & (c.energy_ev <= hi + 5)
                    (line,) = ax.plot(c.energy_ev[m], getattr(c, key)[m], color="0.5", lw=1,
                                      ls=["--", ":", "-."][t_i % 3], label=_legend_label(c))
                    remember(line.get_label(), line)
            if truth and s in truth:
                c = truth[s]
                m = (c.energy_ev >= lo - 5) & (c.energy_ev <= hi + 5)
                (line,) = ax.plot(c.energy_ev[m], getattr(c, key)[m], color="k", lw=1.2,
                                  label=_legend_label(c))
                remember(line.get_label(), line)
            for r_i, res in enumerate(results):
                if s not in res:
                    continue
                c = res[s]
                col = colors[r_i % len(colors)]
                y = getattr(c, key)
                sig = getattr(c, key + "_sigma")
                (line,) = ax.plot(c.energy_ev, y, "o-", color=col, ms=3, lw=1.3,
                                  label=_legend_label(c))
                if sig is not None and np.any(np.isfinite(sig)):
                    ax.fill_between(c.energy_ev, y - sig, y + sig, color=col, alpha=0.25, lw=0)
                    band = Patch(facecolor=col, alpha=0.25, lw=0)
                    remember(f"{_legend_label(c)} (band: ±1σ)", (band, line))
                else:
                    remember(_legend_label(c), line)
            ax.set_xlim(lo, hi)
            ax.set_ylabel(f"{name} (e⁻)")
            ax.grid(alpha=0.3)
            if not with_res:
                ax.set_xlabel("energy (eV)")
            if with_res:
                axr = fig.add_subplot(gs[r0 + 1, j], sharex=ax)
                axr.axhline(0, color="k", lw=0.8)
                t = truth.get(s)
                for r_i, res in enumerate(results):
                    if s not in res or t is None:
                        continue
                    c = res[s]
                    col = colors[r_i % len(colors)]
                    ref = np.interp(c.energy_ev, t.energy_ev, getattr(t, key))
                    d = getattr(c, key) - ref
                    axr.plot(c.energy_ev, d, "o-", color=col, ms=2.5, lw=1)
                    sig = getattr(c, key + "_sigma")
                    if sig is not None and np.any(np.isfinite(sig)):
                        axr.fill_between(c.energy_ev, d - sig, d + sig, color=col, alpha=0.25, lw=0)
                axr.set_ylabel(f"{name} − truth (e⁻)", fontsize=8)
                axr.set_xlabel("energy (eV)")
                axr.grid(alpha=0.3)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside upper center",
                   ncols=min(len(legend), 3), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def plot_gallery(result_path, datasets, cache, n_shoeboxes=6, backend="cpu"):
    """Gallery of the strongest shoeboxes: data, model λ at the refined values, residual.

    Parameters
    ----------
    result_path : str or Path
        ``refine_fdp`` result of exactly these datasets (same order).
    datasets : list of Dataset
    cache : SFCache
    n_shoeboxes : int
    backend : str
        Pixel-model backend.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    from spread_tools.io.dataset import concatenate
    from spread_tools.model.pixel import PixelModel
    from spread_tools.physics.scattering import reference_fp_fdp
    from spread_tools.refine.grid import interpolation_matrix
    from spread_tools.refine.s1 import read_result
    from spread_tools.structure.factors import structure_factors
    res = read_result(result_path)
    ds = concatenate(list(datasets))
    bgr = res.get("shoebox_background")
    Gr = res.get("lattice_G")
    if bgr is None or Gr is None or len(bgr) != ds.n_shoeboxes or len(Gr) != ds.n_lattices:
        raise InputError(f"{result_path}: was not refined from these datasets "
                         f"({ds.n_lattices} lattices, {ds.n_shoeboxes} shoeboxes)")
    tot = np.add.reduceat(np.where(ds.mask, ds.counts, 0.0), ds.pixel_offset[:-1])
    tot[~np.all(np.isfinite(bgr), axis=1)] = -1
    pick = np.sort(np.argsort(-tot, kind="stable")[:int(n_shoeboxes)])
    keep = np.zeros(ds.n_shoeboxes, bool)
    keep[pick] = True
    sub = ds.select_shoeboxes(keep)
    pm = PixelModel.from_dataset(sub, backend=backend)
    e = sub.energy_ev
    names = list(cache.site_names)
    fpc = np.zeros((len(names), len(e)))
    fdpc = np.zeros_like(fpc)
    M = interpolation_matrix(e, res["energy_ev"])
    ref = (res.get("config") or {}).get("reference", "chantler")
    for i, (nm, el) in enumerate(zip(names, cache.site_elements)):
        if nm in res["site_names"]:
            k = res["site_names"].index(nm)
            fpc[i], fdpc[i] = M @ res["fp"][k], M @ res["fdp"][k]
        else:
            fpc[i], fdpc[i] = reference_fp_fdp(el, e, ref)
    F = structure_factors(cache, e, fpc, fdpc, cache.index_of(pm.hkl), reference=ref)
    I = np.ascontiguousarray((np.abs(F) ** 2).T)
    lam = pm.expected_counts(I, np.where(np.isfinite(Gr), Gr, 1.0), bgr[keep])
    fig = Figure(figsize=(7.5, 2.3 * len(pick)), layout="constrained")
    for r in range(len(pick)):
        a, b = sub.pixel_offset[r], sub.pixel_offset[r + 1]
        x0, x1, y0, y1 = sub.sb_bbox[r]
        shape = (y1 - y0, x1 - x0)
        data = np.where(sub.mask[a:b], sub.counts[a:b], np.nan).reshape(shape)
        model = lam[a:b].reshape(shape)
        resid = (data - model) / np.sqrt(model)
        vmax = max(np.nanmax(data), np.nanmax(model))
        for c, (img, name, kw) in enumerate(((data, "data", dict(vmin=0, vmax=vmax, cmap="viridis")),
                                            (model, "model λ", dict(vmin=0, vmax=vmax, cmap="viridis")),
                                            (resid, "(data−λ)/√λ", dict(vmin=-4, vmax=4, cmap="RdBu_r")))):
            ax = fig.add_subplot(len(pick), 3, 3 * r + c + 1)
            im = ax.imshow(img, origin="upper", interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"sb {int(pick[r])} {tuple(int(v) for v in sub.sb_miller_index[r])}", fontsize=7)
            if r == 0:
                ax.set_title(name, fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_convergence(results, labels=None, gtol=None):
    """Convergence trace of ``refine_fdp`` results: objective and largest gradient per iteration.

    Top: objective minus the result's final objective (log scale); bottom: the largest
    |gradient| in standard-uncertainty units (log scale) with ``optimizer.gtol`` as a
    dashed line. Dotted vertical lines mark the start of every macrocycle after the first
    (each begins with the exact fit of the scales and backgrounds).

    Parameters
    ----------
    results : list of dict
        :func:`spread_tools.refine.s1.read_result` outputs (``history`` with ``objective``,
        ``gradient_norm`` and, when written by this version, ``macrocycle``).
    labels : list of str, optional
        Legend labels (default: the file stems).
    gtol : float, optional
        Convergence threshold drawn (default: the first result's ``optimizer.gtol``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.0, 5.5))
    ax_f, ax_g = fig.subplots(2, 1, sharex=True)
    labels = list(labels or [])
    for i, res in enumerate(results):
        h = res.get("history", {})
        f = np.asarray(h.get("objective", []), dtype=np.float64)
        gn = np.asarray(h.get("gradient_norm", []), dtype=np.float64)
        if f.size == 0:
            raise InputError(f"{res.get('path', 'result')}: holds no convergence history")
        label = labels[i] if i < len(labels) else Path(res.get("path", f"result {i}")).stem
        it = np.arange(1, f.size + 1)
        f_end = float(res.get("objective", f[-1]))
        drop = np.maximum(f - min(f_end, f.min()), 0.0) + 1e-6 * max(1.0, abs(f_end))
        (line,) = ax_f.plot(it, drop, marker=".", label=label)
        ax_g.plot(it, gn, marker=".", color=line.get_color(), label=label)
        mc = np.asarray(h.get("macrocycle", []), dtype=np.float64)
        if mc.size == f.size:
            for k in np.flatnonzero(np.diff(mc) > 0):
                for ax in (ax_f, ax_g):
                    ax.axvline(k + 1.5, color=line.get_color(), lw=0.6, ls=":")
    if gtol is None and results:
        gtol = results[0].get("config", {}).get("optimizer", {}).get("gtol")
    if gtol:
        ax_g.axhline(float(gtol), color="k", lw=0.8, ls="--", label=f"gtol {float(gtol):g}")
    ax_f.set_yscale("log")
    ax_g.set_yscale("log")
    ax_f.set_ylabel("objective − final (NLL units)")
    ax_g.set_ylabel("largest |gradient| (σ units)")
    ax_g.set_xlabel("L-BFGS iteration (dotted: new macrocycle)")
    ax_f.legend(fontsize=8)
    ax_g.legend(fontsize=8)
    fig.suptitle("refine_fdp convergence")
    return fig
