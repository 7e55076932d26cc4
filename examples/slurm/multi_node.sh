#!/bin/bash
# Score (or compress) across several nodes: one torchrun per node, joined by a c10d rendezvous on
# the first node. The ablations are split across all ranks; the results equal a one-process run.
#
#   sbatch --nodes=4 examples/slurm/multi_node.sh examples/configs/resnet20_cifar10.toml out/scores
#
# Only rank 0 writes, so OUT needs to be visible to the node of rank 0 only; a shared file system
# is needed for resuming after a requeue (rank 0 may land on another node).
#
#SBATCH --job-name=carprune-mn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1        # one torchrun per node; it starts the per-GPU workers
#SBATCH --cpus-per-task=32
#SBATCH --gpus-per-node=4
#SBATCH --time=08:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=carprune-mn-%j.log

set -uo pipefail
CONFIG=${1:?config file}
OUT=${2:?output directory}
COMMAND=${COMMAND:-score}           # or compress (then also pass --layer via EXTRA)
EXTRA=${EXTRA:-}                    # further flags, e.g. EXTRA="--layer all --num-images 50000"
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-1}}

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# shellcheck disable=SC2086  # EXTRA is a list of flags
srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$NPROC" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
    -m carprune "$COMMAND" --config "$CONFIG" --out "$OUT" $EXTRA
RC=$?

STATE=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$OUT/run.json" 2>/dev/null)
echo "carprune: exit $RC, run state '${STATE:-unknown}'"
case "$STATE" in
  done)      exit 0 ;;
  preempted) scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;   # score resumes at the next layer
  *)         exit "${RC:-1}" ;;
esac
