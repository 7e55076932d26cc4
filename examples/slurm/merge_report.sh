#!/bin/bash
# Merge the per-layer results of compress_array.sh into one report: OUT/report/report.md (one
# table row per layer) and, with the model and data of the config, an interpretation page per
# layer linked from OUT/report/index.html.
#
#   sbatch --dependency=afterok:<array job id> examples/slurm/merge_report.sh CONFIG OUT
#
#SBATCH --job-name=carprune-report
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --output=carprune-report-%j.log

set -euo pipefail
CONFIG=${1:?config file}
OUT=${2:?output root}

mapfile -t DIRS < <(find "$OUT" -mindepth 2 -maxdepth 2 -name result.json -printf '%h\n' | sort)
if [ "${#DIRS[@]}" -eq 0 ]; then
  echo "no finished layers under $OUT"; exit 2
fi
srun python -m carprune report --config "$CONFIG" --title "$(basename "$OUT")" \
    --out "$OUT/report" "${DIRS[@]}"
