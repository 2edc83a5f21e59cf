"""Several teachers, one student: per-teacher heads and standardised targets, their statistics
estimated once and saved, per-teacher logs, adaptors.pth, and the flags' errors."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.data import OPENAI_CLIP_MEAN

import models
from models import TeacherTarget, load_adaptors, load_backbone
from pretrain import main as pretrain_main
from pretrain.distiller import Distiller, teacher_losses
from tests.helpers import TINY_RUN, make_image_folder, tiny_vit

TEACHERS = "dinov2_vits14,clip_vitb16"


def moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    x = x.flatten(0, -2).double()
    return x.shape[0], x.sum(0), x.T @ x


def loss_shares(standardization: str) -> float:
    """The ratio of two teachers' losses at initialisation when one's features are 100x the other's."""
    torch.manual_seed(0)
    targets = {}
    for name, dim, scale in (("small", 12, 1.0), ("large", 20, 100.0)):
        mixing = torch.randn(dim, dim)
        cls, patches = (torch.randn(16, dim) @ mixing + 3) * scale, (torch.randn(16, 4, dim) @ mixing - 1) * scale
        targets[name] = models.Tokens(cls, patches, (2, 2))
    d = Distiller(tiny_vit(), [TeacherTarget(n, t.cls.shape[1], standardization=standardization)
                               for n, t in targets.items()])  # fmt: skip
    for name, t in targets.items():
        d.adaptors[name].cls_std.fit(*moments(t.cls))
        d.adaptors[name].patch_std.fit(*moments(t.patches))
    with torch.no_grad():
        losses = d(torch.randn(16, 3, 28, 28), torch.rand(8, 4) < 0.5, targets)
    share = {n: sum(float(losses[f"{n}_{level}"]) for level in ("token", "patch", "fea")) for n in targets}
    return share["large"] / share["small"]


@pytest.mark.parametrize("standardization", ["phi-s", "zscore"])
def test_standardised_teachers_of_100x_scale_share_the_loss(standardization):
    assert 0.5 <= loss_shares(standardization) <= 2.0
    assert loss_shares("none") > 1000  # without standardisation one teacher is the whole loss


def test_raw_summary_targets_enter_the_token_loss_as_the_teacher_gives_them():
    """With summary standardisation none the token loss is the MSE to the teacher's own CLS; by default to the
    CLS standardised with its own statistics. The patch targets are PHI-S'd either way."""
    torch.manual_seed(0)
    mixing = torch.randn(12, 12)
    cls, patches = torch.randn(16, 12) @ mixing * 50 + 3, torch.randn(16, 4, 12) @ mixing - 1
    target = models.Tokens(cls, patches, (2, 2))
    d = Distiller(tiny_vit(), [TeacherTarget("raw", 12, standardization="phi-s", summary_standardization="none"),
                               TeacherTarget("both", 12, standardization="phi-s")])  # fmt: skip
    for a in d.adaptors.values():
        a.cls_std.fit(*moments(cls))
        a.patch_std.fit(*moments(patches))
    with torch.no_grad():
        out = d.student.forward_tokens(torch.randn(16, 3, 28, 28))
        for name, summary in (("raw", cls), ("both", d.adaptors["both"].cls_std(cls))):
            a = d.adaptors[name]
            parts = teacher_losses(a, out.cls, out.patches, masks=None, target=target)
            assert torch.equal(parts["token"], F.mse_loss(a.token_head(out.cls), summary))
            want = torch.cat((summary.unsqueeze(1), a.patch_std(patches)), dim=1)
            pred = torch.cat((a.token_head(out.cls).unsqueeze(1), a.fea_head(out.patches)), dim=1)
            assert torch.equal(parts["fea"], F.mse_loss(pred, want))
    assert all(a.patch_std.kind == "phi-s" for a in d.adaptors.values()) and d.adaptors["raw"].cls_std.kind == "none"
    assert not torch.allclose(d.adaptors["both"].cls_std(cls), cls)


