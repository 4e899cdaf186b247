"""Structure-factor cache against an independent brute-force summation (6lk1, P2₁)."""

import math

import gemmi
import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.physics.scattering import reference_fp_fdp
from spread_tools.structure.build import build_sf_cache, parse_sites
from spread_tools.structure.cache import SFCache
from spread_tools.structure.factors import intensity_and_gradients, structure_factors
from spread_tools.structure.miller import miller_indices, systematically_absent

SITES = ["FE1=FES/FE1", "FE2=FES/FE2"]
D_MIN, D_MAX = 3.0, 4.0
ENERGY = np.array([7090.0, 7112.0, 7130.0])


@pytest.fixture(scope="module")
def model_path(request):
    from pathlib import Path
    return Path(__file__).resolve().parents[2] / "test_data" / "models" / "6lk1.pdb"


@pytest.fixture(scope="module")
def direct(model_path):
    return build_sf_cache(model_path, SITES, D_MIN, D_MAX, ENERGY, route="direct")


@pytest.fixture(scope="module")
def fft(model_path):
    return build_sf_cache(model_path, SITES, D_MIN, D_MAX, ENERGY, route="fft")


# ----------------------------------------------------------------- brute force, written here

def _it92(el, stol2):
    c = gemmi.Element(el).it92.get_coefs()
    return c[8] + sum(c[i] * np.exp(-c[4 + i] * stol2) for i in range(4))


def brute_force(model_path, hkl, atom_f=None):
    """F(h) by explicit summation over every atom and both P2₁ operations.

    ``atom_f(atom, h_index) -> complex array`` gives f′ + i f″ to add to f0 (default 0).
    Symmetry by hand: (x, y, z) and (−x, y+½, −z); the ADP of the copy is rotated
    in the Cartesian frame, U' = R_c U R_cᵀ with R_c = O R M.
    """
    st = gemmi.read_structure(str(model_path))
    assert st.spacegroup_hm.replace(" ", "") in ("P1211", "P121")
    O = np.array(st.cell.orth.mat.tolist())
    M = np.array(st.cell.frac.mat.tolist())
    ops = [(np.eye(3), np.zeros(3)), (np.diag([-1.0, 1.0, -1.0]), np.array([0.0, 0.5, 0.0]))]
    hkl = np.asarray(hkl, dtype=np.float64)
    s_cart = hkl @ M                                    # rows: Mᵀh
    stol2 = np.einsum("ij,ij->i", s_cart, s_cart) / 4.0
    F = np.zeros(len(hkl), dtype=np.complex128)
    for ch in st[0]:
        for res in ch:
            for atom in res:
                f = _it92(atom.element.name, stol2).astype(np.complex128)
                if atom_f is not None:
                    f = f + atom_f(res, atom)
                x = M @ np.array(atom.pos.tolist())
                if atom.aniso.nonzero():
                    u = atom.aniso
                    U = np.array([[u.u11, u.u12, u.u13], [u.u12, u.u22, u.u23],
                                  [u.u13, u.u23, u.u33]])
                else:
                    U = np.eye(3) * atom.b_iso / (8 * math.pi ** 2)
                for R, t in ops:
                    Rc = O @ R @ M
                    Uc = Rc @ U @ Rc.T
                    xc = R @ x + t
                    dw = np.exp(-2 * math.pi ** 2 * np.einsum("ij,jk,ik->i", s_cart, Uc, s_cart))
                    F += atom.occ * f * dw * np.exp(2j * math.pi * (hkl @ xc))
    return F


def _subset(cache, n=400):
    rng = np.random.default_rng(1)
    return np.sort(rng.choice(cache.n_h, size=min(n, cache.n_h), replace=False))


def _rel_errors(F, F_ref):
    """max |F − F_ref| / |F_ref| over reflections with |F_ref| ≥ 5 % of the rms, and the
    max |F − F_ref| over all relative to the rms."""
    rms = np.sqrt(np.mean(np.abs(F_ref) ** 2))
    strong = np.abs(F_ref) >= 0.05 * rms
    return (np.max(np.abs(F[strong] - F_ref[strong]) / np.abs(F_ref[strong])),
            np.max(np.abs(F - F_ref)) / rms)


