"""Linear probe and kNN: the 52-classifier grid and DINOv3's 13, metrics, kNN votes, resume, torchrun, errors,
end to end."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

import models
from common import features as features_module
from common.features import Features
from common.results import topk_correct
from linear_eval import knn as knn_main
from linear_eval import main as linear_main
from linear_eval.classifiers import (
    DINOV3,
    GLOBAL_DINOV3,
    LEARNING_RATES,
    PROTOCOLS,
    AllClassifiers,
    classifier_grid,
    dinov3_grid,
    last_block_features,
    linear_features,
    probe_of,
)
from linear_eval.data import load_splits, train_transform, val_transform
from models import ViT
from pretrain import main as pretrain_main
from tests.helpers import ROOT, TINY_RUN, child_env, make_image_folder, make_splits, tiny_vit

ENV = child_env()
BICUBIC = InterpolationMode.BICUBIC
RUN = ["--input-size", "28", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_splits(tmp_path_factory.mktemp("data"))


def is_ninths(percent: float) -> bool:
    """Every image of the 9-image val split is counted exactly once."""
    return abs(percent * 9 / 100 - round(percent * 9 / 100)) < 1e-9


def split(features: torch.Tensor, targets: torch.Tensor) -> Features:
    """A split's features as extraction gives them, every image readable."""
    return Features(features, targets, torch.arange(len(targets)), [])


def base_args(data, backbone, out) -> list[str]:
    return ["--data-path", str(data), "--backbone", str(backbone), "--output-dir", str(out), *RUN]


# --- the grid ------------------------------------------------------------------------------------
def test_grid_names_dims_lrs_and_init():
    specs = classifier_grid(global_batch=512)
    assert len(specs) == 52 and len({s.name for s in specs}) == 52
    assert sorted({s.lr for s in specs}) == pytest.approx(sorted(lr * 2 for lr in LEARNING_RATES))
    assert specs[0].name == "blocks1_cls_lr1e-05" and specs[-1].name == "blocks4_cls+avgpool_lr1e-01"
    heads = AllClassifiers(specs, embed_dim=64, num_classes=1000)
    dims = {(s.n_blocks, s.avgpool): heads.heads[s.name].in_features for s in specs}
    assert dims == {(1, False): 64, (1, True): 128, (4, False): 256, (4, True): 320}
    weights = torch.cat([h.weight.flatten() for h in heads.heads.values()])
    assert weights.mean().abs() < 1e-4 and weights.std().item() == pytest.approx(0.01, rel=0.01)
    assert all((h.bias == 0).all() for h in heads.heads.values())
    groups = heads.param_groups()
    assert [g["lr"] for g in groups] == [s.lr for s in specs] and all(len(g["params"]) == 2 for g in groups)
    assert classifier_grid(global_batch=128)[12].lr == pytest.approx(0.1 / 2)


def test_each_classifier_reads_the_dinov2_linear_input():
    vit = tiny_vit(dim=64, depth=4, heads=1).eval()
    x = torch.randn(3, 3, 28, 28)
    feats = linear_features(vit, x)
    layers = vit.get_intermediate_layers(x, n=4, return_class_token=True, norm=True)
    heads = AllClassifiers(classifier_grid(256), 64, 5)
    outputs = heads(feats)
    for s in heads.specs:
        manual = torch.cat([cls for _, cls in layers[-s.n_blocks :]], dim=-1)
        if s.avgpool:
            manual = torch.cat([manual, layers[-1][0].mean(dim=1)], dim=-1)
        torch.testing.assert_close(feats[:, s.input_slice(64)], manual)
        torch.testing.assert_close(outputs[s.name], heads.heads[s.name](manual))
    torch.testing.assert_close(feats[:, 192:256], vit.forward_features(x)["x_norm_clstoken"])


# dinov3/eval/linear.py at facebookresearch/dinov3 6876159, read by hand: _DEFAULT_LR_LIST, and the
# classifier names its setup_linear_classifiers gives at its README's launch (dinov3/run/submit.py defaults:
# 1 node x 8 GPUs x TrainConfig.batch_size 128 = 1024, so lr x 4): f"classifier_1_blocks_avgpool_True_lr_{lr:.5f}"
DINOV3_OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DINOV3_OFFICIAL_LR_SUFFIXES = ("0_00004", "0_00008", "0_00020", "0_00040", "0_00080", "0_00200", "0_00400",
                               "0_00800", "0_02000", "0_04000", "0_08000", "0_20000", "0_40000")  # fmt: skip


