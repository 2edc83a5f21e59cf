"""The error contract of every entry point, for mistakes any of them can meet: an output folder that is
a file, a device that does not exist here. One `error:` line and exit code 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from fine_grained import main as fg_main
from linear_eval import knn as knn_main
from linear_eval import main as linear_main
from pretrain import main as pretrain_main
from scripts import evaluate_all, visualize_pca


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=1)
    path = tmp_path_factory.mktemp("bb") / "backbone.pth"
    torch.save(models.to_dinov2(vit), path)
    return path


def entry_points(backbone: Path, tmp: Path) -> dict:
    """name -> (main, argv without the output flag, output flag)."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    for split in ("train", "val"):  # evaluate_all runs nothing without a data folder
        (tmp / split).mkdir(exist_ok=True)
    return {
        "pretrain": (pretrain_main.main, ["--data-path", str(tmp), "--random-teacher", "--student", "vit_tiny",
                                          "--teacher", "dinov2_vits14"], "--output-dir"),
        "linear": (linear_main.main, ["--data-path", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "knn": (knn_main.main, ["--data-path", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "fine_grained": (fg_main.main, ["--data-root", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "visualize_pca": (visualize_pca.main, ["--images", str(images), "--backbone", str(backbone)], "--out"),
        "evaluate_all": (evaluate_all.main, ["--backbone", str(backbone), "--data-imagenet", str(tmp)], "--output-dir"),
    }  # fmt: skip


NAMES = ["pretrain", "linear", "knn", "fine_grained", "visualize_pca", "evaluate_all"]


@pytest.mark.parametrize("name", NAMES)
def test_output_folder_that_is_a_file(name, backbone, tmp_path, capsys):
    main, argv, flag = entry_points(backbone, tmp_path)[name]
    if name == "visualize_pca":
        (tmp_path / "images" / "a.jpg").write_bytes(b"")  # listed, never read: the folder check comes first
    taken = tmp_path / "out.txt"
    taken.write_text("not a folder")
    assert main([*argv, flag, str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: output folder {taken} exists and is not a folder"
    assert taken.read_text() == "not a folder"  # nothing overwritten


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", ["gpu", "cuda:0"])
def test_unknown_or_missing_device(name, device, backbone, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    main, argv, flag = entry_points(backbone, tmp_path)[name]
    if name == "visualize_pca":
        (tmp_path / "images" / "a.jpg").write_bytes(b"")
    assert main([*argv, flag, str(tmp_path / "out"), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --device {device}") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("module", [pretrain_main, linear_main, knn_main, fg_main, evaluate_all, visualize_pca])
def test_help_shows_each_default_once(module):
    parser = module.get_args_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            helped = " ".join(parser._get_formatter()._expand_help(action).split())
            assert helped.count("default") == 1, (action.option_strings, helped)  # said once, never missing
