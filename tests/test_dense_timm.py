"""Dense evaluations of timm students on mmsegmentation: the *_timm.py configs take their widths from the model's
feature_info (UperNet and DPT over a CNN's four stages, the 1x1 probes on its last map, Feature2Pyramid first for
a single-stride ViT), train and evaluate end to end, decay the lr layer-wise as timm groups the layers, and a
config of the other kind is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models

pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
import segmentation.mmseg_ext  # noqa: E402, F401 - registers ProteusTimm and the heads
from segmentation import runner  # noqa: E402
from tests.helpers import DENSE_TINY, ROOT, optimizer_groups  # noqa: E402

# the three kinds of CNN students and a timm ViT (one stride: its blocks, pyramided by Feature2Pyramid)
MODELS = ["resnet18", "convnext_atto", "mobilenetv4_conv_small", "vit_tiny_patch16_224"]
SMALL_HEADS = ["model.decode_head.channels=16", "model.auxiliary_head.channels=8"]  # CPU-sized heads
CONFIGS = {
    "segmentation/configs/upernet_timm.py": SMALL_HEADS,
    "depth/configs/linear_timm.py": [],
    "depth/configs/dpt_timm.py": SMALL_HEADS[:1],
}
QUICK = DENSE_TINY[:-1]  # 2 iterations, no workers; the backbone's own maps


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Each model's backbone.pth as pretraining exports it (trained at 64 px)."""
    folder = tmp_path_factory.mktemp("timm_exports")
    torch.manual_seed(0)
    for name in MODELS:
        torch.save(models.to_reference(models.create_student(f"timm:{name}", img_size=64), "timm"), folder / name)
    return {name: folder / name for name in MODELS}


def _config(config: str, backbone, data, tmp_path, *extra: str):
    task = config.split("/")[0]
    argv = [str(ROOT / config), "--backbone", str(backbone), "--data-path", str(data), "--output-dir",
            str(tmp_path / "work"), *extra]  # fmt: skip
    return runner.build_config(runner.get_args_parser(task).parse_args(argv), task)


