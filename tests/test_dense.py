"""Dense evaluations on mmsegmentation: the configs end to end on tiny generated datasets, the
metrics against direct computations, every protocol setting against the reference release's value,
layer-wise lr decay, backbone loading and the reference's positional embedding."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import models

mmseg = pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
import segmentation.mmseg_ext as proteus_mmseg  # noqa: E402
from models.errors import UsageError  # noqa: E402
from segmentation import runner  # noqa: E402
from tests.helpers import DENSE_HEADS, DENSE_TINY, DEPTH, DIM, ROOT, child_env, optimizer_groups  # noqa: E402


@pytest.mark.parametrize("config", list(DENSE_HEADS))
def test_config_trains_and_evaluates(config, backbone, ade, nyu, tmp_path):
    task = config.split("/")[0]
    data = ade if task == "segmentation" else nyu
    work = tmp_path / "work"
    base = [str(ROOT / config), "--backbone", str(backbone), "--data-path", str(data), "--output-dir", str(work)]
    overrides = ["--cfg-options", *DENSE_TINY, *DENSE_HEADS[config]]
    assert runner.main(task, [*base, "--show-dir", str(tmp_path / "show"), *overrides]) == 0
    out = json.loads((work / "results.json").read_text())
    results = out["details"]["final"]["metrics"]
    keys = ("mIoU",) if task == "segmentation" else ("rmse", "abs_rel", "d1")
    for k in keys:
        assert k in results and np.isfinite(results[k]), (k, results)
    assert out["details"]["final"]["iter"] == 2
    # the one evaluation during training (iteration 2 of 2) saw the final weights: best = final
    best = out["details"]["best_on_test"]
    assert best["iter"] == 2 and best["metric"] == keys[0]
    assert best["metrics"] == pytest.approx(results, rel=1e-5)
    assert len(list((tmp_path / "show").rglob("*.png"))) >= 2
    # --eval-only on the trained checkpoint (the work dir's last) gives the same numbers
    assert runner.main(task, [*base, "--eval-only", *overrides]) == 0
    again = json.loads((work / "results.json").read_text())
    assert again["details"]["final"]["iter"] is None and again["details"]["checkpoint"] == str(work / "iter_2.pth")
    for k in keys:
        assert again["details"]["final"]["metrics"][k] == pytest.approx(results[k], rel=1e-5)


def _cfg(path: str):
    from mmengine.config import Config

    return Config.fromfile(str(ROOT / path))


def test_protocol_settings_in_configs():
    """Slide inference as in the reference's proteus configs (ADE20K slide, NYU slide_flip)."""
    seg = _cfg("segmentation/configs/upernet_vit_large.py")
    assert seg.model.test_cfg == dict(mode="slide", crop_size=(518, 518), stride=(345, 345))
    assert seg.model.backbone.out_indices == (7, 11, 15, 23) and seg.model.backbone.drop_path_rate == 0.2
    assert seg.train_cfg.max_iters == 160000 and seg.param_scheduler[1].end == 160000
    assert seg.optim_wrapper.paramwise_cfg == dict(num_layers=24, decay_rate=0.65, token_weight_decay=True)
    lin = _cfg("segmentation/configs/linear_vit_base.py")
    assert lin.model.backbone.frozen and lin.model.decode_head.in_channels == [768] * 4
    assert lin.optim_wrapper.optimizer.lr == 8e-4 and lin.train_cfg.max_iters == 60000
    dep = _cfg("depth/configs/dpt_vit_base.py")
    assert dep.model.test_cfg == dict(mode="slide_flip", crop_size=(518, 518), stride=(129, 129))
    assert dep.model.decode_head.post_process_channels == [96, 192, 384, 768]
    assert dep.optim_wrapper.optimizer.lr == 1e-4 and dep.optim_wrapper.paramwise_cfg.custom_keys == REFERENCE_DPT_KEYS
    assert _cfg("depth/configs/dpt_vit_small.py").optim_wrapper.optimizer.lr == 4e-4


def test_amp_flag_switches_the_optimizer_wrapper(backbone, ade, tmp_path, monkeypatch, capsys):
    config = "segmentation/configs/linear_vit_small.py"
    argv = _tiny_argv(config, backbone, ade, tmp_path, "--amp")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config only: nothing runs
    cfg = runner.build_config(runner.get_args_parser("segmentation").parse_args(argv), "segmentation")
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.dtype == "bfloat16"
    assert cfg.model.backbone.checkpoint == str(backbone)
    monkeypatch.undo()
    if not torch.cuda.is_available():  # mmengine's wrapper would assert deep inside: one line instead
        assert runner.main("segmentation", argv) == 2
        assert capsys.readouterr().err.startswith("error: --amp needs a GPU: mmengine's AmpOptimWrapper")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("config", ["segmentation/configs/upernet_vit_small.py", "depth/configs/dpt_vit_small.py"])
def test_amp_trains_on_gpu(config, backbone, ade, nyu, tmp_path):
    """--amp really trains in bf16 (the reference's amp flags were ignored): UperNet's BN, DPT's SiLog loss."""
    task = config.split("/")[0]
    work = tmp_path / "work"
    argv = _tiny_argv(config, backbone, ade if task == "segmentation" else nyu, work, "--amp")
    assert runner.main(task, argv) == 0
    logs = "\n".join(p.read_text() for p in work.rglob("*.log"))
    assert "AmpOptimWrapper" in logs and "bfloat16" in logs
    metrics = json.loads((work / "results.json").read_text())["details"]["final"]["metrics"]
    assert all(np.isfinite(v) for v in metrics.values()), metrics


def _tiny_cfg(config: str, backbone: Path, data: Path, *extra: str):
    """The config as the runner builds it for the tiny backbone (nothing runs)."""
    argv = _tiny_argv(config, backbone, data, data / "work", *extra)
    return runner.build_config(runner.get_args_parser(config.split("/")[0]).parse_args(argv), config.split("/")[0])


