"""A full disk, for real: a small tmpfs, mounted for each test (root only). Every writer (torch's zip writer,
text, log appends, the linear probe's and pretraining's checkpoints) ends in one `error:` line and exit 1,
the last good file intact and no temp file left."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

import common.io
import models
from common import cli
from common.io import append_text, atomic_save, atomic_write_text, replace_folder
from linear_eval import main as linear_main
from models import ViTConfig
from pretrain import main as pretrain_main
from pretrain import state as pretrain_state
from tests.helpers import TINY_RUN, make_image_folder, make_splits

NO_SPACE = "(No space left on device)"


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at tmp_path/disk, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    cmd = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Take every free byte of folder's file system."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("writer", ["torch.save", "text", "append"])
def test_every_writer_on_a_full_disk_is_one_line_and_keeps_the_last_file(disk, capsys, writer):
    """torch's zip writer turns ENOSPC into RuntimeError("unexpected pos"), the OSError only in its context."""
    path = disk / "out" / "file"
    path.parent.mkdir()
    write = {
        "torch.save": lambda size: atomic_save({"w": torch.zeros(size)}, path),
        "text": lambda size: atomic_write_text("x" * size * 4, path),
        "append": lambda size: append_text("x" * size * 4, path),
    }[writer]
    write(10)
    before = path.read_bytes()
    fill(disk)
    assert cli.run(write, 2_000_000) == 1  # 8 MB: more than is free
    assert one_error_line(capsys) == f"error: no space left on {path.parent} {NO_SPACE}; the last file is intact"
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["file"]


def test_a_new_file_that_does_not_fit_is_said_not_written(disk, capsys):
    fill(disk)
    assert cli.run(atomic_save, {"w": torch.zeros(100_000)}, disk / "new.pth") == 1
    assert one_error_line(capsys) == f"error: no space left on {disk} {NO_SPACE}; new.pth was not written"
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_folder_replaced_on_a_full_disk_is_one_line_and_keeps_the_last_one(disk, capsys):
    """replace_folder (an export, shards): the earlier folder stays whole and no half folder is left."""
    target = disk / "export"

    def write(size):
        return lambda folder: (folder / "model.safetensors").write_bytes(b"\0" * size)

    replace_folder(target, write(10), ours=lambda p: True, what="an export")
    fill(disk)
    replace = partial(replace_folder, ours=lambda p: True, what="an export")
    assert cli.run(replace, target, write(8_000_000)) == 1
    assert one_error_line(capsys) == f"error: no space left on {disk} {NO_SPACE}; the last export is intact"
    assert (target / "model.safetensors").read_bytes() == b"\0" * 10
    assert sorted(p.name for p in disk.iterdir()) == ["export", "filler"]


def test_the_linear_probes_checkpoint_on_a_full_disk(disk, backbone, tmp_path, capsys, monkeypatch):
    """The disk fills after the first epoch's checkpoint: the second one fails, the first stays."""
    data = make_splits(tmp_path / "data")
    out = disk / "linear"
    real_save = linear_main.save_checkpoint

    def save_then_fill(*args, **kwargs):
        real_save(*args, **kwargs)
        fill(disk)

    monkeypatch.setattr(linear_main, "save_checkpoint", save_then_fill)
    argv = ["--data-path", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--input-size", "28",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--epochs", "2",
            "--epoch-length", "1"]  # fmt: skip
    assert linear_main.main(argv) == 1
    assert one_error_line(capsys) == f"error: no space left on {out} {NO_SPACE}; the last checkpoint.pth is intact"
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth"]


def test_a_pretraining_checkpoint_on_a_full_disk(disk, tmp_path, capsys, monkeypatch):
    """Through the command line: the re-run's checkpoint meets a full disk; the first run's stays, and the same
    command, with space again, continues from it."""
    monkeypatch.setitem(models.STUDENT_ARCHS, "vit_tiny", ViTConfig(64, 1, 1))  # a checkpoint of ~1 MB
    data = make_image_folder(tmp_path / "data")
    out = disk / "pretrain"

    def run(epochs: int) -> int:
        argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--epoch-length", "1", "--pca-every"]
        return pretrain_main.main([*argv, "0", "--epochs", str(epochs)])

    assert run(1) == 0
    before = (out / "checkpoint.pth").read_bytes()
    real_save_all = common.io.atomic_save_all

    def fill_then_save(*args, **kwargs):
        fill(disk)
        real_save_all(*args, **kwargs)

    monkeypatch.setattr(pretrain_state, "atomic_save_all", fill_then_save)
    capsys.readouterr()
    assert run(2) == 1
    assert one_error_line(capsys) == f"error: no space left on {out} {NO_SPACE}; the last checkpoint.pth is intact"
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    os.unlink(disk / "filler")
    monkeypatch.setattr(pretrain_state, "atomic_save_all", real_save_all)
    assert run(2) == 0
    assert "resumed from" in capsys.readouterr().out
