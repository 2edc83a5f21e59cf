#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Generic torchrun launcher, one call per node: scripts/torchrun.sh -m <module> [args...]
#
#   NPROC          processes (GPUs) on this node                      default 4
#   NNODES         nodes in the job                                   default 1
#   NODE_RANK      this node's index, 0..NNODES-1                     default 0
#   RDZV_ENDPOINT  host:port of the c10d rendezvous (multi-node only; the first node's host)
#   RDZV_ID        the same id on every node of one run               default proteus
#   TORCHRUN       the torchrun executable                            default torchrun
#   DRY_RUN=1      print the command instead of running it
#
# Exits 75 when the run ended on a slurm signal (see run_checkpointable in scripts/common.sh).
#
# One node uses --standalone (a private local rendezvous on a free port, so two jobs on one
# machine never collide); several nodes meet through c10d on RDZV_ENDPOINT, which needs no
# fixed master rank, so torchrun assigns global ranks itself.
set -euo pipefail

NPROC=${NPROC:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-proteus}
TORCHRUN=${TORCHRUN:-torchrun}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

args=(--nproc_per_node="$NPROC")
if ((NNODES > 1)); then
    if [[ -z "$RDZV_ENDPOINT" ]]; then
        echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the first node)" >&2
        exit 2
    fi
    args+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv-backend=c10d
        --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
elif [[ -n "$RDZV_ENDPOINT" ]]; then
    # One node under slurm still meets on the given endpoint: the same command at any size.
    args+=(--nnodes=1 --node_rank=0 --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
else
    args+=(--standalone)
fi

# One OpenMP thread per process unless asked: torchrun's default, said out loud.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run_checkpointable "$TORCHRUN" "${args[@]}" "$@"
