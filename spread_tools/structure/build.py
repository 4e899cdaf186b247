"""Model → structure-factor cache: per-hkl base F and per-site geometric sums.

:func:`build_sf_cache` reads the model, assigns the site atoms, expands the
symmetry copies and fills an :class:`~spread_tools.structure.cache.SFCache` (the
arrays of ``docs/formats.md``, from which :mod:`spread_tools.structure.factors`
evaluates F(h, E) at any energy and site f′/f″); the sums themselves are in
:mod:`spread_tools.structure.routes`.

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

import numpy as np

from spread_tools.errors import InputError
from spread_tools.io.h5io import check_readable
from spread_tools.structure.cache import SFCache
from spread_tools.structure.miller import frac_matrix, miller_indices
from spread_tools.structure.miller import inv_d2 as inv_d2_of
from spread_tools.structure.routes import (
    direct_sums,
    f0_it92,
    fft_structure,
    solvent_mask_f,
)

__all__ = ["SiteSpec", "parse_sites", "read_model", "build_sf_cache", "AUTO_FFT_PAIRS"]

#: ``route="auto"`` switches to the FFT when n_h × n_atom_copies exceeds this.
AUTO_FFT_PAIRS = 4e9


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
    path = check_readable(path)
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


def _collect_atoms(st, sites, source):
    """Atoms of the first model with their site assignment."""
    import gemmi

    from spread_tools.physics.scattering import element_symbol
    model = st[0]
    M = frac_matrix(st.cell)
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


def _group_sums(atoms, ops, mask, group, n_group, hkl, quiet, desc):
    """Direct sums (n_group, n_h) over the P1 copies of the atoms in ``mask``.

    ``group`` (one entry per selected atom) is the row of each atom in the result.
    """
    x, q6, n_ops = _expand(atoms, ops, mask)
    w = np.tile(atoms.occ[mask], n_ops)
    return direct_sums(hkl, x, q6, w, np.tile(group, n_ops), n_group, quiet=quiet, desc=desc)


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
    inv_d2 = inv_d2_of(st.cell, hkl)
    timings["setup_s"] = time.perf_counter() - t0

    # sites: always direct
    t1 = time.perf_counter()
    site_mask = atoms.site >= 0
    S_site = _group_sums(atoms, ops, site_mask, atoms.site[site_mask], len(specs), hkl,
                         quiet, "sites")
    site_elements = []
    for s_i in range(len(specs)):
        site_elements.append(atoms.element[int(np.argmax(atoms.site == s_i))])
    f0_site = np.array([f0_it92(el, inv_d2) for el in site_elements]).reshape(len(specs), len(hkl))
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
        S_el = _group_sums(atoms, ops, rest, grp_rest, len(elements), hkl, quiet, "atoms")
        F_base = np.zeros(len(hkl), dtype=np.complex128)
        for i, el in enumerate(elements):
            F_base += f0_it92(el, inv_d2) * S_el[i]
    else:
        F_base, S_el = fft_structure(st, rest, atoms, elements, hkl, inv_d2, d_min_a,
                                     fft_rate, fft_cutoff)
    timings["atoms_s"] = time.perf_counter() - t2
    if k_sol is not None and k_sol > 0:
        t3 = time.perf_counter()
        F_base = F_base + k_sol * np.exp(-b_sol * inv_d2 / 4.0) * solvent_mask_f(
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

