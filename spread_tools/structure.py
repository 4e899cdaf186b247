"""Model → structure-factor cache: per-hkl base F and per-site geometric sums.

The cache (``format = "spread_tools.sf_cache"``, see ``docs/formats.md``)
lets any later step evaluate, at any energy E and for any site values
(f′_s, f″_s),

    F(h,E) = F_base(h) + Σ_e (f′_e(E) + i f″_e(E)) S_el(e,h)
             + Σ_s (f0_s(h) + f′_s + i f″_s) S_site(s,h)

exactly, where the non-site elements take their reference f′/f″ from
:func:`spread_tools.scattering.reference_fp_fdp`.

Conventions
-----------
* F(h) = Σ_atoms occ · f · DW(h) · exp(+2πi h·x), x fractional, summed over
  every atom of the first model and every operation (rotation R, translation
  t, centring included) of the space group: copy x' = R x + t. Friedel mates
  are both stored (f″ breaks Friedel's law); systematic absences of the
  space group are left out.
* Debye–Waller: isotropic ``exp(−B s²/4)`` with s = 1/d, or, when the atom
  has ANISOU, ``exp(−2π² sᵀ U s)`` with U in Å² in the orthogonal (PDB) frame
  and s = Mᵀh the Cartesian reciprocal vector (M = fractionalisation
  matrix). The symmetry copy uses ``R U Rᵀ`` in the crystal frame, i.e. the
  quadratic form ``hᵀ (R Q Rᵀ) h`` with Q = 2π² M U Mᵀ.
* f0: International Tables Vol. C (IT92) 4-Gaussian + c form factors from
  gemmi (neutral atoms; charges are ignored), the same ones on both routes.
* Routes for F_base and S_el (``route=``): ``"direct"`` sums every atom copy
  for every h (numba, parallel over h); ``"fft"`` uses gemmi's
  ``DensityCalculatorX`` (atoms blurred by an extra B, Refmac-compatible,
  spread on a grid of spacing d_min/(2·rate), FFT, then the blur is undone by
  ``exp(+blur·s²/4)``); S_el on that route comes from the constant term alone
  (``add_c_contribution_to_grid`` with c = 1). ``"auto"`` picks the FFT when
  n_h × n_atom_copies exceeds ``AUTO_FFT_PAIRS``. Site atoms are always
  summed directly.
* Flat bulk solvent (optional, ``k_sol`` e⁻/Å³ and ``b_sol`` Å²): gemmi's
  ``SolventMasker`` (Refmac radii, probe and shrink) gives a 0/1 solvent mask
  of the whole model including the sites; its Fourier transform F_mask (Å³)
  enters F_base as ``k_sol · exp(−b_sol s²/4) · F_mask(h)``. No solvent
  anomalous term.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numba
import numpy as np

from . import __version__
from .errors import InputError

__all__ = ["SFCache", "SiteSpec", "parse_sites", "read_model", "miller_indices",
           "build_sf_cache", "structure_factors", "intensity_and_gradients",
           "FORMAT", "VERSION", "AUTO_FFT_PAIRS"]

FORMAT = "spread_tools.sf_cache"
VERSION = 1
#: ``route="auto"`` switches to the FFT when n_h × n_atom_copies exceeds this.
AUTO_FFT_PAIRS = 4e9
_TWO_PI = 2.0 * math.pi


# --------------------------------------------------------------------------- sites

@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """One metal site: a name and a gemmi selection of the atoms sharing one curve."""

    name: str
    selection: str


_SHORT = re.compile(r"^([A-Za-z0-9]{1,5})/([A-Za-z0-9'*]{1,4})$")


def parse_sites(specs):
    """Parse site definitions ``NAME=SELECTION``.

    Parameters
    ----------
    specs : sequence of str
        Each ``NAME=SELECTION`` where SELECTION is a gemmi selection string
        (MMDB CID syntax, e.g. ``//*/(FES)/FE1`` or ``(FES)/FE1``; residue
        names go in parentheses) or the short form ``RES/ATOM`` (``FES/FE1`` =
        atom FE1 of every residue FES in every chain).

    Returns
    -------
    list of SiteSpec
        With SELECTION expanded to a gemmi selection string.

    Raises
    ------
    InputError
        Missing ``=``, empty or repeated names, invalid selection syntax.
    """
    import gemmi
    out = []
    for spec in specs or []:
        spec = str(spec).strip()
        if not spec:
            continue
        name, eq, sel = spec.partition("=")
        name, sel = name.strip(), sel.strip()
        if not eq or not name or not sel:
            raise InputError(f"sites: {spec!r} is not NAME=SELECTION (e.g. FE1=FES/FE1)")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise InputError(f"sites: site name {name!r} may hold only letters, digits, _ . + -")
        if any(s.name == name for s in out):
            raise InputError(f"sites: site name {name} given twice")
        m = _SHORT.match(sel)
        if m:
            sel = f"//*/({m.group(1)})/{m.group(2)}"
        try:
            gemmi.Selection(sel)
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"sites: {name}: invalid selection {sel!r} ({exc})") from None
        out.append(SiteSpec(name, sel))
    return out


# --------------------------------------------------------------------------- model

def read_model(path):
    """Read a PDB or mmCIF model with gemmi.

    Parameters
    ----------
    path : str or Path
        Model file (``.pdb``, ``.cif``, ``.mmcif``, optionally gzipped).

    Returns
    -------
    gemmi.Structure
        Hydrogens and waters kept; only the first model is used later.

    Raises
    ------
    InputError
        Missing/unreadable file, no atoms, no unit cell or unknown space group.
    """
    import gemmi
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a file")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read the model ({str(exc).splitlines()[0]})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: no atoms in the model")
    if not st.cell.is_crystal() or st.cell.volume <= 0:
        raise InputError(f"{path}: no unit cell (CRYST1 / _cell) in the model")
    if st.find_spacegroup() is None:
        raise InputError(f"{path}: unknown space group {st.spacegroup_hm!r}")
    return st


@dataclasses.dataclass
class _Atoms:
    frac: np.ndarray      # (n, 3)
    occ: np.ndarray       # (n,)
    q6: np.ndarray        # (n, 3, 3) DW quadratic form Q in h: DW = exp(-hᵀQh)
    element: list         # symbols
    site: np.ndarray      # (n,) site index, -1 = not a site
    refs: list            # (chain, residue index, atom index) for the FFT route


def _cell_matrices(cell):
    frac = np.array(cell.frac.mat.tolist(), dtype=np.float64)
    return frac


def _collect_atoms(st, sites, source):
    """Atoms of the first model with their site assignment."""
    import gemmi
    from .scattering import element_symbol
    model = st[0]
    M = _cell_matrices(st.cell)
    # number every atom through its serial (on a clone) to map selections back to indices
    tagged = st.clone()
    index_of_serial = {}
    n = 0
    for ch_i, ch in enumerate(tagged[0]):
        for r_i, res in enumerate(ch):
            for a_i, atom in enumerate(res):
                atom.serial = n
                index_of_serial[n] = (ch_i, r_i, a_i)
                n += 1
    site_of = {}
    for s_i, site in enumerate(sites):
        sel = gemmi.Selection(site.selection)
        found = 0
        elements = set()
        for ch in sel.chains(tagged[0]):
            for res in sel.residues(ch):
                for atom in sel.atoms(res):
                    key = index_of_serial[atom.serial]
                    if key in site_of:
                        raise InputError(f"{source}: atom {_atom_label(ch, res, atom)} is in sites "
                                         f"{sites[site_of[key]].name} and {site.name}")
                    site_of[key] = s_i
                    found += 1
                    elements.add(atom.element.name)
        if found == 0:
            raise InputError(f"{source}: site {site.name} ({site.selection}) matches no atom")
        if len(elements) > 1:
            raise InputError(f"{source}: site {site.name} ({site.selection}) holds atoms of "
                             f"different elements ({', '.join(sorted(elements))})")
    frac, occ, q6, els, site_idx, refs = [], [], [], [], [], []
    for ch_i, ch in enumerate(model):
        for r_i, res in enumerate(ch):
            for a_i, atom in enumerate(res):
                el = atom.element
                if el.atomic_number == 0:
                    raise InputError(f"{source}: atom {_atom_label(ch, res, atom)} has unknown "
                                     f"element {el.name!r}")
                sym = element_symbol(el.name)
                f = np.array(st.cell.fractionalize(atom.pos).tolist())
                if atom.aniso.nonzero():
                    u = atom.aniso
                    U = np.array([[u.u11, u.u12, u.u13], [u.u12, u.u22, u.u23],
                                  [u.u13, u.u23, u.u33]], dtype=np.float64)
                    Q = 2.0 * math.pi ** 2 * M @ U @ M.T
                else:
                    Q = (atom.b_iso / 4.0) * (M @ M.T)
                frac.append(f)
                occ.append(atom.occ)
                q6.append(Q)
                els.append(sym)
                site_idx.append(site_of.get((ch_i, r_i, a_i), -1))
                refs.append((ch_i, r_i, a_i))
    q = np.array(q6)
    return _Atoms(np.array(frac), np.array(occ, dtype=np.float64), q, els,
                  np.array(site_idx, dtype=np.int64), refs)


def _atom_label(ch, res, atom):
    return f"{ch.name}/{res.name}{res.seqid.num}{res.seqid.icode.strip()}/{atom.name}"


def _symops(st):
    """Rotation (3x3, fractional) and translation of every operation incl. centring."""
    ops = st.find_spacegroup().operations()
    out = []
    for op in ops:
        seitz = np.array(op.float_seitz(), dtype=np.float64)
        out.append((seitz[:3, :3], seitz[:3, 3]))
    return out


def _expand(atoms, ops, mask):
    """P1 copies (x' = R x + t, Q' = R Q Rᵀ) of the atoms selected by mask."""
    frac = atoms.frac[mask]
    Q = atoms.q6[mask]
    xs, qs = [], []
    for R, t in ops:
        xs.append(frac @ R.T + t)
        qs.append(np.einsum("ij,njk,lk->nil", R, Q, R))
    x = np.concatenate(xs) if xs else np.zeros((0, 3))
    q = np.concatenate(qs) if qs else np.zeros((0, 3, 3))
    q6 = np.stack([q[:, 0, 0], q[:, 1, 1], q[:, 2, 2], q[:, 0, 1], q[:, 0, 2], q[:, 1, 2]], axis=1)
    return np.ascontiguousarray(x), np.ascontiguousarray(q6), len(ops)


# --------------------------------------------------------------------------- Miller indices

def miller_indices(cell, spacegroup, d_min_a, d_max_a=None):
    """P1 Miller indices with d_min ≤ d ≤ d_max, both Friedel mates, absences removed.

    Parameters
    ----------
    cell : gemmi.UnitCell
        Unit cell.
    spacegroup : gemmi.SpaceGroup
        Space group (its absences are left out).
    d_min_a : float
        High-resolution limit (Å).
    d_max_a : float, optional
        Low-resolution limit (Å); ``None`` keeps every h ≠ 0.

    Returns
    -------
    hkl : numpy.ndarray
        int32 (n_h, 3), sorted by h, k, l.
    """
    M = _cell_matrices(cell)
    hmax = [int(math.floor(p / d_min_a)) + 1 for p in (cell.a, cell.b, cell.c)]
    hs = [np.arange(-m, m + 1) for m in hmax]
    inv_d2_max = 1.0 / d_min_a ** 2
    inv_d2_min = 0.0 if not d_max_a else 1.0 / d_max_a ** 2
    out = []
    kk, ll = np.meshgrid(hs[1], hs[2], indexing="ij")
    kk, ll = kk.ravel(), ll.ravel()
    for h in hs[0]:
        hkl = np.stack([np.full_like(kk, h), kk, ll], axis=1).astype(np.float64)
        s = hkl @ M
        inv_d2 = np.einsum("ij,ij->i", s, s)
        keep = (inv_d2 <= inv_d2_max * (1 + 1e-12)) & (inv_d2 >= inv_d2_min * (1 - 1e-12)) \
            & (inv_d2 > 0)
        out.append(hkl[keep].astype(np.int64))
    hkl = np.concatenate(out)
    hkl = hkl[~systematically_absent(hkl, spacegroup)]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    return np.ascontiguousarray(hkl[order].astype(np.int32))


def systematically_absent(hkl, spacegroup):
    """True where h is a systematic absence of the space group.

    h is absent when some operation (R, t) has Rᵀh = h and h·t not integer.

    Parameters
    ----------
    hkl : numpy.ndarray
        (n, 3) integer indices.
    spacegroup : gemmi.SpaceGroup

    Returns
    -------
    numpy.ndarray of bool
    """
    hkl = np.asarray(hkl, dtype=np.int64)
    absent = np.zeros(len(hkl), dtype=bool)
    for op in spacegroup.operations():
        R = np.array(op.rot, dtype=np.int64)          # × DEN
        t = np.array(op.tran, dtype=np.int64)         # × DEN
        fixed = np.all(hkl @ R == hkl * op.DEN, axis=1)
        shift = (hkl @ t) % op.DEN != 0
        absent |= fixed & shift
    return absent


def _inv_d2(cell, hkl):
    s = np.asarray(hkl, dtype=np.float64) @ _cell_matrices(cell)
    return np.einsum("ij,ij->i", s, s)


def _f0(element, inv_d2):
    import gemmi
    coefs = gemmi.Element(element).it92.get_coefs()
    a, b, c = coefs[0:4], coefs[4:8], coefs[8]
    stol2 = np.asarray(inv_d2) / 4.0
    out = np.full(stol2.shape, c, dtype=np.float64)
    for ai, bi in zip(a, b):
        out += ai * np.exp(-bi * stol2)
    return out


# --------------------------------------------------------------------------- direct route

@numba.njit(parallel=True, cache=True)
def _direct_kernel(hkl, xyz, q6, w, group, out):
    n_h = hkl.shape[0]
    n_c = xyz.shape[0]
    two_pi = 2.0 * np.pi
    for i in numba.prange(n_h):
        h = float(hkl[i, 0])
        k = float(hkl[i, 1])
        l = float(hkl[i, 2])  # noqa: E741
        hh, kk, ll = h * h, k * k, l * l
        hk, hl, kl = 2.0 * h * k, 2.0 * h * l, 2.0 * k * l
        for j in range(n_c):
            arg = two_pi * (h * xyz[j, 0] + k * xyz[j, 1] + l * xyz[j, 2])
            e = (hh * q6[j, 0] + kk * q6[j, 1] + ll * q6[j, 2]
                 + hk * q6[j, 3] + hl * q6[j, 4] + kl * q6[j, 5])
            a = w[j] * np.exp(-e)
            g = group[j]
            out[g, i] += complex(a * np.cos(arg), a * np.sin(arg))


def _direct_sums(hkl, xyz, q6, w, group, n_group, chunk=20000, quiet=True, desc=None):
    """S[g, h] = Σ_{copies j in group g} w_j exp(−hᵀQ_j h) exp(2πi h·x_j)."""
    from .progress import progress
    out = np.zeros((n_group, len(hkl)), dtype=np.complex128)
    if len(xyz) == 0 or len(hkl) == 0:
        return out
    hkl = np.ascontiguousarray(hkl, dtype=np.int64)
    starts = range(0, len(hkl), chunk)
    for s in progress(starts, total=len(starts), desc=desc, quiet=quiet, unit="chunk"):
        part = np.zeros((n_group, min(chunk, len(hkl) - s)), dtype=np.complex128)
        _direct_kernel(hkl[s:s + chunk], xyz, q6, w, group, part)
        out[:, s:s + chunk] = part
    return out


# --------------------------------------------------------------------------- FFT route

def _fft_structure(st, keep_mask, atoms, elements, hkl, inv_d2, d_min_a, rate, cutoff):
    """F_base (n_h,) and S_el (n_el, n_h) of the non-site atoms by gemmi's density + FFT."""
    import gemmi
    st2 = st.clone()
    # first model only, no site atoms, charges ignored (neutral IT92 as on the direct route)
    while len(st2) > 1:
        del st2[len(st2) - 1]
    model = st2[0]
    drop = {ref for ref, k in zip(atoms.refs, keep_mask) if not k}
    for ch_i, ch in enumerate(model):
        for r_i, res in enumerate(ch):
            for a_i in reversed(range(len(res))):
                if (ch_i, r_i, a_i) in drop:
                    del res[a_i]
                else:
                    res[a_i].charge = 0
    dc = gemmi.DensityCalculatorX()
    dc.d_min = d_min_a
    dc.rate = rate
    dc.cutoff = cutoff
    dc.set_refmac_compatible_blur(model)
    dc.set_grid_cell_and_spacegroup(st2)
    dc.put_model_density_on_grid(model)

    def transform():
        # blurred F on the grid, looked up at hkl, blur undone: exp(+blur s²/4)
        f = gemmi.transform_map_to_f_phi(dc.grid)
        return _lookup(f.array, hkl).astype(np.complex128) * mult

    mult = np.exp(dc.blur * inv_d2 / 4.0)
    F_base = transform()
    S_el = np.zeros((len(elements), len(hkl)), dtype=np.complex128)
    for i, el in enumerate(elements):
        dc.initialize_grid()
        for ch in model:
            for res in ch:
                for atom in res:
                    if atom.element.name == el or (el == "H" and atom.element.name == "D"):
                        dc.add_c_contribution_to_grid(atom, 1.0)
        dc.grid.symmetrize_sum()
        S_el[i] = transform()
    return F_base, S_el