def test_dinov3_grid_is_dinov3_eval_linear_py():
    specs = dinov3_grid(global_batch=1024)
    assert [s.name for s in specs] == [f"blocks1_cls+avgpool_lr{lr:.0e}" for lr in DINOV3_OFFICIAL_LRS]
    assert [s.lr for s in specs] == pytest.approx([lr * 1024 / 256 for lr in DINOV3_OFFICIAL_LRS])
    assert [f"{s.lr:.5f}".replace(".", "_") for s in specs] == list(DINOV3_OFFICIAL_LR_SUFFIXES)
    assert all(s.n_blocks == 1 and s.avgpool for s in specs)
    assert dinov3_grid(global_batch=128)[12].lr == pytest.approx(0.1 / 2)
    # the same 13 classifiers as DINOv2's last-block CLS + avgpool ones, reading a 2D feature instead of 5D
    dinov2 = [s for s in classifier_grid(1024) if s.n_blocks == 1 and s.avgpool]
    assert [(s.name, s.lr) for s in specs] == [(s.name, s.lr) for s in dinov2]
    assert all(s.input_slice(64) == slice(0, 128) for s in specs) and dinov2[0].input_slice(64) == slice(192, 320)
    heads = AllClassifiers(specs, embed_dim=64, num_classes=1000)
    assert all(h.in_features == 128 and h.out_features == 1000 for h in heads.heads.values())
    weights = torch.cat([h.weight.flatten() for h in heads.heads.values()])
    assert weights.std().item() == pytest.approx(0.01, rel=0.02)
    assert all((h.bias == 0).all() for h in heads.heads.values())
    assert [g["lr"] for g in heads.param_groups()] == [s.lr for s in specs]


def test_each_dinov3_classifier_reads_the_last_blocks_cls_and_patch_mean():
    vit = tiny_vit(dim=64, depth=4, heads=1).eval()
    x = torch.randn(3, 3, 28, 28)
    feats = last_block_features(vit, x)
    ((patches, cls),) = vit.get_intermediate_layers(x, n=1, return_class_token=True, norm=True)
    manual = torch.cat([cls, patches.mean(dim=1)], dim=-1)
    torch.testing.assert_close(feats, manual)
    final = vit.forward_features(x)  # the last block's outputs through the final norm
    torch.testing.assert_close(feats[:, :64], final["x_norm_clstoken"])
    torch.testing.assert_close(feats[:, 64:], final["x_norm_patchtokens"].mean(dim=1))
    torch.testing.assert_close(feats, linear_features(vit, x)[:, 192:])
    heads = AllClassifiers(dinov3_grid(256), DINOV3.width(vit), 5)
    for name, logits in heads(feats).items():
        torch.testing.assert_close(logits, heads.heads[name](manual))
    assert DINOV3.feature_type != probe_of(vit).feature_type  # the feature caches of the two never mix


def test_protocol_settings():
    """dinov3/eval/linear.py's TrainConfig (epochs 10, epoch_length 1250, batch_size 128 per GPU) at its README's
    8 GPUs; PROTOCOLS B's at 4 GPUs, one pass per epoch. Both: SGD momentum 0.9 wd 0, cosine to 0 per iteration."""
    v2, v3 = PROTOCOLS["dinov2"], PROTOCOLS["dinov3"]
    assert (v3.epochs, v3.epoch_length, v3.batch_size, v3.reference_gpus) == (10, 1250, 128, 8)
    assert (v2.epochs, v2.epoch_length, v2.batch_size, v2.reference_gpus) == (10, None, 128, 4)
    images = v3.epochs * v3.epoch_length * v3.batch_size * v3.reference_gpus
    assert images == 12_800_000 and 9.9 < images / 1_281_167 < 10  # ~10 passes over ImageNet-1k's train
    assert v3.probe is DINOV3 and v3.global_probe is GLOBAL_DINOV3
    assert v2.probe.name == "DINOv2 linear probe (PROTOCOLS B)"
    vit = tiny_vit(dim=64, depth=4, heads=1)
    assert probe_of(vit, v3) is DINOV3 and probe_of(vit) is v2.probe
    assert probe_of(argparse.Namespace(summary_is_class_token=False), v3) is GLOBAL_DINOV3
    # the flags left unset take the protocol's values; given ones win
    parser = linear_main.get_args_parser()
    assert {p.batch_size for p in PROTOCOLS.values()} == {parser.get_default("batch_size")}
    base = ["--backbone", "b.pth", "--data-path", "d"]
    args = parser.parse_args(base)
    assert args.protocol == "dinov2" and linear_main.protocol_defaults(args) is v2
    assert (args.epochs, args.epoch_length, args.batch_size) == (10, None, 128)
    args = parser.parse_args([*base, "--protocol", "dinov3"])
    assert linear_main.protocol_defaults(args) is v3
    assert (args.epochs, args.epoch_length, args.batch_size) == (10, 1250, 128)
    given = ["--epochs", "2", "--epoch-length", "3", "--batch-size", "5"]
    args = parser.parse_args([*base, "--protocol", "dinov3", *given])
    linear_main.protocol_defaults(args)
    assert (args.epochs, args.epoch_length, args.batch_size) == (2, 3, 5)
    # the shared schedule is torch's CosineAnnealingLR(max_iter, eta_min=0) stepped every iteration
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4, momentum=0.9, weight_decay=0.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12, eta_min=0)
    official = []
    for _ in range(12):
        official.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    ours = linear_main.warmup_cosine(1.0, 0.0, 12, warmup_iters=0, warmup_start=0.0)
    assert [0.4 * m for m in ours] == pytest.approx(official)


