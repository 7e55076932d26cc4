#!/bin/bash
# One array task per conv layer: task i compresses the i-th conv layer of the model into
# OUT/<layer>/. Submit with submit_array.sh, which sizes the array and queues the merge.
#
#   sbatch --array=0-18 examples/slurm/compress_array.sh CONFIG OUT
#
#SBATCH --job-name=carprune-layer
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=carprune-layer-%A_%a.log

set -uo pipefail
CONFIG=${1:?config file}
OUT=${2:?output root}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

LAYER=$(python -m carprune layers --config "$CONFIG" | sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" | cut -d' ' -f1)
if [ -z "$LAYER" ]; then
  echo "task $SLURM_ARRAY_TASK_ID: no such conv layer (the model has fewer)"; exit 2
fi
echo "task $SLURM_ARRAY_TASK_ID: $LAYER"

srun python -m carprune compress --config "$CONFIG" --layer "$LAYER" --out "$OUT/$LAYER" \
    --threads "$OMP_NUM_THREADS"
RC=$?
case $RC in
  0)  ;;
  75) echo "$LAYER: checkpointed; requeueing"
      scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; RC=0 ;;
  2)  echo "$LAYER: input or settings error; not retrying" ;;
  *)  echo "$LAYER: failed ($RC)" ;;
esac
exit $RC
