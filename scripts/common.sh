# shellcheck shell=bash
# Shared by scripts/torchrun.sh, scripts/pretrain.sh and scripts/slurm/*.sh (sourced, never executed).
#
# Exit status 75 (EX_TEMPFAIL) means "checkpointed, requeue me": the trainer writes
# <output-dir>/checkpoint.pth on SIGUSR1/SIGTERM and exits 75; re-running the same command resumes.

# The status that asks slurm (scripts/slurm/common.sh) to requeue the job.
EXIT_REQUEUE=75

# Print a command as one copy-pasteable, shell-quoted line.
print_cmd() {
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}

# Per-process batch that keeps GLOBAL images per step over WORLD processes: split_batch GLOBAL WORLD
split_batch() {
    if (($1 % $2 != 0)); then
        echo "error: global batch $1 does not split over $2 processes; set BATCH (per process)" >&2
        return 2
    fi
    echo $(($1 / $2))
}

# Run a training command so that slurm's warning/preemption signal ends in status 75.
#
# Who gets the signal: `#SBATCH --signal=USR1@180` (no "B:") makes slurmstepd send SIGUSR1 to
# every process of every job step: this shell, torchrun and the training workers alike.
# - The command runs with SIGUSR1 ignored (a subshell sets SIG_IGN, then execs). torchrun does
#   not handle SIGUSR1, so it would otherwise die of it and slurm would then kill its workers
#   mid-checkpoint; ignoring it, torchrun waits for them as usual. Workers inherit SIG_IGN and
#   the trainer replaces it with its own handler (Python's signal.signal), so it still sees
#   the signal; an entry point without a handler just runs on.
# - torchrun hides its workers' exit codes: a worker that exits 75 makes torchrun exit 1. So this
#   shell notes whether SIGUSR1/SIGTERM arrived and turns a failure after one into 75. The trap
#   only records: bash runs it after the foreground command returns, and survives the signal.
run_checkpointable() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        print_cmd "$@"
        return 0
    fi
    local signalled=0 rc=0
    trap 'signalled=1' USR1 TERM
    (
        trap '' USR1
        exec "$@"
    ) || rc=$?
    trap - USR1 TERM
    if ((rc != 0 && rc != EXIT_REQUEUE && signalled)); then
        echo "$(basename "$1") exited $rc after a slurm signal: reporting $EXIT_REQUEUE (checkpointed, requeue me)" >&2
        rc=$EXIT_REQUEUE
    fi
    return "$rc"
}