def test_transforms_are_dinov3_data_transforms_py():
    """dinov3/data/transforms.py's make_classification_{train,eval}_transform at linear.py's TransformConfig
    (crop 224, resize int(256 * 224 / 224)): the same numbers as DINOv2's, which both protocols share."""
    crop, flip, *_, norm = train_transform(224).transforms
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3), BICUBIC)
    assert flip.p == 0.5
    resize, center, _, val_norm = val_transform(224).transforms
    assert (resize.size, resize.interpolation, resize.max_size, center.size) == (256, BICUBIC, None, (224, 224))
    for n in (norm, val_norm):
        assert (tuple(n.mean), tuple(n.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_topk_correct_matches_direct_count():
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    order = scores.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == targets[i]) for i in range(50))
    top5 = sum(int(targets[i] in order[i, :5]) for i in range(50))
    assert topk_correct(scores, targets).tolist() == [top1, top5]
    assert topk_correct(scores[:, :3], targets.clamp(max=2)).tolist()[1] == 50  # top-5 of 3 classes


def test_evaluate_scores_every_classifier_like_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    heads = AllClassifiers(classifier_grid(256), 8, 6)
    for h in heads.heads.values():
        torch.nn.init.normal_(h.weight, generator=g)
    data = Features(torch.randn(37, 40, generator=g), torch.randint(0, 6, (37,), generator=g), torch.arange(37), [])
    scores = linear_main.evaluate(heads, data, torch.device("cpu"), batch_size=5)
    for s in heads.specs:
        logits = data.features[:, s.input_slice(8)] @ heads.heads[s.name].weight.T
        ranked = logits.argsort(dim=1, descending=True)
        top1 = (ranked[:, 0] == data.targets).double().mean().item() * 100
        top5 = (ranked[:, :5] == data.targets[:, None]).any(1).double().mean().item() * 100
        assert scores[s.name] == pytest.approx({"top1": top1, "top5": top5})


# --- kNN -----------------------------------------------------------------------------------------
def brute_force_knn(train, labels, queries, num_classes, k, t):
    """DINO's weighted vote written plainly, one query at a time (float64)."""
    train, queries = F.normalize(train, dim=1), F.normalize(queries, dim=1)
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for i, q in enumerate(queries):
        sims = torch.tensor([float(q @ f) for f in train])
        for j in sims.argsort(descending=True)[:k]:
            out[i, labels[j]] += math.exp(float(sims[j]) / t)
    return out


def test_knn_matches_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(60, 16, generator=g), torch.randint(0, 6, (60,), generator=g)
    val, targets = torch.randn(23, 16, generator=g), torch.randint(0, 6, (23,), generator=g)
    ks = [1, 5, 20]
    scores = knn_main.knn_scores(
        F.normalize(train, dim=1), labels, F.normalize(val, dim=1), num_classes=6, ks=ks, temperature=0.07
    )
    monkeypatch.setattr(knn_main, "SIMILARITY_BUDGET", 60 * 4)  # chunks of 4 queries
    acc = knn_main.knn_accuracy(
        split(train, labels), split(val, targets), 6, ks=ks, temperature=0.07, device=torch.device("cpu")
    )
    for k in ks:
        ref = brute_force_knn(train, labels, val, 6, k, 0.07)
        # the votes are exp(sim / T) up to one factor per query (DINOv2's softmax normalisation)
        ref = (ref / ref.sum(1, keepdim=True)).float() * scores[k].sum(1, keepdim=True)
        torch.testing.assert_close(scores[k], ref, rtol=1e-4, atol=1e-6)
        hits = topk_correct(ref, targets) * 100 / 23
        assert [acc[k]["top1"], acc[k]["top5"]] == pytest.approx(hits.tolist())


def test_knn_votes_stay_finite_at_small_temperature():
    """exp(sim / T) overflows float32 below T ~ 0.0113; DINOv2's softmax does not, nor may we."""
    g = torch.Generator().manual_seed(1)
    train, labels = torch.randn(80, 16, generator=g), torch.randint(0, 5, (80,), generator=g)
    val, targets = torch.randn(30, 16, generator=g), torch.randint(0, 5, (30,), generator=g)
    ks, t = [3, 20], 0.005
    scores = knn_main.knn_scores(
        F.normalize(train, dim=1), labels, F.normalize(val, dim=1), num_classes=5, ks=ks, temperature=t
    )
    acc = knn_main.knn_accuracy(
        split(train, labels), split(val, targets), 5, ks=ks, temperature=t, device=torch.device("cpu")
    )
    for k in ks:
        assert torch.isfinite(scores[k]).all()
        ref = brute_force_knn(train, labels, val, 5, k, t)
        assert (scores[k].argmax(1) == ref.argmax(1)).all()
        hits = topk_correct(ref, targets) * 100 / 30
        assert [acc[k]["top1"], acc[k]["top5"]] == pytest.approx(hits.tolist())


