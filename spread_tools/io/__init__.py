"""Files in and out: HDF5 helpers, the SPREAD dataset, DIALS readers and the importer.

* :mod:`spread_tools.io.h5io` — atomic writes, checked reads, the overwrite policy, output locks;
* :mod:`spread_tools.io.dataset` — :class:`Dataset` (``format = "spread_tools.dataset"``);
* :mod:`spread_tools.io.dials` — DIALS ``.expt``/``.refl``/spectra readers and ``import_dials``.
"""

from spread_tools.io.dataset import Dataset, Truth, concatenate, read_many
from spread_tools.io.h5io import (
                                  OutputLock,
                                  atomic_files,
                                  atomic_output,
                                  atomic_write_text,
                                  atomic_writer,
                                  check_readable,
                                  check_writable,
                                  open_checked,
                                  read_array,
                                  write_strings,
)

__all__ = ["Dataset", "Truth", "concatenate", "read_many", "OutputLock", "atomic_files",
           "atomic_output", "atomic_write_text",
           "atomic_writer", "check_readable", "check_writable", "open_checked", "read_array",
           "write_strings"]
