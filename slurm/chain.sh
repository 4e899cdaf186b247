#!/bin/bash
# Submit the SPREAD chain cache_sf -> refine_geometry -> refine_fdp -> plot_curves + kk_check
# with dependencies.
# Usage: bash chain.sh cpu|gpu MODEL.pdb OUTDIR DATASET.h5
# (refine_geometry writes OUTDIR/refined.h5, which refine_fdp then refines)
# Extra sbatch options (account, partition, QOS) via SBATCH_* environment variables,
# e.g. SBATCH_ACCOUNT=myproj SBATCH_PARTITION=gpu bash chain.sh gpu ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# the tools of this checkout (bin/), unless SPREAD_BIN is set already; sbatch passes the environment on
export SPREAD_BIN=${SPREAD_BIN:-$(cd "$here/../bin" && pwd)}
kind=$1; model=$2; out=$3; shift 3
case $kind in cpu|gpu) ;; *) echo "chain.sh: first word must be cpu or gpu" >&2; exit 2;; esac
j1=$(sbatch --parsable "$here/cache_sf.sbatch" "$model" "$out")
data=$1
backend=$([ "$kind" = gpu ] && echo backend=cuda || echo backend=cpu)
j2=$(sbatch --parsable --dependency=afterok:$j1 "$here/refine_geometry.sbatch" "$out" "$data" "$backend")
j3=$(sbatch --parsable --dependency=afterok:$j2 "$here/refine_fdp_$kind.sbatch" "$out" "$out/refined.h5")
j4=$(sbatch --parsable --dependency=afterok:$j3 "$here/plot_kk.sbatch" "$out")
echo "submitted: cache_sf $j1, refine_geometry $j2, refine_fdp $j3, plot_curves+kk_check $j4 (outputs in $out)"
