"""Every non-dense evaluation on DINOv3 files as they are: a DINOv3-layout student's
`backbone.pth` (models.to_reference(student, "dinov3")) and an official-format DINOv3 teacher file given
as `--backbone dinov3_vits16.pth`. The features each eval computes are checked against
tests.helpers.FairViT, the independent re-statement of FAIR's network, so counting the 4 storage
tokens as patches, reading the wrong blocks or norm, or a RoPE grid of the wrong size fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import models
from common.features import eval_transform
from fine_grained import main as fg_main
from fine_grained.datasets import DATASETS, SplitOptions, build_split
from linear_eval import knn as knn_main
from linear_eval import main as linear_main
from linear_eval.classifiers import last_block_features, linear_features
from linear_eval.data import load_splits, val_transform
from models.dinov3 import DinoV3ViT
from pretrain import pca
from pretrain.pca import pca_rgb
from scripts import evaluate_all, visualize_pca
from tests.helpers import N_STORAGE, FairViT, fair, official_sd, official_weights_, rel_err

TEACHER = dict(dim=384, depth=4, heads=6, hidden=1536)  # dinov3_vits16's width, heads and MLP; 4 blocks
STUDENT = dict(dim=192, depth=12, heads=3, hidden=768)  # vit_tiny_dinov3
RUN = ["--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
KINDS = ("student", "teacher")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """{kind: (file, FairViT arguments)}: the student's export and the teacher's official file."""
    root = tmp_path_factory.mktemp("dinov3_files")
    torch.manual_seed(0)
    student = official_weights_(models.create_student("vit_tiny_dinov3"), seed=1)  # LayerScale ~1: blocks matter
    (root / "student").mkdir()
    torch.save(models.to_reference(student, "dinov3"), root / "student" / "backbone.pth")
    torch.save(official_sd(**TEACHER, seed=2), root / "dinov3_vits16.pth")
    return {"student": (root / "student" / "backbone.pth", STUDENT), "teacher": (root / "dinov3_vits16.pth", TEACHER)}


def reference(files: dict, kind: str) -> FairViT:
    path, arch = files[kind]
    return fair(torch.load(path, weights_only=True), **arch)


def fair_linear_features(ref: FairViT, x: torch.Tensor) -> torch.Tensor:
    """PROTOCOLS B's compact feature from FAIR's outputs: CLS of the last 4 blocks + mean of the last block's
    patch tokens (after the cls and the 4 storage tokens)."""
    layers = ref.get_intermediate_layers(x, 4)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(dim=1)], dim=-1)


def stack(dataset, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in rows.tolist()])


# --- the features ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_linear_features_are_fairs_and_leave_the_storage_tokens_out(files, kind):
    model, ref = models.load_backbone(files[kind][0]).eval(), reference(files, kind)
    dim = files[kind][1]["dim"]
    for size in ((224, 224), (96, 160)):  # RoPE at any multiple of 16
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, theirs = linear_features(model, x), fair_linear_features(ref, x)
            last = ref.norm(ref.blocks_out(x)[-1])
        assert ours.shape == (2, 5 * dim)
        assert rel_err(ours, theirs) < 1e-4, size
        # the avgpool part is not the mean over the storage tokens too: the test can tell them apart
        with_storage = last[:, 1:].mean(dim=1)
        assert rel_err(with_storage, last[:, 1 + N_STORAGE :].mean(dim=1)) > 1e-3
        assert rel_err(ours[:, 4 * dim :], with_storage) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_dinov3_protocol_features_are_fairs(files, kind):
    """`--protocol dinov3` reads what dinov3/eval/linear.py's create_linear_input makes of
    get_intermediate_layers(n=1, return_class_token=True): the normed CLS, then the mean of the normed
    patch tokens (the storage tokens are neither)."""
    model, ref = models.load_backbone(files[kind][0]).eval(), reference(files, kind)
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = last_block_features(model, x)
        ((patches, cls),) = ref.get_intermediate_layers(x, 1)
    assert ours.shape == (2, 2 * files[kind][1]["dim"])
    assert rel_err(ours, torch.cat([cls, patches.mean(dim=1)], dim=-1)) < 1e-4


def test_load_backbone_never_initialises_what_the_file_holds(files, monkeypatch):
    """A DINOv3 file fills every weight, so the network is built on the meta device: FAIR's random init
    on real memory would cost minutes and a second copy of the 7B teacher."""
    devices = []
    init = DinoV3ViT.init_dinov3_weights
    monkeypatch.setattr(
        DinoV3ViT, "init_dinov3_weights", lambda self: devices.append(self.cls_token.device) or init(self)
    )
    for kind in KINDS:
        model = models.load_backbone(files[kind][0], drop_path_rate=0.1).eval()
        assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
        assert all(p.device.type == "cpu" for p in [*model.parameters(), *model.buffers()])
        assert all(torch.count_nonzero(b.attn.k_bias) == 0 for b in model.blocks)  # the masked k bias
        x = torch.randn(1, 3, 64, 48)
        with torch.no_grad():
            ours, theirs = model.forward_features(x), reference(files, kind).forward_features(x)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            assert rel_err(ours[key], theirs[key]) < 1e-4, (kind, key)
    assert devices and all(d.type == "meta" for d in devices)


# --- linear probe and kNN --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_linear_probe_and_knn(files, kind, imagenet, tmp_path, capsys):
    path, ref = files[kind][0], reference(files, kind)
    argv = ["--data-path", str(imagenet), "--backbone", str(path), *RUN]
    out = tmp_path / "linear"
    linear = [*argv, "--output-dir", str(out), "--input-size", "32", "--epochs", "1", "--cache-dir", str(out)]
    assert linear_main.main(linear) == 0
    res = json.loads((out / "results.json").read_text())["details"]
    assert len(res["classifiers"]) == 52 and res["images"]["val"] == {"evaluated": 9, "dropped": 0, "unreadable": []}
    # the cached eval features are FAIR's, image by image, at 32 (a 2x2 grid)
    cached = models.safe_load(out / "features_val.pth")
    val = load_splits(imagenet, val_transform(32), val_transform(32))[1]
    with torch.no_grad():
        expected = fair_linear_features(ref, stack(val, cached["index"]))
    assert rel_err(cached["features"], expected) < 1e-4
    # kNN at the default input size, 224 (14x14 patches of 16)
    cache = tmp_path / "knn_cache"
    assert (
        knn_main.main([*argv, "--output-dir", str(tmp_path / "knn"), "--cache-dir", str(cache), "--nb-knn", "3"]) == 0
    )
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["metrics"]["top-1 k=3"] >= 0
    cached = models.safe_load(cache / "val_features.pth")
    with torch.no_grad():
        expected = ref.forward_features(
            stack(load_splits(imagenet, val_transform(224), val_transform(224))[1], cached["index"])
        )
    assert cached["key"]["input size"] == 224
    assert rel_err(cached["features"], expected["x_norm_clstoken"]) < 1e-4
    # an input size that is no multiple of 16 (28 is one of 14): one line, exit 2, before any extraction
    capsys.readouterr()
    assert knn_main.main([*argv, "--output-dir", str(tmp_path / "bad"), "--input-size", "28"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --input-size 28 is not a multiple of the patch size 16"]


# --- fine-grained ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_fine_grained_at_the_default_224(files, kind, fine_grained, tmp_path):
    path, ref = files[kind][0], reference(files, kind)
    out = tmp_path / "fg"
    argv = ["--backbone", str(path), "--data-path", str(fine_grained), "--output-dir", str(out), "--datasets", "cub200"]
    assert fg_main.main([*argv, *RUN, "--max-iter", "20"]) == 0
    res = json.loads((out / "results.json").read_text())["details"]["datasets"]["cub200"]
    assert (res["n_train"], res["n_val"], res["n_test"]) == (8, 1, 6) and 0 <= res["value"] <= 100
    cached = models.safe_load(out / "features" / "cub200_test.pth")
    mean, std = fg_main.NORMALIZATION["imagenet"]
    transform = eval_transform(224, 224, mean=mean, std=std)
    test = build_split(
        DATASETS["cub200"], fine_grained, "test", transform=transform, download=False, options=SplitOptions()
    )
    with torch.no_grad():
        expected = ref.forward_features(stack(test, cached["index"]))["x_norm_clstoken"]
    assert rel_err(cached["features"], expected) < 1e-4


# --- PCA pictures ----------------------------------------------------------------------------------
def test_visualize_pca_next_to_a_patch14_student_at_the_default_size(files, tmp_path, capsys):
    """The default --input-size (448) is a multiple of 14 and 16: a DINOv2-layout ViT-x/14, the DINOv3 student
    and the DINOv3 teacher side by side, each on its own patch grid; the DINOv3 panels are FAIR's tokens' PCA."""
    images = tmp_path / "images"
    images.mkdir()
    photo = np.random.default_rng(0).integers(0, 255, (70, 70, 3), dtype=np.uint8)  # square: panels 448 x 448
    Image.fromarray(photo).save(images / "photo.png")
    torch.manual_seed(0)
    dinov2 = tmp_path / "dinov2.pth"
    torch.save(models.to_dinov2(models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)), dinov2)
    argv = ["--images", str(images), "--device", "cpu", "--backbone", str(dinov2)]
    argv += [a for kind in KINDS for a in ("--backbone", str(files[kind][0]))]
    assert visualize_pca.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    pic = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    top, step = pca.label_height(448), 448 + pca.GAP  # each panel under its name strip, a gap between panels
    assert pic.shape == (top + 448, 4 * step - pca.GAP, 3)
    panels = [pic[top:, i * step : i * step + 448] for i in range(1, 4)]
    for panel, patch in zip(panels, (14, 16, 16)):
        cells = panel.reshape(448 // patch, patch, 448 // patch, patch, 3)
        assert (cells == cells[:, :1, :, :1]).all(), patch  # one colour per patch of that backbone
    resized = Image.fromarray(photo).resize((448, 448), Image.BICUBIC)
    x = transforms.Normalize(*fg_main.NORMALIZATION["imagenet"])(transforms.functional.to_tensor(resized))[None]
    for kind, panel in zip(KINDS, panels[1:]):
        with torch.no_grad():
            tokens = reference(files, kind).forward_features(x)["x_norm_patchtokens"][0]
        rgb = F.interpolate(pca_rgb(tokens, (28, 28))[None], size=(448, 448), mode="nearest")[0]
        expected = (rgb.permute(1, 2, 0).numpy() * 255).round()
        assert np.mean(np.abs(panel.astype(float) - expected) <= 1) > 0.99, kind
    # 434 = 31 x 14 is no multiple of 16: one line naming the DINOv3 file
    capsys.readouterr()
    assert visualize_pca.main([*argv, "--output-dir", str(tmp_path / "bad"), "--input-size", "434"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{files['student'][0]}'s patch size 16" in err[0]


# --- evaluate_all ----------------------------------------------------------------------------------
def test_evaluate_all_on_a_dinov3_teacher_file(files, imagenet, fine_grained, tmp_path, capsys):
    """The teacher's own numbers (ViT-S from its embed dim 384), each row the task's results.json."""
    out = tmp_path / "eval"
    argv = ["--backbone", str(files["teacher"][0]), "--output-dir", str(out), "--quick", "--device", "cpu",
            "--tasks", "linear,knn,fine_grained", "--data-imagenet", str(imagenet),
            "--data-fine-grained", str(fine_grained), "--extra", "linear=--input-size 32",
            "--extra", "knn=--input-size 32", "--extra", "fine_grained=--input-size 32"]  # fmt: skip
    assert evaluate_all.main(argv) == 0, capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md.startswith(f"# Evaluation of `{files['teacher'][0]}` (ViT-S DINOv3 layout)")
    results = md.split("\n\n")[1]  # the results table, not the unreadable-images one
    rows = dict(re.findall(r"^\| (?:linear|knn|fine_grained) \| ([^|]+?) \| ([^|]+?) \| n/a \|", results, re.M))
    linear = json.loads((out / "linear" / "results.json").read_text())["details"]["best"]
    knn = json.loads((out / "knn" / "results.json").read_text())["metrics"]
    fg = json.loads((out / "fine_grained" / "results.json").read_text())["metrics"]
    assert rows[f"top-1 ({linear['name']})"] == f"{linear['top1']:.2f}"
    assert rows["top-1 k=20"] == f"{knn['top-1 k=20']:.2f}" and rows["mean (1 of 12)"] == f"{fg['mean (1 of 12)']:.2f}"
    assert len(rows) == 1 + 2 + 2  # no paper column for a DINOv3-layout backbone
