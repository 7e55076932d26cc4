#!/bin/bash
# Compress one conv layer on one node, with one process per GPU (or per CPU socket).
# The run is checkpointed after every greedy step: when the time limit nears, Slurm sends
# SIGTERM (--signal), carprune finishes the step, writes its checkpoint and exits 75; this script
# then requeues the job, and the requeued job resumes from the checkpoint with the same command.
#
#   sbatch examples/slurm/one_node.sh examples/configs/resnet20_cifar10.toml layer3.2.conv1 out/r20
#
#SBATCH --job-name=carprune
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@300          # SIGTERM to the job step 5 minutes before the limit
#SBATCH --requeue
#SBATCH --open-mode=append         # a requeued run appends to the same log
#SBATCH --output=carprune-%j.log

set -uo pipefail
CONFIG=${1:?config file}
LAYER=${2:?conv layer}
OUT=${3:?output directory}
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-1}}   # without GPUs: e.g. NPROC=4 and --threads

# Plain log lines (stderr is a file here); exit codes: 0 done, 2 bad input, 75 checkpointed.
srun torchrun --standalone --nproc_per_node "$NPROC" -m carprune compress \
    --config "$CONFIG" --layer "$LAYER" --out "$OUT"
RC=$?

# torchrun reports its own exit code, so read the run's state from run.json.
STATE=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['state'])" "$OUT/run.json" 2>/dev/null)
echo "carprune: torchrun exit $RC, run state '${STATE:-unknown}'"
case "$STATE" in
  done)      exit 0 ;;
  preempted) scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;   # resumes from $OUT/checkpoint.json
  *)         exit "${RC:-1}" ;;
esac
