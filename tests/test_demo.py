"""`make demo`: its inputs are checked before the previous run's files are replaced."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import models
from pretrain import demo
from pretrain import main as pretrain_main
from tests.test_pretrain import TINY_RUN, make_image_folder

OLD = {"checkpoint.pth": b"the last run's checkpoint", "log.txt": b'{"epoch": 4}\n', "backbone.pth": b"old backbone"}


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A previous demo run's files in demo_output/ of the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEACHER", raising=False)
    monkeypatch.delenv("TEACHER_CHECKPOINT", raising=False)
    out = tmp_path / demo.OUT / "dinov2_vits14_to_vit_tiny"
    out.mkdir(parents=True)
    for name, content in OLD.items():
        (out / name).write_bytes(content)
    return out


def wrong_teacher_file(path):
    torch.save(models.to_dinov2(models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=1)), path)
    return str(path)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TEACHER_CHECKPOINT": "missing.pth"}, "teacher checkpoint not found: missing.pth"),
        ({"TEACHER_CHECKPOINT": wrong_teacher_file}, "do not match the model"),
        ({"TEACHER": "dinov2_vitz14"}, "unknown TEACHER 'dinov2_vitz14'"),
        ({"skimage": None}, "cannot write the demo's photos"),
    ],
)
def test_bad_input_leaves_the_last_run_untouched(old_run, tmp_path, monkeypatch, capsys, env, message):
    for name, value in env.items():
        if name == "skimage":
            monkeypatch.setitem(sys.modules, "skimage.data", None)  # scikit-image missing
        else:
            monkeypatch.setenv(name, value(tmp_path / "wrong.pth") if callable(value) else value)
    assert demo.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in old_run.iterdir()} == OLD


def test_fresh_run_replaces_a_finished_run_only_after_its_checks(tmp_path, capsys):
    """What the demo relies on: pretrain.main(fresh=True) in a finished run's folder trains anew from epoch 0."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "run"
    argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--epochs", "2", "--epoch-length", "1"]
    assert pretrain_main.main([*argv, "--pca-every", "0"]) == 0
    before = (out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_bytes()
    assert pretrain_main.main([*argv, "--student", "vit_huge"], fresh=True) == 2
    assert ((out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_bytes()) == before
    assert pretrain_main.main([*argv, "--epochs", "1", "--pca-every", "0"], fresh=True) == 0
    assert "resumed" not in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 0