def test_layer_wise_lr_decay_reaches_every_block(backbone, ade):
    """Each backbone parameter gets lr * 0.65 ** (L + 1 - layer_id), heads the base lr: the reference's
    multipliers (mmseg's LayerDecayOptimizerConstructor: 0.65 ** (L + 1 - id) with id 0 for the
    embeddings, i + 1 for block i, L + 1 for the rest). pos_embed and cls_token decayed as there."""
    cfg = _tiny_cfg("segmentation/configs/upernet_vit_small.py", backbone, ade)
    groups, model = optimizer_groups(cfg)
    lr = {n: g[0] for n, g in groups.items()}
    wd = {n: g[1] for n, g in groups.items()}
    base = 1e-4
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(base * 0.65**DEPTH)
    assert lr[f"backbone.vit.blocks.{DEPTH - 1}.mlp.fc1.weight"] == pytest.approx(base * 0.65)
    assert lr["backbone.vit.pos_embed"] == pytest.approx(base * 0.65 ** (DEPTH + 1))
    assert lr["backbone.vit.patch_embed.proj.weight"] == pytest.approx(base * 0.65 ** (DEPTH + 1))
    assert lr["decode_head.conv_seg.weight"] == pytest.approx(base)
    assert wd["backbone.vit.blocks.0.norm1.weight"] == 0.0 and wd["backbone.vit.blocks.0.ls1.gamma"] == 0.0
    assert wd["backbone.vit.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["backbone.vit.pos_embed"] == wd["backbone.vit.cls_token"] == 0.05  # the reference
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == 0.05
    assert len({round(v / base, 8) for n, v in lr.items() if n.startswith("backbone.")}) == DEPTH + 1
    # what never reaches the outputs is frozen (DDP rejects parameters without gradient)
    named = dict(model.named_parameters())
    assert not named["backbone.vit.norm.weight"].requires_grad and not named["backbone.vit.mask_token"].requires_grad
    cfg.model.backbone.out_indices = [0, 1]
    frozen = {n for n, p in optimizer_groups(cfg)[1].named_parameters() if not p.requires_grad}
    assert "backbone.vit.blocks.1.attn.qkv.weight" not in frozen and "backbone.vit.blocks.2.attn.qkv.weight" in frozen
    # our fix, by name: the tokens without weight decay, as the reference's check meant
    cfg = _tiny_cfg("segmentation/configs/upernet_vit_small.py", backbone, ade)
    cfg.optim_wrapper.paramwise_cfg.token_weight_decay = False
    wd = {n: g[1] for n, g in optimizer_groups(cfg)[0].items()}
    assert wd["backbone.vit.pos_embed"] == wd["backbone.vit.cls_token"] == 0.0
    assert wd["backbone.vit.blocks.0.attn.qkv.weight"] == 0.05


REFERENCE_DPT_KEYS = {  # dpt_mae-*_nyu-518x518_proteus*.py
    "pos_embed": dict(decay_mult=0.0),
    "cls_token": dict(decay_mult=0.0),
    "norm": dict(decay_mult=0.0),
    "backbone": dict(lr_mult=0.1),
}


@pytest.mark.parametrize("config", ["depth/configs/dpt_vit_small.py", "depth/configs/dpt_probe_vit_small.py"])
def test_dpt_optimizer_groups_are_the_references(config, backbone, nyu):
    """mmengine applies the longest custom key a name contains: the tokens at the full lr without
    weight decay, the rest of the backbone (norms too: "backbone" outranks "norm") at lr x 0.1 with
    decay; the head (its BN layers are named "bn") at the base lr with decay. The probe trains the head only."""
    groups, model = optimizer_groups(_tiny_cfg(config, backbone, nyu))
    base, wd = 4e-4, 0.01
    head = {
        "decode_head.conv_seg.weight": (base, wd),
        "decode_head.conv_seg.bias": (base, wd),
        "decode_head.fusion_blocks.1.res_conv_unit1.conv1.bn.weight": (base, wd),
        "decode_head.project.bn.bias": (base, wd),
        "decode_head.reassemble_blocks.readout_projects.0.0.weight": (base, wd),
    }
    for name, expected in head.items():
        assert groups[name] == pytest.approx(expected), name
    backbone_params = {n for n in groups if n.startswith("backbone.")}
    if "probe" in config:
        assert not backbone_params and not any(p.requires_grad for p in model.backbone.parameters())
        return
    assert groups["backbone.vit.pos_embed"] == pytest.approx((base, 0.0))
    assert groups["backbone.vit.cls_token"] == pytest.approx((base, 0.0))
    for name in ("blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                 "blocks.3.ls2.gamma", "patch_embed.proj.weight"):  # fmt: skip
        assert groups[f"backbone.vit.{name}"] == pytest.approx((base * 0.1, wd)), name
    assert len(backbone_params) == sum(p.requires_grad for p in model.backbone.parameters())


def test_reference_pos_embed_is_resized_once_and_fine_tuned(backbone):
    """--reference-pos-embed: the pretrained 2x2 table resized once to the 5x5 grid of a 70-pixel input
    as the reference's MAE.resize_abs_pos_embed did (F.interpolate bicubic to size, align_corners=False,
    no antialias), then a trainable parameter used without interpolation at that grid."""
    import torch.nn.functional as F

    pretrained = models.load_backbone(backbone).pos_embed.detach()
    bb = proteus_mmseg.ProteusViT(checkpoint=str(backbone), img_size=70, out_indices=(3,), reference_pos_embed=True)
    table = bb.vit.pos_embed
    grid = pretrained[:, 1:].reshape(1, 2, 2, DIM).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(table, torch.cat([pretrained[:, :1], resized.reshape(1, 25, DIM)], 1))
    assert isinstance(table, torch.nn.Parameter) and table.requires_grad
    assert bb.vit.interpolate_pos_encoding(5, 5) is table  # no interpolation in the forward
    default = proteus_mmseg.ProteusViT(checkpoint=str(backbone), img_size=70, out_indices=(3,))
    dinov2 = default.vit.interpolate_pos_encoding(5, 5)  # our default: DINOv2's offset-0.1 formula per forward
    assert default.vit.pos_embed.shape == (1, 5, DIM) and (dinov2 - table).abs().max() > 1e-3
    x = torch.randn(2, 3, 70, 70)
    bb(x)[0].sum().backward()
    assert table.grad is not None and table.grad[:, 1:].abs().sum() > 0


def test_reference_pos_embed_flag(backbone, ade, tmp_path, capsys):
    """The runner's flag sets the backbone key; a checkpoint trained with it refuses to load without it."""
    config = "segmentation/configs/linear_vit_small.py"
    cfg = _tiny_cfg(config, backbone, ade, "--reference-pos-embed")
    assert cfg.model.backbone.reference_pos_embed is True
    assert "reference_pos_embed" not in _tiny_cfg(config, backbone, ade).model.backbone
    work = tmp_path / "work"
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work, "--reference-pos-embed")) == 0
    state = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert state["backbone.vit.pos_embed"].shape == (1, 1 + 37 * 37, DIM)  # 518 / 14 = 37
    # results.json says how the figures were made (scripts.evaluate_all compares it with the paper's)
    protocol = json.loads((work / "results.json").read_text())["protocol"]
    assert protocol == {"name": "Proteus ADE20K linear probe", "config": str(ROOT / config), "world_size": 1,
                        "batch_per_gpu": 2, "global_batch": 2, "max_iters": 2, "val_interval": 2,
                        "reference_pos_embed": True, "amp": False}  # fmt: skip
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work, "--eval-only")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the checkpoint's pos_embed has 1370 positions, this backbone's 5")
    # resuming without the flag is refused the same way, and the run's checkpoint stays as it was
    saved = (work / "iter_2.pth").read_bytes()
    argv = _tiny_argv(config, backbone, ade, work)
    argv[argv.index("train_cfg.max_iters=2")] = "train_cfg.max_iters=4"
    assert runner.main("segmentation", argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: the checkpoint's pos_embed has 1370 positions")
    assert "Traceback" not in err and (work / "iter_2.pth").read_bytes() == saved
    assert not (work / "iter_4.pth").exists()


def test_best_on_test_follows_the_checkpoint_rule(tmp_path):
    scores = {1000: (0.5, 0.7), 2000: (0.4, 0.6), 3000: (0.4, 0.8), 4000: (0.45, 0.8)}  # rmse, d1
    lines = [{"iter": it, "metrics": {"rmse": rmse, "d1": d1}} for it, (rmse, d1) in scores.items()]
    (tmp_path / "evaluations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    best = runner.best_on_test(tmp_path, dict(save_best="rmse", rule="less"))
    assert best == {
        "iter": 2000,
        "metric": "rmse",
        "rule": "less",
        "metrics": lines[1]["metrics"],
    }  # ties: the earliest
    assert runner.best_on_test(tmp_path, dict(save_best="d1", rule="greater"))["iter"] == 3000
    assert runner.best_on_test(tmp_path, dict(interval=2000)) is None  # no rule in the config
    assert runner.best_on_test(tmp_path / "nowhere", dict(save_best="rmse", rule="less")) is None


def test_backbone_loads_every_checkpoint_format(backbone, tmp_path):
    vit = models.load_backbone(backbone)
    ref = tmp_path / "reference.pth"
    sd = {f"student.backbone.{k}": v for k, v in models.to_dinov2(vit).items()}
    torch.save({"model": sd, "args": argparse.Namespace(model="models_proteus_dinov2")}, ref)
    x = torch.randn(1, 3, 70, 98)
    outs = []
    for path in (backbone, ref):
        bb = proteus_mmseg.ProteusViT(checkpoint=str(path), out_indices=(1, 3), frozen=True).train()
        assert not bb.vit.training and not any(p.requires_grad for p in bb.parameters())
        feats = bb(x)
        assert [f.shape for f in feats] == [(1, DIM, 5, 7)] * 2
        outs.append(feats)
    torch.testing.assert_close(outs[0], outs[1])
    with_cls = proteus_mmseg.ProteusViT(checkpoint=str(backbone), out_indices=(3,), with_cls_token=True)(x)
    assert with_cls[0][0].shape == (1, DIM, 5, 7) and with_cls[0][1].shape == (1, DIM)
    fine = proteus_mmseg.ProteusViT(checkpoint=str(backbone), out_indices=(3,), drop_path_rate=0.1)
    assert fine.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert all(p.requires_grad for n, p in fine.named_parameters() if not n.startswith(("vit.mask_token", "vit.norm.")))


def test_miou_with_reduce_zero_label_matches_direct_computation():
    from mmengine.structures import PixelData
    from mmseg.registry import METRICS
    from mmseg.structures import SegDataSample

    metric = METRICS.build(_cfg("segmentation/configs/linear_vit_small.py").val_evaluator)
    metric.dataset_meta = dict(classes=[str(i) for i in range(150)])
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4, (2, 20, 30))  # ADE label png values; 0 = "other", ignored
    gt = np.where(raw == 0, 255, raw - 1)  # what LoadAnnotations(reduce_zero_label=True) yields
    pred = rng.integers(0, 3, (2, 20, 30))
    samples = []
    for g, p in zip(gt, pred):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.from_numpy(g)[None])
        s.pred_sem_seg = PixelData(data=torch.from_numpy(p)[None])
        samples.append(s.to_dict())
    metric.process({}, samples)
    got = metric.compute_metrics(metric.results)["mIoU"]
    valid = gt != 255
    ious = []
    for c in range(150):
        inter = ((pred == c) & (gt == c) & valid).sum()
        union = (((pred == c) | (gt == c)) & valid).sum()
        if (gt[valid] == c).sum() > 0:  # classes absent from gt are nan and left out
            ious.append(inter / union)
    assert got == pytest.approx(100 * np.mean(ious), abs=0.01)


