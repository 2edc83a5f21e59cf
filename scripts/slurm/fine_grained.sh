#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Slurm: 12 fine-grained datasets, logistic regression on frozen features (PROTOCOLS C).
# One process on one GPU (fine_grained.main is not distributed).
#   BACKBONE=out/b_dinov2l/backbone.pth sbatch scripts/slurm/fine_grained.sh [fine_grained.main flags...]
# Env: BACKBONE (required), DATA_ROOT (/data/fine_grained), OUT (<backbone dir>/fine_grained),
# DEVICE (cuda; fine_grained.main's own default is cpu), PYTHON (python). Features are cached in
# OUT/features, so a re-submitted job only redoes the regressions.
#
# Resources (sbatch command-line options override these). Remove one "#" to set a partition.
#SBATCH --job-name=proteus-fine-grained
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
##SBATCH --partition=your_partition
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
set -euo pipefail

BACKBONE=${BACKBONE:?set BACKBONE=<backbone.pth or checkpoint.pth>}
DATA_ROOT=${DATA_ROOT:-/data/fine_grained}
OUT=${OUT:-$(dirname "$BACKBONE")/fine_grained}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
# sbatch runs a copy of this file from its spool: find the repository through the submit dir.
PROTEUS_ROOT=${PROTEUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

# shellcheck source=common.sh
source "$PROTEUS_ROOT/scripts/slurm/common.sh"
run_single "$PYTHON" -m fine_grained.main --backbone "$BACKBONE" --data-path "$DATA_ROOT" \
    --output-dir "$OUT" --device "$DEVICE" --num-workers "${SLURM_CPUS_PER_TASK:-8}" "$@"
