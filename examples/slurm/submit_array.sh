#!/bin/bash
# Queue the per-layer array (one task per conv layer of the config's model) and the merge that
# runs after every task has succeeded (requeued tasks included).
#
#   examples/slurm/submit_array.sh examples/configs/resnet20_cifar10.toml out/r20-layers

set -euo pipefail
CONFIG=${1:?config file}
OUT=${2:?output root}
HERE=$(cd "$(dirname "$0")" && pwd)

N=$(python -m carprune layers --config "$CONFIG" | wc -l)
echo "$N conv layers"
ARRAY=$(sbatch --parsable --array=0-$((N - 1)) "$HERE/compress_array.sh" "$CONFIG" "$OUT")
MERGE=$(sbatch --parsable --dependency=afterok:"$ARRAY" "$HERE/merge_report.sh" "$CONFIG" "$OUT")
echo "array job $ARRAY, merge job $MERGE"
