"""Dense evaluations on DINOv3 backbones (PROTOCOLS G): a DINOv3-layout export and an
official DINOv3 file through every head on the tiny ADE20K/NYU folders (conftest), the `*_dinov3_layout.py`
configs (our protocols at 512 crops on DINOv3's evenly spaced blocks) against their DINOv2-layout configs,
DINOv3's own ADE20K linear protocol (dinov3_linear.py) against its official settings and schedule, the
backbone's patch map (RoPE, storage tokens left out), layer-wise lr decay and the token groups on DINOv3's names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as tvF

import models

mmseg = pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
import segmentation.dinov3_protocol as dinov3_protocol  # noqa: E402
import segmentation.mmseg_ext as proteus_mmseg  # noqa: E402
from models.errors import UsageError  # noqa: E402
from scripts import evaluate_all  # noqa: E402
from segmentation import runner  # noqa: E402
from tests.helpers import DENSE_HEADS, DENSE_TINY, DEPTH, DIM, ROOT, official_sd, optimizer_groups  # noqa: E402

N_PREFIX = 5  # cls + 4 storage tokens
LAYOUT_NAME = ", DINOv3 layout (512 crops, blocks at even intervals)"  # the *_dinov3_layout.py configs' protocol names


def dinov2_config(config: str) -> str:
    return config.replace("_dinov3_layout.py", ".py")


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
    "segmentation/configs/linear_vit_small_dinov3_layout.py",
    "segmentation/configs/upernet_vit_small_dinov3_layout.py",
    "depth/configs/linear_vit_small_dinov3_layout.py",
    "depth/configs/dpt_vit_small_dinov3_layout.py",
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
    assert out["protocol"]["name"].startswith("Proteus ") and out["protocol"]["name"].endswith(LAYOUT_NAME)


def test_official_dinov3_file_as_backbone(official, nyu, tmp_path):
    """A teacher file exactly as FAIR releases it (here S+-like: SwiGLU, local_cls_norm) under the DPT
    probe, so a teacher's figures can stand beside its students'."""
    work = tmp_path / "work"
    assert runner.main("depth", argv("depth/configs/dpt_probe_vit_small_dinov3_layout.py", official, nyu, work)) == 0
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


def test_fine_tuned_drop_path_ramps_as_in_every_layout(official):
    """The same drop_path_rate regularises a DINOv3 backbone as a DINOv2-layout one: the linear ramp from 0 in
    the first block to the rate in the last (FAIR's dense evaluations freeze the backbone: none of their own)."""
    fine = proteus_mmseg.ProteusViT(checkpoint=str(official), out_indices=(3,), drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in fine.vit.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, DEPTH).tolist())
    assert rates == [getattr(b.drop_path2, "drop_prob", 0.0) for b in fine.vit.blocks]


