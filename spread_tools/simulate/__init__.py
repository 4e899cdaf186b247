"""Synthetic SPREAD datasets with ground truth (``simulate_data``).

* :mod:`spread_tools.simulate.simulator` — the simulation, streamed to a dataset file;
* :mod:`spread_tools.simulate.sase` — SASE-like spectra;
* :mod:`spread_tools.simulate.background` — the smooth background and its shoebox planes.
"""

from spread_tools.simulate.simulator import (
    SimulationSettings,
    SimulationSummary,
    make_detector,
    simulate_dataset,
)

__all__ = ["SimulationSettings", "SimulationSummary", "make_detector", "simulate_dataset"]
