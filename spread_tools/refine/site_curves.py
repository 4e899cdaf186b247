"""Fixed f′(E), f″(E) of the sites while the crystal models are refined, and the
intensities they give with their slope in energy.

The curves of the SF cache's sites come, per site, from a table (``SITE=TABLE``: any
format :func:`spread_tools.physics.scattering.read_table` reads), else from a previous
``refine_fdp`` result (its site of the same name), else from the smooth free-atom
reference of the site's element. Tables are interpolated linearly; so the intensity
I(h, E) = |F(h, E)|² is a quadratic in E between table rows and its slope by central
differences (:func:`intensities_with_slope`) is exact there.
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError
from spread_tools.physics.scattering import detect_format, read_table, reference_fp_fdp
from spread_tools.structure.factors import structure_factors

__all__ = ["SiteCurves", "intensities_with_slope"]

_SLOPE_STEP_EV = 0.01


class SiteCurves:
    """f′, f″ of every site of an SF cache as functions of energy.

    Parameters
    ----------
    cache : spread_tools.structure.cache.SFCache
    tables : dict, optional
        Site name → :class:`~spread_tools.physics.scattering.SpectrumTable`.
    result : str or Path, optional
        A ``refine_fdp`` result (.h5/.csv): the curves of its sites (sites it lacks fall
        back to the reference).
    reference : str
        Reference source for the other sites (``chantler``).

    Raises
    ------
    InputError
        Unknown site names in ``tables``.
    """

    def __init__(self, cache, tables=None, result=None, reference="chantler"):
        self.site_names = list(cache.site_names)
        self.site_elements = list(cache.site_elements)
        self.reference = reference
        tables = dict(tables or {})
        unknown = [n for n in tables if n not in self.site_names]
        if unknown:
            raise InputError(f"curves.tables: site(s) {', '.join(unknown)} not in the SF cache "
                             f"(sites {', '.join(self.site_names)})")
        if result is not None:
            fmt = detect_format(result)
            if fmt not in ("result", "csv"):
                raise InputError(f"{result}: curves.result must be a refine_fdp result (.h5 or .csv)")
            for name in self.site_names:
                if name not in tables:
                    try:
                        tables[name] = read_table(result, site=name)
                    except InputError:
                        continue
        self.tables = tables

    def describe(self):
        """One phrase per site saying where its curve comes from."""
        return [f"{n}: {self.tables[n].source}" if n in self.tables else f"{n}: {self.reference} {e}"
                for n, e in zip(self.site_names, self.site_elements)]

    def check_covers(self, min_ev, max_ev):
        """Raise InputError when a table does not cover [min_ev, max_ev]."""
        for name, table in self.tables.items():
            lo, hi = table.energy_range_ev
            if min_ev < lo or max_ev > hi:
                raise InputError(f"{table.source}: the curve of {name} covers {lo:g}-{hi:g} eV but the "
                                 f"spectra span {min_ev:.1f}-{max_ev:.1f} eV")

    def at(self, energy_ev):
        """f′ and f″ of every site at the energies.

        Parameters
        ----------
        energy_ev : array_like (n_E,)

        Returns
        -------
        fp, fdp : ndarray (n_site, n_E)
        """
        e = np.asarray(energy_ev, dtype=np.float64)
        fp = np.empty((len(self.site_names), len(e)))
        fdp = np.empty_like(fp)
        for i, (name, element) in enumerate(zip(self.site_names, self.site_elements)):
            if name in self.tables:
                fp[i], fdp[i] = self.tables[name].interpolate(e)
            else:
                fp[i], fdp[i] = reference_fp_fdp(element, e, source=self.reference)
        return fp, fdp


def intensities_with_slope(cache, curves, h_index, energy_ev):
    """I(h, E) and ∂I/∂E (per eV) for the given cache rows at the given energies.

    Parameters
    ----------
    cache : spread_tools.structure.cache.SFCache
    curves : SiteCurves
    h_index : int array (n_h,)
        Rows of the cache.
    energy_ev : array_like (n_E,)

    Returns
    -------
    I, dI_dE : ndarray (n_h, n_E)
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    h = _SLOPE_STEP_EV
    out = []
    for shift in (0.0, h, -h):
        fp, fdp = curves.at(e + shift)
        F = structure_factors(cache, e + shift, fp, fdp, h_index)
        out.append((F.real ** 2 + F.imag ** 2).T)
    return np.ascontiguousarray(out[0]), np.ascontiguousarray((out[1] - out[2]) / (2 * h))

