#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Slurm: ImageNet weighted kNN (k 10/20/100/200, T 0.07).
#   BACKBONE=out/b_dinov2l/backbone.pth sbatch scripts/slurm/knn.sh [linear_eval.knn flags...]
# Env: BACKBONE (required), DATA (/data/imagenet), OUT (<backbone dir>/knn), BATCH (256 per
# process: no training, so the batch only sets speed and memory). Features are cached in
# OUT/features, so a requeued or re-submitted job skips the extraction it already did.
#
# Resources (sbatch command-line options override these). Remove one "#" to set a partition.
#SBATCH --job-name=proteus-knn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=4:00:00
##SBATCH --partition=your_partition
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
set -euo pipefail

BACKBONE=${BACKBONE:?set BACKBONE=<backbone.pth or checkpoint.pth>}
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-$(dirname "$BACKBONE")/knn}
BATCH=${BATCH:-256}
# sbatch runs a copy of this file from its spool: find the repository through the submit dir.
PROTEUS_ROOT=${PROTEUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

# shellcheck source=common.sh
source "$PROTEUS_ROOT/scripts/slurm/common.sh"
run_per_node "$PROTEUS_ROOT/scripts/torchrun.sh" -m linear_eval.knn \
    --data-path "$DATA" --backbone "$BACKBONE" --batch-size "$BATCH" --output-dir "$OUT" \
    --cache-dir "$OUT/features" "$@"
