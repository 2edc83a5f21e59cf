"""Several students from one teacher pass (--student a,b): the teacher runs once per step, each student
writes its own outputs, they resume exactly together, and a NaN in one stops them all, checkpoints untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from timm.layers import DropPath

import common.io
import models
from models import ViTConfig
from models.errors import UsageError
from pretrain import engine
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


def test_students_of_one_architecture_draw_their_own_masks_and_drop_path(data, tmp_path, monkeypatch):
    """Two students of the same architecture in one run: each its own masks and drop path at every iteration,
    while the first one draws, and so logs, exactly what a run of it alone does."""
    monkeypatch.setitem(models.TEACHERS, "dinov2_vits14", tiny_spec("dinov2_vits14"))
    for name in ("vit_tiny", "vit_twin"):
        monkeypatch.setitem(models.STUDENT_ARCHS, name, ViTConfig(32, 2, 1))
    masks, dropped = [], []
    real_masks, real_drop = engine.make_masks, DropPath.forward

    def recorded_masks(*a, **k):
        masks.append(real_masks(*a, **k))
        return masks[-1]

    def recorded_drop(self, x):
        out = real_drop(self, x)
        dropped.append((out.flatten(1) == 0).all(1))  # which samples lost this residual branch
        return out

    monkeypatch.setattr(engine, "make_masks", recorded_masks)
    monkeypatch.setattr(DropPath, "forward", recorded_drop)
    extra = ["--input-size", "56", "--drop-path", "0.5", "--epochs", "1", "--epoch-length", "2", "--pca-every", "0"]
    assert pretrain_main.main(base(data, tmp_path / "two", *extra, "--student", "vit_tiny,vit_twin")) == 0
    # calls alternate: iteration 0 of each student, then iteration 1; two drop paths (block 1) a forward, the
    # last four those of the finite-loss check before the checkpoint
    assert len(masks) == 4 and not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])
    drops = [torch.cat(dropped[i : i + 2]) for i in range(0, 8, 2)]
    assert len(dropped) == 12 and not torch.equal(drops[0], drops[1]) and not torch.equal(drops[2], drops[3])
    solo_masks, masks[:] = masks[0::2], []
    assert pretrain_main.main(base(data, tmp_path / "one", *extra, "--student", "vit_tiny")) == 0
    assert all(torch.equal(a, b) for a, b in zip(masks, solo_masks, strict=True))
    two, one = tmp_path / "two" / "vit_tiny" / "iterations.jsonl", tmp_path / "one" / "iterations.jsonl"
    assert one.read_bytes() == two.read_bytes()


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


def saved_under_a_kill(tmp_path, kill_at: int) -> tuple[list, list]:
    """atomic_save_all of two new files over two old ones in a child process that dies (os._exit, no clean-up)
    at its `kill_at`-th rename or removal; then finish_saves, as the next run's start does. Returns the
    files' contents and every name left in the folders."""
    paths = [tmp_path / "a" / "checkpoint.pth", tmp_path / "b" / "checkpoint.pth"]
    for p in paths:
        p.parent.mkdir(exist_ok=True)
        torch.save({"at": "old"}, p)
    journal = tmp_path / ".checkpoint.commit"
    pid = os.fork()
    if pid == 0:  # the child: every rename or removal counts; the kill_at-th never happens
        calls = [0]

        def killing(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(0)
                return real(*args, **kwargs)

            return call

        os.replace, os.unlink = killing(os.replace), killing(os.unlink)
        common.io.atomic_save_all({p: {"at": "new"} for p in paths}, journal)
        os._exit(0)
    os.waitpid(pid, 0)
    common.io.finish_saves(journal, paths)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    return [torch.load(p, weights_only=True)["at"] for p in paths], names


def test_a_kill_at_any_step_of_a_save_leaves_the_students_together(tmp_path):
    """Each .next file written (a temp file renamed), the journal (the commit point), two renames, the journal's
    removal: killed before any of these, the files are all old or all new, and nothing else is left."""
    seen = []
    for kill_at in range(1, 9):
        folder = tmp_path / str(kill_at)
        folder.mkdir()
        contents, names = saved_under_a_kill(folder, kill_at)
        assert len(set(contents)) == 1, (kill_at, contents)
        assert names == ["a", "a/checkpoint.pth", "b", "b/checkpoint.pth"], (kill_at, names)
        seen.append(contents[0])
    assert seen == ["old"] * 3 + ["new"] * 5  # the journal's rename is the commit point


def test_a_journal_naming_other_files_moves_nothing(tmp_path):
    """A journal that travels with a folder cannot rename any file but the run's own staged checkpoints."""
    paths = [tmp_path / "a" / "checkpoint.pth"]
    paths[0].parent.mkdir()
    torch.save({"at": "old"}, paths[0])
    (tmp_path / "payload").write_text("x")
    journal = tmp_path / ".checkpoint.commit"
    journal.write_text(json.dumps({"replace": [["payload", "a/checkpoint.pth"]]}))
    with pytest.raises(UsageError, match="is not the journal of this run's checkpoints"):
        common.io.finish_saves(journal, paths)
    assert torch.load(paths[0], weights_only=True)["at"] == "old" and (tmp_path / "payload").is_file()


@pytest.mark.parametrize("kill", ["before the commit", "between the renames"])
def test_a_run_killed_while_saving_resumes_with_the_same_command(data, tmp_path, capsys, monkeypatch, kill):
    """The epoch-1 save of two students dies after the first student's new file is in place (or before the
    journal): the same command completes (or undoes) that save and resumes both students at one place."""
    out = tmp_path / "run"
    argv = base(data, out, *TWO, "--epochs", "2", "--epoch-length", "1", "--pca-every", "0")
    saves = []
    real_save, real_finish = common.io.atomic_save, common.io.finish_saves

    def dying_save(obj, path):
        real_save(obj, path)
        saves.append(path)
        if kill == "before the commit" and len(saves) == 3:  # the second save's first student is written
            shutil.copy(path, tmp_path / "left")  # what a kill leaves; the failed save's clean-up removes it
            raise SystemError("killed")

    def dying_finish(journal, paths):
        if kill == "between the renames" and len(saves) == 4:
            first = paths[0]
            os.replace(first.with_name(f".{first.name}.next"), first)
            raise SystemError("killed")
        real_finish(journal, paths)

    monkeypatch.setattr(common.io, "atomic_save", dying_save)
    monkeypatch.setattr(common.io, "finish_saves", dying_finish)
    with pytest.raises(SystemError, match="killed"):
        pretrain_main.main(argv)
    monkeypatch.undo()
    if kill == "before the commit":
        shutil.move(tmp_path / "left", saves[-1])
    capsys.readouterr()
    assert pretrain_main.main(argv) == 0
    printed = capsys.readouterr().out
    epoch = 0 if kill == "before the commit" else 1
    assert f"resumed from {out} after epoch {epoch}" in printed
    for name in ("vit_tiny", "vit_small"):
        assert models.safe_load(out / name / "checkpoint.pth")["epoch"] == 1
        assert not [p.name for p in (out / name).iterdir() if p.name.startswith(".")]
    assert not (out / ".checkpoint.commit").exists()