def _lookup(grid, hkl):
    nu, nv, nw = grid.shape
    return grid[hkl[:, 0] % nu, hkl[:, 1] % nv, hkl[:, 2] % nw]


def _solvent_mask_f(st, hkl, d_min_a, rate):
    """Fourier transform (Å³) of gemmi's flat-solvent mask at hkl."""
    import gemmi
    grid = gemmi.FloatGrid()
    grid.setup_from(st, spacing=d_min_a / (2.0 * rate))
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Refmac)
    masker.put_mask_on_float_grid(grid, st[0])
    fm = gemmi.transform_map_to_f_phi(grid)
    return _lookup(fm.array, hkl).astype(np.complex128)


# --------------------------------------------------------------------------- the cache

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
        from .h5io import atomic_writer, write_strings
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
        from .h5io import open_checked, read_array
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
        keys = _pack(self.hkl)
        if len(np.unique(keys)) != n_h:
            raise InputError(f"{src}: repeated Miller indices in 'hkl'")
        if n_h:
            import gemmi
            try:
                cell = gemmi.UnitCell(*map(float, self.cell))
            except (RuntimeError, ValueError):
                raise InputError(f"{src}: 'cell' {list(self.cell)} is not a unit cell") from None
            d2 = _inv_d2(cell, self.hkl)
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
            keys = _pack(self.hkl)
            order = np.argsort(keys, kind="stable")
            self._sorted = (keys[order], order)
        keys, order = self._sorted
        inrange = np.all(np.abs(q) < (1 << 20), axis=1)
        qk = _pack(np.where(inrange[:, None], q, 0))
        pos = np.minimum(np.searchsorted(keys, qk), len(keys) - 1)
        hit = inrange & (keys[pos] == qk)
        out[hit] = order[pos[hit]]
        return out

    def inv_d2(self, h_index=None):
        """1/d² (Å⁻²) of the cached indices (all, or rows ``h_index``)."""
        import gemmi
        cell = gemmi.UnitCell(*self.cell)
        hkl = self.hkl if h_index is None else self.hkl[h_index]
        return _inv_d2(cell, hkl)


