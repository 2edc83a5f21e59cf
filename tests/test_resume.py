"""Cluster life: SIGUSR1/SIGTERM checkpoint mid-epoch and exit 75; a resumed run repeats the uninterrupted losses."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import models
from pretrain.main import EXIT_REQUEUE
from tests.helpers import ITERS, command, epoch_losses, epochs_logged, interrupt, iterations, make_image_folder, run_ok


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("reference")
    run_ok(command(data, out))
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

    proc = run_ok(cmd)  # the same command again: workers 2 must also repeat the workers-0 reference
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

    run_ok(cmd)
    assert iterations(out) == iterations(reference)  # lines logged after the last checkpoint: dropped, then redone
    assert epochs_logged(out) == [0, 1]
    assert epoch_losses(out) == epoch_losses(reference)