def test_a_raw_summary_run_estimates_the_patches_exports_and_resumes_with_its_flag(two_teachers, tmp_path, capsys):
    """--teacher-summary-standardization none end to end: the patch statistics are still estimated, the
    checkpoint stores the flag, adaptors.pth returns the token head's CLS as is (the teacher's space), and a
    resume without the flag is one line naming it."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "o"
    sizes = ["--teacher-input-size", "42,48"]
    assert run(data, out, "--epochs", "1", *sizes, "--teacher-summary-standardization", "none") == 0
    assert "estimating the target statistics of clip_vitb16, dinov2_vits14" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["teacher_summary_standardization"] == "none"
    assert not [k for k in ckpt["heads"] if ".cls_std." in k]  # the identity: no statistics
    assert ckpt["heads"]["teachers.clip_vitb16.patch_std.estimated"]
    adaptors = load_adaptors(out / "adaptors.pth")
    clip = adaptors.adaptors["clip_vitb16"]
    assert (clip.target.standardization, clip.target.summary_standardization) == ("phi-s", "none")
    backbone = load_backbone(out / "backbone.pth").eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        predicted = adaptors(backbone, images)["clip_vitb16"].cls
        want = clip.token_head(backbone.forward_features(images)["x_norm_clstoken"])
    assert torch.equal(predicted, want)

    assert run(data, out, "--epochs", "2", *sizes) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with --teacher-summary-standardization none, not phi-s" in err[0], err


def test_one_teacher_keeps_its_head_names_and_loss_names():
    d = Distiller(tiny_vit(), [TeacherTarget("dinov2_vits14", 8)])
    assert d.loss_names == ("total", "token", "patch", "fea")
    assert {k.split(".")[0] for k in d.heads_state_dict()} == {"token_head", "patch_head", "fea_head"}


@pytest.fixture
def two_teachers(tiny_teacher):
    tiny_teacher("dinov2_vits14", dim=48, depth=1)
    tiny_teacher("clip_vitb16", dim=32, depth=1)


def run(data, out, *extra) -> int:
    base = list(TINY_RUN)
    base[base.index("--teacher") + 1] = TEACHERS
    return pretrain_main.main([*base, "--data-path", str(data), "--output-dir", str(out), "--epoch-length", "2",
                               "--teacher-stats-batches", "2", *extra])  # fmt: skip


def test_two_teachers_with_resampled_grids_train_resume_and_export(two_teachers, tmp_path, capsys):
    """DINOv2 at 42 px (3x3) and CLIP with its patch map at 48 px (3x3), both resampled to the student's 2x2
    (so CLIP's patch and feature levels are on by default). Statistics are estimated on a fresh run, saved with
    the heads and reloaded (not re-estimated) on resume; the console, log.txt and tensorboard carry each
    teacher's levels; adaptors.pth predicts each teacher's features in its own space."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "o"
    sizes = ["--teacher-input-size", "42,48", "--teacher-weights", "1,0.5"]
    assert run(data, out, "--epochs", "1", *sizes) == 0
    printed = capsys.readouterr().out
    assert "3x3 patch tokens (dinov2_vits14 at 42 px) are resampled to the student's 2x2 grid" in printed
    assert "3x3 patch tokens (clip_vitb16 at 48 px) are resampled to the student's 2x2 grid" in printed
    assert "estimating the target statistics of clip_vitb16, dinov2_vits14 on 2 batches" in printed
    first = torch.load(out / "checkpoint.pth", weights_only=True)["heads"]
    assert first["teachers.dinov2_vits14.cls_std.estimated"] and first["teachers.clip_vitb16.patch_std.estimated"]
    assert first["teachers.clip_vitb16.cls_std.rotation"].shape == (32, 32)
    assert "teachers.clip_vitb16.patch_head.1.weight" in first  # resampled: CLIP's patch level is on

    assert run(data, out, "--epochs", "2", *sizes) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "estimating" not in printed
    progress = re.search(r"epoch 1 \[2/2\] loss \S+ \((.*)\) lr", printed).group(1)
    levels = r"token \S+ patch \S+ fea \S+"
    assert re.fullmatch(f"dinov2_vits14: {levels}; clip_vitb16: {levels}", progress)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for teacher, level in itertools.product(TEACHERS.split(","), ("token", "patch", "fea")):
        assert {f"train/loss_{teacher}_{level}", f"epoch/train_loss_{teacher}_{level}"} <= tags
    last = torch.load(out / "checkpoint.pth", weights_only=True)["heads"]
    for key in (k for k in first if "_std." in k):  # frozen: the statistics never change
        assert torch.equal(first[key], last[key]), key
    line = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for teacher in TEACHERS.split(","):
        assert {f"train_loss_{teacher}_{level}" for level in ("token", "patch", "fea")} <= set(line)
    total = sum(w * line[f"train_loss_{t}_{lvl}"] for t, w in (("dinov2_vits14", 1), ("clip_vitb16", 0.5))
                for lvl in ("token", "patch", "fea"))  # fmt: skip
    assert line["train_loss"] == pytest.approx(total, rel=1e-5)

    adaptors = load_adaptors(out / "adaptors.pth")
    assert adaptors.teachers["clip_vitb16"]["mean"] == list(OPENAI_CLIP_MEAN)  # several teachers: each its own
    assert (
        adaptors.teachers["clip_vitb16"]["family"] == "clip" and adaptors.teachers["dinov2_vits14"]["input_size"] == 42
    )
    backbone = load_backbone(out / "backbone.pth").eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        predicted = adaptors(backbone, images)
        tokens = backbone.forward_features(images)
    clip = adaptors.adaptors["clip_vitb16"]
    assert predicted["dinov2_vits14"].patches.shape == (2, 4, 48) and predicted["clip_vitb16"].cls.shape == (
        2,
        32,
    )
    std = clip.cls_std
    with torch.no_grad():
        want = std.mean + (clip.token_head(tokens["x_norm_clstoken"]) * std.scale) @ std.rotation
    torch.testing.assert_close(predicted["clip_vitb16"].cls, want)  # de-standardised: the teacher's own space


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher-input-size", "28,28,28"], "--teacher-input-size 28,28,28: 3 values for 2 teachers"),
        (["--teacher-weights", "1,x"], "--teacher-weights 1,x: expected float values"),
        (["--teacher-weights", "0,0"], "must be >= 0 and not all 0"),
        (["--teacher-checkpoint", "a.pth"], "--teacher-checkpoint names 1 files for 2 teachers"),
        (["--teacher-input-size", "28,30"], "not a multiple of clip_vitb16's patch size 16"),
    ],
)
def test_teacher_flags_are_checked_per_teacher(tmp_path, capsys, extra, message):
    assert run(tmp_path, tmp_path / "o", *extra) == 2
    assert message in capsys.readouterr().err


