"""The Kramers–Kronig operator for anomalous scattering factors.

Convention (Cromer–Liberman, Henke; f = f0 + f′ + i f″ with f″ >= 0)::

    f′(E)  =  (2/π) P∫₀^∞ E′ f″(E′) / (E² − E′²) dE′
    f″(E)  = −(2E/π) P∫₀^∞   f′(E′) / (E² − E′²) dE′

Using 2E′/(E² − E′²) = 1/(E − E′) − 1/(E + E′) and 2E/(E² − E′²) = 1/(E − E′) + 1/(E + E′)::

    f′(E) = (1/π) [I₋ − I₊](f″),    f″(E) = −(1/π) [I₋ + I₊](f′),
    I₋(u)(E) = P∫ u(x)/(E − x) dx,   I₊(u)(E) = ∫ u(x)/(E + x) dx.

(This is the odd-extension convention: f″(−E) = −f″(E), f′(−E) = f′(E). A
damped oscillator that satisfies it is f′ + i f″ = A E0² / (E² − E0² − iγE);
the pair A E0²/(E0² − E² − iγE) has f′ of the opposite sign, see
``tests/physics/test_kk.py``.)

Discretisation
--------------
``u`` is taken piecewise linear between the nodes x_0 < … < x_N and zero
outside [x_0, x_N]. On a segment [a, b] with slope s the principal-value
integral is exact::

    ∫_a^b L(x)/(E − x) dx = u_a ln|E − a| − u_b ln|E − b| + s [g(E − a) − g(E − b)] − (u_b − u_a),
    g(t) = t ln|t|,   g(0) = 0.

Summed over the segments, the interior ln|E − x_j| terms cancel (f″ is
continuous there), leaving only t ln|t| terms, which are finite at t = 0:
the matrix is exact and finite when an output energy equals an interior
node. At an *end* node with u ≠ 0 the zero continuation has a jump and the
true transform diverges logarithmically there; the matrix holds the finite
part (the ln|E − x_end| term dropped), which is exact whenever u vanishes at
that end (e.g. the padded form used by the restraint, see
:func:`padded_kk_matrix`).

Cost and memory
---------------
``kk_matrix`` builds the dense (n_out × n_in) matrix in row chunks (about
``chunk_bytes`` per temporary array). For a 24,000-row table that is only
needed on a window (≈100 output energies) this is 100 × 24,000 entries,
milliseconds. The full 24,000² matrix (4.6 GB) is never needed:
:func:`kk_transform` applies the operator without storing it, and on a
uniform grid with outputs at the nodes (the 1 eV tables) it uses the
Toeplitz (E − x) and Hankel (E + x) structure of the matrix: two FFT
convolutions, O(n log n), ≈10 ms for 24,000 points.
"""

from __future__ import annotations

import numpy as np

from spread_tools.errors import InputError

__all__ = ["kk_matrix", "kk_transform", "padded_kk_matrix", "check_grid", "kk_consistency",
           "KKCheck", "KINDS", "CHECK_MODES", "CHECK_METRICS"]

KINDS = ("fdp_to_fp", "fp_to_fdp")


