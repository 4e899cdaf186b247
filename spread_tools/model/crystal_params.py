"""Crystal-model parameters: small rotations, the unit cell by crystal system, mosaic spread.

A lattice's reciprocal orientation matrix is written (DIALS convention, q = A·h)::

    A = R(θ) · U0 · B(p),        B(p)⁻¹ = O(cell(p))ᵀ

* ``R(θ) = Rx(θx)·Ry(θy)·Rz(θz)``: three small rotations about the lab axes (radians),
  applied to the stored orientation U0, as diffBragg's RotX/Y/Z;
* ``cell(p) = C·p + c0``: the six cell constants (Å, °) from the free parameters ``p``
  that the crystal system allows (:class:`CellParameterization`); ``C`` is constant, so
  the map is linear;
* ``O``: the orthogonalization matrix of the cell (PDB/gemmi convention, a along x, b in
  the xy plane), the inverse of gemmi's fractionalization matrix M; B = Mᵀ as in
  :func:`spread_tools.structure.miller.b_matrix`.

A pixel's fractional Miller index in mosaic domain d is then
``h = (R_d A)⁻¹ (ŝ − ŝ0)/λ = Oᵀ U0ᵀ R(θ)ᵀ R_dᵀ (ŝ − ŝ0)/λ``, and every derivative the
geometry refinement needs is a 3 × 3 matrix (:func:`domain_matrices`). The derivatives of
O with respect to the cell constants are taken by complex-step differentiation of the
closed-form O (exact to round-off, no subtractive cancellation); those of R(θ) and R_d
are closed forms.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from spread_tools.errors import InputError
from spread_tools.model.geometry import mosaic_axes_and_quantiles, rotation_matrix

__all__ = ["CELL_NAMES", "CellParameterization", "orthogonalization_matrix", "cell_from_A",
           "small_rotation", "mosaic_rotations_with_derivative", "split_orientation",
           "domain_matrices", "stored_domain_matrices", "rotation_angle_deg"]

#: Names of the six cell constants, in order.
CELL_NAMES = ("a", "b", "c", "alpha", "beta", "gamma")
_COMPLEX_STEP = 1e-30


def orthogonalization_matrix(cell):
    """Orthogonalization matrix O of a cell (PDB/gemmi convention), r = O·x_frac.

    Works on complex input (for complex-step derivatives).

    Parameters
    ----------
    cell : sequence of 6
        a, b, c (Å), α, β, γ (°).

    Returns
    -------
    ndarray (3, 3)
        Real or complex, as the input.
    """
    a, b, c, al, be, ga = cell
    rad = math.pi / 180.0
    ca, cb, cg = np.cos(al * rad), np.cos(be * rad), np.cos(ga * rad)
    sg = np.sin(ga * rad)
    vol = a * b * c * np.sqrt(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg)
    zero = 0 * a
    return np.array([[a, b * cg, c * cb],
                     [zero, b * sg, c * (ca - cb * cg) / sg],
                     [zero, zero, vol / (a * b * sg)]])


def cell_from_A(A):
    """Cell constants of a reciprocal orientation matrix A (from its metric AᵀA).

    Parameters
    ----------
    A : ndarray (3, 3)
        q = A·h (Å⁻¹).

    Returns
    -------
    ndarray (6,)
        a, b, c (Å), α, β, γ (°).
    """
    A = np.asarray(A, dtype=np.float64)
    g = np.linalg.inv(A.T @ A)          # real-space metric tensor
    abc = np.sqrt(np.diag(g))
    cosines = [g[1, 2] / (abc[1] * abc[2]), g[0, 2] / (abc[0] * abc[2]), g[0, 1] / (abc[0] * abc[1])]
    return np.concatenate([abc, np.degrees(np.arccos(np.clip(cosines, -1, 1)))])


@dataclasses.dataclass
class CellParameterization:
    """The free cell parameters a crystal system allows: ``cell = C·p + c0``.

    Attributes
    ----------
    system : str
        ``triclinic``, ``monoclinic``, ``orthorhombic``, ``tetragonal``, ``trigonal``,
        ``hexagonal``, ``rhombohedral`` (trigonal on rhombohedral axes) or ``cubic``.
    names : tuple of str
        Name of each free parameter (``a``, ``c``, ``beta``, …).
    C : ndarray (6, n_free)
        0/1 matrix: which cell constants each free parameter sets.
    c0 : ndarray (6,)
        Fixed values (90° or 120° angles, 0 elsewhere).
    """

    system: str
    names: tuple
    C: np.ndarray
    c0: np.ndarray

    @property
    def n_free(self):
        """Number of free cell parameters."""
        return len(self.names)

    @property
    def cell_index(self):
        """Index (into the six cell constants) that each free parameter stands for."""
        return np.array([CELL_NAMES.index(n) for n in self.names], dtype=np.int64)

    def cell(self, p):
        """The six cell constants of free parameters ``p``."""
        return self.C @ np.asarray(p) + self.c0

    def free(self, cell):
        """Free parameters of a cell, averaging the constants the system ties together."""
        cell = np.asarray(cell, dtype=np.float64)
        return (self.C.T @ cell) / self.C.sum(axis=0)

    @classmethod
    def for_spacegroup(cls, spacegroup, cell):
        """The parameterization of a space group's crystal system.

        Parameters
        ----------
        spacegroup : str
            Hermann–Mauguin symbol (gemmi).
        cell : sequence of 6 float
            A cell of the dataset: tells the unique axis of a monoclinic cell and whether a
            trigonal group is on rhombohedral axes.

        Returns
        -------
        CellParameterization

        Raises
        ------
        InputError
            Unknown space group.
        """
        import gemmi
        try:
            sg = gemmi.SpaceGroup(str(spacegroup))
        except (RuntimeError, ValueError):
            raise InputError(f"space group {spacegroup!r}: not a space group gemmi knows") from None
        system = sg.crystal_system_str()
        cell = np.asarray(cell, dtype=np.float64)
        angles = cell[3:]
        if system == "triclinic":
            groups, fixed = [("a", [0]), ("b", [1]), ("c", [2]), ("alpha", [3]), ("beta", [4]),
                             ("gamma", [5])], {}
        elif system == "monoclinic":
            off = np.abs(angles - 90.0)
            unique = int(np.argmax(off)) if off.max() > 1e-6 else "abc".index(sg.monoclinic_unique_axis())
            groups = [("a", [0]), ("b", [1]), ("c", [2]), (CELL_NAMES[3 + unique], [3 + unique])]
            fixed = {3 + i: 90.0 for i in range(3) if i != unique}
        elif system == "orthorhombic":
            groups, fixed = [("a", [0]), ("b", [1]), ("c", [2])], {3: 90.0, 4: 90.0, 5: 90.0}
        elif system == "tetragonal":
            groups, fixed = [("a", [0, 1]), ("c", [2])], {3: 90.0, 4: 90.0, 5: 90.0}
        elif system in ("trigonal", "hexagonal"):
            if system == "trigonal" and sg.ext == "R":
                system = "rhombohedral"
                groups, fixed = [("a", [0, 1, 2]), ("alpha", [3, 4, 5])], {}
            else:
                groups, fixed = [("a", [0, 1]), ("c", [2])], {3: 90.0, 4: 90.0, 5: 120.0}
        else:
            groups, fixed = [("a", [0, 1, 2])], {3: 90.0, 4: 90.0, 5: 90.0}
        C = np.zeros((6, len(groups)))
        for k, (_, rows) in enumerate(groups):
            C[rows, k] = 1.0
        c0 = np.zeros(6)
        for i, v in fixed.items():
            c0[i] = v
        return cls(system=system, names=tuple(n for n, _ in groups), C=C, c0=c0)

    def b_inverse(self, p):
        """B⁻¹ = Oᵀ at free parameters ``p`` and its derivatives (complex step).

        Returns
        -------
        binv : ndarray (3, 3)
        dbinv : ndarray (n_free, 3, 3)
            ∂B⁻¹/∂p_i (per Å for edges, per degree for angles).
        """
        cell = self.cell(p)
        binv = orthogonalization_matrix(cell).T
        dbinv = np.empty((self.n_free, 3, 3))
        for i in range(self.n_free):
            step = cell + 1j * _COMPLEX_STEP * self.C[:, i]
            dbinv[i] = orthogonalization_matrix(step).T.imag / _COMPLEX_STEP
        return np.real(binv), dbinv


def small_rotation(theta_rad):
    """R = Rx(θx)·Ry(θy)·Rz(θz) and its derivatives.

    Parameters
    ----------
    theta_rad : sequence of 3 float
        Rotations about the lab x, y, z axes (radians).

    Returns
    -------
    R : ndarray (3, 3)
    dR : ndarray (3, 3, 3)
        ∂R/∂θ_i.
    """
    mats, ders = [], []
    for axis, t in enumerate(theta_rad):
        c, s = math.cos(t), math.sin(t)
        i, j = [(1, 2), (0, 2), (0, 1)][axis]
        m = np.eye(3)
        d = np.zeros((3, 3))
        sign = -1.0 if axis == 1 else 1.0   # Ry has +sin in the (0, 2) corner
        m[i, i] = m[j, j] = c
        m[i, j], m[j, i] = -sign * s, sign * s
        d[i, i] = d[j, j] = -s
        d[i, j], d[j, i] = -sign * c, sign * c
        mats.append(m)
        ders.append(d)
    rx, ry, rz = mats
    dx, dy, dz = ders
    return rx @ ry @ rz, np.stack([dx @ ry @ rz, rx @ dy @ rz, rx @ ry @ dz])


def mosaic_rotations_with_derivative(spread_deg, n_domains):
    """Domain rotations R_d (:func:`~spread_tools.model.geometry.mosaic_rotations`) and ∂R_d/∂σ.

    Parameters
    ----------
    spread_deg : float
        Mosaic spread σ (degrees).
    n_domains : int

    Returns
    -------
    R : ndarray (n_domains, 3, 3)
    dR : ndarray (n_domains, 3, 3)
        ∂R_d/∂σ per degree: R_d is a rotation by σ·q_d about a fixed axis u_d, so
        ∂R_d/∂σ = q_d (π/180) [u_d]× R_d.
    """
    axes, q = mosaic_axes_and_quantiles(n_domains)
    sigma = math.radians(float(spread_deg))
    R = np.empty((len(q), 3, 3))
    dR = np.empty_like(R)
    for d in range(len(q)):
        u = axes[d]
        ux = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
        R[d] = rotation_matrix(u, sigma * q[d]) if q[d] != 0 else np.eye(3)
        dR[d] = q[d] * math.radians(1.0) * ux @ R[d]
    return R, dR


def split_orientation(A, param):
    """Stored orientation U0 and free cell parameters p0 of a lattice, with A ≈ U0·B(p0).

    The lattice's own cell (from AᵀA) is projected onto the crystal system (tied constants
    averaged, fixed angles set), and U0 is the rotation nearest to A·B(p0)⁻¹ (polar
    decomposition), so a lattice whose A already obeys its system gives A = U0·B(p0) to
    round-off.

    Parameters
    ----------
    A : ndarray (3, 3)
    param : CellParameterization

    Returns
    -------
    U0 : ndarray (3, 3)
    p0 : ndarray (n_free,)
    """
    p0 = param.free(cell_from_A(A))
    binv, _ = param.b_inverse(p0)
    # A = U B  ⇒  U = A B⁻¹ ; B⁻¹ = binv (h = B⁻¹ q)
    u, _, vt = np.linalg.svd(np.asarray(A, dtype=np.float64) @ binv)
    U0 = u @ vt
    if np.linalg.det(U0) < 0:
        raise InputError("crystal model: A has a left-handed setting (det < 0)")
    return U0, p0


def domain_matrices(U0, theta_rad, param, p, spread_deg, n_domains, want_rotation=True,
                    want_cell=True, want_mosaic=True):
    """(R_d A)⁻¹ of every mosaic domain and its derivatives with respect to the parameters.

    Parameters
    ----------
    U0 : ndarray (3, 3)
        Stored orientation.
    theta_rad : sequence of 3
        Small rotations (:func:`small_rotation`).
    param : CellParameterization
    p : ndarray (n_free,)
        Free cell parameters.
    spread_deg : float
        Mosaic spread (degrees).
    n_domains : int
    want_rotation, want_cell, want_mosaic : bool
        Which derivative families to return (in this order).

    Returns
    -------
    minv : ndarray (n_domains, 3, 3)
        (R_d A)⁻¹ = Oᵀ U0ᵀ R(θ)ᵀ R_dᵀ.
    dminv : ndarray (n_domains, n_q, 3, 3)
        Derivatives with respect to θx, θy, θz (per radian), the free cell parameters
        (per Å or degree) and σ (per degree), for the families asked for.
    A : ndarray (3, 3)
        R(θ) U0 B(p).
    """
    R, dR = small_rotation(theta_rad)
    binv, dbinv = param.b_inverse(p)
    Rd, dRd = mosaic_rotations_with_derivative(spread_deg, n_domains)
    left = binv @ U0.T                                    # Oᵀ U0ᵀ
    core = left @ R.T                                     # A⁻¹
    minv = np.einsum("ij,djk->dik", core, np.transpose(Rd, (0, 2, 1)))
    parts = []
    if want_rotation:
        for i in range(3):
            parts.append(np.einsum("ij,djk->dik", left @ dR[i].T, np.transpose(Rd, (0, 2, 1))))
    if want_cell:
        tail = U0.T @ R.T
        for i in range(param.n_free):
            parts.append(np.einsum("ij,djk->dik", dbinv[i] @ tail, np.transpose(Rd, (0, 2, 1))))
    if want_mosaic:
        parts.append(np.einsum("ij,djk->dik", core, np.transpose(dRd, (0, 2, 1))))
    dminv = np.stack(parts, axis=1) if parts else np.zeros((n_domains, 0, 3, 3))
    A = R @ U0 @ np.linalg.inv(binv)
    return minv, np.ascontiguousarray(dminv), A



def stored_domain_matrices(ds, param, want_rotation=True, want_cell=True, want_mosaic=True):
    """:func:`domain_matrices` of every lattice of a dataset at its stored crystal model (θ = 0).

    Returns
    -------
    minv : ndarray (n_dom_total, 3, 3)
    dminv : ndarray (n_dom_total, n_q, 3, 3)
    dom_off : int64 array (n_lat + 1,)
        Domains of lattice j are ``dom_off[j]:dom_off[j+1]`` (the layout of
        :meth:`spread_tools.model.lattice_batch.LatticeBatch.evaluate`).
    """
    mats, dms, off = [], [], [0]
    for j in range(ds.n_lattices):
        U0, p0 = split_orientation(ds.A[j], param)
        mi, dm, _ = domain_matrices(U0, np.zeros(3), param, p0, ds.mosaic_spread_deg[j], int(ds.n_domains[j]),
                                    want_rotation, want_cell, want_mosaic)
        mats.append(mi)
        dms.append(dm)
        off.append(off[-1] + len(mi))
    return np.concatenate(mats), np.concatenate(dms), np.asarray(off, dtype=np.int64)


def rotation_angle_deg(A1, A2):
    """Angle (degrees) of the rotation that takes the orientation of A1 to that of A2.

    The orientations are the rotation parts U of the polar decompositions, so cell changes
    do not count.
    """
    def orient(A):
        u, _, vt = np.linalg.svd(np.asarray(A, dtype=np.float64))
        return u @ vt
    # A = U B with B upper/lower triangular differs from the polar factor; compare the
    # rotations that take the reciprocal axes of one to the other instead
    r = orient(A2 @ np.linalg.inv(A1))
    return math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)))
