"""Dense evaluations on DINOv3 backbones (PROTOCOLS G): a DINOv3-layout export and an
official DINOv3 file through every head on the tiny ADE20K/NYU folders (conftest), the `*_dinov3.py`
configs against DINOv3's dense setting and their DINOv2-layout configs, the backbone's patch map
(RoPE, storage tokens left out), layer-wise lr decay and the token groups on DINOv3's names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models

mmseg = pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
import segmentation.mmseg_ext as proteus_mmseg  # noqa: E402
from models.errors import UsageError  # noqa: E402
from scripts import evaluate_all  # noqa: E402
from segmentation import runner  # noqa: E402
from tests.helpers import DENSE_HEADS, DENSE_TINY, DEPTH, DIM, ROOT, official_sd, optimizer_groups  # noqa: E402

N_PREFIX = 5  # cls + 4 storage tokens


def dinov2_config(config: str) -> str:
    return config.replace("_dinov3.py", ".py")


@pytest.fixture(scope="module")
def export(dinov3_export) -> Path:
    return dinov3_export  # conftest's


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """An official-format DINOv3 file (random weights in its keys): S+-like SwiGLU with local_cls_norm."""
    path = tmp_path_factory.mktemp("official") / "dinov3_tiny.pth"
    torch.save(official_sd(dim=DIM, depth=DEPTH, heads=1, hidden=2 * DIM, swiglu=True, local_cls_norm=True), path)
    return path


def argv(config: str, backbone: Path, data: Path, work: Path, *extra: str) -> list[str]:
    base = [str(ROOT / config), "--backbone", str(backbone), "--data-path", str(data), "--output-dir", str(work)]
    return [*base, *extra, "--cfg-options", *DENSE_TINY, *DENSE_HEADS[dinov2_config(config)]]


def tiny_cfg(config: str, backbone: Path, data: Path):
    args = runner.get_args_parser(config.split("/")[0]).parse_args(argv(config, backbone, data, data / "work"))
    return runner.build_config(args, config.split("/")[0])


CONFIGS = [
    "segmentation/configs/linear_vit_small_dinov3.py",
    "segmentation/configs/upernet_vit_small_dinov3.py",
    "depth/configs/linear_vit_small_dinov3.py",
    "depth/configs/dpt_vit_small_dinov3.py",
]  # the DPT probe: test_official_dinov3_file_as_backbone


@pytest.mark.parametrize("config", CONFIGS)
def test_dinov3_export_trains_and_evaluates(config, export, ade, nyu, tmp_path):
    task = config.split("/")[0]
    work = tmp_path / "work"
    assert runner.main(task, argv(config, export, ade if task == "segmentation" else nyu, work)) == 0
    out = json.loads((work / "results.json").read_text())
    keys = ("mIoU",) if task == "segmentation" else ("rmse", "abs_rel", "d1")
    assert out["details"]["final"]["iter"] == 2 and all(
        np.isfinite(out["details"]["final"]["metrics"][k]) for k in keys
    ), out
    assert out["protocol"]["reference_pos_embed"] is False


def test_official_dinov3_file_as_backbone(official, nyu, tmp_path):
    """A teacher file exactly as FAIR releases it (here S+-like: SwiGLU, local_cls_norm) under the DPT
    probe, so a teacher's figures can stand beside its students'."""
    work = tmp_path / "work"
    assert runner.main("depth", argv("depth/configs/dpt_probe_vit_small_dinov3.py", official, nyu, work)) == 0
    assert np.isfinite(json.loads((work / "results.json").read_text())["details"]["final"]["metrics"]["rmse"])
    state = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert "backbone.vit.reg_token" in state and "backbone.vit.blocks.0.mlp.fc1_g.weight" in state


def test_patch_map_is_dinov3s_at_any_size(export, official):
    """The levels are FAIR's patch tokens of those blocks (storage tokens and CLS left out, no final
    norm) on the input's own grid (RoPE, no table), CLS beside them for DPT; fine-tuning keeps RoPE as
    at eval (no coordinate rescaling) while a plain train() of the ViT would rescale."""
    x = torch.randn(2, 3, 48, 80)  # a 3x5 grid: no 512, not square
    bb = proteus_mmseg.ProteusViT(checkpoint=str(export), out_indices=(1, 3), with_cls_token=True).eval()
    with torch.no_grad():
        (p1, c1), (p3, c3) = bb(x)
        tokens = bb.vit.forward_features(x)["x_prenorm"]  # after the last block, before the norm
    assert p1.shape == p3.shape == (2, DIM, 3, 5) and c3.shape == (2, DIM)
    torch.testing.assert_close(p3.flatten(2).transpose(1, 2), tokens[:, N_PREFIX:])
    torch.testing.assert_close(c3, tokens[:, 0])
    fine = proteus_mmseg.ProteusViT(checkpoint=str(official), out_indices=(3,), drop_path_rate=0.0).train()
    assert fine.vit.training and not fine.vit.rope.training
    with torch.no_grad():
        trained = fine(x)[0]
        fine.eval()
        assert torch.equal(trained, fine(x)[0])
        fine.vit.train()  # FAIR's RoPE in training mode: coordinates rescaled by a random factor
        torch.manual_seed(0)
        assert (fine.vit.get_intermediate_layers(x, n=[3], reshape=True, norm=False)[0] - trained).abs().max() > 1e-3
    named = dict(fine.named_parameters())
    assert not named["vit.local_cls_norm.weight"].requires_grad and not named["vit.mask_token"].requires_grad
    assert named["vit.reg_token"].requires_grad and named["vit.blocks.3.attn.q_bias"].requires_grad


def test_reference_pos_embed_is_one_clear_error(export, ade, tmp_path, capsys):
    expected = "--reference-pos-embed (reference_pos_embed) resizes a learned positional-embedding table once"
    with pytest.raises(UsageError, match=r"this DINOv3 backbone has none \(its RoPE takes any input size\)"):
        proteus_mmseg.ProteusViT(checkpoint=str(export), out_indices=(3,), reference_pos_embed=True)
    config = "segmentation/configs/linear_vit_small_dinov3.py"
    assert runner.main("segmentation", argv(config, export, ade, tmp_path / "w", "--reference-pos-embed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert not list(tmp_path.rglob("*.log"))  # mmengine never started


def test_layer_decay_reaches_every_dinov3_block(export, ade):
    """DINOv3's names (gamma_1, attn.q_bias, reg_token, ...) in the layer-wise lr decay: block i at
    lr * 0.65 ** (L - i), the tokens and patch embedding at layer 0 with cls_token's weight decay;
    no backbone parameter falls through to the heads' full lr."""
    cfg = tiny_cfg("segmentation/configs/upernet_vit_small_dinov3.py", export, ade)
    groups, model = optimizer_groups(cfg)
    base = 1e-4
    backbone = {n: g for n, g in groups.items() if n.startswith("backbone.")}
    trainable = {n for n, p in model.backbone.named_parameters(prefix="backbone") if p.requires_grad}
    assert set(backbone) == trainable and "backbone.vit.blocks.0.gamma_1" in backbone
    for name, (lr, _) in backbone.items():
        block = name.split(".")[3] if name.startswith("backbone.vit.blocks.") else None
        layer = int(block) + 1 if block is not None else 0
        assert lr == pytest.approx(base * 0.65 ** (DEPTH + 1 - layer)), name
    for name in ("cls_token", "reg_token", "patch_embed.proj.weight"):
        assert backbone[f"backbone.vit.{name}"][0] == pytest.approx(base * 0.65 ** (DEPTH + 1)), name
    assert backbone["backbone.vit.reg_token"][1] == backbone["backbone.vit.cls_token"][1] == 0.05  # the reference
    assert backbone["backbone.vit.blocks.0.attn.q_bias"][1] == backbone["backbone.vit.blocks.0.gamma_2"][1] == 0.0
    assert groups["decode_head.conv_seg.weight"][0] == pytest.approx(base)
    cfg.optim_wrapper.paramwise_cfg.token_weight_decay = False
    wd = {n: g[1] for n, g in optimizer_groups(cfg)[0].items()}
    assert wd["backbone.vit.reg_token"] == wd["backbone.vit.cls_token"] == 0.0
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == 0.05