def check_grid(energy_ev, name="energy_ev", allow_zero=True):
    """Check that an energy grid is 1-D, finite, strictly increasing and not negative.

    Parameters
    ----------
    energy_ev : array_like
        Energies (eV).
    name : str
        Name used in the error message.
    allow_zero : bool
        Accept a first energy of exactly 0 eV.

    Returns
    -------
    numpy.ndarray
        The grid as float64.

    Raises
    ------
    InputError
        Not 1-D, fewer than 2 points, NaN/inf, not strictly increasing, negative.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise InputError(f"{name}: needs a 1-D grid of at least 2 energies, got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise InputError(f"{name}: contains NaN or inf")
    d = np.diff(e)
    if np.any(d <= 0):
        i = int(np.argmax(d <= 0))
        raise InputError(f"{name}: energies are not strictly increasing "
                         f"({e[i]:g} then {e[i + 1]:g} eV at positions {i}-{i + 1})")
    if e[0] < 0 or (e[0] == 0 and not allow_zero):
        raise InputError(f"{name}: energies must be positive, first is {e[0]:g} eV")
    return e


def _g(t):
    """t ln|t| with the limit 0 at t = 0."""
    out = np.zeros_like(t)
    nz = t != 0
    out[nz] = t[nz] * np.log(np.abs(t[nz]))
    return out


def _log_abs_finite(t):
    """ln|t|, with 0 (the finite part) where t = 0."""
    out = np.zeros_like(t)
    nz = t != 0
    out[nz] = np.log(np.abs(t[nz]))
    return out


def _rows(x, e_out, sign):
    """Matrix rows (len(e_out), len(x)) of (1/π)(I₋ + sign·I₊)."""
    h = np.diff(x)
    t_minus = e_out[:, None] - x[None, :]            # E − x_j
    t_plus = e_out[:, None] + x[None, :]             # E + x_j  (> 0)
    gm = _g(t_minus)
    gp = _g(t_plus)
    # I₋: D_k = [g(E − x_k) − g(E − x_{k+1})]/h_k, coefficient of u_j is D_{j−1} − D_j
    d = (gm[:, :-1] - gm[:, 1:]) / h
    c_minus = np.zeros_like(gm)
    c_minus[:, 1:] += d
    c_minus[:, :-1] -= d
    c_minus[:, 0] += _log_abs_finite(t_minus[:, 0]) + 1.0
    c_minus[:, -1] -= _log_abs_finite(t_minus[:, -1]) + 1.0
    # I₊: B_k = [g(E + x_{k+1}) − g(E + x_k)]/h_k, coefficient of u_j is B_j − B_{j−1}
    b = (gp[:, 1:] - gp[:, :-1]) / h
    c_plus = np.zeros_like(gp)
    c_plus[:, :-1] += b
    c_plus[:, 1:] -= b
    c_plus[:, -1] += np.log(t_plus[:, -1]) + 1.0
    c_plus[:, 0] -= _log_abs_finite(t_plus[:, 0]) + 1.0
    return (c_minus + sign * c_plus) / np.pi


def _prepare(energy_in_ev, energy_out_ev, kind):
    if kind not in KINDS:
        raise InputError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    x = check_grid(energy_in_ev, "energy_in_ev")
    if energy_out_ev is None:
        e = x
    else:
        e = np.atleast_1d(np.asarray(energy_out_ev, dtype=np.float64))
        if e.ndim != 1:
            raise InputError(f"energy_out_ev: needs a 1-D array, got shape {e.shape}")
        if not np.all(np.isfinite(e)):
            raise InputError("energy_out_ev: contains NaN or inf")
    if e.size and (np.any(e <= 0)):
        raise InputError("energy_out_ev: output energies must be positive")
    # sign of the I₊ term: f″→f′ is (I₋ − I₊)/π, f′→f″ is −(I₋ + I₊)/π
    return x, e, (-1.0 if kind == "fdp_to_fp" else 1.0), (1.0 if kind == "fdp_to_fp" else -1.0)


def kk_matrix(energy_in_ev, energy_out_ev=None, kind="fdp_to_fp", chunk_bytes=64 * 2**20):
    """Dense Kramers–Kronig matrix for piecewise-linear curves on a grid.

    Parameters
    ----------
    energy_in_ev : array_like
        Strictly increasing nodes (eV), shape (n_in,), >= 0. The input curve
        is linear between nodes and zero outside [first, last].
    energy_out_ev : array_like, optional
        Positive output energies (eV), shape (n_out,), any order; default the
        input nodes.
    kind : str
        ``"fdp_to_fp"`` (default): f′ = K f″. ``"fp_to_fdp"``: f″ = K f′
        (the inverse relation, for checks).
    chunk_bytes : int
        Size of the temporary arrays per row chunk (bytes).

    Returns
    -------
    numpy.ndarray
        K, float64 (n_out, n_in): exact for piecewise-linear input (see the
        module notes for output energies at the end nodes).

    Raises
    ------
    InputError
        Grid not increasing, NaN, negative energies, unknown ``kind``.
    """
    x, e, sign, scale = _prepare(energy_in_ev, energy_out_ev, kind)
    out = np.empty((e.size, x.size))
    step = max(1, int(chunk_bytes // (8 * x.size)))
    for i in range(0, e.size, step):
        out[i:i + step] = scale * _rows(x, e[i:i + step], sign)
    return out


def _uniform_step(x, rtol=1e-9):
    h = np.diff(x)
    h0 = (x[-1] - x[0]) / (x.size - 1)
    if np.all(np.abs(h - h0) <= rtol * h0):
        return h0
    return None


def _fft_transform(x, u, h, sign):
    """(1/π)(I₋ + sign·I₊) u at the nodes of a uniform grid, by FFT convolutions."""
    from scipy.signal import fftconvolve
    n = x.size
    x0 = x[0]
    # I₋ at E_i = x_i: coefficient of u_j depends on m = i − j only (interior nodes):
    # T(m) = [g((m+1)h) − 2 g(mh) + g((m−1)h)]/h,  m = −(n−1) … n−1.
    m = np.arange(-n, n + 1, dtype=np.float64)
    gm = _g(m * h)
    d = (gm[1:] - gm[:-1]) / h                        # d(m) = [g(mh) − g((m−1)h)]/h for m = −n+1 … n
    T = d[1:] - d[:-1]                                 # T(m), m = −n+1 … n−1   (length 2n−1)
    i_minus = fftconvolve(u, T, mode="full")[n - 1:2 * n - 1]
    # end corrections: true coefficient of u_0 is −d(i) + ln|E−x0| + 1, Toeplitz gave d(i+1) − d(i);
    # of u_N: d(i−N+1) − (ln|E−x_N| + 1), Toeplitz gave d(i−N+1) − d(i−N).
    idx = np.arange(n)
    dd = lambda k: d[k + n - 1]                        # noqa: E731  d(k) for k = −n+1 … n
    tm0 = (x - x0)
    tmN = (x - x[-1])
    i_minus += u[0] * (-dd(idx + 1) + _log_abs_finite(tm0) + 1.0)
    i_minus += u[-1] * (dd(idx - (n - 1)) - _log_abs_finite(tmN) - 1.0)
    # I₊ at E_i: coefficient of u_j (interior) is H(i+j) = b(i+j) − b(i+j−1),
    # b(p) = [g(2x0 + (p+1)h) − g(2x0 + ph)]/h, p = −1 … 2n−2.
    p = np.arange(-1, 2 * n, dtype=np.float64)
    gp = _g(2 * x0 + p * h)
    b = (gp[1:] - gp[:-1]) / h                         # b(p) for p = −1 … 2n−2
    H = b[1:] - b[:-1]                                 # H(q), q = 0 … 2n−2
    i_plus = fftconvolve(H, u[::-1], mode="full")[n - 1:2 * n - 1]
    bb = lambda k: b[k + 1]                            # noqa: E731
    # coefficient of u_0: B_0 − ln(E+x0) − 1 where B_0 = b(i), Hankel gave b(i) − b(i−1)
    # coefficient of u_N: −B_{N−1} + ln(E+x_N) + 1 = −b(i+N−1) + …, Hankel gave b(i+N) − b(i+N−1)
    i_plus += u[0] * (bb(idx - 1) - _log_abs_finite(x + x0) - 1.0)
    i_plus += u[-1] * (-bb(idx + n - 1) + np.log(x + x[-1]) + 1.0)
    return (i_minus + sign * i_plus) / np.pi


def kk_transform(energy_ev, values, energy_out_ev=None, kind="fdp_to_fp",
                 chunk_bytes=64 * 2**20):
    """Apply the Kramers–Kronig operator without storing the full matrix.

    Parameters
    ----------
    energy_ev : array_like
        Strictly increasing nodes (eV), shape (n,).
    values : array_like
        Curve at the nodes, shape (n,) or (m, n) for several curves; linear
        between nodes, zero outside.
    energy_out_ev : array_like, optional
        Output energies (eV); default the nodes. With the default on a
        uniform grid the transform uses FFTs (O(n log n)); otherwise the
        matrix is built row chunk by row chunk.
    kind : str
        ``"fdp_to_fp"`` or ``"fp_to_fdp"``.
    chunk_bytes : int
        Temporary memory per row chunk (bytes).

    Returns
    -------
    numpy.ndarray
        Transformed curve(s), shape (n_out,) or (m, n_out).
    """
    x, e, sign, scale = _prepare(energy_ev, energy_out_ev, kind)
    u = np.asarray(values, dtype=np.float64)
    if u.shape[-1:] != x.shape or u.ndim > 2:
        raise InputError(f"values: shape {u.shape} does not match the grid ({x.size},)")
    if not np.all(np.isfinite(u)):
        raise InputError("values: contain NaN or inf")
    h = _uniform_step(x) if energy_out_ev is None else None
    if h is not None and x[0] > 0:
        if u.ndim == 1:
            return scale * _fft_transform(x, u, h, sign)
        return np.stack([scale * _fft_transform(x, row, h, sign) for row in u])
    out = np.empty(u.shape[:-1] + (e.size,))
    step = max(1, int(chunk_bytes // (8 * x.size)))
    for i in range(0, e.size, step):
        k = scale * _rows(x, e[i:i + step], sign)
        out[..., i:i + step] = u @ k.T
    return out


def padded_kk_matrix(energy_ev, pad_ev, kind="fdp_to_fp"):
    """KK matrix on a window whose curve is ramped linearly to zero over ``pad_ev``.

    This is the operator of the differential KK restraint: Δf″ is known on
    the window nodes x_0 … x_N, continued linearly from Δf″(x_0) at x_0 to 0
    at x_0 − pad and from Δf″(x_N) at x_N to 0 at x_N + pad, and zero beyond.
    The ramps are piecewise linear, so they are the end hat functions of the
    grid extended by the two nodes x_0 − pad and x_N + pad (where the value
    is 0): the result is exact and finite at every window node.

    Parameters
    ----------
    energy_ev : array_like
        Window nodes (eV), strictly increasing, shape (n,).
    pad_ev : float
        Ramp length (eV), > 0 and < energy_ev[0].
    kind : str
        ``"fdp_to_fp"`` or ``"fp_to_fdp"``.

    Returns
    -------
    numpy.ndarray
        K (n, n): transform evaluated at the window nodes.
    """
    x = check_grid(energy_ev, "energy_ev", allow_zero=False)
    pad = float(pad_ev)
    if not np.isfinite(pad) or pad <= 0:
        raise InputError(f"pad: must be a positive number of eV, got {pad_ev!r}")
    if pad >= x[0]:
        raise InputError(f"pad: {pad:g} eV reaches below 0 eV from the first energy {x[0]:g} eV")
    ext = np.concatenate([[x[0] - pad], x, [x[-1] + pad]])
    return kk_matrix(ext, x, kind=kind)[:, 1:-1]


# --------------------------------------------------------------------------- consistency check

CHECK_MODES = ("auto", "table", "restraint")
#: the figures a threshold can apply to (:attr:`KKCheck.metric`)
CHECK_METRICS = ("rms_about_mean", "rms", "max_abs")


class KKCheck:
    """Result of :func:`kk_consistency` (all arrays on the window nodes).

    Attributes
    ----------
    energy_ev, fp, fdp : numpy.ndarray
        Window nodes (eV) and the curve's f′, f″ there (e⁻).
    fp_kk : numpy.ndarray
        f′ predicted from f″ by Kramers–Kronig (e⁻).
    residual : numpy.ndarray
        fp − fp_kk (e⁻).
    fp_ref, fdp_ref : numpy.ndarray or None
        The (self-consistent) reference curve at the window nodes (None without a reference).
    mode : str
        ``"table"`` or ``"restraint"`` (see :func:`kk_consistency`).
    rms, max_abs, mean : float
        rms, largest absolute value and mean of the residual (e⁻).
    offset : float
        The best constant offset (least squares: the mean), e⁻: what untabulated far
        tails or another relativistic convention leave in f′.
    rms_about_mean : float
        rms of the residual minus that offset (e⁻): the shape disagreement; the figure
        ``kk_check``'s threshold applies to by default.
    energy_at_max_ev : float
        Where the largest absolute residual is (eV).
    """

    def __init__(self, energy_ev, fp, fdp, fp_kk, fp_ref, fdp_ref, mode):
        self.energy_ev, self.fp, self.fdp, self.fp_kk = energy_ev, fp, fdp, fp_kk
        self.fp_ref, self.fdp_ref, self.mode = fp_ref, fdp_ref, mode
        self.residual = fp - fp_kk
        self.rms = float(np.sqrt(np.mean(self.residual ** 2)))
        i = int(np.argmax(np.abs(self.residual)))
        self.max_abs = float(abs(self.residual[i]))
        self.energy_at_max_ev = float(energy_ev[i])
        self.mean = float(np.mean(self.residual))
        self.offset = self.mean
        self.rms_about_mean = float(np.sqrt(np.mean((self.residual - self.mean) ** 2)))

    def metric(self, name):
        """The figure ``name`` (one of :data:`CHECK_METRICS`), e⁻."""
        if name not in CHECK_METRICS:
            raise InputError(f"parameter metric: {name!r} is not one of {', '.join(CHECK_METRICS)}")
        return float(getattr(self, name))


def kk_consistency(energy_ev, fp, fdp, min_ev, max_ev, element="Fe", reference="chantler",
                   mode="auto", pad_ev=100.0, source="table"):
    """How well a tabulated f′ agrees with the Kramers–Kronig transform of its f″.

    Parameters
    ----------
    energy_ev, fp, fdp : array_like
        The curve (eV, e⁻, e⁻), strictly increasing energies, one length.
    min_ev, max_ev : float
        Window (eV) in which the residual is evaluated, at the table's nodes;
        it must lie inside the table.
    element : str
        Element of the reference curve.
    reference : str or ReferenceCurve
        ``"chantler"``, ``"cromer_liberman"``, ``"none"``, or a
        :class:`spread_tools.physics.kk_reference.ReferenceCurve`. A named reference is
        made self-consistent (:func:`spread_tools.physics.kk_reference.reference_curve`:
        its f′ is C + KK of its own f″), so it adds no false floor.
    mode : str
        ``"table"``: KK(f″) = C + KK[the table's f″ (linear between rows) over the whole
        table, the reference's f″ below its first and above its last row]; nothing
        inside the table comes from the reference. ``"restraint"``: what the refinement's
        KK terms see (:class:`spread_tools.physics.kk_reference.WindowKK`): f″ of the window
        rows only, joined to the reference by linear ramps over ``pad_ev``. ``"auto"``:
        ``"table"`` when the table extends at least ``pad_ev`` beyond both ends of the
        window (measured tables), else ``"restraint"`` (refinement results on their grid).
        With ``reference="none"`` the transform uses the table's f″ alone (restraint
        mode: ramped to zero); the missing tails then show as a slowly varying offset.
    pad_ev : float
        Ramp length (eV) of the ``"restraint"`` mode and the margin of ``"auto"``.
    source : str
        Name of the curve for messages.

    Returns
    -------
    KKCheck

    Raises
    ------
    InputError
        Different lengths, NaN, non-increasing energies, a window not inside
        the table or with fewer than 2 nodes, unknown mode/reference.
    """
    e = np.asarray(energy_ev, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    fdp = np.asarray(fdp, dtype=np.float64)
    if e.ndim != 1 or fp.shape != e.shape or fdp.shape != e.shape:
        raise InputError(f"{source}: energy, f' and f'' must have one length "
                         f"(got {e.shape}, {fp.shape}, {fdp.shape})")
    e = check_grid(e, f"{source}: energy", allow_zero=False)
    for name, a in (("f'", fp), ("f''", fdp)):
        if not np.all(np.isfinite(a)):
            raise InputError(f"{source}: {name} contains NaN or inf")
    if mode not in CHECK_MODES:
        raise InputError(f"parameter mode: {mode!r} is not one of {', '.join(CHECK_MODES)}")
    lo, hi = float(min_ev), float(max_ev)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
        raise InputError(f"parameter window: min_ev {lo:g} must be below max_ev {hi:g}")
    if lo < e[0] or hi > e[-1]:
        raise InputError(f"parameter window: {lo:g}-{hi:g} eV is not inside the table "
                         f"{source} ({e[0]:g}-{e[-1]:g} eV)")
    win = (e >= lo) & (e <= hi)
    if win.sum() < 2:
        raise InputError(f"parameter window: {lo:g}-{hi:g} eV holds {int(win.sum())} table "
                         f"energies of {source}, need at least 2")
    pad = float(pad_ev)
    if not (np.isfinite(pad) and pad > 0):
        raise InputError(f"parameter pad: must be > 0 eV, got {pad_ev!r}")
    if mode == "auto":
        mode = "table" if (e[0] <= lo - pad and e[-1] >= hi + pad) else "restraint"
    ew = e[win]
    from spread_tools.physics.kk_reference import ReferenceCurve, WindowKK, reference_curve
    if isinstance(reference, ReferenceCurve):
        ref = reference
    elif reference == "none":
        ref = None
    else:
        ref = reference_curve(element, reference)
    if ref is None:
        fp_kk = kk_matrix(e, ew) @ fdp if mode == "table" else padded_kk_matrix(ew, pad) @ fdp[win]
        return KKCheck(ew, fp[win], fdp[win], fp_kk, None, None, mode)
    if mode == "table":
        r = ref.energy_ev
        tol = 1e-9 * (e[-1] - e[0])
        below, above = r[r < e[0] - tol], r[r > e[-1] + tol]
        nodes = np.concatenate([below, e, above])
        vals = np.concatenate([ref.fdp(below), fdp, ref.fdp(above)])
        fp_kk = ref.constant + kk_matrix(nodes, ew) @ vals
    else:
        fp_kk = WindowKK(ew, ref, pad).fp(fdp[win])
    return KKCheck(ew, fp[win], fdp[win], fp_kk, ref.fp(ew), ref.fdp(ew), mode)
