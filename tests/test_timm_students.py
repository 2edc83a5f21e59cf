"""timm models as students (--student timm:<model>): they distil beside our ViTs from one teacher pass, mask in
pixel space, export in timm's own layout that timm loads strictly with the same features, and resume exactly."""

from __future__ import annotations

import signal

import pytest
import timm
import torch

import models
from pretrain import main as pretrain_main
from tests.helpers import command, interrupt, iterations, make_image_folder, run_ok, tiny_spec

# CPU-sized students of three kinds: a ResNet, a ConvNeXt and a mobile network whose pooled feature (1280) is
# wider than its tokens (960)
STUDENTS = ["timm:resnet18", "timm:convnext_atto", "timm:mobilenetv4_conv_small"]


@pytest.fixture
def tiny_dinov2(monkeypatch):
    spec = tiny_spec("dinov2_vits14", dim=64, depth=2, heads=1, img_size=56)
    monkeypatch.setitem(models.TEACHERS, "dinov2_vits14", spec)
    return spec


def distil(tmp_path, students: str, input_size: int = 64, *extra: str) -> int:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=2, size=(input_size, input_size))
    argv = ["--teacher", "dinov2_vits14", "--random-teacher", "--student", students, "--input-size", str(input_size),
            "--teacher-input-size", "56", "--data-path", str(data), "--output-dir", str(tmp_path / "run"),
            "--batch-size", "2", "--epochs", "1", "--epoch-length", "2", "--num-workers", "0", "--pca-every", "0",
            "--device", "cpu", *extra]  # fmt: skip
    return pretrain_main.main(argv)


@pytest.mark.parametrize("name", STUDENTS)
def test_a_timm_student_distils_and_its_export_is_timms_own(name, tiny_dinov2, tmp_path):
    assert distil(tmp_path, name) == 0
    path = tmp_path / "run" / "backbone.pth"
    arch = name.removeprefix("timm:")
    ours = models.load_backbone(path).eval()
    theirs = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.forward_tokens(x).cls, rtol=0, atol=0)
        want = theirs.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(ours.forward_tokens(x).patches, want, rtol=0, atol=0)
    adaptors = models.load_adaptors(tmp_path / "run" / "adaptors.pth")
    head = adaptors.adaptors["dinov2_vits14"].token_head
    assert head[0].normalized_shape == (ours.summary_dim,)  # MobileNetV4: 1280, its tokens 960
    assert adaptors(ours, x)["dinov2_vits14"].patches.shape == (2, 4, 64)


def test_a_masked_cell_is_the_mean_colour_in_pixel_space():
    student = models.create_student("timm:resnet18", img_size=64)
    x = torch.randn(1, 3, 64, 64)
    masks = torch.tensor([[False, True, False, False]])  # the top-right 32x32 cell of the 2x2 grid
    masked = student.mask_pixels(x, masks)
    assert masked[..., :32, 32:].abs().sum() == 0
    assert torch.equal(masked[..., 32:, :], x[..., 32:, :]) and torch.equal(masked[..., :32, :32], x[..., :32, :32])


def test_our_vit_and_a_timm_student_share_one_teacher_pass(tiny_dinov2, tmp_path, monkeypatch):
    calls = []
    targets = models.Teacher.targets
    monkeypatch.setattr(models.Teacher, "targets", lambda self, *a, **k: calls.append(1) or targets(self, *a, **k))
    assert distil(tmp_path, "vit_tiny,timm:resnet18", 224) == 0
    assert len(calls) == 2  # one per iteration, for both students
    for folder in ("vit_tiny", "timm-resnet18"):
        assert len(iterations(tmp_path / "run" / folder)) == 2
    assert (
        models.layout_of(models.load_backbone(tmp_path / "run" / "vit_tiny" / "backbone.pth").state_dict()) == "dinov2"
    )


def test_a_timm_student_resumes_exactly_after_sigusr1(tmp_path):
    """The requeued run's losses are the uninterrupted run's, iteration by iteration; its checkpoint.pth, which
    records the student's name, is a backbone every evaluation reads, with the weights of backbone.pth. On a
    ResNet: its BatchNorm statistics are state a resume must carry, beyond the weights and the optimiser."""
    name = STUDENTS[0]
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, size=(64, 64))
    extra = ("--student", name, "--input-size", "64", "--teacher-input-size", "56", "--pca-every", "0")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_ok(command(data, whole, 0, *extra))
    assert interrupt(command(data, stopped, 0, *extra), stopped, signal.SIGUSR1, after=3) == pretrain_main.EXIT_REQUEUE
    run_ok(command(data, stopped, 0, *extra))
    assert iterations(stopped) == iterations(whole) and len(iterations(whole)) > 3
    from_checkpoint = models.load_backbone(stopped / "checkpoint.pth")
    exported = models.load_backbone(stopped / "backbone.pth")
    assert from_checkpoint.name == name.removeprefix("timm:") and from_checkpoint.img_size == 64
    want = exported.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in from_checkpoint.state_dict().items()) and len(want) > 10