@pytest.mark.parametrize("name", MODELS)
def test_the_heads_read_the_models_own_maps(name, exports, ade, nyu, tmp_path):
    from mmseg.registry import MODELS as MMSEG
    from mmseg.utils import register_all_modules

    register_all_modules()
    net = models.load_backbone(exports[name])
    four = net.dense_indices()
    widths = net.map_widths(four)
    upernet = _config("segmentation/configs/upernet_timm.py", exports[name], ade, tmp_path)
    assert list(upernet.model.decode_head.in_channels) == widths
    assert upernet.model.auxiliary_head.in_channels == widths[2]
    single_stride = len(set(net.map_strides(four))) == 1
    assert (upernet.model.get("neck") is not None) == single_stride  # a ViT's blocks: pyramided first
    linear = _config("depth/configs/linear_timm.py", exports[name], nyu, tmp_path)
    assert linear.model.decode_head.in_channels == linear.model.decode_head.channels == widths[-1]
    dpt = _config("depth/configs/dpt_timm.py", exports[name], nyu, tmp_path)
    x = torch.randn(1, 3, 64, 64)
    for cfg, channels in ((upernet, 150), (dpt, 1)):
        segmentor = MMSEG.build(cfg.model).eval()
        with torch.no_grad():
            maps = segmentor.backbone(x)
            out = segmentor.decode_head(segmentor.neck(maps) if segmentor.with_neck else maps)
        assert [m.shape[1] for m in maps] == widths
        assert out.shape[:2] == (1, channels) and torch.isfinite(out).all()
    # fine-tuned, every trainable parameter reaches the loss (DDP rejects one that does not: a ConvNeXt's head
    # norm, MobileNetV4's conv head, a ViT's final norm are pruned); a probe's frozen BatchNorm keeps its statistics
    segmentor = MMSEG.build(upernet.model).train()
    maps = segmentor.backbone(torch.randn(2, 3, 64, 64))
    segmentor.decode_head(segmentor.neck(maps) if segmentor.with_neck else maps).sum().backward()
    assert [n for n, p in segmentor.backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    probe = MMSEG.build(_config("segmentation/configs/linear_timm.py", exports[name], ade, tmp_path).model).train()
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    probe.backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, before[k]) for k, v in probe.backbone.state_dict().items())
    if not single_stride:  # a CNN's four stages: strides 4 to 32
        assert net.map_strides(four) == [4, 8, 16, 32] and [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    with torch.no_grad():  # an int is timm's own "last n" maps, the indices those of its feature_info
        last_two = net.eval().get_intermediate_layers(x, n=2, reshape=True, norm=False)
        count = len(net.model.feature_info)
        listed = net.get_intermediate_layers(x, n=[count - 2, count - 1], reshape=True, norm=False)
    assert all(torch.equal(a, b) for a, b in zip(last_two, listed, strict=True))


# evaluate_all runs the default heads (ADE20K's linear probe, NYU's DPT probe) on each kind of CNN
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_timm_config_trains_and_evaluates(config, exports, ade, nyu, tmp_path):
    """The fine-tuned multi-scale heads and NYU's probe on the last map, on a ResNet-18 export."""
    task = config.split("/")[0]
    work = tmp_path / "work"
    argv = [str(ROOT / config), "--backbone", str(exports["resnet18"]), "--data-path",
            str(ade if task == "segmentation" else nyu), "--output-dir", str(work),
            "--cfg-options", *QUICK, *CONFIGS[config]]  # fmt: skip
    assert runner.main(task, argv) == 0
    out = json.loads((work / "results.json").read_text())
    metrics = out["details"]["final"]["metrics"]
    for k in ("mIoU",) if task == "segmentation" else ("rmse", "abs_rel", "d1"):
        assert np.isfinite(metrics[k]), (k, metrics)
    assert out["details"]["final"]["iter"] == 2


def test_layer_wise_lr_decay_follows_timms_layers(exports, ade, tmp_path):
    """UperNet on a ResNet-18: timm groups its stem and 8 blocks into 9 layers; the stem's lr is 0.9^8 of the
    last block's, which the heads share; no weight decay on 1-d parameters (BatchNorm) and biases."""
    cfg = _config("segmentation/configs/upernet_timm.py", exports["resnet18"], ade, tmp_path)
    groups, model = optimizer_groups(cfg)
    base = 1e-4
    lr = {n: g[0] for n, g in groups.items()}
    assert lr["backbone.net.model.conv1.weight"] == pytest.approx(base * 0.9**8)
    assert lr["backbone.net.model.layer1.0.conv1.weight"] == pytest.approx(base * 0.9**7)
    assert lr["backbone.net.model.layer4.1.conv2.weight"] == pytest.approx(base)
    assert lr["decode_head.conv_seg.weight"] == lr["auxiliary_head.conv_seg.weight"] == base
    assert groups["backbone.net.model.bn1.weight"][1] == 0 and groups["decode_head.conv_seg.bias"][1] == 0
    assert groups["backbone.net.model.conv1.weight"][1] == groups["decode_head.conv_seg.weight"][1] == 0.05
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups)  # every parameter is in exactly one group


def test_the_other_kind_of_config_is_one_line(exports, backbone, ade, tmp_path, capsys):
    """A timm export with a ViT config, or our ViT with a timm one, would fail deep inside mmseg."""
    work = ["--data-path", str(ade), "--output-dir", str(tmp_path / "w")]
    timm_export, vit_config = str(exports["resnet18"]), "segmentation/configs/linear_vit_small.py"
    assert runner.main("segmentation", [vit_config, "--backbone", timm_export, *work]) == 2
    assert "is timm:resnet18, and" in (err := capsys.readouterr().err) and "use the *_timm.py configs" in err
    assert runner.main("segmentation", ["segmentation/configs/linear_timm.py", "--backbone", str(backbone), *work]) == 2
    assert "is one of our ViTs" in (err := capsys.readouterr().err) and "use the *_vit_*.py configs" in err
    argv = ["segmentation/configs/linear_timm.py", "--backbone", timm_export, "--reference-pos-embed", *work]
    assert runner.main("segmentation", argv) == 2
    assert "--reference-pos-embed resizes our ViTs' position table" in capsys.readouterr().err


