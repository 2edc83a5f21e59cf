#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Slurm: NYU-Depth V2 monocular depth on mmsegmentation (PROTOCOLS E).
#   BACKBONE=out/b_dinov2l/backbone.pth sbatch scripts/slurm/depth.sh [depth.main flags...]
#   CONFIG=depth/configs/dpt_vit_small.py BACKBONE=out/s_dinov2b/backbone.pth sbatch scripts/slurm/depth.sh
# Env: BACKBONE (required), CONFIG (depth/configs/dpt_vit_base.py; any of depth/configs/*.py), DATA_ROOT (data/nyu),
# WORK_DIR (<backbone dir>/nyu_<config name>), GLOBAL_BATCH (the paper's: 4 GPUs x the config's per-GPU batch;
# split over the GPUs) or BATCH (per GPU), CFG_OPTIONS ("key=value ..." for the config; not --cfg-options).
# A requeued job continues from the work dir's last checkpoint (as any re-run does). Results:
# WORK_DIR/results.json.
#
# Resources (sbatch command-line options override these). Remove one "#" to set a partition.
#SBATCH --job-name=proteus-depth
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
##SBATCH --partition=your_partition
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --requeue
set -euo pipefail

BACKBONE=${BACKBONE:?set BACKBONE=<backbone.pth or checkpoint.pth>}
CONFIG=${CONFIG:-depth/configs/dpt_vit_base.py}
DATA_ROOT=${DATA_ROOT:-data/nyu}
WORK_DIR=${WORK_DIR:-$(dirname "$BACKBONE")/nyu_$(basename "$CONFIG" .py)}
# sbatch runs a copy of this file from its spool: find the repository through the submit dir.
PROTEUS_ROOT=${PROTEUS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}

# shellcheck source=common.sh
source "$PROTEUS_ROOT/scripts/slurm/common.sh"
GLOBAL_BATCH=${GLOBAL_BATCH:-$(paper_global_batch "$CONFIG")}
run_dense depth "$CONFIG" "$DATA_ROOT" "$WORK_DIR" "$GLOBAL_BATCH" "$@"
