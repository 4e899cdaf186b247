"""Miller-index helpers against closed forms and gemmi's own d-spacings."""

import gemmi
import numpy as np
import pytest

from spread_tools.errors import InputError
from spread_tools.structure.miller import b_matrix, frac_matrix, inv_d2, pack_hkl

MONO = (40.0, 50.0, 60.0, 90.0, 101.5, 90.0)


def test_b_matrix_orthorhombic_is_diagonal():
    B = b_matrix((10.0, 20.0, 40.0, 90.0, 90.0, 90.0))
    np.testing.assert_allclose(B, np.diag([0.1, 0.05, 0.025]), atol=1e-15)


def test_b_matrix_is_frac_transposed_and_takes_gemmi_cells():
    uc = gemmi.UnitCell(*MONO)
    np.testing.assert_array_equal(b_matrix(MONO), frac_matrix(MONO).T)
    np.testing.assert_array_equal(b_matrix(uc), b_matrix(MONO))
    assert frac_matrix(MONO).flags.c_contiguous


def test_inv_d2_matches_gemmi_d_spacing():
    hkl = np.array([[1, 0, 0], [0, 1, 0], [1, 2, -3], [-4, 1, 5]])
    uc = gemmi.UnitCell(*MONO)
    expect = np.array([1.0 / uc.calculate_d(list(map(int, h))) ** 2 for h in hkl])
    np.testing.assert_allclose(inv_d2(MONO, hkl), expect, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(hkl @ b_matrix(MONO).T, axis=1) ** 2, expect,
                               rtol=1e-12)


def test_pack_hkl_is_one_to_one_and_keeps_lexicographic_order():
    rng = np.random.default_rng(0)
    hkl = rng.integers(-300, 301, size=(2000, 3))
    hkl = np.unique(hkl, axis=0)                     # sorted by h, k, l
    keys = pack_hkl(hkl)
    assert len(np.unique(keys)) == len(hkl)
    assert np.all(np.diff(keys) > 0)


@pytest.mark.parametrize("cell", [(10.0, 20.0, 30.0, 90.0, 90.0), ("ten", 20, 30, 90, 90, 90)])
def test_bad_cell_is_an_input_error(cell):
    with pytest.raises(InputError, match="cell: .* is not a unit cell"):
        b_matrix(cell)