# --- main end to end -----------------------------------------------------------------------------
def test_learnable_problem_reaches_high_accuracy(data, backbone, tmp_path, capsys):
    out = tmp_path / "lin"
    argv = [*base_args(data, backbone, out), "--batch-size", "6", "--epochs", "2", "--epoch-length", "40"]
    assert linear_main.main([*argv, "--print-freq", "40"]) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert (
        len(res["details"]["classifiers"]) == 52
        and res["protocol"]["global_batch"] == 6
        and res["protocol"]["selection"].startswith("val")
    )
    assert res["protocol"]["name"] == "DINOv2 linear probe (PROTOCOLS B)" and res["protocol"]["recipe"] == "dinov2"
    assert [c["lr"] for c in res["details"]["classifiers"].values()] == [s.lr for s in classifier_grid(6)]
    best = res["details"]["best"]
    assert best["top1"] == 100.0 and best["top1"] == max(c["top1"] for c in res["details"]["classifiers"].values())
    assert f"* {best['name']}" in stdout and "best (val" in stdout and "eta" in stdout
    for c in res["details"]["classifiers"].values():
        assert c["top5"] == 100.0 and is_ninths(c["top1"])
    assert models.safe_load(out / "checkpoint.pth")["scheduler"]["iteration"] == 80


def test_dinov3_protocol_end_to_end(data, backbone, tmp_path, capsys):
    out = tmp_path / "v3"
    argv = [*base_args(data, backbone, out), "--protocol", "dinov3", "--epochs", "1", "--epoch-length", "2"]
    assert linear_main.main(argv) == 0
    assert "linear probe (dinov3): 13 classifiers" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["name"] == "DINOv3 linear probe (dinov3/eval/linear.py)"
    assert res["protocol"]["recipe"] == "dinov3" and res["protocol"]["selection"].startswith("val")
    assert (res["protocol"]["epochs"], res["protocol"]["epoch_length"], res["protocol"]["global_batch"]) == (1, 2, 4)
    table = res["details"]["classifiers"]
    assert list(table) == [s.name for s in dinov3_grid(4)]
    assert all(c["n_blocks"] == 1 and c["avgpool"] for c in table.values())
    assert [c["lr"] for c in table.values()] == pytest.approx([lr * 4 / 256 for lr in DINOV3_OFFICIAL_LRS])
    assert all(is_ninths(c["top1"]) for c in table.values()) and res["metric_notes"]["top-1"] in table
    ckpt = models.safe_load(out / "checkpoint.pth")
    assert {k: v.shape for k, v in ckpt["classifiers"].items() if k.endswith("weight")} == {
        f"heads.{name}.weight": (3, 128) for name in table
    }
    # linear.py's optimizer: SGD momentum 0.9, wd 0, plain; the last of 2 steps ran at cosine's (1 + cos(pi/2)) / 2
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["momentum"], g["weight_decay"], g["dampening"], g["nesterov"]) for g in groups] == [
        (0.9, 0.0, 0, False)
    ] * 13
    assert [g["lr"] for g in groups] == pytest.approx([c["lr"] * 0.5 for c in table.values()])
    # its checkpoint is not resumed by the other protocol's run (other classifiers), in one line
    assert linear_main.main([*base_args(data, backbone, out), "--epochs", "1", "--epoch-length", "2"]) == 2
    assert "was run with protocol dinov3, not dinov2" in capsys.readouterr().err
    # DINOv3's probe reads the last block only: a 2-block backbone is fine (DINOv2's refuses it)
    shallow = tmp_path / "shallow.pth"
    torch.save(models.to_dinov2(ViT(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=1)), shallow)
    argv = [*base_args(data, shallow, tmp_path / "v3s"), "--protocol", "dinov3", "--epochs", "1", "--epoch-length", "1"]
    assert linear_main.main(argv) == 0
    # a backbone without a class token: the 13 lrs on its global feature, under DINOv3's name
    cnn = tmp_path / "resnet18.pth"
    torch.save(models.to_reference(models.create_student("timm:resnet18", img_size=64), "timm"), cnn)
    argv = [*base_args(data, cnn, tmp_path / "v3c"), "--protocol", "dinov3", "--epochs", "1", "--epoch-length", "1"]
    assert linear_main.main([*argv, "--input-size", "64"]) == 0
    res = json.loads((tmp_path / "v3c" / "results.json").read_text())
    assert res["protocol"]["name"] == GLOBAL_DINOV3.name and len(res["details"]["classifiers"]) == 13


class Interrupted(Exception):
    pass


