"""The structure-factor cache file (``format = "spread_tools.sf_cache"``, version 1).

:class:`SFCache` holds the arrays of ``docs/formats.md``, reads, writes and
validates them and finds the rows of Miller indices. It is built from a model
by :func:`spread_tools.structure.build.build_sf_cache` and evaluated by
:func:`spread_tools.structure.factors.structure_factors`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spread_tools import __version__
from spread_tools.errors import InputError
from spread_tools.structure import miller

__all__ = ["SFCache", "FORMAT", "VERSION"]

FORMAT = "spread_tools.sf_cache"
VERSION = 1


@dataclasses.dataclass
class SFCache:
    """Structure-factor cache (see ``docs/formats.md``).

    Attributes
    ----------
    cell : numpy.ndarray
        a, b, c (Å), α, β, γ (°).
    spacegroup : str
        Hermann–Mauguin symbol.
    d_min_a, d_max_a : float
        Resolution range (Å) of ``hkl``.
    hkl : numpy.ndarray
        int32 (n_h, 3) P1 indices, both Friedel mates.
    F_base : numpy.ndarray
        complex128 (n_h,), non-site atoms with f0 only (+ bulk solvent).
    elements : list of str
        Non-site elements (n_el,).
    S_el : numpy.ndarray
        complex128 (n_el, n_h).
    site_names, site_elements : list of str
        (n_site,).
    S_site : numpy.ndarray
        complex128 (n_site, n_h).
    f0_site : numpy.ndarray
        float64 (n_site, n_h).
    energy_ev : numpy.ndarray
        Energy grid asked for (eV), informational.
    model_file : str
        Model the cache was built from.
    config : str
        JSON of the effective parameters.
    spread_tools_version : str
        Version that wrote the cache.
    """

    cell: np.ndarray
    spacegroup: str
    d_min_a: float
    d_max_a: float
    hkl: np.ndarray
    F_base: np.ndarray
    elements: list
    S_el: np.ndarray
    site_names: list
    site_elements: list
    S_site: np.ndarray
    f0_site: np.ndarray
    energy_ev: np.ndarray
    model_file: str = ""
    config: str = "{}"
    spread_tools_version: str = __version__
    source: str = "sf_cache"

    def __post_init__(self):
        self._sorted = None

    @property
    def n_h(self):
        """Number of Miller indices."""
        return len(self.hkl)

    # ------------------------------------------------------------------ IO
    def write(self, path, overwrite=False):
        """Write the cache atomically.

        Parameters
        ----------
        path : str or Path
            Output ``.h5`` file.
        overwrite : bool
            Replace an existing file.
        """
        from spread_tools.io.h5io import atomic_writer, write_strings
        self.validate()
        with atomic_writer(path, FORMAT, VERSION, overwrite=overwrite) as h5:
            h5.attrs["cell"] = np.asarray(self.cell, dtype=np.float64)
            h5.attrs["spacegroup"] = self.spacegroup
            h5.attrs["d_min_a"] = float(self.d_min_a)
            h5.attrs["d_max_a"] = float(self.d_max_a)
            h5.attrs["model_file"] = str(self.model_file)
            h5.attrs["config"] = self.config
            h5.create_dataset("hkl", data=self.hkl.astype(np.int32))
            h5.create_dataset("F_base", data=self.F_base.astype(np.complex128))
            write_strings(h5, "elements", self.elements)
            h5.create_dataset("S_el", data=self.S_el.astype(np.complex128))
            write_strings(h5, "site_names", self.site_names)
            write_strings(h5, "site_elements", self.site_elements)
            h5.create_dataset("S_site", data=self.S_site.astype(np.complex128))
            h5.create_dataset("f0_site", data=self.f0_site.astype(np.float64))
            h5.create_dataset("energy_ev", data=np.asarray(self.energy_ev, dtype=np.float64))

    @classmethod
    def read(cls, path):
        """Read and validate a cache file.

        Parameters
        ----------
        path : str or Path
            File written by :meth:`write` (``cache_sf``).

        Returns
        -------
        SFCache

        Raises
        ------
        InputError
            Missing, not HDF5, truncated, wrong format, or inconsistent content.
        """
        from spread_tools.io.h5io import open_checked, read_array
        with open_checked(path, FORMAT, max_version=VERSION) as h5:
            try:
                attrs = {k: h5.attrs[k] for k in ("cell", "spacegroup", "d_min_a", "d_max_a")}
            except KeyError as exc:
                raise InputError(f"{path}: missing attribute {exc.args[0]}") from None

            def s(v):
                return v.decode() if isinstance(v, bytes) else str(v)
            strs = lambda name: [str(x) for x in np.atleast_1d(read_array(h5, name))]  # noqa: E731
            cache = cls(
                cell=np.asarray(attrs["cell"], dtype=np.float64),
                spacegroup=s(attrs["spacegroup"]),
                d_min_a=float(attrs["d_min_a"]), d_max_a=float(attrs["d_max_a"]),
                hkl=read_array(h5, "hkl", dtype=np.int32),
                F_base=read_array(h5, "F_base", dtype=np.complex128),
                elements=strs("elements"),
                S_el=read_array(h5, "S_el", dtype=np.complex128),
                site_names=strs("site_names"),
                site_elements=strs("site_elements"),
                S_site=read_array(h5, "S_site", dtype=np.complex128),
                f0_site=read_array(h5, "f0_site", dtype=np.float64),
                energy_ev=read_array(h5, "energy_ev", dtype=np.float64),
                model_file=s(h5.attrs.get("model_file", "")),
                config=s(h5.attrs.get("config", "{}")),
                spread_tools_version=s(h5.attrs.get("spread_tools_version", "")),
                source=str(path),
            )
        cache.validate()
        return cache

    def validate(self):
        """Check shapes, types and values.

        Raises
        ------
        InputError
            Naming the cache and the first problem found.
        """
        src = self.source
        n_h = len(self.hkl) if np.ndim(self.hkl) == 2 else -1
        if np.ndim(self.hkl) != 2 or np.shape(self.hkl)[1] != 3:
            raise InputError(f"{src}: 'hkl' must have shape (n_h, 3), has {np.shape(self.hkl)}")
        n_el, n_site = len(self.elements), len(self.site_names)
        expect = {"F_base": (n_h,), "S_el": (n_el, n_h), "S_site": (n_site, n_h),
                  "f0_site": (n_site, n_h)}
        for name, shape in expect.items():
            if np.shape(getattr(self, name)) != shape:
                raise InputError(f"{src}: '{name}' has shape {np.shape(getattr(self, name))}, "
                                 f"expected {shape}")
        if len(self.site_elements) != n_site:
            raise InputError(f"{src}: {len(self.site_elements)} site_elements for {n_site} sites")
        if len(set(self.site_names)) != n_site:
            raise InputError(f"{src}: repeated site names {self.site_names}")
        if np.shape(self.cell) != (6,) or not np.all(np.isfinite(self.cell)):
            raise InputError(f"{src}: 'cell' must hold 6 finite numbers")
        if not (0 < self.d_min_a < self.d_max_a):
            raise InputError(f"{src}: d range {self.d_min_a}-{self.d_max_a} Å is not valid")
        for name in ("F_base", "S_el", "S_site", "f0_site"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise InputError(f"{src}: '{name}' holds NaN or inf")
        keys = miller.pack_hkl(self.hkl)
        if len(np.unique(keys)) != n_h:
            raise InputError(f"{src}: repeated Miller indices in 'hkl'")
        if n_h:
            import gemmi
            try:
                cell = gemmi.UnitCell(*map(float, self.cell))
            except (RuntimeError, ValueError):
                raise InputError(f"{src}: 'cell' {list(self.cell)} is not a unit cell") from None
            d2 = miller.inv_d2(cell, self.hkl)
            if np.any(d2 <= 0) or np.any(d2 > (1 + 1e-6) / self.d_min_a ** 2) \
                    or np.any(d2 < (1 - 1e-6) / self.d_max_a ** 2):
                raise InputError(f"{src}: 'hkl' holds indices outside d {self.d_min_a}-"
                                 f"{self.d_max_a} Å")
        e = np.asarray(self.energy_ev)
        if e.ndim != 1 or (len(e) > 1 and np.any(np.diff(e) <= 0)):
            raise InputError(f"{src}: 'energy_ev' must be increasing")

    # ------------------------------------------------------------------ lookups
    def index_of(self, hkl):
        """Row of each Miller index in the cache.

        Parameters
        ----------
        hkl : array_like
            (n, 3) or (3,) integer indices.

        Returns
        -------
        numpy.ndarray
            int64 (n,) rows, −1 where the index is not in the cache.
        """
        q = np.atleast_2d(np.asarray(hkl, dtype=np.int64))
        if q.ndim != 2 or q.shape[1] != 3:
            raise InputError(f"hkl: expected shape (n, 3), got {np.shape(hkl)}")
        out = np.full(len(q), -1, dtype=np.int64)
        if self.n_h == 0 or len(q) == 0:
            return out
        if self._sorted is None:
            keys = miller.pack_hkl(self.hkl)
            order = np.argsort(keys, kind="stable")
            self._sorted = (keys[order], order)
        keys, order = self._sorted
        inrange = np.all(np.abs(q) < (1 << 20), axis=1)
        qk = miller.pack_hkl(np.where(inrange[:, None], q, 0))
        pos = np.minimum(np.searchsorted(keys, qk), len(keys) - 1)
        hit = inrange & (keys[pos] == qk)
        out[hit] = order[pos[hit]]
        return out

    def inv_d2(self, h_index=None):
        """1/d² (Å⁻²) of the cached indices (all, or rows ``h_index``)."""
        hkl = self.hkl if h_index is None else self.hkl[h_index]
        return miller.inv_d2(self.cell, hkl)