@pytest.mark.parametrize("route,tol", [("direct", 1e-4), ("fft", 1e-3)])
def test_f0_structure_factors_match_brute_force(route, tol, direct, fft, model_path):
    cache = direct if route == "direct" else fft
    idx = _subset(cache)
    zeros = np.zeros((2, 1))
    F = structure_factors(cache, [7000.0], zeros, zeros, h_index=idx, reference=None)[0]
    F_ref = brute_force(model_path, cache.hkl[idx])
    rel_strong, rel_all = _rel_errors(F, F_ref)
    assert rel_strong <= tol and rel_all <= tol, (rel_strong, rel_all)
    amp = np.abs(np.abs(F) - np.abs(F_ref)) / np.abs(F_ref)
    assert np.max(amp[np.abs(F_ref) >= 0.05 * np.sqrt(np.mean(np.abs(F_ref) ** 2))]) <= tol


def test_intensity_matches_brute_force_with_site_values(direct, model_path):
    idx = _subset(direct, 200)
    fp_site = np.array([[-5.1, -7.9, -6.2], [-4.8, -8.3, -5.9]])
    fdp_site = np.array([[0.5, 2.1, 3.9], [0.45, 1.5, 3.8]])
    I, _, _ = intensity_and_gradients(direct, ENERGY, fp_site, fdp_site, h_index=idx)
    for k, e in enumerate(ENERGY):
        ref = {el: reference_fp_fdp(el, e) for el in direct.elements}

        def atom_f(res, atom, k=k, ref=ref):
            if res.name == "FES" and atom.name in ("FE1", "FE2"):
                s = 0 if atom.name == "FE1" else 1
                return fp_site[s, k] + 1j * fdp_site[s, k]
            fp, fdp = ref[atom.element.name]
            return float(fp) + 1j * float(fdp)
        F_ref = brute_force(model_path, direct.hkl[idx], atom_f)
        np.testing.assert_allclose(I[k], np.abs(F_ref) ** 2, rtol=1e-7,
                                   atol=1e-9 * np.max(np.abs(F_ref) ** 2))


def test_friedel_mates(direct):
    minus = direct.index_of(-direct.hkl)
    assert np.all(minus >= 0)                       # both mates stored
    fp = np.full((2, 3), -6.0)
    I0, _, _ = intensity_and_gradients(direct, ENERGY, fp, np.zeros((2, 3)), reference=None)
    np.testing.assert_allclose(I0, I0[:, minus], rtol=1e-10)
    I1, _, _ = intensity_and_gradients(direct, ENERGY, fp, np.full((2, 3), 3.9), reference=None)
    diff = np.abs(I1 - I1[:, minus]) / (I1 + I1[:, minus])
    assert np.median(diff) > 1e-3
    # with the Chantler f″ of C, N, O, S the mates differ as well
    I2, _, _ = intensity_and_gradients(direct, ENERGY, fp, np.zeros((2, 3)))
    assert np.max(np.abs(I2 - I2[:, minus]) / (I2 + I2[:, minus])) > 1e-4


def test_p21_absences(direct, model_path):
    hkl = direct.hkl
    axial = (hkl[:, 0] == 0) & (hkl[:, 2] == 0)
    assert not np.any(axial & (hkl[:, 1] % 2 == 1))
    assert np.any(axial)                             # (0 k 0), k even, are there
    F = brute_force(model_path, [[0, 13, 0], [0, -15, 0], [0, 14, 0]])
    assert np.all(np.abs(F[:2]) < 1e-9 * np.abs(F[2]))
    # the whole P1 sphere, absences removed
    st = gemmi.read_structure(str(model_path))
    full = miller_indices(st.cell, st.find_spacegroup(), D_MIN, D_MAX)
    assert len(full) == direct.n_h


@pytest.mark.parametrize("hm", ["P 41 21 2", "C 1 2 1", "I 2 2 2", "P 61 2 2", "F 2 3", "R 3 :H"])
def test_absences_agree_with_gemmi(hm):
    sg = gemmi.SpaceGroup(hm)
    rng = np.random.default_rng(0)
    hkl = rng.integers(-8, 9, size=(3000, 3))
    hkl[:500, :2] = 0
    hkl[500:1000, 0] = 0
    hkl[1000:1300, 0] = hkl[1000:1300, 1]
    ours = systematically_absent(hkl, sg)
    ops = sg.operations()
    theirs = np.array([ops.is_systematically_absent(list(map(int, h))) for h in hkl])
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("which", ["fp", "fdp"])
def test_gradients_finite_differences(direct, which):
    idx = _subset(direct, 300)
    rng = np.random.default_rng(3)
    fp = rng.uniform(-8, -3, size=(2, 3))
    fdp = rng.uniform(0.4, 4, size=(2, 3))
    I, dfp, dfdp = intensity_and_gradients(direct, ENERGY, fp, fdp, h_index=idx)
    grad = dfp if which == "fp" else dfdp
    step = 1e-4
    for s in range(2):
        for k in (0, 1, 2):                          # every energy, first and last included
            plus = [fp.copy(), fdp.copy()]
            minus = [fp.copy(), fdp.copy()]
            j = 0 if which == "fp" else 1
            plus[j][s, k] += step
            minus[j][s, k] -= step
            Ip = intensity_and_gradients(direct, ENERGY, *plus, h_index=idx)[0]
            Im = intensity_and_gradients(direct, ENERGY, *minus, h_index=idx)[0]
            num = (Ip - Im) / (2 * step)
            np.testing.assert_allclose(grad[s, k], num[k], rtol=1e-6,
                                       atol=1e-6 * np.max(np.abs(num[k])))
            others = [i for i in range(3) if i != k]          # a value at E_k moves only I(E_k)
            np.testing.assert_array_equal(num[others], 0.0)