def test_dpt_gives_storage_tokens_cls_tokens_groups(export, nyu):
    groups, _ = optimizer_groups(tiny_cfg("depth/configs/dpt_vit_small_dinov3.py", export, nyu))
    base, wd = 4e-4, 0.01
    assert groups["backbone.vit.reg_token"] == groups["backbone.vit.cls_token"] == pytest.approx((base, 0.0))
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.v_bias", "blocks.3.gamma_2", "patch_embed.proj.weight"):
        assert groups[f"backbone.vit.{name}"] == pytest.approx((base * 0.1, wd)), name


# --- the configs: DINOv3's dense setting, the rest as the DINOv2-layout config --------------------------------
DINOV3_CONFIGS = [
    f"{d}/configs/{head}_vit_{size}_dinov3.py"
    for d, heads in (("segmentation", ("linear", "upernet")), ("depth", ("linear", "dpt", "dpt_probe")))
    for head in heads
    for size in ("small", "base", "large")
]
SIZED = {"RandomResize": "scale", "Resize": "scale", "RandomCrop": "crop_size"}  # the transforms' crop-bound keys


def _without_sizes(pipeline: list) -> list:
    return [{k: v for k, v in t.items() if k != SIZED.get(t["type"])} for t in pipeline]


@pytest.mark.parametrize("config", DINOV3_CONFIGS)
def test_dinov3_configs_follow_dinov3_dense_setting(config):
    """PROTOCOLS G: 512 crops (a 32x32 grid of patch 16), blocks [2, 5, 8, 11] of 12 and [4, 11, 17, 23]
    of 24; everything else is the DINOv2-layout config of that head and size."""
    from mmengine.config import Config

    ours, theirs = Config.fromfile(str(ROOT / config)).to_dict(), Config.fromfile(str(ROOT / dinov2_config(config)))
    theirs = theirs.to_dict()
    blocks = (4, 11, 17, 23) if "large" in config else (2, 5, 8, 11)
    bb = ours["model"]["backbone"]
    assert bb["out_indices"] == blocks and bb["img_size"] == 512 and 512 // 16 == 32
    assert ours["model"]["data_preprocessor"]["size"] == ours["model"]["test_cfg"]["crop_size"] == (512, 512)
    train, test = ours["train_dataloader"]["dataset"]["pipeline"], ours["test_dataloader"]["dataset"]["pipeline"]
    sizes = {t["type"]: t[SIZED[t["type"]]] for t in train + test if t["type"] in SIZED}
    assert sizes["RandomCrop"] == (512, 512) and sizes["Resize"][1] == 512
    stride = ours["model"]["test_cfg"]["stride"]
    assert stride == ((128, 128) if "depth" in config else (341, 341))  # 1/4 and 2/3 of the crop, as at 518
    assert ours["val_dataloader"] == ours["test_dataloader"]
    # the rest is the DINOv2-layout config's
    for cfg in (ours, theirs):
        for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[split]["dataset"]["pipeline"] = _without_sizes(cfg[split]["dataset"]["pipeline"])
        for key in ("img_size", "out_indices"):
            cfg["model"]["backbone"].pop(key)
        cfg["model"]["data_preprocessor"].pop("size")
        for key in ("crop_size", "stride"):
            cfg["model"]["test_cfg"].pop(key)
    if "dpt" in config:
        assert ours["model"]["decode_head"].pop("patch_size") == 16 and theirs["model"]["decode_head"].pop("patch_size")
        assert ours["optim_wrapper"]["paramwise_cfg"]["custom_keys"].pop("reg_token") == dict(decay_mult=0.0)
    assert ours.pop("dinov3_dense") and ours == theirs


