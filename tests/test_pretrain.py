"""Pretraining: masking, losses, schedule, optimizer groups, data, and main() end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import models
from common.schedule import warmup_cosine
from pretrain import main as pretrain_main
from pretrain.data import SingleImageDataset, build_dataset, subset_samples, train_transform
from pretrain.distiller import Distiller, param_groups, resize
from pretrain.masking import make_masks
from pretrain.output import Output
from tests.helpers import TINY_RUN, make_image_folder, one_teacher_distiller, tiny_spec, tiny_vit


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data")


# --- masking -------------------------------------------------------------------------------------
def test_masks_first_samples_exact_count():
    m = make_masks(10, 256, 0.5, mask_ratio=(0.5, 0.5))
    assert m.shape == (10, 256) and m.dtype == torch.bool
    assert m[:5].sum(1).tolist() == [128] * 5  # exactly int(256 * 0.5)
    assert not m[5:].any()  # the rest of the batch is clean, no shuffling


def test_masks_ratio_range_is_stratified():
    """As the reference: masked sample i draws its ratio uniformly in the i-th stratum of linspace(lo, hi, n + 1)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.stack(
        [make_masks(8, 1000, 0.5, mask_ratio=(0.2, 0.8), generator=g).sum(1) for _ in range(400)]
    ).double()
    assert not counts[:, 4:].any()
    for i, (lo, hi) in enumerate([(200, 350), (350, 500), (500, 650), (650, 800)]):
        assert lo <= counts[:, i].min() and counts[:, i].max() < hi  # inside its stratum
        assert counts[:, i].mean().item() == pytest.approx((lo + hi) / 2, abs=5)  # uniform over it
        assert counts[:, i].std().item() == pytest.approx((hi - lo) / 12**0.5, rel=0.15)
    m = make_masks(7, 256, 0.5, mask_ratio=(0.3, 0.3))  # int(0.5 * 7) = 3 masked samples
    assert m.sum(1).tolist() == [76, 76, 76, 0, 0, 0, 0]


def test_mask_positions_are_uniform():
    g = torch.Generator().manual_seed(0)
    freq = (
        torch.stack([make_masks(2, 64, 0.5, mask_ratio=(0.25, 0.25), generator=g)[0] for _ in range(4000)])
        .float()
        .mean(0)
    )
    assert torch.allclose(freq, torch.full((64,), 0.25), atol=0.03)


# --- losses --------------------------------------------------------------------------------------
def plain_losses(distiller, images, masks, t_cls, t_patches):
    """The reference's step written plainly: two separate student passes, losses by hand."""
    s = distiller.student
    m = masks.shape[0]
    full = torch.cat((masks, torch.zeros(images.shape[0] - m, masks.shape[1], dtype=torch.bool)))
    masked_out = s.forward_features(images, masks=full)
    clean = s.forward_features(images)
    tok = distiller.token_head(clean["x_norm_clstoken"])
    token = ((tok - t_cls) ** 2).mean()
    pred = torch.cat((tok[:, None], distiller.fea_head(clean["x_norm_patchtokens"])), 1)
    fea = ((pred - torch.cat((t_cls[:, None], t_patches), 1)) ** 2).mean()
    rows = []
    for i in range(m):
        idx = masks[i].nonzero().flatten()
        rows.append((distiller.patch_head(masked_out["x_norm_patchtokens"][i, idx]) - t_patches[i, idx]) ** 2)
    patch = torch.cat(rows).mean()
    return token, patch, fea


