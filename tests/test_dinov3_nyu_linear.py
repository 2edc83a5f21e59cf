"""DINOv3's NYU linear depth protocol (depth/configs/dinov3_linear.py) against DINOv3's code at 6876159
(dinov3/eval/depth): the bins, the depth from their scores, the loss, the schedule (lr and Adam's beta1), the
transforms and the centre padding restated from it or printed by it; the config pinned to every number of
config-nyu.yaml and config.py's defaults; a tiny DINOv3 export trained 2 iterations and evaluated end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

mmseg = pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
import segmentation.dinov3_protocol as dinov3  # noqa: E402
import segmentation.mmseg_ext as ext  # noqa: E402
from scripts.evaluate_all import QUICK_DENSE  # noqa: E402
from segmentation import runner  # noqa: E402
from tests.helpers import DEPTH, DIM, ROOT  # noqa: E402

CONFIG = "depth/configs/dinov3_linear.py"


def _argv(backbone: Path, data: Path, work: Path, *extra: str) -> list[str]:
    base = [str(ROOT / CONFIG), "--backbone", str(backbone), "--data-path", str(data), "--output-dir", str(work)]
    return [*base, *extra]


def _cfg():
    from mmengine.config import Config

    return Config.fromfile(str(ROOT / CONFIG))


# --- the head's numbers -------------------------------------------------------------------------------------
def dinov3_depth(scores: torch.Tensor, min_depth=0.001, max_depth=10.0) -> torch.Tensor:
    """models/__init__.py's FeaturesToDepth, bins_strategy and norm_strategy "linear", restated."""
    bins = torch.linspace(min_depth, max_depth, scores.shape[1])
    logit = torch.relu(scores) + 0.1
    logit = logit / logit.sum(dim=1, keepdim=True)
    return torch.einsum("ikmn,k->imn", [logit, bins]).unsqueeze(dim=1)


