#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Slurm: ImageNet linear probe (PROTOCOLS B: 52 classifiers, global batch 512, 10 epochs).
#   BACKBONE=out/b_dinov2l/backbone.pth sbatch scripts/slurm/linear.sh [linear_eval.main flags...]
# Env: BACKBONE (required), DATA (/data/imagenet), OUT (<backbone dir>/linear), GLOBAL_BATCH
# (512, split over the GPUs) or BATCH (per process). Results: OUT/results.json ("best").
# Requeue: linear_eval.main resumes from OUT/checkpoint.pth (written every epoch); it is
# requeued when the step exits 75 (scripts/slurm/common.sh).
#
# Resources (sbatch command-line options override these). Remove one "#" to set a partition.
#SBATCH --job-name=proteus-linear
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
##SBATCH --partition=your_partition
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
set -euo pipefail

BACKBONE=${BACKBONE:?set BACKBONE=<backbone.pth or checkpoint.pth>}
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-$(dirname "$BACKBONE")/linear}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
# sbatch runs a copy of this file from its spool: find the repository through the submit dir.
PROTEUS_ROOT=${PROTEUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

# shellcheck source=common.sh
source "$PROTEUS_ROOT/scripts/slurm/common.sh"
batch=$(per_process_batch "$GLOBAL_BATCH")
run_per_node "$PROTEUS_ROOT/scripts/torchrun.sh" -m linear_eval.main \
    --data-path "$DATA" --backbone "$BACKBONE" --batch-size "$batch" --output-dir "$OUT" "$@"
