"""DIALS stills: ``.expt`` (JSON), ``.refl`` (msgpack) and spectrum readers, and the importer.

* :mod:`spread_tools.io.dials.expt` — experiment lists (beams, hierarchical detectors, crystals);
* :mod:`spread_tools.io.dials.refl` — reflection tables and shoeboxes;
* :mod:`spread_tools.io.dials.spectra` — ``.lam`` and HDF5 spectra, rebinning onto channels;
* :mod:`spread_tools.io.dials.importer` — shot lists → :class:`~spread_tools.io.dataset.Dataset`.
"""

from spread_tools.io.dials.expt import ExperimentList, read_expt
from spread_tools.io.dials.importer import (
           ImportSettings,
           Shot,
           build_dataset,
           export_dials,
           read_shot_list,
)
from spread_tools.io.dials.refl import ReflectionTable, read_refl, write_refl
from spread_tools.io.dials.spectra import Spectrum, read_spectrum, rebin_spectrum

__all__ = ["ExperimentList", "read_expt", "ImportSettings", "Shot", "build_dataset", "export_dials",
           "read_shot_list", "ReflectionTable", "read_refl", "write_refl", "Spectrum",
           "read_spectrum", "rebin_spectrum"]
