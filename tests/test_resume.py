"""Cluster life: SIGUSR1/SIGTERM checkpoint mid-epoch and exit 75; a resumed run repeats the uninterrupted losses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import models
from pretrain.main import EXIT_REQUEUE
from tests.helpers import ROOT, TINY_RUN, child_env, epochs_logged, make_image_folder

ENV = child_env()

ITERS = 12  # per epoch; 12 images in batches of 4 -> the sampler goes round 4 times an epoch


def command(data: Path, out: Path, workers: int = 0, *extra: str) -> list[str]:
    argv = [*TINY_RUN, "--data-path", str(data), "--output-dir", str(out), "--epochs", "2"]
    argv[argv.index("--num-workers") + 1] = str(workers)
    return [sys.executable, "-m", "pretrain.main", *argv, "--epoch-length", str(ITERS), *extra]


def iterations(out: Path) -> list[dict]:
    path = out / "iterations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def epoch_losses(out: Path) -> list[dict]:
    """log.txt's loss averages per epoch (timings aside): a resumed epoch's line averages the whole epoch."""
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k.startswith("train_loss")} for line in lines]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def interrupt(cmd: list[str], out: Path, sig: int, after: int = 5) -> int:
    """Start `cmd`, send `sig` once `after` iterations are logged; returns the exit status."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(iterations(out)) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (EXIT_REQUEUE, -signal.SIGKILL), err[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("reference")
    run(command(data, out))
    assert [r["iteration"] for r in iterations(out)] == list(range(2 * ITERS))
    return out


@pytest.mark.parametrize(
    "sig, workers", [(signal.SIGUSR1, 0), (signal.SIGTERM, 2)], ids=["usr1-workers0", "term-workers2"]
)
def test_signal_checkpoints_mid_epoch_and_rerun_repeats_the_losses(data, reference, tmp_path, sig, workers):
    out = tmp_path / "run"
    cmd = command(data, out, workers)
    assert interrupt(cmd, out, sig) == EXIT_REQUEUE
    done = len(iterations(out))
    ckpt = models.safe_load(out / "checkpoint.pth")
    assert ckpt["scheduler"]["iteration"] == done  # it finished the iteration it was in, then saved
    assert ckpt["iteration_in_epoch"] == done % ITERS > 0 and ckpt["epoch"] == done // ITERS - 1

    proc = run(cmd)  # the same command again: workers 2 must also repeat the workers-0 reference
    assert f"at iteration {done % ITERS} of epoch {done // ITERS}" in proc.stdout
    assert iterations(out) == iterations(reference)  # exactly, and no iteration logged twice
    assert epochs_logged(out) == [0, 1]
    assert epoch_losses(out) == epoch_losses(reference)  # the checkpoint's loss sums carried the first part


def test_save_every_minutes_then_hard_kill_resumes_exactly(data, reference, tmp_path):
    out = tmp_path / "run"
    cmd = command(data, out, 0, "--save-every-minutes", "0.001")
    interrupt(cmd, out, signal.SIGKILL, after=7)
    ckpt = models.safe_load(out / "checkpoint.pth")
    assert 0 < ckpt["iteration_in_epoch"] < ITERS and ckpt["epoch"] == -1  # saved mid-epoch, did not exit
    assert ckpt["scheduler"]["iteration"] >= 5

    run(cmd)
    assert iterations(out) == iterations(reference)  # lines logged after the last checkpoint: dropped, then redone
    assert epochs_logged(out) == [0, 1]
    assert epoch_losses(out) == epoch_losses(reference)
