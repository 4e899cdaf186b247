"""Scattering-factor physics: tabulated f′/f″ and references, the Kramers–Kronig operator.

* :mod:`spread_tools.physics.scattering` — table readers, Chantler/Cromer–Liberman references;
* :mod:`spread_tools.physics.kk` — the exact KK operator and the consistency check.
"""

from spread_tools.physics.kk import (
           kk_consistency,
           kk_matrix,
           kk_transform,
           padded_kk_matrix,
)
from spread_tools.physics.scattering import (
           SpectrumTable,
           read_table,
           reference_fp_fdp,
           reference_table,
)

__all__ = ["kk_consistency", "kk_matrix", "kk_transform", "padded_kk_matrix", "SpectrumTable",
           "read_table", "reference_fp_fdp", "reference_table"]