def test_a_checkpoint_of_another_run_is_refused_in_one_line(data, backbone, tmp_path, capsys):
    out = tmp_path / "run"
    base = [*base_args(data, backbone, out), "--epochs", "1", "--epoch-length", "2"]
    assert linear_main.main(base) == 0
    saved = (out / "checkpoint.pth").read_bytes()
    other_data = shutil.copytree(data, tmp_path / "data_copy")
    changes = [
        (["--epochs", "2"], "epochs 1, not 2"),
        (["--epoch-length", "3"], "epoch_length 2, not 3"),
        (["--batch-size", "3"], "batch_size_global 4, not 3"),
        (["--val-from-train", "0.5"], "val_from_train None, not 0.5"),
        (["--data-path", str(other_data)], f"data_path {Path(data).resolve()}, not {other_data.resolve()}"),
    ]
    capsys.readouterr()
    for change, message in changes:
        assert linear_main.main([*base, *change]) == 2, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"was run with {message}; use another --output-dir" in err[0], (change, err)
    assert (out / "checkpoint.pth").read_bytes() == saved
    # a checkpoint that does not record its protocol ran DINOv2's grid
    ckpt = models.safe_load(out / "checkpoint.pth")
    del ckpt["args"]["protocol"]
    torch.save(ckpt, out / "checkpoint.pth")
    assert linear_main.main([*base, "--protocol", "dinov3"]) == 2
    assert "was run with protocol dinov2, not dinov3" in capsys.readouterr().err
    assert linear_main.main(base) == 0 and "nothing left to train" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_uninterrupted_result(data, backbone, tmp_path, monkeypatch, capsys):
    def run(out, *extra):
        return linear_main.main([*base_args(data, backbone, out), "--epochs", "2", "--epoch-length", "3", *extra])

    assert run(tmp_path / "straight") == 0
    real_save = linear_main.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise Interrupted

    monkeypatch.setattr(linear_main, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        run(tmp_path / "killed")
    assert models.safe_load(tmp_path / "killed" / "checkpoint.pth")["epoch"] == 0
    monkeypatch.setattr(linear_main, "save_checkpoint", real_save)
    capsys.readouterr()
    assert run(tmp_path / "killed") == 0
    stdout = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'killed' / 'checkpoint.pth'} after epoch 0" in stdout
    assert "epoch 0 [" not in stdout and "epochs 1..1" in stdout
    a, b = (models.safe_load(tmp_path / d / "checkpoint.pth") for d in ("straight", "killed"))
    assert a["epoch"] == b["epoch"] == 1
    for k in a["classifiers"]:
        torch.testing.assert_close(a["classifiers"][k], b["classifiers"][k], rtol=0, atol=0)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "killed"))
    assert ra["details"]["classifiers"] == rb["details"]["classifiers"]
    assert run(tmp_path / "killed") == 0  # nothing left: said so, not "epochs 2..1"
    stdout = capsys.readouterr().out
    assert "all 2 epochs are trained, nothing left to train" in stdout and "epochs 2..1" not in stdout
    # another schedule in the same folder is refused, not silently mixed
    assert run(tmp_path / "killed", "--epoch-length", "4") == 2
    assert "was run with epoch_length 3, not 4" in capsys.readouterr().err
    # so is a backbone file re-written at the same path (another mtime)
    st = backbone.stat()
    os.utime(backbone, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert run(tmp_path / "killed") == 2
        assert "was run with backbone" in capsys.readouterr().err
    finally:
        os.utime(backbone, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_val_from_train_selects_on_holdout_and_caches_eval_features(data, backbone, tmp_path, capsys):
    out = tmp_path / "lin"
    argv = [*base_args(data, backbone, out), "--epochs", "1", "--epoch-length", "2", "--cache-dir", str(out)]
    assert linear_main.main([*argv, "--val-from-train", "0.34"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["selection"].startswith("train holdout")
    best = max(res["details"]["classifiers"].values(), key=lambda c: c["holdout_top1"])
    assert res["details"]["best"]["holdout_top1"] == best["holdout_top1"] and "top1" in res["details"]["best"]
    cache = models.safe_load(out / "features_holdout.pth")
    assert cache["features"].shape == (6, 320)  # round(18 * 0.34) held out, 12 train
    val_cache = models.safe_load(out / "features_val.pth")
    assert val_cache["features"].shape == (9, 320) and val_cache["targets"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    stamp = (out / "features_val.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert linear_main.main([*argv, "--val-from-train", "0.34"]) == 0  # finished: eval only, from the cache
    assert "val features [" not in capsys.readouterr().out
    assert (out / "features_val.pth").stat().st_mtime_ns == stamp
    other = tmp_path / "other.pth"
    vit = tiny_vit(dim=64, depth=4, heads=1)
    torch.save(models.to_dinov2(vit), other)
    argv[argv.index("--backbone") + 1] = str(other)
    (out / "checkpoint.pth").unlink()
    capsys.readouterr()
    assert linear_main.main([*argv, "--val-from-train", "0.34"]) == 0  # another backbone: recomputed, said why
    stdout = capsys.readouterr().out
    assert (
        "features_val.pth was written for a different backbone file; recomputing" in stdout
        and "val features [" in stdout
    )
    assert (out / "features_val.pth").stat().st_mtime_ns != stamp


def corrupt(path: Path) -> Path:
    """Keep the header, cut the pixel data: PIL opens the file and fails when decoding it."""
    path.write_bytes(path.read_bytes()[:60])
    return path


def test_extract_features_drops_unreadable_images_and_keeps_labels_aligned(tmp_path, capsys):
    root = make_splits(tmp_path / "d", classes=3, train=2, val=1)
    bad = corrupt(root / "train" / "class1" / "0.png")
    ds = load_splits(str(root), val_transform(28), val_transform(28))[0]
    fn = lambda x: x.mean(dim=(2, 3))  # noqa: E731 - per-image mean colour
    out = features_module.extract_features(fn, ds, torch.device("cpu"), batch_size=2, num_workers=0)
    assert f"warning: unreadable image {bad}" in capsys.readouterr().out
    kept = [i for i, (p, _) in enumerate(ds.samples) if p != str(bad)]
    assert out.index.tolist() == kept and out.dropped == [str(bad)]
    assert out.targets.tolist() == [ds.samples[i][1] for i in kept] == [0, 0, 1, 2, 2]
    direct = torch.stack([fn(ds[i][0][None])[0] for i in kept])
    torch.testing.assert_close(out.features, direct)


def test_corrupt_eval_images_are_dropped_reported_and_counted(backbone, tmp_path, capsys):
    root = make_splits(tmp_path / "d")
    bad_val = corrupt(root / "val" / "class2" / "1.png")
    bad_train = corrupt(root / "train" / "class0" / "4.png")
    args = [*base_args(root, backbone, tmp_path / "lin"), "--epochs", "1", "--epoch-length", "2"]
    assert linear_main.main(args) == 0
    stdout = capsys.readouterr().out
    assert f"warning: unreadable image {bad_val}" in stdout and "val features: 1 of 9 images unreadable" in stdout
    res = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert res["details"]["images"]["val"] == {"evaluated": 8, "dropped": 1, "unreadable": [str(bad_val)]}
    assert res["unreadable_images"] == {"train": 1, "val": 1}  # the 8 training images drawn include bad_train
    assert res["protocol"]["data_path"] == str(root.resolve())
    for c in res["details"]["classifiers"].values():  # every kept image counted once: multiples of 100 / 8
        assert c["top1"] * 8 / 100 == pytest.approx(round(c["top1"] * 8 / 100))
    cache = tmp_path / "cache"
    argv = [*base_args(root, backbone, tmp_path / "knn"), "--nb-knn", "1", "--cache-dir", str(cache)]
    assert knn_main.main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"warning: unreadable image {bad_train}" in stdout and f"warning: unreadable image {bad_val}" in stdout
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["unreadable_images"] == {"train": 1, "val": 1} and res["details"]["images"]["train"]["evaluated"] == 17
    assert res["details"]["images"]["val"]["evaluated"] == 8 and res["protocol"]["data_path"] == str(root.resolve())
    # a split with unreadable images is not cached (an I/O hiccup must not be frozen in); a rerun redoes it
    assert "not cached, since 1 images were unreadable" in stdout and not (cache / "val_features.pth").exists()
    assert knn_main.main(argv) == 0
    assert "val features: 1 of 9 images unreadable" in capsys.readouterr().out
    again = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert {**again, "timings": None} == {**res, "timings": None}


def test_corrupt_train_jpeg_skipped_by_workers_is_counted(backbone, tmp_path):
    """Training serves the next image for an unreadable one; the data-loader workers that skip it tell the
    main process (shared flags), so results.json counts it like the eval splits' dropped images."""
    root = make_image_folder(tmp_path / "d", classes=3, per_class=6, val=3)  # noise JPEGs
    bad = corrupt(root / "train" / "class1" / "2.jpg")
    out = tmp_path / "lin"
    # 18 train images in batches of 6: the one epoch reads every index, the corrupt one in a worker
    argv = [*base_args(root, backbone, out), "--batch-size", "6", "--num-workers", "2", "--epochs", "1"]
    assert linear_main.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["unreadable_images"] == {"train": 1, "val": 0}
    assert res["details"]["images"]["train"] == {"dropped": 1, "unreadable": [str(bad)]}


def test_knn_cache_is_keyed_on_the_images_and_the_backbone_file(backbone, tmp_path, capsys):
    a, b = make_splits(tmp_path / "a", seed=0), make_splits(tmp_path / "b", seed=1)
    bb = tmp_path / "bb.pth"
    bb.write_bytes(backbone.read_bytes())
    cache = tmp_path / "cache"

    def knn(data_path, out, *extra):
        assert knn_main.main([*base_args(data_path, bb, out), "--nb-knn", "1", "3", *extra]) == 0
        return capsys.readouterr().out, models.safe_load(cache / "val_features.pth")

    knn(a, tmp_path / "o", "--cache-dir", str(cache))
    stdout, val = knn(b, tmp_path / "o", "--cache-dir", str(cache))  # other images, same cache folder
    assert (
        "val_features.pth was written for a different image list; recomputing" in stdout and "val features [" in stdout
    )
    knn(b, tmp_path / "fresh")  # no cache
    assert (
        json.loads((tmp_path / "o" / "results.json").read_text())["metrics"]
        == json.loads((tmp_path / "fresh" / "results.json").read_text())["metrics"]
    )
    x = torch.stack([val_transform(28)(Image.open(b / "val" / "class0" / "0.png").convert("RGB"))])
    vit = models.load_backbone(bb).eval()
    torch.testing.assert_close(val["features"][:1], vit(x), rtol=1e-4, atol=1e-5)
    stdout, _ = knn(b, tmp_path / "o", "--cache-dir", str(cache))
    assert "recomputing" not in stdout and "val features [" not in stdout  # same key: reused
    other = tiny_vit(dim=64, depth=4, heads=1)
    torch.nn.init.normal_(other.cls_token)
    torch.save(models.to_dinov2(other), bb)  # re-written at the same path
    os.utime(bb, ns=(1, 1))
    stdout, val = knn(b, tmp_path / "o", "--cache-dir", str(cache))
    assert "val_features.pth was written for a different backbone file; recomputing" in stdout
    torch.testing.assert_close(val["features"][:1], other.eval()(x), rtol=1e-4, atol=1e-5)


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [linear_main, knn_main])
def test_clear_errors(entry, data, backbone, tmp_path, capsys):
    def err(data_path, backbone_path, *extra):
        rc = entry.main([*base_args(data_path, backbone_path, tmp_path / "o"), *extra])
        text = capsys.readouterr().err
        assert rc == 2 and len(text.strip().splitlines()) == 1, text
        return text

    assert "no train/ folder" in err(tmp_path / "nope", backbone) and "<data-path>/train/<class>/<image>" in err(
        tmp_path / "nope", backbone
    )
    make_image_folder(tmp_path / "noval", classes=3)
    assert "no val/ folder" in err(tmp_path / "noval", backbone)
    (tmp_path / "noval" / "val" / "class0").mkdir(parents=True)
    assert "no images in" in err(tmp_path / "noval", backbone)
    make_splits(tmp_path / "mismatch", classes=2)
    (tmp_path / "mismatch" / "val" / "extra").mkdir()
    (tmp_path / "mismatch" / "val" / "class0" / "0.png").rename(tmp_path / "mismatch" / "val" / "extra" / "0.png")
    assert "val classes do not match train classes" in err(tmp_path / "mismatch", backbone)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in err(data, tmp_path / "garbage.pth")
    assert "checkpoint file not found" in err(data, tmp_path / "missing.pth")
    assert "--input-size 30 is not a multiple of the patch size 14" in err(data, backbone, "--input-size", "30")
    assert not (tmp_path / "o" / "results.json").exists()


def test_linear_only_errors(data, backbone, tmp_path, capsys):
    argv = base_args(data, backbone, tmp_path / "o")
    assert linear_main.main([*argv, "--val-from-train", "1.5"]) == 2
    assert "--val-from-train must be a fraction" in capsys.readouterr().err
    assert linear_main.main([*argv, "--batch-size", "50"]) == 2
    assert "cannot fill a batch of 50" in capsys.readouterr().err
    shallow = tmp_path / "shallow.pth"
    torch.save(models.to_dinov2(ViT(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=1)), shallow)
    assert linear_main.main(base_args(data, shallow, tmp_path / "o")) == 2
    assert "reads the last 4" in capsys.readouterr().err
    assert linear_main.main([*argv, "--resume", str(backbone)]) == 2
    assert "is not a linear_eval checkpoint" in capsys.readouterr().err


# --- checkpoints from pretraining and from the reference -----------------------------------------
def test_end_to_end_on_a_pretrain_checkpoint(data, tmp_path, capsys):
    pre = tmp_path / "pre"
    pre_data = make_image_folder(tmp_path / "pre_data", classes=2, per_class=4)
    assert pretrain_main.main(["--data-path", str(pre_data), "--output-dir", str(pre), "--epochs", "1", *TINY_RUN]) == 0
    ckpt = pre / "checkpoint.pth"
    assert linear_main.main([*base_args(data, ckpt, tmp_path / "lin"), "--epochs", "1", "--epoch-length", "1"]) == 0
    res = json.loads((tmp_path / "lin" / "results.json").read_text())
    assert res["metric_notes"]["top-1"] == res["details"]["best"]["name"]
    assert knn_main.main([*base_args(data, ckpt, tmp_path / "knn"), "--nb-knn", "1", "5"]) == 0
    assert set(json.loads((tmp_path / "knn" / "results.json").read_text())["metrics"]) == {
        "top-1 k=1", "top-5 k=1", "top-1 k=5", "top-5 k=5"
    }  # fmt: skip


def test_end_to_end_on_a_reference_layout_checkpoint(data, tmp_path, capsys):
    vit = tiny_vit(dim=64, depth=4, heads=1).eval()
    ref = tmp_path / "ref_checkpoint.pth"
    state = {f"student.backbone.{k}": v for k, v in models.to_dinov2(vit).items()}
    torch.save({"model": state, "args": argparse.Namespace(arch="vit_tiny")}, ref)
    assert linear_main.main([*base_args(data, ref, tmp_path / "lin"), "--epochs", "1", "--epoch-length", "1"]) == 0
    cache = tmp_path / "cache"
    # the default k values (10 20 100 200) on 18 train images: the ones above 18 become 18, said once
    assert knn_main.main([*base_args(data, ref, tmp_path / "knn"), "--cache-dir", str(cache)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --nb-knn 20, 100, 200 exceeds the 18 readable train images; using k=18 instead"]
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert list(res["metrics"]) == ["top-1 k=10", "top-5 k=10", "top-1 k=18", "top-5 k=18"] and res["protocol"][
        "nb_knn_requested"
    ] == [10, 20, 100, 200]
    assert knn_main.main([*base_args(data, ref, tmp_path / "knn"), "--nb-knn", "0"]) == 2
    assert "--nb-knn values must be positive, got [0]" in capsys.readouterr().err
    assert knn_main.main([*base_args(data, ref, tmp_path / "knn"), "--cache-dir", str(cache), "--nb-knn", "3"]) == 0
    assert "k  top1    top5" in capsys.readouterr().out
    train, val = (models.safe_load(cache / f"{s}_features.pth") for s in ("train", "val"))
    x = torch.stack([knn_main.val_transform(28)(Image.open(data / "val" / "class1" / "0.png").convert("RGB"))])
    torch.testing.assert_close(val["features"][3:4], vit(x), rtol=1e-4, atol=1e-5)
    ref_scores = brute_force_knn(train["features"], train["targets"], val["features"], 3, 3, 0.07)
    hits = topk_correct(ref_scores, val["targets"]) * 100 / 9
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert [res["metrics"]["top-1 k=3"], res["metrics"]["top-5 k=3"]] == pytest.approx(hits.tolist())
    assert res["protocol"]["temperature"] == 0.07


# --- torchrun --------------------------------------------------------------------------------------
def torchrun(data, backbone, module, out, *extra, nproc=2, device="cpu"):
    """MODULE under torchrun on gloo (CPU) or NCCL (cuda): (stdout, results.json)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", module, *base_args(data, backbone, out), "--device", device, *extra,
    ]  # fmt: skip
    env = child_env(gpus=device == "cuda")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "results.json").read_text())


def test_torchrun_two_processes_gloo(data, backbone, tmp_path):
    stdout, res = torchrun(data, backbone, "linear_eval.main", tmp_path / "lin", "--epochs", "2")
    # 18 images over 2 ranks -> 9 per rank -> 2 iterations of 4 per epoch
    assert "world 2, global batch 8" in stdout and "2 it/epoch" in stdout and "epoch 1 [2/2]" in stdout
    assert res["protocol"]["global_batch"] == 8 and len(res["details"]["classifiers"]) == 52
    assert all(is_ninths(c["top1"]) for c in res["details"]["classifiers"].values())
    assert models.safe_load(tmp_path / "lin" / "checkpoint.pth")["epoch"] == 1
    _, res = torchrun(data, backbone, "linear_eval.knn", tmp_path / "knn", "--nb-knn", "1", "3")
    assert knn_main.main([*base_args(data, backbone, tmp_path / "knn1"), "--nb-knn", "1", "3"]) == 0
    single = json.loads((tmp_path / "knn1" / "results.json").read_text())
    assert res["metrics"] == pytest.approx(single["metrics"])


def test_torchrun_counts_a_train_image_only_rank_1_skipped(backbone, tmp_path):
    """The train skips are summed over ranks: the corrupt image is one that only rank 1 draws."""
    root = make_image_folder(tmp_path / "d", classes=3, per_class=6, val=3)
    samples = load_splits(str(root), None, None)[0].samples
    only_rank_1 = set(range(len(samples)))
    for epoch in (0, 1):  # linear_main.epoch_batches' shuffles: 9 images a rank, all read in batches of 3
        sampler = torch.utils.data.DistributedSampler(samples, num_replicas=2, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(epoch * 1000)
        only_rank_1 -= set(sampler)
    bad = corrupt(Path(samples[min(only_rank_1)][0]))
    _, res = torchrun(root, backbone, "linear_eval.main", tmp_path / "lin", "--batch-size", "3", "--epochs", "2")
    assert res["unreadable_images"] == {"train": 1, "val": 0}
    assert res["details"]["images"]["train"]["unreadable"] == [str(bad)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torchrun_on_gpus_nccl(data, backbone, tmp_path):
    """Linear probe and kNN as on a GPU node: one process per GPU (up to 2) on NCCL, features on CUDA."""
    nproc = min(torch.cuda.device_count(), 2)
    run = dict(nproc=nproc, device="cuda")
    stdout, res = torchrun(data, backbone, "linear_eval.main", tmp_path / "lin", "--epochs", "2", **run)
    assert f"world {nproc}, global batch {4 * nproc}" in stdout and len(res["details"]["classifiers"]) == 52
    assert all(is_ninths(c["top1"]) for c in res["details"]["classifiers"].values())
    _, res = torchrun(data, backbone, "linear_eval.knn", tmp_path / "knn", "--nb-knn", "1", "3", **run)
    assert set(res["metrics"]) == {"top-1 k=1", "top-5 k=1", "top-1 k=3", "top-5 k=3"}
    assert all(is_ninths(v) for name, v in res["metrics"].items() if name.startswith("top-1"))


def test_preemption_signal_exits_75_and_the_rerun_resumes(data, backbone, tmp_path):
    """slurm's warning signal: the eval stops with status 75; the same command resumes from the last epoch."""
    import signal
    import time

    from common.distributed import EXIT_REQUEUE

    out = tmp_path / "lin"
    cmd = [sys.executable, "-m", "linear_eval.main", *base_args(data, backbone, out), "--epochs", "20"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_REQUEUE, output[-2000:]
    assert "received SIGUSR1" in output
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from" in rerun.stdout and (out / "results.json").exists()