def _pack(hkl):
    h = np.asarray(hkl, dtype=np.int64)
    off = 1 << 20
    return ((h[:, 0] + off) << 42) | ((h[:, 1] + off) << 21) | (h[:, 2] + off)


# --------------------------------------------------------------------------- build

def build_sf_cache(model, sites, d_min_a, d_max_a, energy_ev=(), route="auto",
                   k_sol=None, b_sol=46.0, fft_rate=2.5, fft_cutoff=1e-7,
                   model_file=None, config=None, quiet=True, timings=None):
    """Compute the structure-factor cache of a model.

    Parameters
    ----------
    model : str, Path or gemmi.Structure
        PDB/mmCIF file or an already read structure (first model used).
    sites : sequence of str or SiteSpec
        Site definitions ``NAME=SELECTION`` (see :func:`parse_sites`).
    d_min_a, d_max_a : float
        Resolution range (Å), ``d_min_a < d_max_a``; ``d_max_a=None``: no low-resolution limit.
    energy_ev : array_like
        Energy grid (eV, strictly increasing), stored for information.
    route : str
        ``"auto"``, ``"direct"`` or ``"fft"`` for F_base and S_el.
    k_sol : float, optional
        Flat bulk-solvent density (e⁻/Å³, typically 0.35); ``None`` = no solvent.
    b_sol : float
        Bulk-solvent B (Å²).
    fft_rate : float
        Oversampling of the FFT grid (spacing d_min/(2·rate)).
    fft_cutoff : float
        gemmi's density cutoff (relative) for the atom radius on the FFT route.
    model_file : str, optional
        Name stored in the cache (defaults to ``model`` when a path).
    config : str, optional
        JSON stored in the cache.
    quiet : bool
        No progress bar.
    timings : dict, optional
        Filled with seconds per stage and the route used.

    Returns
    -------
    SFCache

    Raises
    ------
    InputError
        Bad model file, bad sites, bad d range or energy grid.
    """
    t0 = time.perf_counter()
    timings = {} if timings is None else timings
    if isinstance(model, (str, Path)):
        model_file = str(model) if model_file is None else model_file
        st = read_model(model)
    else:
        st = model
    source = model_file or "model"
    d_min_a = float(d_min_a)
    d_max_a = math.inf if d_max_a is None else float(d_max_a)
    if not (math.isfinite(d_min_a) and d_min_a > 0):
        raise InputError(f"d_min: must be a positive number of Å, got {d_min_a}")
    if not (d_min_a < d_max_a):
        raise InputError(f"d_min: {d_min_a} Å must be smaller than d_max ({d_max_a} Å)")
    e = np.asarray(energy_ev, dtype=np.float64).ravel()
    if not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InputError("energy: energies must be positive finite eV")
    if len(e) > 1 and np.any(np.diff(e) <= 0):
        raise InputError("energy: the energy grid must be strictly increasing")
    if route not in ("auto", "direct", "fft"):
        raise InputError(f"route: {route!r} is not one of auto, direct, fft")
    if k_sol is not None and not (k_sol >= 0 and b_sol >= 0):
        raise InputError("k_sol, b_sol: must be >= 0")
    specs = [s if isinstance(s, SiteSpec) else None for s in sites]
    if any(s is None for s in specs):
        specs = parse_sites([s for s in sites if not isinstance(s, SiteSpec)]) + \
            [s for s in sites if isinstance(s, SiteSpec)]
    sg = st.find_spacegroup()
    atoms = _collect_atoms(st, specs, source)
    ops = _symops(st)
    hkl = miller_indices(st.cell, sg, d_min_a, d_max_a)
    if len(hkl) == 0:
        raise InputError(f"d_min, d_max: no reflection with {d_min_a} <= d <= {d_max_a} Å "
                         f"in this cell")
    inv_d2 = _inv_d2(st.cell, hkl)
    timings["setup_s"] = time.perf_counter() - t0

    # sites: always direct
    t1 = time.perf_counter()
    site_mask = atoms.site >= 0
    x, q6, n_ops = _expand(atoms, ops, site_mask)
    w = np.tile(atoms.occ[site_mask], n_ops)
    grp = np.tile(atoms.site[site_mask], n_ops)
    S_site = _direct_sums(hkl, x, q6, w, grp, len(specs), quiet=quiet, desc="sites")
    site_elements = []
    for s_i in range(len(specs)):
        site_elements.append(atoms.element[int(np.argmax(atoms.site == s_i))])
    f0_site = np.array([_f0(el, inv_d2) for el in site_elements]).reshape(len(specs), len(hkl))
    timings["sites_s"] = time.perf_counter() - t1

    # non-site atoms
    t2 = time.perf_counter()
    rest = ~site_mask
    elements = sorted({atoms.element[i] for i in np.nonzero(rest)[0]})
    n_copies = int(rest.sum()) * len(ops)
    pairs = float(n_copies) * len(hkl)
    use = route if route != "auto" else ("fft" if pairs > AUTO_FFT_PAIRS else "direct")
    if n_copies == 0:
        use = "direct"                      # nothing but sites: nothing to put on a grid
    timings["route"] = use
    timings["atom_copies"] = n_copies
    if use == "direct":
        el_index = {el: i for i, el in enumerate(elements)}
        grp_rest = np.array([el_index[atoms.element[i]] for i in np.nonzero(rest)[0]],
                            dtype=np.int64)
        x, q6, n_ops = _expand(atoms, ops, rest)
        w = np.tile(atoms.occ[rest], n_ops)
        S_el = _direct_sums(hkl, x, q6, w, np.tile(grp_rest, n_ops), len(elements),
                            quiet=quiet, desc="atoms")
        F_base = np.zeros(len(hkl), dtype=np.complex128)
        for i, el in enumerate(elements):
            F_base += _f0(el, inv_d2) * S_el[i]
    else:
        F_base, S_el = _fft_structure(st, rest, atoms, elements, hkl, inv_d2, d_min_a,
                                      fft_rate, fft_cutoff)
    timings["atoms_s"] = time.perf_counter() - t2
    if k_sol is not None and k_sol > 0:
        t3 = time.perf_counter()
        F_base = F_base + k_sol * np.exp(-b_sol * inv_d2 / 4.0) * _solvent_mask_f(
            st, hkl, d_min_a, fft_rate)
        timings["solvent_s"] = time.perf_counter() - t3
    c = st.cell
    cache = SFCache(
        cell=np.array([c.a, c.b, c.c, c.alpha, c.beta, c.gamma], dtype=np.float64),
        spacegroup=sg.hm, d_min_a=d_min_a, d_max_a=d_max_a, hkl=hkl,
        F_base=F_base, elements=elements, S_el=S_el,
        site_names=[s.name for s in specs], site_elements=site_elements,
        S_site=S_site, f0_site=f0_site, energy_ev=e,
        model_file=str(model_file or ""),
        config=config if config is not None else json.dumps(
            {"d_min": d_min_a, "d_max": d_max_a, "route": use, "k_sol": k_sol, "b_sol": b_sol,
             "sites": [f"{s.name}={s.selection}" for s in specs]}),
        source=source)
    timings["total_s"] = time.perf_counter() - t0
    timings["n_h"] = len(hkl)
    timings["site_atoms"] = {s.name: int(np.sum(atoms.site == i)) for i, s in enumerate(specs)}
    return cache