def test_depth_metrics_use_eigen_crop_and_range():
    from mmengine.structures import PixelData
    from mmseg.registry import METRICS
    from mmseg.structures import SegDataSample

    metric = METRICS.build(_cfg("depth/configs/dpt_vit_small.py").val_evaluator)
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 9.0, (480, 640))
    gt[:10] = 0.0  # invalid: below the range
    gt[100:110] = 12.0  # invalid: beyond 10 m
    pred = gt * rng.uniform(0.8, 1.25, gt.shape)
    pred[0:45] = 100.0  # outside the Eigen crop: must not count
    s = SegDataSample()
    s.gt_depth_map = PixelData(data=torch.from_numpy(gt)[None].float())
    s.pred_depth_map = PixelData(data=torch.from_numpy(pred)[None].float())
    metric.process({}, [s.to_dict()])
    got = metric.compute_metrics(metric.results)
    mask = np.zeros_like(gt, dtype=bool)
    mask[45:471, 41:601] = True
    mask &= (gt > 1e-3) & (gt < 10)
    g, p = gt[mask], pred[mask].astype(np.float32).astype(np.float64)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((p - g) ** 2)), rel=1e-4)
    assert got["abs_rel"] == pytest.approx(np.mean(np.abs(p - g) / g), rel=1e-4)
    assert got["d1"] == pytest.approx(np.mean(np.maximum(g / p, p / g) < 1.25), rel=1e-4)


def _metrics(g: np.ndarray, p: np.ndarray) -> dict:
    t, d, dl = np.maximum(g / p, p / g), p - g, np.log(p) - np.log(g)
    return dict(d1=np.mean(t < 1.25), d2=np.mean(t < 1.25**2), d3=np.mean(t < 1.25**3),
                abs_rel=np.mean(np.abs(d) / g), sq_rel=np.mean(d**2 / g), rmse=np.sqrt(np.mean(d**2)),
                rmse_log=np.sqrt(np.mean(dl**2)), log10=np.mean(np.abs(np.log10(p) - np.log10(g))),
                silog=np.sqrt(np.mean(dl**2) - 0.5 * np.mean(dl) ** 2))  # fmt: skip


