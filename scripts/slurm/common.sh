# shellcheck shell=bash
# Sourced by every scripts/slurm/*.sh batch script, after its #SBATCH header:
#   source "$PROTEUS_ROOT/scripts/slurm/common.sh"
# Sets up the c10d rendezvous on the job's first node, runs one srun step (one task per node,
# each running torchrun) and requeues the job when the step exits 75 ("checkpointed, requeue me").
#
# Signals: the headers use `#SBATCH --signal=USR1@180` without "B:", so 180 s before the time
# limit slurmstepd sends SIGUSR1 to every process of the running step (not to this batch shell,
# which keeps its default USR1 action and would die of it): the trainer checkpoints and exits 75,
# scripts/common.sh:run_checkpointable makes that torchrun's status too, srun returns it here,
# and finish_step requeues. The requeued job runs this same script again, and the same command
# resumes from <output-dir>/checkpoint.pth. Do not switch to "B:USR1": then only this shell
# would get the signal, and nothing here forwards it to the step.
#
# Overridable from the environment:
#   NPROC          processes per node        default $SLURM_GPUS_ON_NODE, else 4
#   RDZV_PORT      c10d rendezvous port      default 20000 + job id % 20000 (two jobs sharing a
#                                            node do not collide)
#   MAX_REQUEUES   stop requeuing after this many restarts (a run that exits 75 at once would
#                  loop forever)             default 100
#   DRY_RUN=1      each node prints its command instead of running it

# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$PROTEUS_ROOT/scripts/common.sh"

: "${SLURM_JOB_ID:?run this under sbatch (SLURM_JOB_ID is not set)}"
NNODES=${SLURM_NNODES:-1}
NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-4}}
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
MAX_REQUEUES=${MAX_REQUEUES:-100}

# The first node hosts the rendezvous store; every node's torchrun connects to it. (No
# `| head -n 1`: under pipefail, scontrol killed by SIGPIPE on a long node list fails the job.)
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
RDZV_HOST=${RDZV_HOST%%$'\n'*}
RDZV_ENDPOINT=$RDZV_HOST:$RDZV_PORT
# The job id is the same on every node and across requeues, and unique among jobs.
RDZV_ID=$SLURM_JOB_ID
export NNODES NPROC RDZV_ENDPOINT RDZV_ID
cd "$PROTEUS_ROOT" || exit
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC process(es), rendezvous $RDZV_ENDPOINT"

# Requeue on 75, otherwise exit with the step's status: finish_step STATUS
finish_step() {
    local rc=$1
    if ((rc != EXIT_REQUEUE)); then
        exit "$rc"
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
        echo "step checkpointed (status $rc) but job restarted ${SLURM_RESTART_COUNT} times already: not requeuing" >&2
        exit "$rc"
    fi
    echo "step checkpointed (status $rc): requeuing job $SLURM_JOB_ID; it resumes from the checkpoint"
    # scontrol ends this job and puts it back in the queue (needs --requeue or JobRequeue=1);
    # if it fails, 75 makes the failure visible in sacct.
    scontrol requeue "$SLURM_JOB_ID" || exit "$rc"
    exit 0
}

# One task per node; each sets NODE_RANK from its own SLURM_NODEID and runs the command
# (scripts/torchrun.sh or a script that ends in it). Then requeue or exit: run_per_node CMD...
# srun options use the --opt=value form only. --cpus-per-task is passed on because srun no
# longer inherits it from sbatch (slurm >= 22.05).
run_per_node() {
    local opts=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    local rc=0
    # shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
    srun "${opts[@]}" bash -c 'NODE_RANK=$SLURM_NODEID exec "$@"' proteus-node "$@" || rc=$?
    finish_step "$rc"
}

# One process on one node (single-process entry points): run_single CMD...
run_single() {
    local opts=(--nodes=1 --ntasks=1)
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    local rc=0
    # shellcheck disable=SC2016  # expands in the step, where common.sh is sourced
    srun "${opts[@]}" bash -c 'source "$0" && run_checkpointable "$@"' "$PROTEUS_ROOT/scripts/common.sh" "$@" || rc=$?
    finish_step "$rc"
}

# ImageNet evaluations and mmseg tasks keep their protocol's global batch at any GPU count:
# per_process_batch GLOBAL prints $BATCH if set, else GLOBAL / (NPROC x NNODES).
per_process_batch() {
    if [[ -n "${BATCH:-}" ]]; then
        echo "$BATCH"
    else
        split_batch "$1" $((NPROC * NNODES))
    fi
}

# The published global batch of an mmseg config: the config's `global_batch` where it states one (another
# release's protocol: DINOv3's dinov3_linear.py 16), else the reference's 4 GPUs x the config's per-GPU batch
# (ADE20K 32, UperNet ViT-B 16, ViT-L 8; NYU 16): paper_global_batch CONFIG
paper_global_batch() {
    # shellcheck disable=SC2016  # python code, not shell
    "${PYTHON:-python}" -c 'import sys; from mmengine.config import Config
c = Config.fromfile(sys.argv[1], import_custom_modules=False)
print(c.get("global_batch") or 4 * c.train_dataloader.batch_size)' "$1"
}

# segmentation.main / depth.main: run_dense TASK CONFIG DATA_ROOT WORK_DIR GLOBAL_BATCH [flags...]
# A requeued job continues from the work dir's last checkpoint (the runner's default; from scratch
# when there is none). The configs' batch is per GPU: ours goes last in the one --cfg-options (argparse
# keeps the last occurrence), with CFG_OPTIONS="key=value ..." for further overrides.
run_dense() {
    local task=$1 config=$2 data_root=$3 work_dir=$4 batch extra=()
    batch=$(per_process_batch "$5")
    shift 5
    read -ra extra <<<"${CFG_OPTIONS:-}"
    run_per_node "$PROTEUS_ROOT/scripts/torchrun.sh" -m "$task.main" "$config" \
        --backbone "$BACKBONE" --data-path "$data_root" --output-dir "$work_dir" "$@" \
        --cfg-options "${extra[@]}" "train_dataloader.batch_size=$batch"
}
