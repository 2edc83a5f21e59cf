"""Several students from one teacher pass (--student a,b): the teacher runs once per step, each student
writes its own outputs, they resume exactly together, and a NaN in one stops them all, checkpoints untouched."""

from __future__ import annotations

import json
import signal

import pytest
import torch

import models
from models import ViTConfig
from pretrain import main as pretrain_main
from pretrain.distiller import Distiller
from tests.helpers import TINY_RUN, command, epoch_losses, interrupt, iterations, make_image_folder, run_ok, tiny_spec

FILES = [
    "adaptors.pth",
    "backbone.pth",
    "backbone_ema.pth",
    "checkpoint.pth",
    "iterations.jsonl",
    "log.txt",
    "tensorboard",
]
TWO = ["--student", "vit_tiny,vit_small"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def base(data, out, *extra: str) -> list[str]:
    return ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, *extra]


def test_two_students_share_one_teacher_pass_and_each_writes_its_own_outputs(data, tmp_path, monkeypatch):
    """A patch-16 DINOv3-layout student (the teacher's 8x8 map resampled to its 7x7 grid) and a patch-14 one;
    the teacher runs once per step. The first student trains exactly as it would alone: the shared targets,
    resampled for it, are the ones Teacher.targets(images, grid) gives, and its masks are its own draws.
    One student keeps the old layout, everything directly in --output-dir."""
    monkeypatch.setitem(models.TEACHERS, "dinov2_vits14", tiny_spec("dinov2_vits14"))
    monkeypatch.setitem(models.STUDENT_ARCHS, "vit_tiny", ViTConfig(192, 2, 3))  # shallow: seconds at 112 px
    calls = []
    real_targets = models.Teacher.targets

    def counted(self, images, grid=None):
        calls.append(tuple(images.shape))
        return real_targets(self, images, grid)

    monkeypatch.setattr(models.Teacher, "targets", counted)
    extra = ["--input-size", "112", "--epochs", "2", "--epoch-length", "2", "--pca-every", "0"]
    out = tmp_path / "two"
    assert pretrain_main.main(base(data, out, *extra, "--student", "vit_tiny_dinov3,vit_tiny")) == 0
    assert len(calls) == 4 and all(shape == (4, 3, 112, 112) for shape in calls)  # 2 epochs x 2 iterations
    assert sorted(p.name for p in out.iterdir()) == ["vit_tiny", "vit_tiny_dinov3"]
    for name, layout, dim in (("vit_tiny_dinov3", "dinov3", 192), ("vit_tiny", "dinov2", 192)):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == FILES
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
        assert [json.loads(line)["epoch"] for line in (folder / "log.txt").read_text().splitlines()] == [0, 1]
        assert len((folder / "iterations.jsonl").read_text().splitlines()) == 4
        ckpt = models.safe_load(folder / "checkpoint.pth")
        assert ckpt["epoch"] == 1 and ckpt["args"]["student"] == "vit_tiny_dinov3,vit_tiny"
        backbone = models.load_backbone(folder / "backbone.pth")
        assert models.layout_of(backbone.state_dict()) == layout and backbone.embed_dim == dim
    tokens = models.load_backbone(out / "vit_tiny_dinov3" / "backbone.pth").patch_size
    assert (tokens, models.load_backbone(out / "vit_tiny" / "backbone.pth").patch_size) == (16, 14)
    one = out / "one"
    assert pretrain_main.main(base(data, one, *extra, "--student", "vit_tiny_dinov3")) == 0
    assert sorted(p.name for p in one.iterdir()) == FILES  # one student: today's layout
    assert (one / "iterations.jsonl").read_bytes() == (out / "vit_tiny_dinov3" / "iterations.jsonl").read_bytes()


def test_two_students_resume_exactly_after_sigusr1(data, tmp_path):
    """Both checkpoints are written at the same iteration; the same command re-run repeats the
    uninterrupted run's losses of both students, iteration by iteration and per epoch."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    cmd = command(data, reference, 0, *TWO, "--epoch-length", "6")
    run_ok(cmd)
    cmd = command(data, out, 0, *TWO, "--epoch-length", "6")
    assert interrupt(cmd, out / "vit_small", signal.SIGUSR1, after=3) == pretrain_main.EXIT_REQUEUE
    places = {
        models.safe_load(out / name / "checkpoint.pth")["scheduler"]["iteration"] for name in ("vit_tiny", "vit_small")
    }
    assert len(places) == 1 and 0 < places.pop() < 12
    proc = run_ok(cmd)
    assert "resumed from" in proc.stdout
    for name in ("vit_tiny", "vit_small"):
        assert iterations(out / name) == iterations(reference / name)
        assert len(iterations(out / name)) == 12
        assert epoch_losses(out / name) == epoch_losses(reference / name)
    assert iterations(out / "vit_tiny") != iterations(out / "vit_small")  # two students, not one twice


def test_nan_in_one_student_stops_all_and_keeps_both_checkpoints(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert pretrain_main.main(base(data, out, *TWO, "--epochs", "1", "--epoch-length", "2")) == 0
    before = {name: (out / name / "checkpoint.pth").read_bytes() for name in ("vit_tiny", "vit_small")}
    real_forward = Distiller.forward

    def nan_for_small(self, *a, **k):
        losses = real_forward(self, *a, **k)
        if self.student.embed_dim == 384:  # vit_small only
            return {**losses, "total": losses["total"] * float("nan")}
        return losses

    monkeypatch.setattr(Distiller, "forward", nan_for_small)
    capsys.readouterr()
    assert pretrain_main.main(base(data, out, *TWO, "--epochs", "3", "--epoch-length", "2")) == 3
    err = capsys.readouterr().err
    assert "non-finite loss of vit_small at epoch 1 iteration 0" in err
    assert "the last good checkpoints" in err and "are untouched" in err
    for name, saved in before.items():
        assert (out / name / "checkpoint.pth").read_bytes() == saved


def test_students_that_do_not_stand_together_do_not_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_main.main(base(data, out, *TWO, "--epochs", "1", "--epoch-length", "1")) == 0
    path = out / "vit_small" / "checkpoint.pth"
    ckpt = models.safe_load(path)
    ckpt["epoch"] = -1
    ckpt["iteration_in_epoch"] = 0
    torch.save(ckpt, path)
    capsys.readouterr()
    assert pretrain_main.main(base(data, out, *TWO, "--epochs", "2", "--epoch-length", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the students' checkpoints stand at different places" in err[0]
    path.unlink()
    assert pretrain_main.main(base(data, out, *TWO, "--epochs", "2", "--epoch-length", "1")) == 2
    assert f"checkpoint file not found: {path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "students, message",
    [
        ("vit_tiny,vit_tiny", "--student vit_tiny,vit_tiny names a student twice"),
        ("vit_tiny,vit_huge", "unknown student 'vit_huge'"),
        ("vit_tiny,vit_small_dinov3", "--input-size 28 is not a multiple of vit_small_dinov3's patch size 16"),
    ],
)
def test_bad_student_lists_are_one_line(data, tmp_path, capsys, students, message):
    assert pretrain_main.main(base(data, tmp_path / "o", "--student", students)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