# --------------------------------------------------------------------------- evaluation

_REF_MEMO = {}


def _reference_el(elements, energy_ev, source):
    from .scattering import reference_fp_fdp
    key = (tuple(elements), energy_ev.tobytes(), source)
    hit = _REF_MEMO.get(key)
    if hit is None:
        fp = np.zeros((len(elements), len(energy_ev)))
        fdp = np.zeros_like(fp)
        for i, el in enumerate(elements):
            fp[i], fdp[i] = reference_fp_fdp(el, energy_ev, source)
        if len(_REF_MEMO) > 64:
            _REF_MEMO.clear()
        hit = _REF_MEMO[key] = (fp, fdp)
    return hit


def _check_site_values(cache, energy_ev, fp_site, fdp_site):
    e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
    if e.ndim != 1:
        raise InputError(f"energy_ev: expected a 1-D array, got shape {e.shape}")
    n_site = len(cache.site_names)
    fp = np.asarray(fp_site, dtype=np.float64)
    fdp = np.asarray(fdp_site, dtype=np.float64)
    for name, a in (("fp_site", fp), ("fdp_site", fdp)):
        if a.shape != (n_site, len(e)):
            raise InputError(f"{name}: expected shape (n_site={n_site}, n_E={len(e)}), "
                             f"got {a.shape}")
    return e, fp, fdp


