"""Pretraining as users launch it: torchrun with 2 processes (gloo), and kill-then-rerun resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
from tests.helpers import ROOT, TINY_RUN, child_env, epochs_logged, make_image_folder

ENV = child_env()


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPUS = min(torch.cuda.device_count(), 2)


@pytest.mark.parametrize(
    "nproc, device, flags",
    [
        (2, "cpu", ["--precision", "fp32"]),
        pytest.param(GPUS, "cuda", ["--precision", "bf16"], marks=GPU),
        pytest.param(GPUS, "cuda", ["--precision", "fp16", "--clip-grad", "1.0", "--compile"], marks=GPU),
    ],
    ids=["gloo", "nccl", "nccl-fp16-clip-compile"],
)
def test_torchrun(tmp_path, nproc, device, flags):
    """2 processes on gloo as a CPU dry run; on a GPU machine, one process per GPU (up to 2) on NCCL (fused
    AdamW, pinned memory, non-blocking copies), in bf16, and in fp16 with gradient clipping (unscale, then
    the fused step) and the compiled student inside DDP."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "pretrain.main", "--data-path", str(data), "--output-dir", str(out), "--epochs", "2", *TINY_RUN,
        "--device", device, *flags,
    ]  # fmt: skip
    env = child_env(gpus=device == "cuda")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"on {device}" in proc.stdout and f"world {nproc}, global batch {4 * nproc}" in proc.stdout
    # 16 images; 2 ranks: 3 repeats over 2 ranks -> ceil(16/2) = 8 samples per rank -> 2 iterations of 4
    assert f"[{4 // nproc}/{4 // nproc}]" in proc.stdout
    assert epochs_logged(out) == [0, 1]
    assert all(math.isfinite(json.loads(line)["train_loss"]) for line in (out / "log.txt").read_text().splitlines())
    student = models.load_backbone(out / "backbone.pth")
    assert student.embed_dim == 192


def test_kill_then_rerun_continues_where_it_stopped(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pretrain.main", "--data-path", str(data), "--output-dir", str(out),
        "--epochs", "4", "--epoch-length", "25", *TINY_RUN,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not epochs_logged(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = epochs_logged(out)
    assert done_before and done_before[-1] < 3, "the run finished before it could be killed"
    saved = models.safe_load(out / "checkpoint.pth")
    assert saved["epoch"] == done_before[-1]

    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint.pth'} after epoch {saved['epoch']}" in rerun.stdout
    assert f"epoch {saved['epoch']} [" not in rerun.stdout  # finished epochs are not trained again
    assert epochs_logged(out) == [0, 1, 2, 3]
    final = models.safe_load(out / "checkpoint.pth")
    assert final["epoch"] == 3 and final["scheduler"]["iteration"] == 100
    assert not torch.equal(final["student"]["norm.weight"], saved["student"]["norm.weight"])


def test_torchrun_two_students_two_teachers(tmp_path):
    """2 processes on gloo: two students (each its own DDP wrapper in one process group) from two teachers
    whose target statistics are estimated on both ranks' batches and summed; every student's folder gets its
    checkpoint, backbone and adaptors.pth, with the same frozen statistics."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    out = tmp_path / "ddp"
    argv = list(TINY_RUN)
    argv[argv.index("--teacher") + 1] = "dinov2_vits14,dinov3_vits16"
    argv[argv.index("--student") + 1] = "vit_tiny,vit_small"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretrain.main",
        "--data-path", str(data), "--output-dir", str(out), "--epochs", "1", *argv,
        "--teacher-input-size", "28,32", "--teacher-stats-batches", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout and "estimating the target statistics" in proc.stdout
    stats = []
    for student in ("vit_tiny", "vit_small"):
        assert epochs_logged(out / student) == [0]
        adaptors = models.load_adaptors(out / student / "adaptors.pth")
        std = adaptors.adaptors["dinov3_vits16"].patch_std
        assert std.kind == "phi-s" and bool(std.estimated)
        stats.append(torch.cat([std.mean, std.scale]))
    assert torch.equal(*stats)