def test_reference_pos_embed_is_one_clear_error(export, ade, tmp_path, capsys):
    expected = "--reference-pos-embed (reference_pos_embed) resizes a learned positional-embedding table once"
    with pytest.raises(UsageError, match=r"this DINOv3 backbone has none \(its RoPE takes any input size\)"):
        proteus_mmseg.ProteusViT(checkpoint=str(export), out_indices=(3,), reference_pos_embed=True)
    config = "segmentation/configs/linear_vit_small_dinov3_layout.py"
    assert runner.main("segmentation", argv(config, export, ade, tmp_path / "w", "--reference-pos-embed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert not list(tmp_path.rglob("*.log"))  # mmengine never started


def test_layer_decay_reaches_every_dinov3_block(export, ade):
    """DINOv3's names (gamma_1, attn.q_bias, reg_token, ...) in the layer-wise lr decay: block i at
    lr * 0.65 ** (L - i), the tokens and patch embedding at layer 0 with cls_token's weight decay;
    no backbone parameter falls through to the heads' full lr."""
    cfg = tiny_cfg("segmentation/configs/upernet_vit_small_dinov3_layout.py", export, ade)
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
    groups, _ = optimizer_groups(tiny_cfg("depth/configs/dpt_vit_small_dinov3_layout.py", export, nyu))
    base, wd = 4e-4, 0.01
    assert groups["backbone.vit.reg_token"] == groups["backbone.vit.cls_token"] == pytest.approx((base, 0.0))
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.v_bias", "blocks.3.gamma_2", "patch_embed.proj.weight"):
        assert groups[f"backbone.vit.{name}"] == pytest.approx((base * 0.1, wd)), name


# --- the DINOv3-layout configs: 512 crops and DINOv3's evenly spaced blocks, the rest the DINOv2-layout config's ------
DINOV3_CONFIGS = [
    f"{d}/configs/{head}_vit_{size}_dinov3_layout.py"
    for d, heads in (("segmentation", ("linear", "upernet")), ("depth", ("linear", "dpt", "dpt_probe")))
    for head in heads
    for size in ("small", "base", "large")
]
SIZED = {"RandomResize": "scale", "Resize": "scale", "RandomCrop": "crop_size"}  # the transforms' crop-bound keys


def _without_sizes(pipeline: list) -> list:
    return [{k: v for k, v in t.items() if k != SIZED.get(t["type"])} for t in pipeline]


@pytest.mark.parametrize("config", DINOV3_CONFIGS)
def test_dinov3_layout_configs_are_ours_at_512_on_dinov3s_blocks(config):
    """Our protocol (PROTOCOLS D, E) at 512 crops (a 32x32 grid of patch 16) on blocks [2, 5, 8, 11] of 12 and
    [4, 11, 17, 23] of 24 (DINOv3's FOUR_EVEN_INTERVALS); everything else, the protocol's name included, is the
    DINOv2-layout config of that head and size."""
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
    assert ours.pop("protocol_name") == theirs.pop("protocol_name") + LAYOUT_NAME
    assert ours.pop("dinov3_layout")["protocol_suffix"] == LAYOUT_NAME and ours == theirs


def test_evaluate_all_picks_the_dinov3_configs(export, ade, nyu, tmp_path, monkeypatch):
    """A DINOv3 backbone gets the `*_dinov3_layout.py` configs without --reference-pos-embed, and no paper figure
    (the paper's are DINOv2-layout students at 518); a DINOv2-layout one keeps its configs and the flag."""
    ran = {}
    monkeypatch.setattr(evaluate_all, "run_task", lambda task, argv, out: ran.setdefault(task, argv) and "not run")
    data = ["--tasks", "ade20k,nyu", "--data-ade20k", str(ade), "--data-nyu", str(nyu)]
    out = ["--output-dir", str(tmp_path / "o")]
    assert evaluate_all.main(["--backbone", str(export), *out, *data, "--dense-head", "full"]) == 1
    configs = {task: next(a for a in argv if a.endswith(".py")) for task, argv in ran.items()}
    assert configs == {
        "ade20k": str(ROOT / "segmentation/configs/upernet_vit_small_dinov3_layout.py"),
        "nyu": str(ROOT / "depth/configs/dpt_vit_small_dinov3_layout.py"),
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


# --- DINOv3's own ADE20K linear protocol (dinov3_linear.py) ---------------------------------------------------------
# Read from facebookresearch/dinov3 (commit 6876159), dinov3/eval/segmentation:
# configs/config-ade20k-linear-training.yaml
# (bs 2 x n_gpus 8, 40000 iterations, WarmupOneCycleLR: warmup 1500, ratio 1e-6, final_div_factor inf, pct_start 0,
# cos; AdamW lr 1e-3, betas 0.9/0.999, wd 1e-3, gradient_clip inf; LAST block, batchnorm, backbone norm; train: short
# side 512 x [0.5, 2.0], crop 512, flip 0.5; eval: reduce_zero_label, slide 512 stride 341, every 5000 iterations),
# config.py (dropout 0.1, ImageNet mean/std x 255), models/heads/linear_head.py, transforms.py, train.py, schedulers.py.
DINOV3_LINEAR = "segmentation/configs/dinov3_linear.py"
# The rate at iterations of a run, measured by running the official WarmupOneCycleLR with that yaml's options in
# train.py's loop (the scheduler stepped after every iteration but the first) under torch 2.14
OFFICIAL_LR = {
    0: 1.0000000000287558e-09,
    1: 1.0000000000287558e-09,
    2: 6.676493083500112e-07,
    750: 4.8998380795835e-04,
    1500: 9.618833173083499e-04,
    1501: 9.965296112632268e-04,
    20000: 5.0e-04,
    39999: 1.5421257049119675e-12,
}


def official_lr(iteration: int) -> float:
    """The official schedule restated: iteration i trains at step s = max(i - 1, 0); before 1500 a ramp from
    1e-6 x peak to the peak damped by (1 - s / 40000), then (1 + cos(pi (s + 1) / 40000)) / 2 x peak."""
    peak, total, warmup, ratio = 1e-3, 40000, 1500, 1e-6
    s = max(iteration - 1, 0)
    if s < warmup:
        return peak * (1 - (1 - s / warmup) * (1 - ratio)) * (1 - s / total)
    return peak * (1 + np.cos(np.pi * (s + 1) / total)) / 2


def test_dinov3_linear_config_is_dinov3s_protocol():
    from mmengine.config import Config

    cfg = Config.fromfile(str(ROOT / DINOV3_LINEAR))
    assert cfg.protocol_name == "DINOv3 ADE20K linear"
    bb, head = cfg.model.backbone, cfg.model.decode_head
    # the last block (any depth) through the backbone's final norm, frozen, patch tokens only
    assert bb.type == "ProteusViT" and bb.out_indices == (-1,) and bb.final_norm and bb.frozen
    assert not bb.get("with_cls_token", False) and bb.img_size == 512
    # Dropout2d 0.1 -> BN (SyncBN) -> 1x1 conv to 150 classes, widths from the backbone; CE over all pixels, 255 ignored
    assert head.type == "BNLinearHead" and head.in_channels is None and head.channels is None and head.in_index == 0
    assert head.dropout_ratio == 0.1 and head.norm_cfg == dict(type="SyncBN", requires_grad=True)
    assert head.num_classes == 150 and not head.align_corners and head.get("ignore_index", 255) == 255
    assert head.loss_decode == dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    # AdamW on every head parameter alike, no clipping; 40k iterations of 8 x 2 = 16
    assert cfg.optim_wrapper == dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-3)
    )
    assert cfg.param_scheduler == [
        dict(
            type="DINOv3SegWarmupOneCycleLR",
            total_iters=40000,
            warmup_iters=1500,
            warmup_ratio=1e-6,
            by_epoch=False,
            begin=0,
            end=40000,
        )
    ]
    assert cfg.train_cfg.max_iters == 40000 and cfg.train_dataloader.batch_size == 2 and cfg.global_batch == 2 * 8
    assert cfg.train_cfg.val_interval == 5000 and cfg.default_hooks.checkpoint.save_best == "mIoU"
    # data: ImageNet mean/std x 255 on RGB, crops padded (image 0 after normalisation, label 255)
    pre = cfg.model.data_preprocessor
    assert pre.mean == [123.675, 116.28, 103.53] and pre.std == [58.395, 57.12, 57.375] and pre.bgr_to_rgb
    assert pre.size == (512, 512) and pre.pad_val == 0 and pre.seg_pad_val == 255
    train = {t["type"]: t for t in cfg.train_dataloader.dataset.pipeline}
    assert list(train) == [
        "LoadImageFromFile",
        "LoadAnnotations",
        "RandomResize",
        "RandomCrop",
        "RandomFlip",
        "DINOv3PhotoMetricDistortion",
        "PackSegInputs",
    ]
    for load in (train["LoadImageFromFile"], cfg.test_dataloader.dataset.pipeline[0]):  # PIL, no EXIF rotation
        assert load.imdecode_backend == "pillow" and load.color_type == "color_ignore_orientation"
    resize = train["RandomResize"]  # short side 512 x U(0.5, 2.0); the long-side bound never binds
    assert min(resize.scale) == 512 and max(resize.scale) >= 64 * 512 and resize.ratio_range == (0.5, 2.0)
    assert resize.keep_ratio and resize.backend == "pillow" and resize.interpolation == "bilinear"
    assert resize.resize_type == "DINOv3Resize"  # the label by torch's nearest rule
    assert train["RandomCrop"] == dict(type="RandomCrop", crop_size=(512, 512), cat_max_ratio=0.75)
    assert train["RandomFlip"].prob == 0.5 and train["LoadAnnotations"].reduce_zero_label
    photo = train["DINOv3PhotoMetricDistortion"]
    assert photo.brightness_delta == 32 and photo.contrast_range == photo.saturation_range == (0.5, 1.5)
    assert photo.hue_range == (-0.5, 0.5)  # torchvision's hue factor: the whole circle
    assert "segmentation.dinov3_protocol" in cfg.custom_imports.imports
    # test: the image at short side 512 (the label stays at its size), slide 512 windows with stride 341
    test = [t["type"] for t in cfg.test_dataloader.dataset.pipeline]
    assert test == ["LoadImageFromFile", "Resize", "LoadAnnotations", "PackSegInputs"]
    resize = cfg.test_dataloader.dataset.pipeline[1]
    assert min(resize.scale) == 512 and max(resize.scale) >= 64 * 512 and resize.keep_ratio
    assert resize.backend == "pillow" and resize.interpolation == "bilinear"
    assert cfg.test_dataloader.dataset.pipeline[2].reduce_zero_label and cfg.val_dataloader == cfg.test_dataloader
    assert cfg.model.test_cfg == dict(mode="slide", crop_size=(512, 512), stride=(341, 341))


def test_dinov3_linear_learning_rate_is_the_official_schedule():
    """The lr each iteration trains at under mmengine (ParamSchedulerHook steps after every iteration) equals the
    official run's, measured and restated, through the warmup, its step up at 1500 and the cosine to 0."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import PARAM_SCHEDULERS

    cfg = Config.fromfile(str(ROOT / DINOV3_LINEAR))
    wrapper = build_optim_wrapper(torch.nn.Conv2d(4, 2, 1), cfg.optim_wrapper)
    scheduler = PARAM_SCHEDULERS.build(dict(cfg.param_scheduler[0], optimizer=wrapper))
    used = []
    for _ in range(cfg.train_cfg.max_iters):
        used.append(wrapper.param_groups[0]["lr"])
        wrapper.optimizer.step()
        scheduler.step()
    for it, lr in OFFICIAL_LR.items():
        assert used[it] == pytest.approx(lr, rel=1e-9, abs=1e-20), it
    assert all(used[i] == pytest.approx(official_lr(i), rel=1e-9, abs=1e-20) for i in range(0, 40000, 97))
    assert max(used) < 1e-3 and used[1501] > used[1500] and wrapper.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(UsageError, match="warmup_ratio 0 must be in"):
        PARAM_SCHEDULERS.build(dict(cfg.param_scheduler[0], warmup_ratio=0, optimizer=wrapper))


def test_bn_linear_head_is_dinov3s():
    """Dropout2d before the BN in training, none at inference; the 1x1 conv on the BN's output (init normal
    std 0.01, bias 0); channels other than the input's width is one line."""
    from mmseg.registry import MODELS

    kw = dict(type="BNLinearHead", in_channels=8, in_index=0, channels=8, dropout_ratio=0.1, num_classes=5)
    head = MODELS.build(dict(kw, norm_cfg=dict(type="BN", requires_grad=True)))
    head.init_weights()
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.conv_seg.kernel_size == (1, 1)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.5) and not head.conv_seg.bias.any()
    x = torch.randn(4, 8, 6, 6)
    torch.manual_seed(0)
    trained = head([x])
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout2d(x, 0.1, training=True)
    mean = dropped.mean(dim=(0, 2, 3))
    torch.testing.assert_close(head.bn.running_mean, 0.1 * mean)  # the statistics of the dropped-out features
    torch.testing.assert_close(trained, head.conv_seg(torch.nn.functional.batch_norm(dropped, None, None, training=True,
                                                                                     weight=head.bn.weight,
                                                                                     bias=head.bn.bias)))  # fmt: skip
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head([x]), head.conv_seg(head.bn(x)))
    with pytest.raises(UsageError, match="channels 4 must equal the input's width 8"):
        MODELS.build(dict(kw, channels=4))