def test_losses_match_hand_computation_and_two_pass_reference():
    student = tiny_vit()
    d = one_teacher_distiller(student, 24, token=1.0, patch=0.5, fea=2.0).eval()
    images = torch.randn(6, 3, 28, 28)
    masks = make_masks(6, 4, 0.5, mask_ratio=(0.5, 0.5))[:3]
    t = models.Tokens(torch.randn(6, 24), torch.randn(6, 4, 24), (2, 2))
    losses = d(images, masks, {"teacher": t})
    assert list(losses) == ["total", "token", "patch", "fea"]  # pretrain.distiller.LOSSES
    token, patch, fea = plain_losses(d, images, masks, t.cls, t.patches)
    torch.testing.assert_close(losses["token"], token, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["patch"], patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["fea"], fea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["total"], token + 0.5 * patch + 2.0 * fea, rtol=1e-5, atol=1e-6)
    # gradients equal those of the plain two-pass computation
    losses["total"].backward()
    g1 = [p.grad.clone() for p in d.parameters() if p.grad is not None]
    d.zero_grad()
    (token + 0.5 * patch + 2.0 * fea).backward()
    g2 = [p.grad.clone() for p in d.parameters() if p.grad is not None]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_only_distiller_has_no_unused_parameters():
    d = one_teacher_distiller(tiny_vit(), 8, token=1.0, patch=0.0, fea=0.0)
    assert d.patch_head is None and d.fea_head is None
    targets = {"teacher": models.Tokens(torch.randn(2, 8), torch.randn(2, 4, 8), (2, 2))}
    losses = d(torch.randn(2, 3, 28, 28), None, targets)
    losses["total"].backward()
    unused = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    assert float(losses["patch"]) == 0.0 and float(losses["fea"]) == 0.0


def tiny_teacher(name: str, **kwargs) -> models.Teacher:
    torch.manual_seed(0)
    spec = tiny_spec(name)
    return models.Teacher(spec.build(), name, spec).to(**kwargs)


