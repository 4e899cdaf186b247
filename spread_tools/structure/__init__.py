"""Structure factors: Miller indices, the SF cache, building it from a model, evaluating it.

* :mod:`spread_tools.structure.miller` — Miller indices, systematic absences, 1/d²;
* :mod:`spread_tools.structure.cache` — :class:`SFCache` (``format = "spread_tools.sf_cache"``);
* :mod:`spread_tools.structure.build` — :func:`build_sf_cache` from a PDB/mmCIF model (gemmi);
* :mod:`spread_tools.structure.routes` — direct and FFT summation of the model;
* :mod:`spread_tools.structure.factors` — F(h, E) and I(h, E) with their f′/f″ gradients.
"""

from spread_tools.structure.build import (
           SiteSpec,
           build_sf_cache,
           parse_sites,
           read_model,
)
from spread_tools.structure.cache import SFCache
from spread_tools.structure.factors import intensity_and_gradients, structure_factors
from spread_tools.structure.miller import (
           b_matrix,
           miller_indices,
           systematically_absent,
)

__all__ = ["SiteSpec", "build_sf_cache", "parse_sites", "read_model", "SFCache",
           "intensity_and_gradients", "structure_factors", "b_matrix", "miller_indices",
           "systematically_absent"]