def test_dinov3_resize_is_dinov3s():
    """The short side to the scale, the long side int(w * short / h + 0.5); the image as torchvision resizes a PIL
    image (bilinear), the label as it resizes DINOv3's label tensor (nearest), which mmseg's Resize does not do."""
    from mmseg.datasets.transforms import Resize
    from PIL import Image
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    rgb, label = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8), rng.integers(0, 150, (37, 53), dtype=np.uint8)
    kw = dict(scale=(64 * 29, 29), keep_ratio=True, backend="pillow", interpolation="bilinear")
    ours, theirs = (
        r.transform(dict(img=rgb[..., ::-1].copy(), gt_seg_map=label.copy(), seg_fields=["gt_seg_map"]))
        for r in (dinov3_protocol.DINOv3Resize(**kw), Resize(**kw))
    )
    size = (29, int(29 * 53 / 37 + 0.5))
    assert ours["img_shape"] == size == (29, 42)
    image = T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)(Image.fromarray(rgb))
    np.testing.assert_array_equal(ours["img"][..., ::-1], np.asarray(image))
    expected = T.Resize(size, interpolation=T.InterpolationMode.NEAREST)(torch.from_numpy(label)[None])[0].numpy()
    np.testing.assert_array_equal(ours["gt_seg_map"], expected)
    assert ours["gt_seg_map"].dtype == np.uint8 and not np.array_equal(theirs["gt_seg_map"], expected)