def test_evaluate_all_picks_the_dinov3_configs(export, ade, nyu, tmp_path, monkeypatch):
    """A DINOv3 backbone gets the `*_dinov3.py` configs without --reference-pos-embed, and no paper figure
    (the paper's are DINOv2-layout students at 518); a DINOv2-layout one keeps its configs and the flag."""
    ran = {}
    monkeypatch.setattr(evaluate_all, "run_task", lambda task, argv, out: ran.setdefault(task, argv) and "not run")
    data = ["--tasks", "ade20k,nyu", "--data-ade20k", str(ade), "--data-nyu", str(nyu)]
    out = ["--output-dir", str(tmp_path / "o")]
    assert evaluate_all.main(["--backbone", str(export), *out, *data, "--dense-head", "full"]) == 1
    configs = {task: next(a for a in argv if a.endswith(".py")) for task, argv in ran.items()}
    assert configs == {
        "ade20k": str(ROOT / "segmentation/configs/upernet_vit_small_dinov3.py"),
        "nyu": str(ROOT / "depth/configs/dpt_vit_small_dinov3.py"),
    }
    assert not any("--reference-pos-embed" in a for a in ran.values())
    protocol = {"world_size": 4, **evaluate_all.paper_protocol(ROOT / "segmentation/configs/linear_vit_small.py")}
    results = {"metrics": {"mIoU final": 40.0}, "metric_notes": {}, "protocol": protocol}
    assert evaluate_all.rows_of("ade20k", results, "small", head="linear")[0].paper == 41.8
    assert evaluate_all.rows_of("ade20k", results, "small_dinov3", head="linear")[0].paper is None
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=DIM, depth=DEPTH, num_heads=1)
    torch.save(models.to_dinov2(vit), tmp_path / "dinov2.pth")
    ran.clear()
    out = ["--output-dir", str(tmp_path / "p")]
    assert evaluate_all.main(["--backbone", str(tmp_path / "dinov2.pth"), *out, *data]) == 1
    configs = {task: next(a for a in argv if a.endswith(".py")) for task, argv in ran.items()}
    assert configs == {
        "ade20k": str(ROOT / "segmentation/configs/linear_vit_small.py"),
        "nyu": str(ROOT / "depth/configs/dpt_probe_vit_small.py"),
    }
    assert all("--reference-pos-embed" in a for a in ran.values())


def test_a_satellite_file_is_evaluated_on_its_own_normalisation(official, export, ade, nyu, tmp_path):
    """DINOv3's satellite weights (known by their release name: their shapes are the others') were not trained on
    ImageNet-normalised inputs: the data preprocessor takes their mean/std; a student keeps the protocol's
    (ImageNet's on ADE20K, the reference's 127.5 on NYU)."""
    from models.families.dinov3 import SAT_MEAN, SAT_STD

    sat = tmp_path / models.TEACHERS["dinov3_vitl16_sat"].url.rsplit("/", 1)[-1]
    sat.write_bytes(official.read_bytes())
    for data, config in ((ade, CONFIGS[0]), (nyu, CONFIGS[2])):
        ours = tiny_cfg(config, export, data).model.data_preprocessor
        theirs = tiny_cfg(config, sat, data).model.data_preprocessor
        assert theirs.mean == pytest.approx([255 * v for v in SAT_MEAN])
        assert theirs.std == pytest.approx([255 * v for v in SAT_STD])
        assert ours.mean == ([123.675, 116.28, 103.53] if data == ade else [127.5] * 3)