def test_every_evaluation_runs_on_a_timm_students_export(imagenet, fine_grained, ade, nyu, tmp_path):
    """evaluate_all on a CNN: the linear probe (13 classifiers on the global feature), kNN and fine-grained on the
    same feature, ADE20K's linear probe on the last map and NYU's DPT probe over the four stages (the *_timm.py
    configs); no paper figure, as no such student is in the paper. (test_dense_timm builds those configs' heads on
    every kind of CNN's own stages.)"""
    pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
    import json

    from scripts import evaluate_all

    name = STUDENTS[0]
    path = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(models.to_reference(models.create_student(name, img_size=64), "timm"), path)
    out = tmp_path / "eval"
    tasks = ["linear", "knn", "fine_grained", "ade20k", "nyu"]
    argv = ["--backbone", str(path), "--output-dir", str(out), "--quick", "--device", "cpu",
            "--tasks", ",".join(tasks), "--data-imagenet", str(imagenet),
            "--data-fine-grained", str(fine_grained), "--data-ade20k", str(ade), "--data-nyu", str(nyu),
            "--extra", "linear=--input-size 64", "--extra", "knn=--input-size 64",
            "--extra", "nyu=--cfg-options model.decode_head.channels=16"]  # fmt: skip
    assert evaluate_all.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["model"] == name and not summary["skipped"] and not summary["failed"]
    assert {r["task"] for r in summary["rows"]} == set(tasks)
    assert all(r["paper"] is None for r in summary["rows"])
    linear = json.loads((out / "linear" / "results.json").read_text())
    assert linear["protocol"]["name"].startswith("linear probe on the global feature")
    assert len(linear["details"]["classifiers"]) == 13
    assert all(n.startswith("global_lr") for n in linear["details"]["classifiers"])
    for task, config in (("ade20k", "segmentation/configs/linear_timm.py"), ("nyu", "depth/configs/dpt_probe_timm.py")):
        assert json.loads((out / task / "results.json").read_text())["protocol"]["config"].endswith(config)
    from scripts import visualize_pca  # the PCA pictures of its last map, unchanged in use

    images = next(p for p in sorted((imagenet / "val").iterdir()) if p.is_dir())
    pca = ["--backbone", str(path), "--images", str(images), "--output-dir", str(tmp_path / "pca")]
    assert visualize_pca.main([*pca, "--input-size", "64", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "pca").glob("*.png"))) == len(list(images.iterdir()))


def test_a_timm_student_starts_from_timms_file(tiny_dinov2, tmp_path, capsys):
    from safetensors.torch import save_file

    start = timm.create_model("resnet18", pretrained=False, num_classes=10)  # its own head: left out
    save_file(start.state_dict(), tmp_path / "model.safetensors")
    still = ("--lr", "0", "--warmup-lr", "0", "--min-lr", "0")
    assert (
        distil(tmp_path, "timm:resnet18", 64, "--student-pretrained", str(tmp_path / "model.safetensors"), *still) == 0
    )
    exported = models.safe_load(tmp_path / "run" / "backbone.pth")
    params = dict(start.named_parameters())
    assert all(torch.equal(exported[k], v) for k, v in params.items() if not k.startswith("fc."))  # lr 0: as it began
    assert distil(tmp_path, "vit_tiny_dinov3", 64, "--student-pretrained", str(tmp_path / "model.safetensors")) == 2
    assert "--student-pretrained starts timm students (timm:<model>), not DINOv3-layout ones" in capsys.readouterr().err


def test_a_timm_name_is_timms_and_its_stride_is_its_last_maps():
    """timm:<model> wins over a family suffix (timm's vit_small_patch16_dinov3 is timm's); the token stride is the
    last map's, whatever the patch embedding's (a Swin's 4-pixel patches give a stride-32 map, in NHWC); a timm ViT
    with LayerScale (DINOv2's key names) is still the timm family's."""
    from models.families import family_of_model, split_student

    assert split_student("timm:vit_small_patch16_dinov3", None) == ("vit_small_patch16_dinov3", "timm")
    assert split_student("vit_small_dinov3", None) == ("vit_small", "dinov3")
    swin = models.create_student("timm:swin_tiny_patch4_window7_224", img_size=224).eval()
    with torch.no_grad():
        tokens = swin.forward_tokens(torch.randn(1, 3, 224, 224))
    assert swin.patch_size == 32 and tokens.grid == (7, 7) and tokens.patches.shape == (1, 49, 768)
    dinov2_like = models.create_student("timm:vit_small_patch14_reg4_dinov2", img_size=28)
    assert family_of_model(dinov2_like).name == "timm"


def test_a_timm_vit_student_starts_from_a_file_at_another_resolution(tmp_path):
    """timm's own file of a ViT at 224 starts a student at 64 px: its position table resized as timm does."""
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), tmp_path / "model.safetensors")
    student = models.create_student("timm:vit_tiny_patch16_224", img_size=64)
    models.FAMILIES["timm"].load_student_weights(student, tmp_path / "model.safetensors")
    assert student.model.pos_embed.shape == (1, 1 + 16, 192)