def structure_factors(cache, energy_ev, fp_site, fdp_site, h_index=None, reference="chantler"):
    """Complex structure factors F(h, E) from the cache.

    Parameters
    ----------
    cache : SFCache
        The cache.
    energy_ev : array_like
        Energies (eV), shape (n_E,); the non-site elements take their
        reference f′/f″ (:func:`~spread_tools.scattering.reference_fp_fdp`) here.
    fp_site, fdp_site : array_like
        Site f′ and f″ (e⁻), shape (n_site, n_E).
    h_index : array_like of int, optional
        Rows of the cache to evaluate (default: all).
    reference : str or None
        Reference table for the non-site elements (``"chantler"`` or
        ``"cromer_liberman"``); ``None`` gives them f′ = f″ = 0 (f0 only).

    Returns
    -------
    numpy.ndarray
        complex128 (n_E, n_h).
    """
    e, fp, fdp = _check_site_values(cache, energy_ev, fp_site, fdp_site)
    sl = slice(None) if h_index is None else np.asarray(h_index, dtype=np.int64)
    F0 = cache.F_base[sl]
    if len(cache.site_names):
        S = cache.S_site[:, sl]
        F0 = F0 + np.sum(cache.f0_site[:, sl] * S, axis=0)
    F = np.broadcast_to(F0, (len(e), len(F0))).copy()
    if len(cache.elements) and reference is not None:
        fpe, fdpe = _reference_el(cache.elements, e, reference)
        F += (fpe + 1j * fdpe).T @ cache.S_el[:, sl]
    if len(cache.site_names):
        F += (fp + 1j * fdp).T @ S
    return F