def test_depth_metrics_and_silog_loss_are_per_image():
    """PROTOCOLS E: every metric per image, then averaged (not pooled over all pixels); SiLog per image."""
    from mmengine.structures import PixelData
    from mmseg.registry import METRICS, MODELS
    from mmseg.structures import SegDataSample

    metric = METRICS.build(_cfg("depth/configs/dpt_vit_small.py").val_evaluator)
    rng = np.random.default_rng(1)
    gts = [rng.uniform(0.5, 9.0, (480, 640)) for _ in range(2)]
    gts[1][:300] = 0.0  # the second image has far fewer valid pixels: pooling would weigh it less
    preds = [gts[0] * 1.3, gts[1] * rng.uniform(0.9, 1.1, (480, 640))]
    samples = []
    for g, p in zip(gts, preds):
        s = SegDataSample()
        s.gt_depth_map = PixelData(data=torch.from_numpy(g)[None].float())
        s.pred_depth_map = PixelData(data=torch.from_numpy(p)[None].float())
        samples.append(s.to_dict())
    metric.process({}, samples)
    got = metric.compute_metrics(metric.results)
    per_image = []
    for g, p in zip(gts, preds):
        m = np.zeros_like(g, dtype=bool)
        m[45:471, 41:601] = True
        m &= (g > 1e-3) & (g < 10)
        per_image.append(_metrics(g[m], p[m].astype(np.float32).astype(np.float64)))
    assert set(got) == set(per_image[0])
    for k in got:
        assert got[k] == pytest.approx((per_image[0][k] + per_image[1][k]) / 2, rel=1e-4, abs=1e-6), k

    head = MODELS.build(_cfg("depth/configs/linear_vit_small.py").model.decode_head)
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 8, 8) * 5
    gt[1, :, :6] = 0.0  # invalid (gt <= 1e-6) pixels are left out
    pred = torch.rand(2, 1, 8, 8) * 5 + 0.1
    batch = []
    for g in gt:
        s = SegDataSample()
        s.gt_depth_map = PixelData(data=g)
        batch.append(s)
    expected = []
    for g, p in zip(gt, pred):
        d = torch.log(g[g > 1e-6]) - torch.log(p[g > 1e-6])
        expected.append(torch.sqrt((d**2).mean() - 0.5 * d.mean() ** 2))
    assert head.loss_by_feat(pred, batch)["loss_silog"].item() == pytest.approx(torch.stack(expected).mean().item())


def test_test_modes_slide_windows_and_flip():
    """ADE: 518 windows, stride 345; NYU: stride 129, each window averaged with its flipped prediction,
    the result resized back to the original 480x640."""
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    for config, windows in (("segmentation/configs/linear_vit_small.py", 2), ("depth/configs/linear_vit_small.py", 6)):
        cfg = _cfg(config)
        cfg.model.backbone.arch = "vit_small"  # random weights, never run: encode_decode is stubbed
        model = MODELS.build(cfg.model)
        calls = []

        def encode_decode(x, metas, model=model, calls=calls):
            calls.append(x.clone())
            return torch.ones(x.shape[0], model.out_channels, *x.shape[2:]) * (1 + x[:, :1, :1, :1])

        model.encode_decode = encode_decode
        x = torch.zeros(1, 3, 518, 691)  # a 480x640 NYU image at short side 518
        x[..., 0] = 1.0  # left column: a flipped window starts with 0 instead
        sample = SegDataSample(metainfo=dict(ori_shape=(480, 640), img_shape=(518, 691)))
        out = model.predict(x, [sample])[0]
        assert len(calls) == windows
        if "depth" in config:
            assert torch.equal(calls[1], calls[0].flip(3))  # each window and its mirror
            assert out.pred_depth_map.shape == (480, 640)
            assert out.pred_depth_map.data[0, 0, 0].item() == pytest.approx((2 + 1) / 2)  # averaged with the flip
        else:
            assert [c.shape[-1] for c in calls] == [518, 518] and out.pred_sem_seg.shape == (480, 640)


# The reference release's values (eval/dense_prediction/configs/{mae,dpt}/*proteus*.py and their
# _base_ schedules) per size S/B/L: a tuple gives one value per size.
SPEC = {
    "segmentation/configs/linear_vit_{}.py": dict(lr=8e-4, iters=60000, batch=8, val=2000, ckpt=2000),
    "segmentation/configs/upernet_vit_{}.py": dict(lr=1e-4, iters=(60000, 60000, 160000), dp=(0.1, 0.1, 0.2),
                                                   batch=(8, 4, 2), val=(2000, 2000, 16000),
                                                   ckpt=(2000, 2000, 16000)),
    "depth/configs/linear_vit_{}.py": dict(lr=(4e-4, 1e-4, 1e-4), iters=25000, batch=4, val=1000, ckpt=2000),
    "depth/configs/dpt_vit_{}.py": dict(lr=(4e-4, 1e-4, 1e-4), iters=25000, dp=0.1, batch=4, val=1000, ckpt=2000),
    "depth/configs/dpt_probe_vit_{}.py": dict(lr=(4e-4, 1e-4, 1e-4), iters=25000, dp=0.1, batch=4, val=1000,
                                              ckpt=2000),
}  # fmt: skip


