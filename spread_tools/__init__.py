"""spread_tools: per-site anomalous scattering factors f′(E), f″(E) from XFEL stills (SPREAD).

The package is a library (``spread_tools.*``) with thin command-line scripts on
top (``spread_tools.cli``): ``cache_sf``, ``simulate_data``, ``import_dials``,
``refine_fdp``, ``plot_curves`` and ``kk_check``.
"""

__version__ = "0.1.0"
