"""What a backbone's inputs were normalised with in training, and that every evaluation normalises with it: our
exports record it (ImageNet's: pretraining's crops), a student's training checkpoint is ImageNet-normalised
whatever its family, an official file has its release's (DINOv3's satellite weights: their own)."""

from __future__ import annotations

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

import models
from models.checkpoints import export_metadata
from models.families.dinov3 import SAT_MEAN, SAT_STD
from tests.helpers import official_sd

SAT_FILE = models.TEACHERS["dinov3_vitl16_sat"].url.rsplit("/", 1)[-1]
ARCH = dict(dim=64, depth=4, heads=1, hidden=128)  # 4 blocks: the linear probe reads the last 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("normalization")
    official = official_sd(**ARCH)
    torch.save(official, folder / SAT_FILE)
    torch.save(official, folder / "dinov3_renamed.pth")
    clip_student = models.create_student("vit_tiny", img_size=28, layout="clip")
    torch.save(models.to_reference(clip_student, "clip"), folder / "clip_export.pth")
    reference = {f"student.backbone.{k}": v for k, v in models.to_reference(clip_student, "clip").items()}
    torch.save({"model": reference}, folder / "reference_checkpoint.pth")
    torch.save(clip_student.state_dict(), folder / "clip_flat.pth")  # no record: an official-like CLIP file
    return folder


@pytest.mark.parametrize(
    "name, mean",
    [
        (SAT_FILE, SAT_MEAN),  # the satellite release, by its file name
        ("dinov3_renamed.pth", IMAGENET_DEFAULT_MEAN),  # the same weights renamed: the family's (LVD's)
        ("clip_export.pth", IMAGENET_DEFAULT_MEAN),  # our export records pretraining's crops
        ("reference_checkpoint.pth", IMAGENET_DEFAULT_MEAN),  # the reference's students saw the same crops
        ("clip_flat.pth", OPENAI_CLIP_MEAN),  # a CLIP file without a record: CLIP's own
    ],
)
def test_a_backbone_knows_what_its_inputs_were_normalised_with(files, name, mean):
    assert tuple(models.load_backbone(files / name).normalization.mean) == pytest.approx(tuple(mean))


def test_an_export_records_its_normalisation():
    record = export_metadata(models.to_reference(models.create_student("vit_tiny", img_size=28), "dinov2"))
    assert record["normalization"] == (tuple(IMAGENET_DEFAULT_MEAN), (0.229, 0.224, 0.225))


def test_knn_linear_and_fine_grained_normalise_as_the_backbone_was_trained(files, imagenet, tmp_path, monkeypatch):
    """The evaluations' transforms take the backbone's mean/std (they were ImageNet's unconditionally)."""
    import argparse

    from fine_grained.main import input_normalization
    from linear_eval import data, knn
    from linear_eval import main as linear

    seen = []
    for module in (data, knn, linear):
        for name in ("train_transform", "val_transform"):
            if hasattr(module, name):
                real = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _real=real: seen.append(a[1].mean) or _real(*a))
    run = ["--backbone", str(files / SAT_FILE), "--data-path", str(imagenet), "--input-size", "32", "--batch-size",
           "8", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert knn.main([*run, "--output-dir", str(tmp_path / "knn"), "--nb-knn", "1"]) == 0
    assert linear.main([*run, "--output-dir", str(tmp_path / "linear"), "--epochs", "1"]) == 0
    assert len(seen) == 3 and all(tuple(m) == SAT_MEAN for m in seen)  # knn's one, the probe's two
    sat = models.load_backbone(files / SAT_FILE)
    assert input_normalization(argparse.Namespace(normalization="backbone"), sat) == ("backbone", SAT_MEAN, SAT_STD)
    ours = models.load_backbone(files / "clip_export.pth")
    assert input_normalization(argparse.Namespace(normalization="backbone"), ours)[0] == "imagenet"
