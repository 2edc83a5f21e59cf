"""scripts/: the torchrun launchers and the slurm batch scripts, run under a fake slurm.

The fake slurm is two stubs first on PATH: `srun` drops its (--opt=value) options and runs the
command here, exiting SRUN_EXIT instead when that is set (a step that checkpointed on a signal
exits 75); `scontrol show hostnames` prints FAKE_HOSTS, `scontrol requeue ARGS` appends ARGS to
REQUEUE_LOG. DRY_RUN=1 makes each node print its command instead of running it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import models
from models import TEACHERS
from pretrain import main as pretrain_main
from tests.helpers import ROOT, TINY_RUN, child_env, make_image_folder

SCRIPTS = ROOT / "scripts"
ALL_SCRIPTS = sorted(SCRIPTS.glob("*.sh")) + sorted(SCRIPTS.glob("slurm/*.sh"))
SBATCH = ["pretrain", "linear", "knn", "fine_grained", "segmentation", "depth"]

SRUN = """#!/usr/bin/env bash
echo "$*" >> "$SRUN_LOG"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
"$@"
rc=$?
exit "${SRUN_EXIT:-$rc}"
"""
SCONTROL = """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
if [[ $1 == requeue ]]; then shift; echo "$*" >> "$REQUEUE_LOG"; exit 0; fi
echo "fake scontrol: unexpected $*" >&2; exit 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm(tmp_path):
    """Environment of task 0 of a one-node job 4242 with one GPU, under the fake slurm."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in [("srun", SRUN), ("scontrol", SCONTROL)]:
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "NPROC", "NNODES", "NODE_RANK"))}
    env.update(
        PATH=f"{stubs}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        SLURM_GPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        FAKE_HOSTS="localhost",
        REQUEUE_LOG=str(tmp_path / "requeue.log"),
        SRUN_LOG=str(tmp_path / "srun.log"),
        RDZV_PORT=str(free_port()),
    )
    return env


def run(script, *args, env, **extra_env):
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        cwd=ROOT,
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def requeued(env) -> list[str]:
    log = Path(env["REQUEUE_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def last_command(proc) -> list[str]:
    """The (dry-run) command a node printed: its last stdout line, split as the shell would."""
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --- (a) a real tiny distillation through the pretrain batch script ---------------------------


def test_pretrain_sbatch_trains_end_to_end_and_does_not_requeue(slurm, tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    out = tmp_path / "out"
    proc = run("slurm/pretrain.sh", "ti_dinov2s", *TINY_RUN, "--epochs", "1", env=slurm, DATA=str(data), OUT=str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world 1, global batch 4" in proc.stdout  # NPROC=1 from SLURM_GPUS_ON_NODE; --batch-size 4 wins
    assert (out / "checkpoint.pth").exists() and (out / "log.txt").exists()
    assert [line for line in (out / "log.txt").read_text().splitlines() if line]  # one epoch logged
    assert models.load_backbone(out / "backbone.pth").embed_dim == 192
    assert requeued(slurm) == []
    srun_opts = Path(slurm["SRUN_LOG"]).read_text().split()
    assert {"--nodes=1", "--ntasks=1", "--ntasks-per-node=1"} <= set(srun_opts)


# --- (b) (c) the requeue contract -------------------------------------------------------------


def test_step_exit_75_requeues_the_job(slurm):
    proc = run("slurm/pretrain.sh", "b_dinov2l", env=slurm, DRY_RUN="1", SRUN_EXIT="75")
    assert proc.returncode == 0, proc.stderr
    assert requeued(slurm) == ["4242"]
    assert "requeuing job 4242" in proc.stdout


@pytest.mark.parametrize("status", [1, 2, 3, 137])
def test_other_failures_propagate_without_requeue(slurm, status):
    proc = run("slurm/pretrain.sh", "b_dinov2l", env=slurm, DRY_RUN="1", SRUN_EXIT=str(status))
    assert proc.returncode == status
    assert requeued(slurm) == []


def test_requeues_stop_after_max_requeues(slurm):
    proc = run(
        "slurm/linear.sh",
        env=slurm,
        DRY_RUN="1",
        SRUN_EXIT="75",
        BACKBONE="b.pth",
        SLURM_RESTART_COUNT="3",
        MAX_REQUEUES="3",
    )
    assert proc.returncode == 75 and "not requeuing" in proc.stderr
    assert requeued(slurm) == []


WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))  # stands in for "checkpoint, then exit 75"
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""


def test_torchrun_wrapper_turns_a_signalled_75_into_75(slurm, tmp_path):
    """torchrun reports a worker's 75 as 1; after a slurm signal the node wrapper reports 75 again.

    Slurm signals every process of the step: here the wrapper's process group (wrapper, torchrun)
    and the worker, which torchrun starts in a session of its own.
    """
    (tmp_path / "worker.py").write_text(WORKER)
    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen(
        ["bash", str(SCRIPTS / "torchrun.sh"), str(tmp_path / "worker.py"), str(pid_file)],
        cwd=ROOT,
        env={**slurm, "NPROC": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGUSR1)  # the wrapper and torchrun (which must survive it)
    time.sleep(0.5)
    os.kill(int(pid_file.read_text()), signal.SIGUSR1)  # the trainer
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    assert "exitcode  : 75" in err  # torchrun itself only said 1


# --- (d) recipes and rendezvous ---------------------------------------------------------------

RECIPES = {
    "ti_dinov2s": ("dinov2_vits14", "vit_tiny"),
    "s_dinov2b": ("dinov2_vitb14", "vit_small"),
    "b_dinov2l": ("dinov2_vitl14", "vit_base"),
    "l_dinov2g": ("dinov2_vitg14", "vit_large"),
    "b_synclrl": ("synclr_vitl14", "vit_base"),
    "b_clipl": ("clip_vitl14", "vit_base"),
    "ti_dinov3s": ("dinov3_vits16", "vit_tiny"),
    "s_dinov3b": ("dinov3_vitb16", "vit_small"),
    "b_dinov3l": ("dinov3_vitl16", "vit_base"),
    "l_dinov3hplus": ("dinov3_vith16plus", "vit_large"),
    "s_dinov3_7b": ("dinov3_vit7b16", "vit_small"),
    "b_dinov3_7b": ("dinov3_vit7b16", "vit_base"),
    "b_dinov2l_clipl": ("dinov2_vitl14,clip_vitl14", "vit_base"),
    "s_dinov3b_clipb16": ("dinov3_vitb16,clip_vitb16", "vit_small"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_single_node(slurm, recipe):
    cmd = last_command(run("pretrain.sh", recipe, "--epochs", "3", env=slurm, DRY_RUN="1", DATA="/in"))
    assert cmd[:3] == ["torchrun", "--nproc_per_node=4", "--standalone"]
    assert cmd[3:5] == ["-m", "pretrain.main"]
    assert (flag(cmd, "--teacher"), flag(cmd, "--student")) == RECIPES[recipe]
    assert flag(cmd, "--data-path") == "/in" and flag(cmd, "--output-dir") == f"out/{recipe}"
    config = pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(cmd[5:]))  # a valid run
    first = TEACHERS[config.teachers[0].name].family
    assert config.student_layout == ("dinov2" if recipe == "s_dinov3b_clipb16" else first)  # a patch-14 student
    assert [t.input_size for t in config.teachers] == [224] * len(config.teachers) and config.input_size == 224
    assert flag(cmd, "--batch-size") == "128"  # 4 x 128 = 512
    assert cmd[-2:] == ["--epochs", "3"]


@pytest.mark.parametrize(("nproc", "nnodes", "batch"), [("8", "2", "32"), ("2", "1", "256"), ("4", "4", "32")])
def test_recipe_multi_node_keeps_global_batch_512(slurm, nproc, nnodes, batch):
    env = dict(NPROC=nproc, NNODES=nnodes, NODE_RANK="1", RDZV_ENDPOINT="head:29500", RDZV_ID="r1")
    cmd = last_command(run("pretrain.sh", "b_dinov2l", env=slurm, DRY_RUN="1", **env))
    assert flag(cmd, "--batch-size") == batch
    assert f"--nproc_per_node={nproc}" in cmd
    if nnodes != "1":
        expected = [f"--nnodes={nnodes}", "--node_rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29500"]
        assert set(expected) <= set(cmd)
        assert "--standalone" not in cmd


def test_recipe_errors(slurm):
    assert run("pretrain.sh", "b_nope", env=slurm, DRY_RUN="1").returncode == 2
    assert run("pretrain.sh", "b_dinov2l", env=slurm, DRY_RUN="1", NPROC="3").returncode == 2  # 512 / 3
    assert run("pretrain.sh", "b_dinov2l", env=slurm, DRY_RUN="1", NNODES="2").returncode == 2  # no endpoint


def test_slurm_multi_node_rendezvous_on_first_node(slurm):
    hosts = " ".join(f"gpu-{i:03d}" for i in range(2000))  # long list: no SIGPIPE failure under pipefail
    env = dict(SLURM_NNODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="4", FAKE_HOSTS=hosts, SLURM_CPUS_PER_TASK="32")
    cmd = last_command(run("slurm/pretrain.sh", "s_dinov2b", env=slurm, DRY_RUN="1", RDZV_PORT="29400", **env))
    expected = ["--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--rdzv-backend=c10d"]
    assert cmd[1:5] == expected and cmd[5:7] == ["--rdzv-endpoint=gpu-000:29400", "--rdzv-id=4242"]
    assert (flag(cmd, "--teacher"), flag(cmd, "--batch-size")) == ("dinov2_vitb14", "64")  # 2 x 4 x 64 = 512
    srun_opts = Path(slurm["SRUN_LOG"]).read_text().split()
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32"} <= set(srun_opts)


# --- (e) evaluation batch scripts -------------------------------------------------------------


def test_linear_and_knn(slurm):
    env = dict(SLURM_GPUS_ON_NODE="4", BACKBONE="out/b/backbone.pth", DATA="/in")
    cmd = last_command(run("slurm/linear.sh", "--epochs", "2", env=slurm, DRY_RUN="1", **env))
    assert cmd[cmd.index("-m") :][:2] == ["-m", "linear_eval.main"] and "--nproc_per_node=4" in cmd
    assert flag(cmd, "--data-path") == "/in" and flag(cmd, "--backbone") == "out/b/backbone.pth"
    assert flag(cmd, "--batch-size") == "128" and flag(cmd, "--output-dir") == "out/b/linear"
    assert cmd[-2:] == ["--epochs", "2"]
    cmd = last_command(run("slurm/knn.sh", env=slurm, DRY_RUN="1", **env))
    assert cmd[cmd.index("-m") :][:2] == ["-m", "linear_eval.knn"]
    assert flag(cmd, "--batch-size") == "256" and flag(cmd, "--output-dir") == "out/b/knn"
    assert flag(cmd, "--cache-dir") == "out/b/knn/features"


def test_fine_grained(slurm):
    env = dict(BACKBONE="out/b/backbone.pth", DATA_ROOT="/fg", SLURM_CPUS_PER_TASK="6")
    cmd = last_command(run("slurm/fine_grained.sh", "--datasets", "dtd", env=slurm, DRY_RUN="1", **env))
    assert cmd[:3] == ["python", "-m", "fine_grained.main"]
    assert flag(cmd, "--data-path") == "/fg" and flag(cmd, "--output-dir") == "out/b/fine_grained"
    assert flag(cmd, "--device") == "cuda" and flag(cmd, "--num-workers") == "6"
    assert cmd[-2:] == ["--datasets", "dtd"]


ADE = "data/ade/ADEChallengeData2016"


@pytest.mark.parametrize(
    ("task", "config", "data_root", "work_dir", "batch"),
    [
        ("segmentation", "segmentation/configs/upernet_vit_small.py", ADE, "ade_upernet_vit_small", "8"),
        ("segmentation", "segmentation/configs/upernet_vit_base.py", ADE, "ade_upernet_vit_base", "4"),
        ("segmentation", "segmentation/configs/upernet_vit_large.py", ADE, "ade_upernet_vit_large", "2"),
        ("depth", "depth/configs/dpt_vit_base.py", "data/nyu", "nyu_dpt_vit_base", "4"),
    ],
)
def test_dense(slurm, task, config, data_root, work_dir, batch):
    env = dict(SLURM_GPUS_ON_NODE="4", BACKBONE="out/b/backbone.pth", CFG_OPTIONS="a=1 b=2", CONFIG=config)
    cmd = last_command(run(f"slurm/{task}.sh", "--amp", env=slurm, DRY_RUN="1", **env))
    m = cmd.index("-m")
    assert cmd[m : m + 3] == ["-m", f"{task}.main", config] and (ROOT / config).exists()
    assert flag(cmd, "--data-path") == data_root and flag(cmd, "--output-dir") == f"out/b/{work_dir}"
    assert "--resume" not in cmd and "--amp" in cmd  # a re-run continues from the last checkpoint by itself
    # the paper's global batch (4 GPUs x per-GPU batch) at 4 GPUs; ours last among the overrides
    assert cmd[cmd.index("--cfg-options") :] == ["--cfg-options", "a=1", "b=2", f"train_dataloader.batch_size={batch}"]
    small = last_command(run(f"slurm/{task}.sh", env=slurm, DRY_RUN="1", **{**env, "SLURM_GPUS_ON_NODE": "1"}))
    assert small[-1] == f"train_dataloader.batch_size={int(batch) * 4}"


@pytest.mark.parametrize("script", SBATCH)
def test_sbatch_headers(script):
    text = (SCRIPTS / "slurm" / f"{script}.sh").read_text()
    for line in ["#SBATCH --requeue", "#SBATCH --signal=USR1@180", "#SBATCH --ntasks-per-node=1", "set -euo pipefail"]:
        assert line in text
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert {ln.split("=")[0] for ln in header} >= {"#SBATCH --nodes", "#SBATCH --time", "#SBATCH --output"}
    body = text[text.index("set -euo pipefail") :]
    assert "#SBATCH" not in body  # sbatch stops reading options at the first command


def test_sbatch_outside_slurm_says_so(slurm):
    env = {k: v for k, v in slurm.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "slurm/pretrain.sh"), "b_dinov2l"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    ours = [str(p) for p in ALL_SCRIPTS if p.name != "build_mmcv.sh"]  # build_mmcv.sh is not ours
    proc = subprocess.run(["shellcheck", "-x", *ours], cwd=SCRIPTS, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_gpu_checks_runs_only_the_named_steps(tmp_path):
    """`gpu_checks.sh NAME ...` (a rerun after a device call cut short) runs those steps and no other."""
    out = tmp_path / "logs"
    env = {**child_env(), "OUT": str(out), "PYTHON": sys.executable}
    script = str(SCRIPTS / "gpu_checks.sh")
    proc = subprocess.run(["bash", script, "mmcv"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mmcv.log"]
    assert "== mmcv: rc " in (out / "mmcv.log").read_text()


def test_two_teacher_recipes_standardise_and_set_their_levels(slurm):
    """B <- DINOv2 L + CLIP L: CLIP token-only on the student's grid; S/14 <- DINOv3 B + CLIP B/16: CLIP's map
    resampled from 14x14 to 16x16, so its dense levels stay on by default. PHI-S both."""
    levels = {}
    for recipe in ("b_dinov2l_clipl", "s_dinov3b_clipb16"):
        cmd = last_command(run("pretrain.sh", recipe, env=slurm, DRY_RUN="1", DATA="/in"))
        config = pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(cmd[5:]))
        assert config.teacher_standardization == "phi-s"
        targets = pretrain_main.targets_of(config, pretrain_main.grid_of(config, config.students[0]))
        levels[recipe] = {t.name: (t.lambda_token, t.lambda_patch, t.lambda_fea) for t in targets}
    assert levels == {
        "b_dinov2l_clipl": {"dinov2_vitl14": (1.0, 1.0, 1.0), "clip_vitl14": (1.0, 0.0, 0.0)},
        "s_dinov3b_clipb16": {"dinov3_vitb16": (1.0, 1.0, 1.0), "clip_vitb16": (1.0, 1.0, 1.0)},
    }
