"""Tabulated f′/f″ tables: readers, format detection, interpolation, references, errors."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.physics.scattering import (
    SpectrumTable,
    detect_format,
    read_henke_nff,
    read_table,
    reference_fp_fdp,
    reference_table,
)

SPECTRA = Path(__file__).resolve().parents[2] / "test_data" / "spectra"


def test_three_column_tables():
    ox = read_table(SPECTRA / "pf-rd-ox_fftkk.out")
    red = read_table(SPECTRA / "pf-rd-red_fftkk.out")
    for t in (ox, red):
        assert t.energy_range_ev == (6500.0, 8500.0) and len(t) == 2001
    # first row of the cut file, read back exactly
    assert ox.fp[0] == pytest.approx(-2.17396873253) and ox.fdp[0] == pytest.approx(0.553524451892)
    # the reduced edge lies below the oxidised one: f″ at half height reached earlier
    half = lambda t: t.energy_ev[np.argmax(t.fdp > 0.5 * (t.fdp.min() + t.fdp.max()))]  # noqa
    assert half(red) < half(ox)
    fe = read_table(SPECTRA / "Fe.dat")
    assert detect_format(SPECTRA / "Fe.dat") == "three-column"
    assert fe.energy_ev[0] == 1000.0 and fe.fp[0] == pytest.approx(-3.883686)


def test_interpolation_is_linear_and_bounded():
    t = SpectrumTable([1.0, 2.0, 4.0], [0.0, 1.0, -1.0], [1.0, 3.0, 3.0], "t")
    fp, fdp = t.interpolate([1.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(fp, [0.0, 0.5, 0.0, -1.0])
    np.testing.assert_allclose(fdp, [1.0, 2.0, 3.0, 3.0])
    fp, _ = t.interpolate(np.array([[1.25, 2.0]]))
    assert fp.shape == (1, 2)
    for bad in (0.99, 4.01, np.nan):
        with pytest.raises(InputError, match="t: "):
            t.interpolate([2.0, bad])


def test_henke_nff_conversion():
    t = read_table(SPECTRA / "fe.nff")
    assert detect_format(SPECTRA / "fe.nff") == "henke"
    raw = np.array([[float(x) for x in ln.split()]
                    for ln in (SPECTRA / "fe.nff").read_text().splitlines()[1:] if ln.strip()])
    ok = (raw[:, 1] != -9999) & (raw[:, 2] != -9999)
    assert (~ok).sum() > 0 and len(t) == ok.sum()                       # missing rows dropped
    np.testing.assert_allclose(t.fp, raw[ok, 1] - 26)                 # f′ = f1 − Z
    np.testing.assert_allclose(t.fdp, raw[ok, 2])
    # Henke and Chantler agree to ~0.3 e⁻ away from the edge (7.5-9 keV)
    e = np.array([7500.0, 8000.0, 9000.0])
    np.testing.assert_allclose(t.interpolate(e)[0], reference_fp_fdp("Fe", e)[0], atol=0.35)
    np.testing.assert_allclose(t.interpolate(e)[1], reference_fp_fdp("Fe", e)[1], rtol=0.05)


def test_henke_element_from_file_name(tmp_path):
    p = tmp_path / "cu.nff"
    p.write_text("copper table\n 8000 27.0 3.9\n 9000 28.0 3.0\n")
    t = read_henke_nff(p)
    np.testing.assert_allclose(t.fp, [-2.0, -1.0])


def test_csv_tables(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("fdp,energy_ev,note,fp\n1.0,7100,a,-5\n3.5,7120,b,-6\n")
    t = read_table(p)
    np.testing.assert_allclose(t.energy_ev, [7100, 7120])
    np.testing.assert_allclose(t.fp, [-5, -6])
    np.testing.assert_allclose(t.fdp, [1.0, 3.5])
    r = tmp_path / "result.csv"
    r.write_text("energy_ev,FE1_fp,FE1_fp_sigma,FE1_fdp,FE1_fdp_sigma,FE2_fp,FE2_fp_sigma,"
                 "FE2_fdp,FE2_fdp_sigma\n7100,-5,0.1,0.5,0.05,-4,0.2,0.4,0.04\n"
                 "7104,-6,0.1,0.6,0.05,-5,0.2,0.5,0.04\n")
    t2 = read_table(r, site="FE2")
    np.testing.assert_allclose(t2.fp, [-4, -5])
    np.testing.assert_allclose(t2.fdp_sigma, [0.04, 0.04])
    with pytest.raises(InputError, match="choose|site= choice"):
        read_table(r)
    with pytest.raises(InputError, match="no site 'FE3'"):
        read_table(r, site="FE3")


def _write_result(path, names=("FE1", "FE2")):
    e = np.arange(7070.0, 7171.0, 4.0)
    n = len(names)
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "spread_tools.result"
        h5.attrs["version"] = 1
        h5["energy_ev"] = e
        h5.create_dataset("site_names", data=np.array(names, dtype=object),
                          dtype=h5py.string_dtype())
        h5["fp"] = -5 + np.arange(n)[:, None] + 0 * e
        h5["fdp"] = 1 + np.arange(n)[:, None] + 0 * e
        h5["fp_sigma"] = 0.1 + 0 * h5["fp"][()]
        h5["fdp_sigma"] = 0.2 + 0 * h5["fp"][()]
    return e


def test_result_file_site(tmp_path):
    p = tmp_path / "res.h5"
    e = _write_result(p)
    t = read_table(p, site="FE2")
    np.testing.assert_allclose(t.energy_ev, e)
    np.testing.assert_allclose(t.fp, -4.0)
    np.testing.assert_allclose(t.fdp_sigma, 0.2)
    assert "FE2" in t.source
    with pytest.raises(InputError, match="choose one with site="):
        read_table(p)
    with pytest.raises(InputError, match="no site 'X'"):
        read_table(p, site="X")
    one = tmp_path / "one.h5"
    _write_result(one, ("MN",))
    assert read_table(one).fp[0] == -5.0
    with h5py.File(p, "a") as h5:
        h5.attrs["format"] = "spread_tools.sf_cache"
    with pytest.raises(InputError, match="expected spread_tools.result"):
        read_table(p, site="FE1")


@pytest.mark.parametrize("text,fragment", [
    ("7100 -5 1\n7090 -5 1\n", "not increasing (7100 then 7090 eV"),
    ("7100 -5 1\n7100 -6 1\n", "energy 7100 eV appears twice"),
    ("7100 -5 1\n7110 nan 1\n", "line 2: NaN or inf"),
    ("7100 -5\n7110 -6\n", "line 1: expected 3 columns, found 2"),
    ("7100 -5 1\n", "at least 2 rows"),
    ("7100 -5 x\n7110 -5 1\n", "line 1: not a number"),
])
def test_bad_tables(tmp_path, text, fragment):
    p = tmp_path / "bad.dat"
    p.write_text(text)
    with pytest.raises(InputError, match=r"bad\.dat") as err:
        read_table(p)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_format_and_missing(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_table(tmp_path / "none.dat")
    p = tmp_path / "words.txt"
    p.write_text("hello world\nthis is not a table\n")
    with pytest.raises(InputError, match="unknown table format"):
        read_table(p)
    b = tmp_path / "bin.dat"
    b.write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(InputError, match="unknown table format"):
        read_table(b)
    with pytest.raises(InputError, match="format 'xyz'"):
        read_table(SPECTRA / "Fe.dat", format="xyz")
    with pytest.raises(InputError, match="holds one curve"):
        read_table(SPECTRA / "Fe.dat", site="FE1")
    c = tmp_path / "c.csv"
    c.write_text("e,fp,fdp\n1,2,3\n")
    with pytest.raises(InputError, match="no 'energy_ev' column"):
        read_table(c)


def test_reference_chantler_and_cromer_liberman():
    e = np.array([7000.0, 7100.0, 7200.0, 8000.0])
    fp_c, fdp_c = reference_fp_fdp("Fe", e)
    fp_l, fdp_l = reference_fp_fdp("fe", e, source="cromer_liberman")
    # independent tables agree away from the edge; f″ jumps ~8x across the K edge (7112 eV)
    np.testing.assert_allclose(fp_c[[0, 3]], fp_l[[0, 3]], atol=0.1)
    np.testing.assert_allclose(fdp_c[[0, 3]], fdp_l[[0, 3]], rtol=0.05)
    assert fdp_c[2] > 6 * fdp_c[0] and fdp_l[2] > 6 * fdp_l[0]
    # f′ without Z: small for light atoms at 7 keV, → 0 far above every edge
    fp_C, fdp_C = reference_fp_fdp("C", 7000.0)
    assert abs(fp_C) < 0.05 and 0 < fdp_C < 0.05
    assert abs(reference_fp_fdp(26, 60000.0)[0]) < 0.3
    # the same energy gives the same value whatever else is asked (a fixed function)
    alone = reference_fp_fdp("Fe", [7000.0])[0][0]
    assert alone == reference_fp_fdp("Fe", [6000.0, 7000.0, 9e4])[0][1]
    # the Fe.dat table is close to gemmi's Cromer-Liberman (same method, another implementation)
    fe = read_table(SPECTRA / "Fe.dat")
    np.testing.assert_allclose(fe.interpolate(e)[0][[0, 3]], fp_l[[0, 3]], atol=0.02)
    t = reference_table("Fe", e)
    assert t.source == "chantler:Fe" and len(t) == 4


@pytest.mark.parametrize("element,source,fragment", [
    ("Xx", "chantler", "unknown element"),
    ("Q", "chantler", "unknown element"),
    (0, "chantler", "atomic number 0"),
    ("Fe2+", "chantler", "not an element symbol"),
    ("Pu", "chantler", "no Chantler table"),
    ("He", "cromer_liberman", "Z 3-92"),
    ("Fe", "henke", "reference source"),
])
def test_reference_errors(element, source, fragment):
    with pytest.raises(InputError, match=fragment):
        reference_fp_fdp(element, [7000.0], source=source)


def test_reference_energy_errors():
    with pytest.raises(InputError, match="positive finite"):
        reference_fp_fdp("Fe", [7000.0, -1.0])
    with pytest.raises(InputError, match="Chantler table covers"):
        reference_fp_fdp("Fe", [1e7])