def test_write_read_roundtrip_and_index(direct, tmp_path):
    path = tmp_path / "c.h5"
    direct.write(path)
    back = SFCache.read(path)
    for name in ("hkl", "F_base", "S_el", "S_site", "f0_site", "energy_ev", "cell"):
        np.testing.assert_array_equal(getattr(back, name), getattr(direct, name))
    assert back.site_names == ["FE1", "FE2"] and back.site_elements == ["Fe", "Fe"]
    assert back.elements == ["C", "N", "O", "S"] and back.spacegroup == direct.spacegroup
    rows = np.array([5, 0, back.n_h - 1])
    np.testing.assert_array_equal(back.index_of(back.hkl[rows]), rows)
    assert list(back.index_of([[0, 1, 0], [500, 0, 0]])) == [-1, -1]
    with pytest.raises(InputError, match="exists already"):
        direct.write(path)
    # truncated and non-HDF5 files
    data = path.read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="t.h5"):
        SFCache.read(tmp_path / "t.h5")
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(InputError, match="not an HDF5 file"):
        SFCache.read(tmp_path / "x.h5")
    # a cache with an inconsistent shape
    with h5py.File(path, "a") as h5:
        del h5["f0_site"]
        h5["f0_site"] = np.zeros((2, 3))
    with pytest.raises(InputError, match="f0_site"):
        SFCache.read(path)


def test_site_errors(model_path):
    with pytest.raises(InputError, match="matches no atom"):
        build_sf_cache(model_path, ["ZN=ZN/ZN"], D_MIN, D_MAX, route="direct")
    with pytest.raises(InputError, match="different elements"):
        build_sf_cache(model_path, ["CL=(FES)/*"], D_MIN, D_MAX, route="direct")
    with pytest.raises(InputError, match="sites FE1 and FE"):
        build_sf_cache(model_path, ["FE1=FES/FE1", "FE=//*/(FES)/FE1"], D_MIN, D_MAX)
    with pytest.raises(InputError, match="NAME=SELECTION"):
        parse_sites(["FE1"])
    with pytest.raises(InputError, match="invalid selection"):
        parse_sites(["FE1=//(FES/FE1"])
    with pytest.raises(InputError, match="smaller than d_max"):
        build_sf_cache(model_path, SITES, 4.0, 3.0)
    assert parse_sites(["A=//A/(FES)/FE1[Fe]"])[0].selection == "//A/(FES)/FE1[Fe]"


def test_gemmi_selection_site_matches_one_chain(model_path):
    cache = build_sf_cache(model_path, ["FE1A=//A/(FES)/FE1", "FE1B=//B/(FES)/FE1"], 3.6, 4.0,
                           route="direct")
    both = build_sf_cache(model_path, ["FE1=FES/FE1"], 3.6, 4.0, route="direct")
    np.testing.assert_allclose(cache.S_site.sum(axis=0), both.S_site[0], rtol=1e-12, atol=1e-12)


def test_bulk_solvent_is_linear_in_k_sol_and_opposes_protein(model_path):
    kw = dict(route="direct", b_sol=46.0)
    none = build_sf_cache(model_path, SITES, 4.0, 12.0, **kw)
    one = build_sf_cache(model_path, SITES, 4.0, 12.0, k_sol=0.35, **kw)
    two = build_sf_cache(model_path, SITES, 4.0, 12.0, k_sol=0.70, **kw)
    d1, d2 = one.F_base - none.F_base, two.F_base - none.F_base
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-10, atol=1e-10)
    low = none.inv_d2() < 1 / 8.0 ** 2
    # flat solvent fills what the protein leaves empty: roughly opposite phases at low resolution
    assert np.mean(np.real(d1[low] * np.conj(none.F_base[low]))) < 0
