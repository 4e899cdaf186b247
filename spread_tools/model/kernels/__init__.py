"""Numba kernels of the pixel model (see ``spread_tools.model.pixel`` for the user-level API).

* :mod:`spread_tools.model.kernels.cpu` — the dense channel-weight kernel
  (``@numba.njit(parallel=True, cache=True)``).
* :mod:`spread_tools.model.kernels.cuda` — its ``@numba.cuda.jit`` twin and the fixed-order
  reductions (import works without a GPU; they run under ``NUMBA_ENABLE_CUDASIM=1``).
* :mod:`spread_tools.model.kernels.bands_cpu`, :mod:`spread_tools.model.kernels.bands_cuda` — the
  channel-banded pixel model: bands built from the closed-form window of every pixel,
  the NLL/gradient pass, λ, on the CPU and the GPU with the same answers.

Both take the same flat arrays (all float64 unless noted):

lattice level
    ``minv`` (n_dom_total, 3, 3) = (R_d A)⁻¹ of every mosaic domain of every lattice,
    ``dom_off`` (n_lat+1,) int64 (domains of lattice j are ``dom_off[j]:dom_off[j+1]``),
    ``s0hat`` (n_lat, 3) unit vector along s0, ``pol_n`` (n_lat, 3), ``pol_f`` (n_lat,),
    ``nabc`` (n_lat, 3) domain size in cells, ``phi`` (n_lat, n_chan) photons/Å².
panels
    ``porig`` (n_panel, 3) mm, ``pfast``, ``pslow`` (n_panel, 3) unit vectors, ``pnorm`` = fast × slow
    (not normalised, so that ω = pixel_fast·pixel_slow·|ŝ·pnorm|/|r|² is exact for non-orthogonal
    axes), ``ppix`` (n_panel, 2) mm.
shoeboxes
    ``pix_off`` (n_sb+1,) int64, ``bbox`` (n_sb, 4) int64 x0, x1, y0, y1, ``sb_lat``, ``sb_panel``,
    ``sb_h`` (n_sb,) int64, ``h0`` (n_sb, 3) Miller index as float64.
channels
    ``inv_lam`` (n_chan,) = E_c / hc in Å⁻¹.

Layout of the dense channel weights ``w`` (float32): ``(n_pix, n_chan)`` row-major
(CUDA: flat, ``p*stride_p + c*stride_c``). The banded layout is described in
:mod:`spread_tools.model.bands`.
"""

#: 0.63 of nanoBragg's Gaussian shape transform.
GAUSS_SHAPE_CONST = 0.63
#: Classical electron radius squared in Å².
R_E2_A2 = 2.8179403262e-5 ** 2