def test_maps_and_heads_that_do_not_fit_are_one_line(exports, ade, tmp_path, capsys):
    """Indices past the model's maps, out of order (the heads would get the widths in the wrong order), or a head
    reading more maps than the backbone gives: one line before mmengine starts."""
    base = ["segmentation/configs/upernet_timm.py", "--backbone", str(exports["resnet18"]), "--data-path", str(ade),
            "--output-dir", str(tmp_path / "w"), "--cfg-options"]  # fmt: skip
    for option, message in (
        ("model.backbone.out_indices=[1,2,3,9]", "increasing indices of timm:resnet18's 5 feature maps"),
        ("model.backbone.out_indices=[4,3,2,1]", "increasing indices"),
        ("model.backbone.out_indices=[3,4]", "the UPerHead reads maps [0, 1, 2, 3] of 2"),
    ):
        assert runner.main("segmentation", [*base, option]) == 2
        assert message in capsys.readouterr().err, option


# each timm config and the ViT-S config whose protocol it keeps: data, crops, schedule, optimizer, batch, evaluation
COUNTERPARTS = {
    "segmentation/configs/linear_timm.py": "segmentation/configs/linear_vit_small.py",
    "segmentation/configs/upernet_timm.py": "segmentation/configs/upernet_vit_small.py",
    "depth/configs/linear_timm.py": "depth/configs/linear_vit_small.py",
    "depth/configs/dpt_timm.py": "depth/configs/dpt_vit_small.py",
    "depth/configs/dpt_probe_timm.py": "depth/configs/dpt_probe_vit_small.py",
}
SHARED = ("train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "param_scheduler", "default_hooks",
          "custom_hooks", "val_evaluator", "crop_size")  # fmt: skip


@pytest.mark.parametrize("config", list(COUNTERPARTS))
def test_a_timm_config_keeps_the_vit_protocol(config):
    from mmengine.config import Config

    ours, vit = (Config.fromfile(str(ROOT / c)) for c in (config, COUNTERPARTS[config]))
    for key in SHARED:
        assert ours[key] == vit[key], key
    assert ours.model.data_preprocessor == vit.model.data_preprocessor and ours.model.test_cfg == vit.model.test_cfg
    assert ours.optim_wrapper.optimizer == vit.optim_wrapper.optimizer
    backbone = ours.model.backbone
    assert backbone.type == "ProteusTimm" and backbone.out_indices is None  # the model's own four maps
    assert backbone.get("frozen", False) == vit.model.backbone.get("frozen", False)
    assert backbone.get("drop_path_rate", 0.0) == vit.model.backbone.get("drop_path_rate", 0.0)
    assert ours.get("sync_bn") == ("torch" if "upernet" in config or "dpt" in config else None)  # BN in the heads


def test_torchrun_fine_tunes_a_timm_backbone_over_two_processes(exports, ade, tmp_path):
    """The multi-GPU path as a CPU dry run: DDP sees a gradient for every trainable parameter of the pruned CNN,
    and the SyncBN of the heads and of the backbone (sync_bn) becomes per-process BN, as SyncBN needs CUDA."""
    import subprocess
    import sys

    from tests.helpers import child_env

    work = tmp_path / "work"
    argv = ["segmentation/configs/upernet_timm.py", "--backbone", str(exports["resnet18"]), "--data-path", str(ade),
            "--output-dir", str(work), "--cfg-options", *QUICK, *SMALL_HEADS]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "segmentation.main", *argv]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = json.loads((work / "results.json").read_text())
    assert results["protocol"]["world_size"] == 2 and np.isfinite(results["details"]["final"]["metrics"]["mIoU"])
    logs = "\n".join(p.read_text() for p in work.rglob("*.log"))
    assert "distributed: 2 processes, backend gloo" in logs and "sync_bn" not in logs  # the config as run