def test_bins_and_depth_from_scores():
    bins = dinov3.depth_bins(0.001, 10.0, 256)
    assert bins.shape == (256,) and bins[0].item() == pytest.approx(0.001) and bins[-1].item() == pytest.approx(10.0)
    torch.testing.assert_close(bins[1:] - bins[:-1], torch.full((255,), (10.0 - 0.001) / 255), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    scores = torch.randn(2, 256, 3, 5) * 3
    depth = dinov3.depth_from_bins(scores, bins)
    assert depth.shape == (2, 1, 3, 5)
    torch.testing.assert_close(depth, dinov3_depth(scores))
    # all scores <= 0: every bin weighs 0.1, the depth is the bins' mean; one large score pulls toward its bin
    assert dinov3.depth_from_bins(-torch.ones(1, 256, 1, 1), bins).item() == pytest.approx((0.001 + 10.0) / 2)
    one = torch.zeros(1, 256, 1, 1)
    one[0, 200] = 1e6
    assert dinov3.depth_from_bins(one, bins).item() == pytest.approx(bins[200].item(), rel=1e-4)


def test_head_is_bn_then_1x1_conv_to_256_bins():
    from mmseg.registry import MODELS

    head = MODELS.build(
        dict(type="DepthBinsHead", in_channels=DIM, in_index=0, norm_cfg=dict(type="BN"), align_corners=False,
             loss_decode=dict(type="WarmupSigLoss"))
    )  # fmt: skip
    head.init_weights()
    assert head.out_channels == 1 and head.conv_seg.weight.shape == (256, DIM, 1, 1)
    assert head.conv_seg.bias.abs().max() == 0 and head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.bn.num_features == DIM and head.bn.eps == 1e-5
    assert "bins" not in head.state_dict()  # computed, not learned: checkpoints hold only the BN and the conv
    torch.manual_seed(0)
    x = torch.randn(2, DIM, 4, 6)
    head.train()
    expected = dinov3_depth(head.conv_seg(F.batch_norm(x, None, None, head.bn.weight, head.bn.bias, training=True)))
    torch.testing.assert_close(head([x]), expected)


def dinov3_sigloss(pred, gt, calls: int, warm_iter=100) -> torch.Tensor:
    """loss.py's SigLoss (warm_up=True, warm_iter=100) after `calls` earlier calls, restated."""
    valid = gt != 0
    g = torch.log(pred[valid] + 0.001) - torch.log(gt[valid] + 0.001)
    dg = 0.15 * torch.pow(torch.mean(g), 2)
    if calls >= warm_iter:
        dg = dg + torch.var(g)
    return torch.abs(dg) if dg <= 0 else torch.sqrt(dg)


def test_loss_is_dinov3s_sigloss():
    from mmseg.registry import MODELS

    loss = MODELS.build(dict(type="WarmupSigLoss", eps=1e-3, mean_weight=0.15, warm_iter=3))
    assert loss.loss_name.startswith("loss_")  # mmseg sums the entries named loss*
    torch.manual_seed(0)
    pred, gt = torch.rand(2, 1, 8, 8) * 10 + 1e-3, torch.rand(2, 1, 8, 8) * 10
    gt[0, 0, :3] = 0  # no measurement, or padding: left out
    for calls in range(5):  # the variance joins after warm_iter calls
        torch.testing.assert_close(loss(pred, gt), dinov3_sigloss(pred, gt, calls, warm_iter=3))
    assert loss(gt.clamp(min=1), gt.clamp(min=1)).item() == 0.0  # DINOv3's |.| where the sum is 0
    default = MODELS.build(dict(type="WarmupSigLoss"))
    assert (default.eps, default.mean_weight, default.warm_iter, default.ignored) == (1e-3, 0.15, 100, 0.0)


# --- the schedule: values printed by dinov3/eval/depth/schedulers.py's WarmupOneCycleLR (torch 2.14.1), built
# as train.py builds it (AdamW lr 3e-4 betas (0.9, 0.99), total 38400, config-nyu.yaml's constructor_kwargs)
OFFICIAL = {  # step: (lr, beta1)
    0: (3e-07, 0.0),
    1: (3.234374999607817e-07, 0.0),
    100: (2.643710781934454e-06, 0.0),
    1600: (3.763959115075894e-05, 0.0),
    6400: (0.00014025190528383288, 0.0),
    12799: (0.00022529304852436912, 0.0),
    12800: (0.00022499237244348423, 0.85),
    12801: (0.00022498174438506576, 0.8500000003764955),
    19200: (0.00014999372864458446, 0.8646446609406726),
    25600: (7.499837294545821e-05, 0.8999999999999999),
    38398: (1.2000501973966568e-08, 0.9499999984940178),
    38399: (1.1999999999999998e-08, 0.9499999996235045),
}


def dinov3_lr(step, total=38400, warmup=12800, max_lr=3e-4, div=25.0, final_div=1000.0) -> float:
    """schedulers.py's _compute_lr_momentum (warmup_ratio 0, anneal "cos"), restated."""
    if step < warmup:
        gmax = max_lr * (1 + math.cos(math.pi * step / float(total))) / 2
        return max_lr / final_div + gmax * step / float(warmup)
    min_lr = max_lr / div / final_div
    return min_lr + (max_lr - min_lr) / 2.0 * (math.cos(math.pi * (step + 1) / float(total)) + 1)


def test_schedule_closed_forms_are_dinov3s():
    span = dict(total=38400, warmup=12800)
    for step, (lr, beta1) in OFFICIAL.items():
        assert dinov3.dinov3_depth_one_cycle_lr(step, peak=3e-4, **span) == pytest.approx(lr, rel=1e-12)
        assert dinov3.dinov3_depth_one_cycle_beta1(step, **span) == pytest.approx(beta1, abs=1e-15)
        assert dinov3_lr(step) == pytest.approx(lr, rel=1e-12)
    for step in range(0, 38400, 97):
        assert dinov3.dinov3_depth_one_cycle_lr(step, peak=3e-4, **span) == pytest.approx(dinov3_lr(step))


def test_configs_schedulers_step_as_dinov3s():
    """The config's optimizer wrapper and param_scheduler, stepped as mmengine's loop steps them (the scheduler
    after each optimizer step), give the official lr and beta1 at each iteration."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import PARAM_SCHEDULERS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = _cfg()
    wrapper = build_optim_wrapper(torch.nn.Linear(2, 1), cfg.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler]
    group = wrapper.optimizer.param_groups[0]
    seen = {}
    for step in range(cfg.train_cfg.max_iters):
        if step in OFFICIAL:
            seen[step] = (group["lr"], group["betas"])
        wrapper.step()
        for s in schedulers:
            s.step()
    for step, (lr, beta1) in OFFICIAL.items():
        assert seen[step][0] == pytest.approx(lr, rel=1e-12), step
        assert seen[step][1][0] == pytest.approx(beta1, abs=1e-15) and seen[step][1][1] == 0.99, step


# --- the config against config-nyu.yaml and config.py's defaults ----------------------------------------------
def _by_type(pipeline: list) -> dict:
    return {t["type"]: {k: v for k, v in t.items() if k != "type"} for t in pipeline}


def test_config_pins_dinov3s_numbers():
    cfg = _cfg()
    assert cfg.protocol_name == "DINOv3 NYU linear"
    assert cfg.custom_imports.imports == ["segmentation.mmseg_ext", "segmentation.dinov3_protocol"]
    # optimizer: AdamW lr 3e-4, betas (0.9, 0.99), wd 1e-4 on the head alone, every parameter; grad clip 35
    assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-4)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=35, norm_type=2) and "paramwise_cfg" not in cfg.optim_wrapper
    # 38.4k iterations, DINOv3DepthWarmupOneCycleLR with warmup 12.8k, final_div_factor 1000, momentum 0.85 -> 0.95
    assert cfg.train_cfg.max_iters == 38400 and cfg.train_cfg.val_interval == 1600
    lr, momentum = cfg.param_scheduler
    assert (lr.type, lr.total_steps, lr.warmup_steps, lr.final_div_factor, lr.div_factor) == (
        "DINOv3DepthWarmupOneCycleLR", 38400, 12800, 1000.0, 25.0)  # fmt: skip
    assert (momentum.type, momentum.base_momentum, momentum.max_momentum) == (
        "DINOv3DepthWarmupOneCycleMomentum", 0.85, 0.95)  # fmt: skip
    assert all(s.by_epoch is False and s.begin == 0 and s.end == 38400 for s in cfg.param_scheduler)
    # 2 per GPU (x 8 GPUs = 16), seed 321 + rank
    assert cfg.train_dataloader.batch_size == 2 and cfg.randomness == dict(seed=321, diff_rank_seed=True)
    # train: NYU crop, rotation +-2.5 deg p 0.5, flip, random 416x544 crop, colour aug (brightness 0.75-1.25)
    train = cfg.train_dataloader.dataset.pipeline
    assert [t["type"] for t in train] == ["LoadImageFromFile", "LoadDepthAnnotation", "BoxCrop", "RandomRotate",
                                          "RandomFlip", "RandomCrop", "DepthColorAug", "PackSegInputs"]  # fmt: skip
    steps = _by_type(train)
    assert steps["LoadDepthAnnotation"]["depth_rescale_factor"] == 1e-3  # normalization_constant 1000
    assert steps["BoxCrop"] == dict(box=(43, 45, 608, 472), reference=(480, 640))
    assert steps["RandomRotate"] == dict(prob=0.5, degree=2.5, pad_val=0, seg_pad_val=0)
    assert steps["RandomFlip"] == dict(prob=0.5) and steps["RandomCrop"] == dict(crop_size=(416, 544))
    assert steps["DepthColorAug"] == dict(prob=0.5, gamma_range=(0.9, 1.1), brightness_range=(0.75, 1.25),
                                          color_range=(0.9, 1.1))  # fmt: skip
    # eval: the whole image (no crop, no resize) averaged with its flip; gt in (0.001, 10) in the Eigen crop
    assert [t["type"] for t in cfg.test_dataloader.dataset.pipeline] == [
        "LoadImageFromFile", "LoadDepthAnnotation", "PackSegInputs"]  # fmt: skip
    assert cfg.val_dataloader == cfg.test_dataloader and cfg.test_dataloader.batch_size == 1
    assert cfg.model.test_cfg == dict(mode="slide_flip", crop_size=(480, 640), stride=(480, 640))
    metric = dict(type="DepthMetric", min_depth_eval=1e-3, max_depth_eval=10.0, crop_type="nyu_crop")
    assert cfg.test_evaluator == cfg.val_evaluator == metric
    # ImageNet mean/std on RGB
    pre = cfg.model.data_preprocessor
    assert pre.mean == pytest.approx([255 * m for m in (0.485, 0.456, 0.406)])
    assert pre.std == pytest.approx([255 * s for s in (0.229, 0.224, 0.225)])
    assert pre.bgr_to_rgb and pre.size == (416, 544) and pre.seg_pad_val == 0
    # the last block through the final norm, patch tokens only, frozen, centre-padded; BN, 256 bins over 0.001-10
    bb, head = cfg.model.backbone, cfg.model.decode_head
    assert (bb.out_indices, bb.final_norm, bb.with_cls_token) == ((-1,), True, False) and bb.frozen and bb.center_pad
    assert (head.type, head.in_channels, head.n_bins, head.min_depth, head.max_depth) == (
        "DepthBinsHead", None, 256, 1e-3, 10.0)  # fmt: skip
    assert head.norm_cfg.type == "SyncBN" and head.align_corners is False
    assert head.loss_decode == dict(type="WarmupSigLoss", eps=1e-3, mean_weight=0.15, warm_iter=100, loss_weight=1.0)
    # the reported figure is the final model's, as DINOv3's: no best checkpoint kept
    assert "save_best" not in cfg.default_hooks.checkpoint and cfg.default_hooks.checkpoint.interval == 1600


# --- the transforms and the padding ----------------------------------------------------------------------------
def test_train_pipeline_gives_rotated_416x544_crops_of_native_images():
    """The config's geometric steps on a 480x640 sample: 416x544 crops of the 565x427 NYU crop, no resize; a
    rotation about half the time, its corners 0 in the depth (ignored by the loss), values otherwise kept."""
    from mmcv.transforms import Compose
    from mmseg.utils import register_all_modules

    register_all_modules()
    steps = [t for t in _cfg().train_dataloader.dataset.pipeline if t["type"] not in ("LoadImageFromFile",
             "LoadDepthAnnotation", "DepthColorAug", "PackSegInputs")]  # fmt: skip
    pipeline = Compose(steps)
    rng = np.random.default_rng(0)
    img = rng.integers(1, 255, (480, 640, 3), dtype=np.uint8)
    depth = rng.choice(np.arange(1, 11, dtype=np.float32), size=(480, 640))  # metres, every pixel measured
    rotated = 0
    for seed in range(6):
        np.random.seed(seed)
        out = pipeline(dict(img=img.copy(), gt_depth_map=depth.copy(), seg_fields=["gt_depth_map"]))
        assert out["img"].shape == (416, 544, 3) and out["gt_depth_map"].shape == (416, 544)
        assert set(np.unique(out["gt_depth_map"])) <= set(range(11))  # nearest: no interpolated depths
        rotated += bool((out["gt_depth_map"] == 0).any())
    assert 0 < rotated < 6


def test_box_crop_is_dinov3s_nyu_crop():
    rng = np.random.default_rng(0)
    # at NYU's 480x640: rows 45:472, cols 43:608 (427 x 565); other sizes scaled, truncated
    for h, w, rows, cols in ((480, 640, (45, 472), (43, 608)), (60, 80, (5, 59), (5, 76))):
        img, depth = rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.random((h, w), dtype=np.float32)
        out = dinov3.BoxCrop(box=(43, 45, 608, 472))(dict(img=img, gt_depth_map=depth, seg_fields=["gt_depth_map"]))
        np.testing.assert_array_equal(out["img"], img[slice(*rows), slice(*cols)])
        np.testing.assert_array_equal(out["gt_depth_map"], depth[slice(*rows), slice(*cols)])
        assert out["img_shape"] == (rows[1] - rows[0], cols[1] - cols[0])


def test_colour_aug_is_dinov3s():
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    aug = dinov3.DepthColorAug(prob=0.5, gamma_range=(0.9, 1.1), brightness_range=(0.75, 1.25), color_range=(0.9, 1.1))
    applied = 0
    for seed in range(8):
        np.random.seed(seed)  # transforms.py's ColorAug, restated with the same draws in the same order
        if np.random.rand() < 0.5:
            gamma, brightness = np.random.uniform(0.9, 1.1), np.random.uniform(0.75, 1.25)
            colors = np.random.uniform(0.9, 1.1, size=3)
            expected = np.clip((img.astype(np.float64) ** gamma) * brightness * colors[None, None], 0, 255)
            applied += 1
        else:
            expected = img
        np.random.seed(seed)
        out = aug(dict(img=img.copy()))["img"]
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    assert 0 < applied < 8


def test_center_padding_is_dinov3s(dinov3_export):
    """CenterPadding (models/embed.py): zeros to a multiple of the patch, half before, the odd pixel after;
    the patch map is that of the padded image."""
    x = torch.randn(1, 3, 60, 83)
    padded = ext.center_pad(x, 16)
    assert padded.shape[-2:] == (64, 96)
    torch.testing.assert_close(padded[..., 2:62, 6:89], x)
    assert padded[..., :2, :].abs().max() == 0 and padded[..., :, 89:].abs().max() == 0
    bb = ext.ProteusViT(checkpoint=str(dinov3_export), out_indices=(DEPTH - 1,), final_norm=True, center_pad=True)
    bb.eval()
    with torch.no_grad():
        (ours,) = bb(x)
        (theirs,) = bb.vit.get_intermediate_layers(padded, n=[DEPTH - 1], reshape=True, norm=True)
    assert ours.shape == (1, DIM, 4, 6)
    torch.testing.assert_close(ours, theirs)


# --- end to end -----------------------------------------------------------------------------------------------
def test_the_last_block_and_the_width_are_the_backbones(dinov3_export, nyu):
    args = runner.get_args_parser("depth").parse_args(_argv(dinov3_export, nyu, nyu / "work"))
    cfg = runner.build_config(args, "depth")
    assert cfg.model.decode_head.in_channels == DIM
    assert ext.MODELS.build(cfg.model.backbone).out_indices == (DEPTH - 1,)


def test_flip_on_one_window_is_dinov3s_whole_image_tta(dinov3_export, nyu):
    """slide_flip with one window as large as the image = the whole image averaged with its flip: DINOv3 averages
    the patch-grid depths and then resizes; resizing first (mmseg) is the same, since both steps are linear and a
    bilinear resize (align_corners False) commutes with the flip."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    args = runner.get_args_parser("depth").parse_args(_argv(dinov3_export, nyu, nyu / "work"))
    model = MODELS.build(runner.build_config(args, "depth").model)
    model.init_weights()
    model.eval()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 60, 80)
    metas = [dict(ori_shape=(60, 80), img_shape=(60, 80), pad_shape=(60, 80), padding_size=[0, 0, 0, 0])]
    with torch.no_grad():
        ours = model.inference(x, metas)

        def grid_depth(img):
            return model.decode_head(model.backbone(img))

        theirs = (grid_depth(x) + grid_depth(x.flip(3)).flip(3)) / 2
    theirs = F.interpolate(theirs, size=(60, 80), mode="bilinear", align_corners=False)
    assert ours.shape == (1, 1, 60, 80)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kind", ["dinov3_export", "backbone"])
def test_trains_and_evaluates(kind, nyu, tmp_path, request):
    """A DINOv3 export, and a DINOv2-layout student (patch 14: 416x544 crops centre-padded to 420x546)."""
    work = tmp_path / "work"
    assert runner.main("depth", _argv(request.getfixturevalue(kind), nyu, work, *QUICK_DENSE)) == 0
    out = json.loads((work / "results.json").read_text())
    assert out["protocol"]["name"] == "DINOv3 NYU linear" and out["protocol"]["config"].endswith(CONFIG)
    final = out["details"]["final"]
    assert final["iter"] == 2 and all(np.isfinite(final["metrics"][k]) for k in ("rmse", "abs_rel", "d1")), out
    assert out["details"]["best_on_test"] is None  # no best-of selection: the final model's figure
    state = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=True)["state_dict"]
    head = {k for k in state if k.startswith("decode_head.")}
    assert {"decode_head.bn.weight", "decode_head.bn.running_mean", "decode_head.conv_seg.weight"} <= head
    assert state["decode_head.conv_seg.weight"].shape == (256, DIM, 1, 1)