@pytest.mark.parametrize("pattern", list(SPEC))
def test_every_size_follows_the_protocol(pattern):
    for i, (size, dim) in enumerate((("small", 384), ("base", 768), ("large", 1024))):
        cfg = _cfg(pattern.format(size))
        spec = {k: v[i] if isinstance(v, tuple) else v for k, v in SPEC[pattern].items()}
        bb, head = cfg.model.backbone, cfg.model.decode_head
        assert bb.out_indices == ((7, 11, 15, 23) if size == "large" else (3, 5, 7, 11))
        assert not bb.final_norm and bb.get("with_cls_token", False) == ("dpt" in pattern)
        assert bb.get("drop_path_rate", 0.0) == spec.get("dp", 0)
        assert bb.get("frozen", False) == ("linear" in pattern or "probe" in pattern)
        assert not bb.get("reference_pos_embed", False)  # our default: DINOv2's interpolation per forward
        assert cfg.optim_wrapper.optimizer.lr == spec["lr"] and cfg.optim_wrapper.optimizer.betas == (0.9, 0.999)
        assert cfg.optim_wrapper.optimizer.weight_decay == (0.01 if "depth" in pattern else 0.05)
        assert cfg.train_cfg.max_iters == spec["iters"] and cfg.param_scheduler[1].end == spec["iters"]
        assert cfg.param_scheduler[0].end == cfg.param_scheduler[1].begin == 1500
        assert cfg.param_scheduler[0].start_factor == 1e-6 and cfg.param_scheduler[1].power == 1.0
        assert cfg.train_dataloader.batch_size == spec["batch"]
        # evaluated on the test split during training; the best kept (NYU as the reference, ADE20K ours)
        assert cfg.train_cfg.val_interval == spec["val"] and cfg.default_hooks.checkpoint.interval == spec["ckpt"]
        best = ("rmse", "less") if "depth" in pattern else ("mIoU", "greater")
        assert (cfg.default_hooks.checkpoint.save_best, cfg.default_hooks.checkpoint.rule) == best
        assert dict(type="EvaluationHistoryHook") in cfg.custom_hooks
        assert head.in_channels == [dim] * 4
        if "linear" in pattern:
            assert head.num_convs == 0 and head.norm_cfg is None and head.input_transform == "resize_concat"
            assert head.channels == 4 * dim and head.dropout_ratio == 0.0
        elif "upernet" in pattern:
            assert (
                head.channels == dim and cfg.model.neck.embed_dim == dim and cfg.model.auxiliary_head.in_channels == dim
            )
            assert cfg.optim_wrapper.paramwise_cfg == dict(
                num_layers=24 if size == "large" else 12, decay_rate=0.65, token_weight_decay=True
            )
        else:
            assert head.embed_dims == dim and head.post_process_channels == [dim // 8, dim // 4, dim // 2, dim]
            assert head.readout_type == "project" and head.channels == 256 and head.act_cfg == dict(type="ReLU")
            assert head.norm_cfg == dict(type="SyncBN", requires_grad=True) and head.dropout_ratio == 0.1
            assert cfg.optim_wrapper.paramwise_cfg.custom_keys == REFERENCE_DPT_KEYS


# Every runnable config's built settings, as sha256 of its canonical dict (the 16 first hex digits).
# Recorded before the shared parts moved into the bases (runtime.py: the backbone, the train loop); a
# refactor of the configs must keep them. A deliberate protocol change updates its line here.
BUILT_CONFIGS = {
    "segmentation/configs/linear_vit_base.py": "cfb7edddd96a1f20",
    "segmentation/configs/linear_vit_base_dinov3_layout.py": "25155733f276c2d8",
    "segmentation/configs/linear_vit_large.py": "f159969e1742a214",
    "segmentation/configs/linear_vit_large_dinov3_layout.py": "eea153f526d2d871",
    "segmentation/configs/linear_vit_small.py": "80cc897b0b6f0325",
    "segmentation/configs/linear_vit_small_dinov3_layout.py": "cb08d2ec439afcad",
    "segmentation/configs/upernet_vit_base.py": "0651e2853e5dcc67",
    "segmentation/configs/upernet_vit_base_dinov3_layout.py": "a780cf863ea662e9",
    "segmentation/configs/upernet_vit_large.py": "93975ae836692b1a",
    "segmentation/configs/upernet_vit_large_dinov3_layout.py": "6883e377e2ed8eb2",
    "segmentation/configs/upernet_vit_small.py": "594d96a862d129a6",
    "segmentation/configs/upernet_vit_small_dinov3_layout.py": "d60bdbb266c1ceae",
    "depth/configs/dpt_probe_vit_base.py": "775b8526a81608d9",
    "depth/configs/dpt_probe_vit_base_dinov3_layout.py": "7d2ead8e3c425dc2",
    "depth/configs/dpt_probe_vit_large.py": "50429dd9d48874be",
    "depth/configs/dpt_probe_vit_large_dinov3_layout.py": "ae61ae91e0cdb3d0",
    "depth/configs/dpt_probe_vit_small.py": "3e6beed98eb4465e",
    "depth/configs/dpt_probe_vit_small_dinov3_layout.py": "dc4990fe13e23682",
    "depth/configs/dpt_vit_base.py": "352bd628884716d8",
    "depth/configs/dpt_vit_base_dinov3_layout.py": "436fc869dd72f970",
    "depth/configs/dpt_vit_large.py": "b7a09894b938f5de",
    "depth/configs/dpt_vit_large_dinov3_layout.py": "82f75856f140aae4",
    "depth/configs/dpt_vit_small.py": "a558acb9752365ef",
    "depth/configs/dpt_vit_small_dinov3_layout.py": "25b1b6802a0fbcd7",
    "depth/configs/linear_vit_base.py": "1b1f4bf4d9f673e6",
    "depth/configs/linear_vit_base_dinov3_layout.py": "71cac899976c33e3",
    "depth/configs/linear_vit_large.py": "e5b309378aba3231",
    "depth/configs/linear_vit_large_dinov3_layout.py": "bf86f2f0f6ba4214",
    "depth/configs/linear_vit_small.py": "58ee2c957aab3a29",
    "depth/configs/linear_vit_small_dinov3_layout.py": "0c1410fa4c91d360",
    "segmentation/configs/linear_timm.py": "50995e089dbed3f3",
    "segmentation/configs/upernet_timm.py": "2aa9ded197d11e70",
    "depth/configs/dpt_probe_timm.py": "946dd495a8027428",
    "depth/configs/dpt_timm.py": "034a77f28cd71acb",
    "depth/configs/linear_timm.py": "2c0a9855d6356f60",
    "segmentation/configs/dinov3_linear.py": "047fb3e49dae8ee3",
    "depth/configs/dinov3_linear.py": "f79e2b1ba5e6db0f",
}


def _canonical(value):
    """Dicts by sorted key, lists and tuples kept apart, leaves by repr: equal exactly when the configs are."""
    if isinstance(value, dict):
        return tuple(sorted((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    return repr(value)


def test_configs_build_the_recorded_settings():
    configs = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/configs/*.py"))
    bases = (
        "runtime.py",
        "ade20k_base.py",
        "nyu_base.py",
        "nyu_data.py",
        "dinov3_layout_ade20k.py",
        "dinov3_layout_nyu.py",
    )
    assert sorted(BUILT_CONFIGS) == [c for c in configs if not c.endswith(bases)]
    for config, recorded in BUILT_CONFIGS.items():
        name = _cfg(config).protocol_name  # results.json's protocol.name: whose protocol it is
        assert name.startswith("DINOv3 " if config.endswith("dinov3_linear.py") else "Proteus "), config
        built = hashlib.sha256(repr(_canonical(_cfg(config).to_dict())).encode()).hexdigest()[:16]
        assert built == recorded, f"{config} builds other settings than recorded"


def test_dpt_head_normalises_where_the_reference_does(backbone, nyu):
    """BN (SyncBN under torchrun) in every fusion residual unit and the projection conv, none in the
    reassemble and post-process convs; dropout 0.1 before the output conv."""
    from mmseg.registry import MODELS

    cfg = _tiny_cfg("depth/configs/dpt_vit_small.py", backbone, nyu)
    head = MODELS.build(cfg.model.decode_head)
    bns = {n for n, m in head.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    units = {f"fusion_blocks.{i}.res_conv_unit{u}.conv{c}.bn" for i in range(4) for u in (1, 2) for c in (1, 2)}
    units -= {"fusion_blocks.0.res_conv_unit1.conv1.bn", "fusion_blocks.0.res_conv_unit1.conv2.bn"}  # DPT drops it
    assert bns == units | {"project.bn"}
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1


def test_clear_errors(backbone, tmp_path, capsys):
    cfg = str(ROOT / "segmentation/configs/linear_vit_small.py")
    assert runner.main("segmentation", [cfg, "--backbone", str(tmp_path / "nope.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    assert runner.main("segmentation", [cfg, "--backbone", str(backbone), "--data-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "segmentation data missing" in err and "images/training" in err
    ckpt = tmp_path / "seg.pth"
    ckpt.write_bytes(b"")
    assert runner.main("segmentation", [cfg, "--backbone", str(backbone), "--checkpoint", str(ckpt)]) == 2
    assert "--checkpoint goes with --eval-only" in capsys.readouterr().err
    # an override of another kind than the config's value: named before mmengine starts
    for option, expected in [
        ("train_cfg.max_iters=abc", "expected an integer (the config's value is 60000)"),
        ("train_cfg.max_iters=2.5", "expected an integer (the config's value is 60000)"),
        ("optim_wrapper.optimizer.lr=fast", "expected a number (the config's value is 0.0008)"),
        ("model.backbone.frozen=maybe", "expected True or False (the config's value is True)"),
    ]:
        assert runner.main("segmentation", [cfg, "--backbone", str(backbone), "--cfg-options", option]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: --cfg-options {option}: {expected}"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, wrapped):
    """mmengine writes the checkpoint's bytes with open().write(): ENOSPC there, plain or wrapped by a writer
    (torch's zip writer raises RuntimeError with it in __context__), is common.io's DiskFullError (one line,
    exit 1); the last checkpoint is intact and no temp file is left."""
    import errno

    from mmengine.runner import Runner

    from common.io import DiskFullError

    def full_disk(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        (Path(out_dir) / filename).write_bytes(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            if wrapped:
                raise RuntimeError("unexpected pos 704 vs 598") from None
            raise

    monkeypatch.setattr(Runner, "save_checkpoint", full_disk)
    (tmp_path / "iter_2.pth").write_bytes(b"the last good one")
    dense = object.__new__(proteus_mmseg.DenseRunner)  # never set up: only its own save_checkpoint code runs
    for name, kept in (("iter_4.pth", "iter_4.pth was not written"), ("iter_2.pth", "the last iter_2.pth is intact")):
        with pytest.raises(DiskFullError) as e:
            dense.save_checkpoint(str(tmp_path), name)
        assert str(e.value) == f"no space left on {tmp_path} (No space left on device); {kept}"
    assert [p.name for p in tmp_path.iterdir()] == ["iter_2.pth"]
    assert (tmp_path / "iter_2.pth").read_bytes() == b"the last good one"


@pytest.mark.parametrize(
    "config",
    [
        "segmentation/configs/linear_vit_small.py",
        "segmentation/configs/upernet_vit_base.py",
        "depth/configs/dpt_vit_small.py",
    ],  # fmt: skip
)
def test_backbone_of_another_size_is_one_line(config, backbone, ade, nyu, tmp_path, capsys):
    """A width-64 backbone with a ViT-S/B config: refused before mmengine starts, not a conv2d traceback."""
    task = config.split("/")[0]
    data = ade if task == "segmentation" else nyu
    argv = [str(ROOT / config), "--backbone", str(backbone), "--data-path", str(data), "--output-dir", str(tmp_path)]
    assert runner.main(task, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"4 blocks of width {DIM}" in err[0] and "takes blocks [3, 5, 7, 11]" in err[0]
    assert runner.main(task, [*argv, "--cfg-options", "model.backbone.out_indices=[0,1,2,3]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    width = 768 if "base" in config else 384
    assert len(err) == 1 and f"expects width {width}" in err[0]
    assert not list(tmp_path.rglob("*.log"))  # mmengine never started


def _tiny_argv(config: str, backbone: Path, data: Path, work: Path, *extra: str, options=()) -> list[str]:
    base = [str(ROOT / config), "--backbone", str(backbone), "--data-path", str(data), "--output-dir", str(work)]
    return [*base, *extra, "--cfg-options", *DENSE_TINY, *DENSE_HEADS[config], *options]


def test_resume_continues_from_the_last_checkpoint(backbone, ade, tmp_path):
    """The same command continues, also in a work dir moved since (mmengine records absolute paths);
    the checkpoints are plain data, read with weights_only=True and no allow-list."""
    config = "segmentation/configs/linear_vit_small.py"
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, tmp_path / "before")) == 0
    work = Path(shutil.move(tmp_path / "before", tmp_path / "work"))
    history = work / "evaluations.jsonl"
    with open(history, "a") as f:  # as if the job had evaluated at 3 and died before checkpointing
        f.write(json.dumps({"iter": 3, "metrics": {"mIoU": 99.0}}) + "\n")
    argv = _tiny_argv(config, backbone, ade, work)  # the same command, with the new folder: it continues
    argv[argv.index("train_cfg.max_iters=2")] = "train_cfg.max_iters=4"
    assert runner.main("segmentation", argv) == 0
    hub = torch.load(work / "iter_4.pth", weights_only=True)["message_hub"]
    assert hub["runtime_info"]["last_ckpt"] == "iter_4.pth"  # relative to the work dir
    assert len(list(work.glob("best_mIoU_iter_*.pth"))) == 1  # a superseded best is removed here, not elsewhere
    logs = "\n".join(p.read_text() for p in work.rglob("*.log"))
    assert "resumed epoch: 0, iter: 2" in logs
    assert "Iter(train) [1/4]" not in logs.split("resumed epoch")[-1]  # iterations 1-2 are not redone
    # the evaluations of both runs, the one after the resumed checkpoint dropped; best of them named
    entries = [json.loads(line) for line in history.read_text().splitlines()]
    assert [e["iter"] for e in entries] == [2, 4]
    results = json.loads((work / "results.json").read_text())
    best = max(entries, key=lambda e: (e["metrics"]["mIoU"], -e["iter"]))
    assert results["details"]["best_on_test"]["iter"] == best["iter"] and results["details"]["final"]["iter"] == 4
    assert results["details"]["final"]["metrics"] == pytest.approx(entries[1]["metrics"], rel=1e-5)
    assert results["metric_notes"] == {f"{k} best on test": f"iter {best['iter']}" for k in best["metrics"]}


def test_resume_is_of_the_same_backbone_and_takes_a_file(backbone, ade, tmp_path, capsys):
    """A run continues from the work dir's last checkpoint only when it is of the same --backbone (another
    backbone's finished run would be reported as this one's); --resume FILE continues from one of our own."""
    config = "segmentation/configs/linear_vit_small.py"
    work, other = tmp_path / "work", tmp_path / "other.pth"
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work)) == 0
    torch.manual_seed(1)
    torch.save(models.to_dinov2(models.ViT(img_size=28, patch_size=14, embed_dim=DIM, depth=DEPTH, num_heads=1)), other)
    capsys.readouterr()
    assert runner.main("segmentation", _tiny_argv(config, other, ade, work)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was trained from the backbone {backbone}, not {other}" in err[0], err
    argv = _tiny_argv(config, backbone, ade, tmp_path / "fresh", "--resume", str(work / "iter_2.pth"))
    argv[argv.index("train_cfg.max_iters=2")] = "train_cfg.max_iters=4"
    assert runner.main("segmentation", argv) == 0
    logs = "\n".join(p.read_text() for p in (tmp_path / "fresh").rglob("*.log"))
    assert "resumed epoch: 0, iter: 2" in logs and (tmp_path / "fresh" / "iter_4.pth").is_file()
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, tmp_path / "x", "--resume", str(other))) == 2
    assert f"{other} holds no training state (meta, message hub, optimizer) to resume from" in capsys.readouterr().err


def _torchrun(config: str, backbone: Path, data: Path, work: Path, nproc: int, cuda: bool, options=()) -> str:
    """Run CONFIG under torchrun; return the run's mmengine logs."""
    import subprocess
    import sys

    argv = _tiny_argv(config, backbone, data, work, options=options)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", f"{config.split('/')[0]}.main", *argv]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(gpus=cuda), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    logs = "\n".join(p.read_text() for p in work.rglob("*.log"))
    assert "Distributed launcher: pytorch" in logs and "Distributed training: True" in logs
    assert f"distributed: {nproc} processes, backend {'nccl' if cuda else 'gloo'}" in logs
    return logs


def _norm_types(logs: str) -> set[str]:
    """The norm layer types of the model config that mmengine dumped into the log."""
    lines = [line for line in logs.splitlines() if line.startswith(" ") and "norm_cfg=dict(" in line]
    assert lines
    return {line.split("norm_cfg=dict(", 1)[1].split("type='", 1)[1].split("'", 1)[0] for line in lines}


@pytest.mark.parametrize("config", ["depth/configs/dpt_vit_small.py", "segmentation/configs/upernet_vit_small.py"])
def test_torchrun_two_processes_gloo(config, backbone, ade, nyu, tmp_path):
    """The multi-GPU path as a CPU dry run, with the backbone fine-tuned (DDP must see a gradient for
    every trainable parameter): 2 processes train, then evaluate one validation image each."""
    task = config.split("/")[0]
    data = ade if task == "segmentation" else nyu
    work = tmp_path / "work"
    # depth without BN here: both ranks then hold rank 0's weights, so the gathered metrics equal one process's
    options = ["model.decode_head.norm_cfg=None"] if task == "depth" else []
    logs = _torchrun(config, backbone, data, work, nproc=2, cuda=False, options=options)
    assert "Iter(test) [1/1]" in logs  # each rank evaluated one of the 2 validation images
    results = json.loads((work / "results.json").read_text())
    assert [results["protocol"][k] for k in ("world_size", "batch_per_gpu", "global_batch")] == [2, 2, 4]
    assert results["protocol"]["reference_pos_embed"] is False
    two = results["details"]["final"]["metrics"]
    if task == "depth":
        assert runner.main(task, _tiny_argv(config, backbone, nyu, work, "--eval-only", options=options)) == 0
        one = json.loads((work / "results.json").read_text())["details"]["final"]["metrics"]
        for k in ("rmse", "abs_rel", "d1"):
            assert two[k] == pytest.approx(one[k], rel=1e-5)
    else:  # SyncBN became per-process BN (SyncBN needs CUDA), so the ranks' BN statistics differ
        assert _norm_types(logs) == {"BN"} and np.isfinite(two["mIoU"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torchrun_on_gpus_nccl(backbone, ade, tmp_path):
    """The real multi-GPU path: mmengine's launcher, NCCL, SyncBN kept, one process per visible GPU
    (up to 2), the UperNet config fine-tuned and evaluated on CUDA."""
    config = "segmentation/configs/upernet_vit_small.py"
    work = tmp_path / "work"
    logs = _torchrun(config, backbone, ade, work, nproc=min(torch.cuda.device_count(), 2), cuda=True)
    assert _norm_types(logs) == {"SyncBN"}
    assert np.isfinite(json.loads((work / "results.json").read_text())["details"]["final"]["metrics"]["mIoU"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mmcv_cuda_ops_match_cpu():
    """mmcv built with FORCE_CUDA=1 (scripts/build_mmcv.sh): its kernels run on this GPU and agree
    with the CPU ops."""
    from mmcv.ops import get_compiling_cuda_version, nms, roi_align

    if get_compiling_cuda_version() == "not available":
        pytest.skip("mmcv was built without CUDA ops: FORCE_CUDA=1 make mmseg")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores = torch.rand(200, generator=g)
    (_, keep_cpu), (_, keep_gpu) = nms(boxes, scores, 0.5), nms(boxes.cuda(), scores.cuda(), 0.5)
    assert 0 < len(keep_cpu) < 200 and torch.equal(keep_cpu, keep_gpu.cpu())
    feats = torch.rand(2, 8, 32, 32, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 25.0], [1, 4.0, 0.0, 31.0, 13.0]])
    cpu = roi_align(feats, rois, (7, 7), 1.0, 2)
    assert torch.allclose(cpu, roi_align(feats.cuda(), rois.cuda(), (7, 7), 1.0, 2).cpu(), atol=1e-5)


class _RunsCode:
    """Unpickling this runs `touch MARKER`: what an attacker's "checkpoint" would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_no_checkpoint_runs_code_whatever_vouches_for_it(backbone, ade, tmp_path, capsys):
    """Every dense checkpoint is read as data (weights_only=True), whoever wrote it: a pickle with code,
    in a folder whose own checkpoints.sha256 lists it (anyone handing over a folder can write one), is
    refused in one line and never run, through --resume FILE, the folder's last_checkpoint (--eval-only
    or resuming), --checkpoint and the loader mmengine calls; mmengine's own format (function references
    in its message hub) is one line too."""
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    config = "segmentation/configs/linear_vit_small.py"
    folder, marker = tmp_path / "handed_over", tmp_path / "code_ran"
    folder.mkdir()
    evil = folder / "iter_2.pth"
    torch.save(_RunsCode(marker), evil)
    (folder / "checkpoints.sha256").write_text(f"{hashlib.sha256(evil.read_bytes()).hexdigest()}  iter_2.pth\n")
    (folder / "last_checkpoint").write_text(str(evil))

    def refused(work: Path, *extra: str) -> str:
        assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert not marker.exists()
        assert len(err) == 1 and err[0].startswith("error: ") and "weights_only" not in err[0], err
        return err[0]

    imports = f"cannot read checkpoint {evil}: it is a pickle that imports posix.system: refused"
    assert imports in refused(tmp_path / "work", "--resume", str(evil))
    assert imports in refused(folder, "--eval-only")
    assert imports in refused(folder)
    assert imports in refused(tmp_path / "work", "--eval-only", "--checkpoint", str(evil))
    runner.read_checkpoints_as_data()  # as the runner does before mmengine starts
    with pytest.raises(UsageError, match="refused"):  # the loader mmengine calls, past the runner's checks
        CheckpointLoader.load_checkpoint(str(evil))
    assert not marker.exists()
    capsys.readouterr()  # mmengine's log line, to an earlier test's logger when tests share a process
    older = folder / "iter_4.pth"  # what DenseRunner saved before its checkpoints were plain data
    hub = {"log_scalars": {"train/loss": HistoryBuffer([1.0], [1])}, "runtime_info": {}, "resumed_keys": {}}
    torch.save({"meta": {"iter": 4}, "state_dict": {}, "message_hub": hub}, older)
    assert f"{older} is a checkpoint of the older format" in refused(tmp_path / "work", "--resume", str(older))


def test_a_depth_checkpoint_must_cover_the_model(backbone, nyu, tmp_path, capsys):
    """depth.main shares the runner's checkpoint rules: a backbone file as --checkpoint is one line."""
    argv = _tiny_argv("depth/configs/linear_vit_small.py", backbone, nyu, tmp_path / "work", "--eval-only",
                      "--checkpoint", str(backbone))  # fmt: skip
    assert runner.main("depth", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {backbone} does not cover the model: "), err
    assert "a backbone file? pass it as --backbone" in err[0]


def test_checkpoint_must_cover_the_model(backbone, ade, tmp_path, capsys):
    """A --checkpoint without (some of) the head's weights would evaluate a random head (mIoU ~0, rc 0)."""
    config = "segmentation/configs/linear_vit_small.py"
    work = tmp_path / "work"

    def evaluate(checkpoint: Path) -> str:
        argv = _tiny_argv(config, backbone, ade, work, "--eval-only", "--checkpoint", str(checkpoint))
        assert runner.main("segmentation", argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: checkpoint {checkpoint} does not cover the model: "), err
        return err[0]

    err = evaluate(backbone)
    assert "it holds none of the model's weights (a backbone file? pass it as --backbone)" in err
    assert "missing keys backbone.vit.blocks.0.attn.proj.bias" in err
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work)) == 0
    state = torch.load(work / "iter_2.pth", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.pth")  # a bare state dict from elsewhere evaluates
    (work / ".iter_9.pth.123.tmp").write_bytes(b"half a checkpoint")
    assert runner.main("segmentation", _tiny_argv(config, backbone, ade, work, "--eval-only", "--checkpoint",
                                                  str(tmp_path / "plain.pth"))) == 0  # fmt: skip
    assert not (work / ".iter_9.pth.123.tmp").exists()  # a save killed mid-write: removed at the next start
    del state["decode_head.conv_seg.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    capsys.readouterr()
    assert evaluate(tmp_path / "partial.pth").endswith("the model: missing keys decode_head.conv_seg.bias")


def _damage(case: str, data: Path) -> Path:
    """Break one file of a copy of a tiny dataset; return the file named in the error."""
    if case == "corrupt test image":
        path = sorted((data / "images" / "validation").iterdir())[1]
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif case == "truncated test image":
        path = sorted((data / "images" / "validation").iterdir())[0]
        path.write_bytes(path.read_bytes()[:-400])
    elif case == "corrupt train image":
        path = sorted((data / "images" / "training").iterdir())[2]
        path.write_bytes(b"")
    else:  # an image without its annotation
        path = sorted((data / "annotations" / "training").iterdir())[0]
        path.unlink()
    return path


LINEAR = "segmentation/configs/linear_vit_small.py"


@pytest.mark.parametrize(
    "case", ["corrupt test image", "truncated test image", "corrupt train image", "missing annotation"]
)
def test_data_errors_before_training(case, backbone, ade, tmp_path, capsys):
    """What mmseg finds only mid-run (a missing annotation at its iteration, a corrupt test image after
    the whole training) is one line before mmengine starts."""
    data = Path(shutil.copytree(ade, tmp_path / "ade"))
    bad = _damage(case, data)
    work = tmp_path / "work"
    assert runner.main("segmentation", _tiny_argv(LINEAR, backbone, data, work)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: segmentation data: ") and str(bad) in err[0], err
    assert ("no annotation" if case == "missing annotation" else "cannot be read") in err[0]
    assert not list(work.rglob("*.log"))  # mmengine never started


def test_depth_test_images_checked_for_eval_only(backbone, nyu, tmp_path, capsys):
    data = Path(shutil.copytree(nyu, tmp_path / "nyu"))
    shutil.rmtree(data / "images" / "train")  # --eval-only needs no training data
    bad = sorted((data / "annotations" / "test").iterdir())[0]
    bad.write_bytes(b"not a png")
    argv = _tiny_argv("depth/configs/dpt_vit_small.py", backbone, data, tmp_path / "work", "--eval-only",
                      "--checkpoint", str(backbone))  # fmt: skip
    assert runner.main("depth", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "cannot be read" in err[0], err


def test_unusable_output_dirs_are_one_line(backbone, ade, tmp_path, capsys):
    """mmengine would fail with a traceback (the --show-dir only after the whole training)."""
    blocker, ro = tmp_path / "a_file", tmp_path / "ro"
    blocker.write_text("")
    cases = {
        blocker: f"output folder {blocker} exists and is not a folder",
        blocker / "work": f"cannot create output folder {blocker / 'work'}: Not a directory",
    }
    if os.geteuid() != 0:
        ro.mkdir(mode=0o500)
    else:  # root writes into chmod-ed folders, but no one into /proc/1
        ro = Path("/proc/1")
    assert ro.is_dir() and not os.access(ro, os.W_OK)
    cases[ro] = f"output folder {ro} is not writable"
    for work, expected in cases.items():
        assert runner.main("segmentation", _tiny_argv(LINEAR, backbone, ade, work)) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: --output-dir: {expected}"]
    argv = _tiny_argv(LINEAR, backbone, ade, tmp_path / "work", "--show-dir", str(blocker))
    assert runner.main("segmentation", argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --show-dir: {cases[blocker]}"]
