#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Slurm: distillation pretraining of one recipe, any number of nodes, requeued before the time
# limit until it finishes. Submit from the repository root:
#   DATA=/data/imagenet sbatch scripts/slurm/pretrain.sh b_dinov2l [pretrain.main flags...]
#   DATA=/data/imagenet OUT=out/b2 sbatch --nodes=2 scripts/slurm/pretrain.sh b_dinov2l
# The global batch stays 512 at any node/GPU count (scripts/pretrain.sh).
#
# Resources (sbatch options on the command line override these lines). One task per node: its
# torchrun starts one worker per GPU. Remove one "#" to set a partition.
#SBATCH --job-name=proteus-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
##SBATCH --partition=your_partition
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
# --open-mode=append: a requeued job keeps writing the same log instead of truncating it.
# --signal=USR1@180 (no "B:"): SIGUSR1 reaches the training step 3 min before the limit, time
# enough to write checkpoint.pth (see scripts/slurm/common.sh).
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm/pretrain.sh RECIPE [pretrain.main flags...]}
shift
export DATA=${DATA:-/data/imagenet}
export OUT=${OUT:-out/$RECIPE}
# sbatch runs a copy of this file from its spool: find the repository through the submit dir.
PROTEUS_ROOT=${PROTEUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

# shellcheck source=common.sh
source "$PROTEUS_ROOT/scripts/slurm/common.sh"
run_per_node "$PROTEUS_ROOT/scripts/pretrain.sh" "$RECIPE" "$@"