def dinov3_distortion(rgb: np.ndarray) -> np.ndarray:
    """DINOv3's PhotoMetricDistortion restated on an RGB uint8 image, drawing from numpy's global generator."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def maybe(x, adjust, low, high):
        return adjust(x, np.random.uniform(low, high)) if np.random.randint(2) else x

    def tv(adjust):
        return lambda x, f: adjust(torch.from_numpy(x).permute(2, 0, 1), f).permute(1, 2, 0).numpy()

    x = maybe(rgb, lambda y, b: convert(y, beta=b), -32, 32)
    mode = np.random.randint(2)
    x = maybe(x, lambda y, a: convert(y, alpha=a), 0.5, 1.5) if mode == 1 else x
    x = maybe(x, tv(tvF.adjust_saturation), 0.5, 1.5)
    x = maybe(x, tv(tvF.adjust_hue), -0.5, 0.5)
    return maybe(x, lambda y, a: convert(y, alpha=a), 0.5, 1.5) if mode == 0 else x


def test_dinov3_photometric_distortion_is_dinov3s():
    """Under the same draws, DINOv3's distortion exactly, on seeds that take every branch; mmseg's own (HSV
    saturation, hue in whole OpenCV steps) gives other images."""
    from mmseg.datasets.transforms import PhotoMetricDistortion

    rgb = np.random.default_rng(1).integers(0, 255, (9, 11, 3), dtype=np.uint8)
    ranges = dict(brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5))
    ours = dinov3_protocol.DINOv3PhotoMetricDistortion(**ranges, hue_range=(-0.5, 0.5))
    differs = []
    for seed in range(16):
        np.random.seed(seed)
        expected = dinov3_distortion(rgb)
        np.random.seed(seed)
        np.testing.assert_array_equal(ours.transform(dict(img=rgb[..., ::-1].copy()))["img"][..., ::-1], expected)
        np.random.seed(seed)
        mmseg_own = PhotoMetricDistortion(**ranges, hue_delta=90).transform(dict(img=rgb[..., ::-1].copy()))["img"]
        differs.append(not np.array_equal(mmseg_own[..., ::-1], expected))
    assert any(differs)


def test_dinov3_linear_runs_on_a_dinov3_export(export, ade, tmp_path):
    """One config for every size: the last block of the 4-block export (-1) with its norm, the head as wide as the
    backbone; results.json names the protocol."""
    work = tmp_path / "work"
    base = [str(ROOT / DINOV3_LINEAR), "--backbone", str(export), "--data-path", str(ade), "--output-dir", str(work)]
    # DENSE_TINY's last sets four blocks; one validation image keeps the two 512 slide evaluations short
    one_image = ["val_dataloader.dataset.indices=1", "test_dataloader.dataset.indices=1"]
    argv = [*base, "--cfg-options", *DENSE_TINY[:-1], *one_image]
    cfg = runner.build_config(runner.get_args_parser("segmentation").parse_args(argv), "segmentation")
    assert cfg.model.decode_head.in_channels == cfg.model.decode_head.channels == DIM
    assert runner.main("segmentation", argv) == 0
    out = json.loads((work / "results.json").read_text())
    assert out["protocol"]["name"] == "DINOv3 ADE20K linear" and out["protocol"]["config"].endswith(DINOV3_LINEAR)
    assert out["details"]["final"]["iter"] == 2 and np.isfinite(out["details"]["final"]["metrics"]["mIoU"])
    state = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert state["decode_head.conv_seg.weight"].shape == (150, DIM, 1, 1) and "decode_head.bn.running_var" in state
    bb = proteus_mmseg.ProteusViT(checkpoint=str(export), out_indices=(-1,), final_norm=True, frozen=True).eval()
    assert bb.out_indices == (DEPTH - 1,)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        normed = bb.vit.forward_features(x)["x_norm_patchtokens"]
        torch.testing.assert_close(bb(x)[0].flatten(2).transpose(1, 2), normed)
    bad = [*base, "--cfg-options", *DENSE_TINY[:-1], "model.decode_head.in_index=1"]
    with pytest.raises(UsageError, match=r"reads maps 1, and the backbone gives 1 \(out_indices \[-1\]\)"):
        runner.build_config(runner.get_args_parser("segmentation").parse_args(bad), "segmentation")