def intensity_and_gradients(cache, energy_ev, fp_site, fdp_site, h_index=None,
                            reference="chantler"):
    """I(h, E) = |F|² and its derivatives with respect to the site f′ and f″.

    Parameters
    ----------
    cache : SFCache
        The cache.
    energy_ev : array_like
        Energies (eV), shape (n_E,).
    fp_site, fdp_site : array_like
        Site f′ and f″ (e⁻), shape (n_site, n_E).
    h_index : array_like of int, optional
        Rows of the cache (default: all).
    reference : str or None
        Reference table for the non-site elements; ``None``: f′ = f″ = 0.

    Returns
    -------
    I : numpy.ndarray
        (n_E, n_h), e⁻².
    dI_dfp, dI_dfdp : numpy.ndarray
        (n_site, n_E, n_h): 2 Re(F̄ S_site) and 2 Re(F̄ · i S_site).
    """
    F = structure_factors(cache, energy_ev, fp_site, fdp_site, h_index, reference)
    sl = slice(None) if h_index is None else np.asarray(h_index, dtype=np.int64)
    S = cache.S_site[:, sl]
    Fr, Fi = F.real, F.imag
    intensity = Fr * Fr + Fi * Fi
    Sr = S.real[:, None, :]
    Si = S.imag[:, None, :]
    dfp = 2.0 * (Fr[None] * Sr + Fi[None] * Si)
    dfdp = 2.0 * (Fi[None] * Sr - Fr[None] * Si)
    return intensity, dfp, dfdp
