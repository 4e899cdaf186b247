"""The forward model: geometry, prediction, spectrum channels and the pixel model.

* :mod:`spread_tools.model.geometry` — beams, panels, detectors, crystals (DIALS conventions);
* :mod:`spread_tools.model.predict` — orientations, reflections in diffraction, shoeboxes;
* :mod:`spread_tools.model.spectra` — the common channel grid;
* :mod:`spread_tools.model.bands` — channel bands: per pixel only the channels whose weight counts;
* :mod:`spread_tools.model.pixel` — channel weights w, λ, the Poisson NLL and its gradients;
* :mod:`spread_tools.model.kernels` — the Numba CPU and CUDA kernels behind :mod:`~spread_tools.model.pixel`.
"""

from spread_tools.model.bands import ChannelBands, build_bands
from spread_tools.model.geometry import HC_EV_A, Beam, Crystal, Detector, Panel
from spread_tools.model.pixel import (
           PixelModel,
           channel_weights,
           direct_lambda,
           resolve_backend,
)

__all__ = ["HC_EV_A", "Beam", "ChannelBands", "Crystal", "Detector", "Panel", "PixelModel", "build_bands",
           "channel_weights", "direct_lambda", "resolve_backend"]