def test_teacher_stays_frozen_and_its_targets_are_ordinary_tensors():
    """A Teacher cannot be put back in training mode; targets come from inference mode but autograd may save them."""
    teacher = tiny_teacher("dinov2_vits14")
    teacher.train()
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    assert (teacher.family, teacher.dtype, teacher.patch_size, teacher.embed_dim) == ("dinov2", torch.float32, 14, 32)
    t = teacher.targets(torch.randn(2, 3, 28, 28))
    assert t.cls.shape == (2, 32) and t.patches.shape == (2, 4, 32) and t.grid == (2, 2)
    assert not t.cls.is_inference() and not t.patches.requires_grad
    pred = torch.zeros(2, 4, 32, requires_grad=True)
    torch.nn.functional.mse_loss(pred, t.patches).backward()  # saves the target for backward
    assert pred.grad is not None


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (5, 4)])
def test_resampled_targets_equal_interpolate_on_the_patch_map(grid):
    """A patch-16 teacher's 3x3 map at 48 px -> the student's grid: F.interpolate(bilinear) on [B, D, H, W],
    antialiased when shrinking; its own grid leaves the tokens as they are."""
    teacher = tiny_teacher("synclr_vitb16")
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        own = teacher.backbone.forward_features(images)["x_norm_patchtokens"]
    got = teacher.targets(images, grid).patches
    assert teacher.targets(images, grid).grid == grid
    patch_map = own.transpose(1, 2).reshape(2, 32, 3, 3)
    shrink = grid[0] < 3 or grid[1] < 3
    want = F.interpolate(patch_map, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    assert got.shape == (2, grid[0] * grid[1], 32)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(teacher.targets(images, (3, 3)).patches, own)


def test_each_network_gets_its_own_resize_of_one_crop():
    crops = torch.randn(2, 3, 48, 48)
    student = resize(crops, 32)
    want = F.interpolate(crops, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(student, want, rtol=0, atol=0)
    assert resize(crops, 48) is crops


@pytest.mark.parametrize(
    "teacher, extra, grids",
    [
        (
            "synclr_vitb16",
            ["--input-size", "112"],
            "7x7 patch tokens (synclr_vitb16 at 112 px) are resampled to the student's 8x8",
        ),
        (
            "dinov2_vits14",
            ["--input-size", "28", "--teacher-input-size", "56"],
            "4x4 patch tokens (dinov2_vits14 at 56 px) are resampled to the student's 2x2",
        ),
        ("dinov2_vits14", ["--input-size", "28", "--teacher-dtype", "bf16"], None),
    ],
    ids=["patch16-teacher-patch14-student", "teacher-input-size", "bf16-teacher"],
)
def test_grid_resampling_and_bf16_teachers_train(data, tmp_path, capsys, monkeypatch, teacher, extra, grids):
    """A patch-14 student from a patch-16 teacher, a teacher at a larger --teacher-input-size, and a bf16 teacher
    under fp32 autocast-free training: each trains with every loss, and says how once."""
    monkeypatch.setitem(models.TEACHERS, teacher, tiny_spec(teacher))
    argv = ["--data-path", str(data), "--output-dir", str(tmp_path / "o"), *TINY_RUN, "--epochs", "1"]
    argv[argv.index("dinov2_vits14")] = teacher
    argv += ["--epoch-length", "2", "--pca-every", "1", *extra]
    assert pretrain_main.main(argv) == 0
    out = capsys.readouterr().out
    if grids:
        assert out.count(grids) == 1 and "(bilinear, antialiased when shrinking)" in out
    else:
        assert "resampled" not in out and f"distilling {teacher} (bfloat16)" in out
    lines = [json.loads(line) for line in (tmp_path / "o" / "iterations.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert all(math.isfinite(e["loss"]) and e["loss_patch"] > 0 and e["loss_fea"] > 0 for e in lines)
    assert models.load_backbone(tmp_path / "o" / "backbone.pth").patch_size == 14


def test_teacher_targets_use_the_teachers_own_normalisation():
    teacher = tiny_teacher("clip_vitl14")
    assert (teacher.mean, teacher.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    raw = torch.rand(2, 3, 28, 28)
    norm = lambda x, m, s: (x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1)  # noqa: E731
    got = teacher.targets(norm(raw, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    with torch.no_grad():
        want = teacher.backbone.forward_features(norm(raw, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    torch.testing.assert_close(got.cls, want["x_norm_clstoken"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.patches, want["x_norm_patchtokens"], rtol=1e-4, atol=1e-5)


# --- schedule and optimizer ----------------------------------------------------------------------
def test_schedule_per_iteration_warmup_then_cosine():
    s = warmup_cosine(1e-3, 1e-5, total_iters=100, warmup_iters=10, warmup_start=1e-6)
    assert len(s) == 100 and s[0] == 1e-6
    assert all(b > a for a, b in zip(s[:10], s[1:11]))  # rises every iteration, not per epoch
    assert s[10] == pytest.approx(1e-3)
    assert s[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)))
    assert s[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)))
    assert 1e-5 < s[-1] < 1.1e-5


def test_no_weight_decay_on_biases_norms_and_layerscale():
    d = one_teacher_distiller(tiny_vit(), 8)
    decay, no_decay = param_groups(d, 0.05)
    names = {id(p): n for n, p in d.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "student.blocks.0.ls1.gamma" in no_decay_names and "student.norm.weight" in no_decay_names
    assert "student.blocks.0.attn.qkv.bias" in no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert "student.pos_embed" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
@pytest.mark.parametrize("layout, lambdas", [("dinov2", (1.0, 1.0, 1.0)), ("clip", (1.0, 0.0, 0.0))])
def test_param_groups_through_timm_are_the_groups_of_before(weight_decay, layout, lambdas):
    """timm's param_groups_weight_decay decides; the groups (members, order, weight decay) are the ones our own
    rule made before, so checkpoints' optimizer states still load: [decay, no decay], both even at 0."""
    student = models.create_student("vit_tiny", img_size=28, layout=layout)
    d = one_teacher_distiller(student, 8, *lambdas)
    no_decay_names = tuple(f"student.{n}" for n in models.LAYOUTS[layout].no_weight_decay)
    trained = [(n, p) for n, p in d.named_parameters() if p.requires_grad]
    before = [  # the rule as main.param_groups wrote it
        ([p for n, p in trained if not (p.ndim <= 1 or n in no_decay_names)], weight_decay),
        ([p for n, p in trained if p.ndim <= 1 or n in no_decay_names], 0.0),
    ]
    groups = param_groups(d, weight_decay, no_decay_names)
    assert [([id(p) for p in g["params"]], g["weight_decay"]) for g in groups] == [
        ([id(p) for p in params], wd) for params, wd in before
    ]
    assert ("student.cls_token" in no_decay_names) == (layout == "clip")


# --- data ----------------------------------------------------------------------------------------
def test_subsets_are_fractions_and_seeded():
    samples = [(f"c{c}/{i}.jpg", c) for c in range(10) for i in range(20)]
    sub = subset_samples(samples, 0.3, 0.25)
    assert len({c for _, c in sub}) == 3 and len(sub) == 15
    assert sub == subset_samples(samples, 0.3, 0.25)


def test_corrupt_image_is_reported_and_skipped(data, caplog):
    bad = data / "train" / "class0" / "broken.jpg"
    bad.write_bytes(b"not an image")
    ds = build_dataset(str(data), 28)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg")][0]
    with caplog.at_level("WARNING"):
        img, _ = ds[idx]
    assert img.shape == (3, 28, 28)
    assert str(bad) in caplog.text


def test_single_image_dataset(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    ds = SingleImageDataset(path, train_transform(28), length=10)
    assert len(ds) == 10
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (3, 28, 28) and not torch.equal(a, b)  # a fresh augmentation each time


# --- main: bad input -----------------------------------------------------------------------------
def run_main(argv, capsys):
    rc = pretrain_main.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher", "dinov2_vitz14"], "unknown teacher 'dinov2_vitz14'"),
        (["--student", "vit_huge"], "unknown student 'vit_huge'"),
        (["--input-size", "30"], "not a multiple of the student's patch size 14"),
        (["--teacher-input-size", "30"], "not a multiple of dinov2_vits14's patch size 14"),
        (["--teacher-input-size", "0"], "--teacher-input-size 0: must be a positive number of pixels"),
        (["--mask-ratio", "abc"], "--mask-ratio"),
        (["--mask-ratio", "0.6,0.2"], "the range must be 'lo,hi' with lo <= hi"),
        (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
        (["--teacher-checkpoint", "t.pth"], "--random-teacher and --teacher-checkpoint exclude each other"),
    ],
)
def test_bad_arguments_fail_before_training(data, tmp_path, capsys, extra, message):
    rc, err = run_main(["--data-path", str(data), "--output-dir", str(tmp_path / "o"), *TINY_RUN, *extra], capsys)
    assert rc == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


def test_missing_and_empty_data_dir(tmp_path, capsys):
    rc, err = run_main(["--data-path", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"), *TINY_RUN], capsys)
    assert rc == 2 and "no train/ folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty" / "train").mkdir(parents=True)
    rc, err = run_main(["--data-path", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o"), *TINY_RUN], capsys)
    assert rc == 2 and "no images in" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


def test_teacher_file_of_another_model(data, tmp_path, capsys):
    wrong = tmp_path / "wrong.pth"
    torch.save(models.to_dinov2(tiny_vit()), wrong)
    argv = [
        "--data-path",
        str(data),
        "--output-dir",
        str(tmp_path / "o"),
        *TINY_RUN,
        "--teacher-checkpoint",
        str(wrong),
    ]
    argv.remove("--random-teacher")
    rc, err = run_main(argv, capsys)
    assert rc == 2 and "do not match" in err and "missing keys: blocks.2.attn.proj.bias" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o" / "checkpoint.pth").exists()


# --- main: a run ---------------------------------------------------------------------------------
def test_run_writes_checkpoints_logs_and_dinov2_exports(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = pretrain_main.main(["--data-path", str(data), "--output-dir", str(out), "--epochs", "2", *TINY_RUN])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in logs] == [0, 1]
    for key in ("train_loss", "train_loss_token", "train_loss_patch", "train_loss_fea", "lr", "images_per_sec"):
        assert all(math.isfinite(e[key]) for e in logs), key
    assert logs[0]["train_loss"] == pytest.approx(
        logs[0]["train_loss_token"] + logs[0]["train_loss_patch"] + logs[0]["train_loss_fea"], rel=1e-5
    )
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = models.safe_load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and not any(k.startswith("teacher") for k in ckpt)
    assert {"student", "heads", "optimizer", "scheduler", "scaler", "ema", "args"} <= set(ckpt)
    assert not any("teacher" in k for k in ckpt["heads"])
    exported = torch.load(out / "backbone.pth", weights_only=True)
    assert "mask_token" in exported and "blocks.11.ls2.gamma" in exported
    student = models.load_backbone(out / "backbone.pth")
    assert student.embed_dim == 192 and len(student.blocks) == 12
    torch.testing.assert_close(student.state_dict()["norm.weight"], ckpt["student"]["norm.weight"])
    assert (out / "backbone_ema.pth").exists()


def test_ema_decays_from_the_first_iteration(data, tmp_path):
    """EMA = decay * ema + (1 - decay) * student at every iteration, the first included (no copy of the student)."""
    base = ["--data-path", str(data), *TINY_RUN, "--epochs", "1", "--epoch-length", "1", "--ema-decay", "0.5"]
    frozen = ["--lr", "0", "--warmup-lr", "0", "--min-lr", "0"]
    assert pretrain_main.main([*base, *frozen, "--output-dir", str(tmp_path / "init")]) == 0
    assert pretrain_main.main([*base, "--warmup-lr", "1e-2", "--output-dir", str(tmp_path / "step")]) == 0
    init = models.safe_load(tmp_path / "init" / "checkpoint.pth")["student"]  # lr 0: the initial weights
    step = models.safe_load(tmp_path / "step" / "checkpoint.pth")
    assert (step["student"]["blocks.0.attn.qkv.weight"] - init["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3
    for key, w0 in init.items():
        torch.testing.assert_close(step["ema"][key], 0.5 * w0 + 0.5 * step["student"][key], rtol=0, atol=1e-6)


def test_rerun_resumes_after_last_epoch(data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN]
    assert pretrain_main.main([*base, "--epochs", "1"]) == 0
    first = models.safe_load(out / "checkpoint.pth")
    assert pretrain_main.main([*base, "--epochs", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert "was trained with --epochs 1, now 2: the lr follows the cosine of a 2-epoch run" in caplog.text
    logs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert logs == [0, 1]
    second = models.safe_load(out / "checkpoint.pth")
    assert second["epoch"] == 1
    assert not torch.equal(first["student"]["norm.weight"], second["student"]["norm.weight"])
    exported = (out / "backbone.pth").stat().st_mtime_ns
    assert pretrain_main.main([*base, "--epochs", "2"]) == 0  # finished: says so, trains nothing
    assert "already holds all 2 epochs" in capsys.readouterr().out
    assert (out / "backbone.pth").stat().st_mtime_ns == exported  # not rewritten: feature caches stay valid
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 1
    # a changed loss (here no patch loss, so no patch head) cannot resume that checkpoint: one clear line
    assert pretrain_main.main([*base, "--epochs", "3", "--lambda-patch", "0"]) == 2
    err = capsys.readouterr().err
    assert "other loss heads than this run" in err and "unexpected ['patch_head." in err
    # another student or teacher cannot continue this run either; the checkpoint stays as it was
    saved = (out / "checkpoint.pth").read_bytes()
    for flag, other, trained in (
        ("--student", "vit_small", "vit_tiny"),
        ("--teacher", "dinov2_vitb14", "dinov2_vits14"),
    ):
        argv = [*base, "--epochs", "3"]
        argv[argv.index(flag) + 1] = other
        assert pretrain_main.main(argv) == 2
        err = capsys.readouterr().err
        assert f"was trained with {flag} {trained}, not {other}" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoint.pth").read_bytes() == saved


def test_a_mid_epoch_checkpoint_of_another_world_size_resumes_with_a_warning(data, tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--epochs", "1", "--epoch-length", "2"]
    assert pretrain_main.main(base) == 0
    ckpt = models.safe_load(out / "checkpoint.pth")  # as if 2 processes had stopped after 1 iteration
    ckpt |= {"epoch": -1, "iteration_in_epoch": 1, "world_size": 2, "epoch_loss_sums": [0.0] * 4}
    ckpt["scheduler"]["iteration"] = 1
    torch.save(ckpt, out / "checkpoint.pth")
    assert pretrain_main.main(base) == 0
    assert "was written by 2 processes, not 1: the rest of epoch 0 differs from the uninterrupted run" in caplog.text
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 0


@pytest.mark.parametrize("first, then", [("bf16", "fp16"), ("fp16", "fp32")])
def test_resume_with_another_precision(data, tmp_path, caplog, first, then):
    """A bf16/fp32 checkpoint holds no loss-scaler state: switching to fp16 (after bf16 NaNs, or on a GPU
    without bf16) starts a fresh scaler instead of failing; fp16 -> fp32 drops the scale."""
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN]
    assert pretrain_main.main([*base, "--epochs", "1", "--precision", first]) == 0
    assert bool(models.safe_load(out / "checkpoint.pth")["scaler"]) == (first == "fp16")
    assert pretrain_main.main([*base, "--epochs", "2", "--precision", then]) == 0
    assert f"was trained with --precision {first}, now {then}" in caplog.text
    final = models.safe_load(out / "checkpoint.pth")
    assert final["epoch"] == 1 and bool(final["scaler"]) == (then == "fp16")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN]
    assert pretrain_main.main([*base, "--epochs", "1"]) == 0
    before = (out / "checkpoint.pth").read_bytes()
    exported = (out / "backbone.pth").read_bytes()
    real_forward = Distiller.forward

    def nan_forward(self, *a, **k):
        losses = real_forward(self, *a, **k)
        return {**losses, "total": losses["total"] * float("nan")}

    monkeypatch.setattr(Distiller, "forward", nan_forward)
    rc = pretrain_main.main([*base, "--epochs", "3"])
    err = capsys.readouterr().err
    assert rc == 3 and "non-finite loss at epoch 1" in err and "untouched" in err
    assert (out / "checkpoint.pth").read_bytes() == before
    assert (out / "backbone.pth").read_bytes() == exported  # no export of a broken student


def test_randaugment_zero_bit_posterize_works():
    """rand-m9-mstd0.5-inc1 can draw 0-bit posterize; the installed Pillow must give black, not raise."""
    from timm.data.auto_augment import posterize

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize(img, 0)).max() == 0


def test_clip_teachers_default_to_token_only_and_others_to_all_three():
    parse = pretrain_main.get_args_parser().parse_args
    clip = pretrain_main.resolve(parse(["--teacher", "clip_vitl14"]))
    assert (clip.lambda_token, clip.lambda_patch, clip.lambda_fea) == (1.0, 0.0, 0.0)
    dino = pretrain_main.resolve(parse(["--teacher", "dinov2_vitb14"]))
    assert (dino.lambda_token, dino.lambda_patch, dino.lambda_fea) == (1.0, 1.0, 1.0)
    assert dino.mask_ratio == (0.5, 0.5) and dino.batch_size == 128 and dino.lr == 5e-4
    ranged = pretrain_main.resolve(parse(["--mask-ratio", "0.1,0.5"]))
    assert ranged.mask_ratio == (0.1, 0.5)
    # a B/16 teacher with a patch-14 student: its patch tokens are resampled, no loss is turned off
    b16 = pretrain_main.resolve(parse(["--teacher", "synclr_vitb16"]))
    assert (b16.lambda_token, b16.lambda_patch, b16.lambda_fea) == (1.0, 1.0, 1.0) and b16.teachers[0].input_size == 224
    on_its_grid = ["--teacher", "clip_vitb16", "--student", "vit_small_dinov3"]  # 14x14 both
    clip16 = pretrain_main.resolve(parse(on_its_grid))
    assert (clip16.lambda_token, clip16.lambda_patch, clip16.lambda_fea) == (1.0, 0.0, 0.0)
    clip16 = pretrain_main.resolve(parse([*on_its_grid, "--lambda-fea", "1"]))
    assert (clip16.lambda_token, clip16.lambda_patch, clip16.lambda_fea) == (1.0, 0.0, 1.0)
    # CLIP's own grid resampled (B/16 at 224 -> a patch-14 student's 16x16, or a --teacher-input-size): dense levels on
    for argv in (["--teacher", "clip_vitb16"], ["--teacher", "clip_vitl14", "--teacher-input-size", "448"]):
        resampled = pretrain_main.resolve(parse(argv))
        assert (resampled.lambda_token, resampled.lambda_patch, resampled.lambda_fea) == (1.0, 1.0, 1.0)
    # one CLIP teacher, one student on its grid and one resampled: levels per student, no single flag value
    mixed = pretrain_main.resolve(parse(["--teacher", "clip_vitb16", "--student", "vit_tiny,vit_small_dinov3"]))
    assert mixed.lambda_patch is None
    assert [s.layout for s in mixed.students] == ["clip", "dinov3"]
    grids = [pretrain_main.grid_of(mixed, s) for s in mixed.students]
    assert [t.lambda_patch for grid in grids for t in pretrain_main.targets_of(mixed, grid)] == [1.0, 0.0]
    dinov3 = pretrain_main.resolve(parse(["--teacher", "dinov3_vitb16", "--input-size", "208"]))  # 13 x 16
    assert dinov3.student_layout == "dinov3" and dinov3.teachers[0].input_size == 208


def test_compiled_run_trains_and_matches_the_eager_loss(data, tmp_path, capsys):
    """--compile compiles only the student's forward_features (the cheapest useful graph).

    ~40 s on 2 CPU cores with a cold inductor cache (under the 60 s limit, so not skipped), ~5 s warm.
    """
    first = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--epochs", "1", "--epoch-length", "2"]
        assert pretrain_main.main([*argv, *extra]) == 0
        lines = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(math.isfinite(e["loss"]) for e in lines)
        first[name] = lines[0]["loss"]
    assert first["compiled"] == pytest.approx(first["eager"], rel=1e-4)


def test_small_batch_lr_below_min_lr_is_said(data, tmp_path, caplog):
    """lr scales with the batch but --min-lr does not: a tiny batch would make the 'cosine decay' rise."""
    argv = ["--data-path", str(data), "--output-dir", str(tmp_path / "o"), *TINY_RUN, "--epochs", "1"]
    with caplog.at_level("WARNING"):
        assert pretrain_main.main(argv) == 0
    assert "is below --min-lr 1e-05: the cosine will rise" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert pretrain_main.main([*argv[:3], str(tmp_path / "p"), *argv[4:], "--min-lr", "1e-9"]) == 0
    assert "--min-lr" not in caplog.text


@pytest.mark.parametrize(
    "choice, mean", [("reference", IMAGENET_DEFAULT_MEAN), ("teacher", OPENAI_CLIP_MEAN), (None, IMAGENET_DEFAULT_MEAN)]
)
def test_clip_teacher_sees_the_references_imagenet_crops_by_default(data, tmp_path, choice, mean):
    """The paper's CLIP row: the reference fed CLIP the ImageNet-normalised crops; `--teacher-normalization
    teacher` re-normalises them with CLIP's mean/std (teacher_targets then converts, tested above)."""
    argv = ["--data-path", str(data), "--teacher", "clip_vitb16", "--input-size", "112", "--random-teacher"]
    argv += ["--student", "vit_tiny", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]
    argv += ["--lambda-patch", "0", "--lambda-fea", "0"] + (["--teacher-normalization", choice] if choice else [])
    config = pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(argv))
    teacher = pretrain_main.build(config, torch.device("cpu"), 1, out=Output(tmp_path, main=True)).teachers[0].teacher
    assert teacher.mean == tuple(mean)


@pytest.mark.parametrize("name", ["dinov3_vitl16_sat", "dinov2_vits14"])
def test_a_teacher_the_reference_never_ran_sees_its_own_normalisation(data, tmp_path, tiny_teacher, name):
    """The paper's setting (its one teacher on the ImageNet-normalised crops) applies to the families it ran; DINOv3's
    satellite teacher, which it never ran, sees its own mean/std by default (channels 0.64-0.70x off otherwise)."""
    spec = tiny_teacher(name, grid=8)
    argv = ["--data-path", str(data), "--teacher", name, "--input-size", "112", "--random-teacher", "--student",
            "vit_tiny", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    config = pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(argv))
    teacher = pretrain_main.build(config, torch.device("cpu"), 1, out=Output(tmp_path, main=True)).teachers[0].teacher
    own = name.endswith("_sat")
    assert config.teacher_normalization == ("teacher" if own else "reference")
    if own:
        assert tuple(spec.mean) != IMAGENET_DEFAULT_MEAN and teacher.mean == tuple(spec.mean)
    else:
        assert teacher.mean == IMAGENET_DEFAULT_MEAN