def test_one_value_of_a_per_teacher_flag_applies_to_every_teacher():
    teachers = ["dinov2_vits14", "clip_vitb16", "synclr_vitb16"]

    def weights(value):
        return pretrain_main.per_teacher(value, teachers, "--teacher-weights", kind=float, default=1.0)

    assert weights("0.5") == [0.5, 0.5, 0.5]
    assert weights("1,2,3") == [1.0, 2.0, 3.0]
    assert weights(None) == [1.0, 1.0, 1.0]


def test_a_teacher_named_twice_or_without_a_hadamard_width_is_one_line(tiny_teacher, tmp_path, capsys):
    base = [*TINY_RUN, "--data-path", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert pretrain_main.main([*base, "--teacher", "dinov2_vits14,dinov2_vits14"]) == 2
    assert "names a teacher twice" in capsys.readouterr().err
    tiny_teacher("clip_vitb16", dim=28)
    assert pretrain_main.main([*base, "--teacher", TEACHERS]) == 2
    assert "no Hadamard matrix of order 28" in capsys.readouterr().err
    assert models.TEACHERS["clip_vitb16"].config.embed_dim == 28


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_two_teachers_on_cuda_in_bf16(two_teachers, tmp_path):
    """The statistics (moments summed on the CPU, fitted into buffers on the GPU) and the standardisation in
    float32 under bf16 autocast, on CUDA: finite losses, estimated standardisers in the export."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "o"
    extra = ["--epochs", "1", "--device", "cuda", "--precision", "bf16", "--teacher-input-size", "42,48"]
    assert run(data, out, *extra) == 0
    line = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert all(math.isfinite(v) for k, v in line.items() if k.startswith("train_loss"))
    adaptors = load_adaptors(out / "adaptors.pth")
    assert all(bool(a.cls_std.estimated) and bool(a.patch_std.estimated) for a in adaptors.adaptors.values())


def test_fetch_teachers_puts_them_where_pretraining_looks(tmp_path, monkeypatch, capsys):
    """`python -m scripts.fetch_teachers NAME ...` on a login node fills torch hub's cache, which a run without
    --teacher-checkpoint then reads; a file already there is kept; an unknown name is one line. No test downloads."""
    from scripts import fetch_teachers

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fetched = []

    def fake_download(url, dst, *args, **kwargs):
        fetched.append(url)
        with open(dst, "wb") as f:
            f.write(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert fetch_teachers.main(["dinov2_vits14", "clip_vitb16"]) == 0
    assert fetch_teachers.main(["clip_vitb16"]) == 0  # already there
    assert fetched == [models.TEACHERS["dinov2_vits14"].url, models.TEACHERS["clip_vitb16"].url]
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("downloading")]
    assert lines == [
        f"dinov2_vits14: {cache / 'dinov2_vits14_pretrain.pth'}",
        f"clip_vitb16: {cache / 'ViT-B-16.pt'}",
        f"clip_vitb16: {cache / 'ViT-B-16.pt'}",
    ]
    assert fetch_teachers.main(["dinov2_vits14", "dino"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown teacher dino; choose from dinov2_vits14, ")
