#!/usr/bin/env bash
# The SPREAD chain on the embedded test data, as a beamline scientist would run it:
#   cache_sf -> refine_geometry -> refine_fdp -> plot_curves -> kk_check
# Usage: bash bin/spread_example.sh [OUTDIR] [--overwrite]
# The dataset is the embedded test_data/dataset.h5 (40 simulated lattices, made by
# simulate_data with the command in test_data/README.md); this script does not simulate.
# With 40 lattices the restraints carry much of the information: the reported sigma
# includes their bias (uncertainty.calibrate, the default), see the README.
set -euo pipefail
out=${1:-example_out}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
td="$here/test_data"
mkdir -p "$out"

echo "== cache_sf: structure factors of the ferredoxin model, sites FE1 and FE2"
cache_sf "$td/models/6lk1.pdb" -o "$out/sf_cache.h5" "$@" \
    sites=FE1=FES/FE1,FE2=FES/FE2 d_min=2.5 d_max=4.0 \
    energy.min_ev=7070 energy.max_ev=7170 energy.step_ev=4

echo "== refine_geometry: per-lattice crystal models and the spectrometer's energy offset"
refine_geometry "$td/dataset.h5" --sf-cache "$out/sf_cache.h5" -o "$out/refined.h5" "$@"

echo "== refine_fdp: f' and f'' of FE1 and FE2 on a 4 eV grid (Sauter restraints)"
refine_fdp "$out/refined.h5" --sf-cache "$out/sf_cache.h5" -o "$out/result.h5" "$@"

echo "== plot_curves: refined curves against the simulation truth"
plot_curves "$out/result.h5" --truth "$td/dataset.h5" -o "$out/curves.png" "$@"

echo "== kk_check: Kramers-Kronig consistency of the refined FE1 curve"
kk_check "$out/result.h5" site=FE1 window.min_ev=7070 window.max_ev=7170 -o "$out/kk_FE1" "$@"

echo "== done: $out/refined.lattices.csv, $out/result.csv, $out/curves.png, $out/kk_FE1.csv/.png"
