"""What several test files share, as plain functions and constants: tiny ViTs, tiny datasets in the
layouts the code reads (ImageFolder trees, CUB-200, ADE20K, our NYU), the tiny runs' flags, numerics
helpers, official-format DINOv3 weights with FAIR's network re-stated, and the environment of child
processes. The fixtures built on them are in conftest.py; no test file imports another."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import models
from models import ViT
from scripts.evaluate_all import QUICK_DENSE

ROOT = Path(__file__).resolve().parents[1]


# --- child processes -----------------------------------------------------------------------------
def child_env(gpus: bool = False) -> dict[str, str]:
    """os.environ with the repository first on PYTHONPATH (what was there stays: it may hold packages
    installed with --target), one OpenMP thread, and no visible GPU unless `gpus`: the multi-process
    tests are CPU dry runs (gloo), and on a one-GPU machine every rank would otherwise take cuda:0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# --- tiny pretraining runs -----------------------------------------------------------------------
TINY_RUN = [
    "--teacher",
    "dinov2_vits14",
    "--random-teacher",
    "--student",
    "vit_tiny",
    "--input-size",
    "28",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--device",
    "cpu",
    "--print-freq",
    "1",
    "--precision",
    "fp32",
]


def epochs_logged(out: Path) -> list[int]:
    log = out / "log.txt"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


# --- numerics and tiny models --------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a non-trivial value (no zero biases, no unit norms, no zero mask token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and p.shape[0] > 1 and p[0].numel() > 1 and not name.endswith(("token", "pos_embed")):
                p.copy_(r * p[0].numel() ** -0.5)  # a weight matrix / conv kernel
            elif re.search(r"(norm\w*|ln_\w+)\.weight$|gamma$", name):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.5 * r)
    return module


def tiny_vit(dim=32, depth=2, heads=2, grid=2, patch=14, reg=0, seed=0, randomize=False, **kw) -> ViT:
    """A `grid` x `grid`-patch ViT drawn from torch seed `seed`; with `randomize`, every weight non-trivial
    (randomize_) and in eval mode, for comparing numerics."""
    torch.manual_seed(seed)
    m = ViT(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
            num_register_tokens=reg, **kw)  # fmt: skip
    return randomize_(m, seed).eval() if randomize else m


@torch.no_grad()
def block_outputs(model: ViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output tokens (unnormed), by running the blocks one by one: what the models' own
    intermediate-layer readers are checked against."""
    t, out = model.prepare_tokens(x), []
    for blk in model.blocks:
        t = blk(t)
        out.append(t)
    return out


def tiny_spec(name: str, dim: int = 32, depth: int = 1, heads: int = 1, **changes) -> models.teachers.TeacherSpec:
    """Teacher `name`'s spec (family, patch, FFN rule, normalisation) at a tiny width, depth and heads; a teacher
    built by timm (SigLIP2's) through its family's `spec` with timm's arguments for them."""
    spec = models.TEACHERS[name]
    if not hasattr(spec, "config"):
        tiny = dict(embed_dim=dim, depth=depth, num_heads=heads)
        if "img_size" in changes:
            tiny["img_size"] = changes["img_size"]
        return dataclasses.replace(models.FAMILIES[spec.family].spec(name, **tiny), **changes)
    config = dataclasses.replace(spec.config, embed_dim=dim, depth=depth, num_heads=heads)
    return dataclasses.replace(spec, config=config, **changes)


# --- tiny datasets -------------------------------------------------------------------------------
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 230), (200, 200, 40)]


def make_image_folder(root, classes=2, per_class=6, val=0, size=(40, 48), colours=False, seed=0) -> Path:
    """root/train/class<c>/ (and root/val/ with `val` images a class): random-noise JPEGs, or with
    `colours` noisy solid colours, one a class, as PNGs: classes a linear probe separates."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(classes if n else 0):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if colours:
                    pixels = np.clip(np.array(COLOURS[c]) + rng.normal(0, 10, (*size, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def make_splits(root: Path, classes: int = 3, train: int = 6, val: int = 3, seed: int = 0) -> Path:
    """The evaluations' train/ and val/ trees: solid colours, 32x32."""
    return make_image_folder(root, classes, train, val, size=(32, 32), colours=True, seed=seed)


RNG = np.random.default_rng(0)


def img(path, size=16, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = RNG.integers(0, 255, (size, size, 3), dtype=np.uint8) if value is None else np.full((size, size, 3), value)
    Image.fromarray(a.astype(np.uint8)).save(path)


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def make_cub(root, classes=3, per_class=5):
    base = root / "cub200" / "CUB_200_2011"
    images, labels, split = [], [], []
    n = 0
    for c in range(classes):
        for i in range(per_class):
            n += 1
            rel = f"{c + 1:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            img(base / "images" / rel, value=60 * c + 20)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c + 1}")
            split.append(f"{n} {int(i < 3)}")
    write(base / "images.txt", images)
    write(base / "image_class_labels.txt", labels)
    write(base / "train_test_split.txt", split)


# --- OpenAI CLIP files and a student's adaptors (zero-shot) -----------------------------------------
def write_openai_clip(path: Path, width: int = 64, embed_dim: int = 32, patch: int = 16, image: int = 32, seed=0):
    """A random tiny CLIP ViT saved as OpenAI's state dict: open_clip's CLIP with QuickGELU has OpenAI's key
    names, and its linear/conv/attention weights and projections are stored in fp16 as OpenAI's are. Width 64:
    OpenAI's files imply 64-wide heads; vocabulary 49408 and context 77: what CLIP's tokenizer gives. Returns
    the fp32 model the file holds (eval mode)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=1, width=width, patch_size=patch, image_size=image)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=1)
    clip = open_clip.CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    convert_weights_to_lp(clip)
    torch.save(clip.state_dict(), path)
    return clip.float()


def student_adaptors(student_dim: int, teachers: dict[str, tuple[int, str]], seed: int = 0) -> models.Adaptors:
    """A student's adaptors as pretraining exports them, for {name: (teacher width, family)}: a CLIP teacher's
    token-only (the reference's CLIP loss), the others with patch heads; z-score statistics fitted, random heads."""
    torch.manual_seed(seed)
    token_only = dict(lambda_patch=0, lambda_fea=0)
    targets = [
        models.TeacherTarget(name, dim, standardization="zscore", **(token_only if f == "clip" else {}))
        for name, (dim, f) in teachers.items()
    ]
    adaptors = models.Adaptors(student_dim, targets, {name: {"family": f} for name, (_, f) in teachers.items()})
    for a in adaptors.adaptors.values():
        x = (torch.randn(256, a.target.dim) * torch.rand(a.target.dim) * 5 + torch.randn(a.target.dim)).double()
        for std in (a.cls_std, a.patch_std):
            std.fit(len(x), x.sum(0), x.T @ x)
    return adaptors


# --- dense layouts (ADE20K, our NYU) and the mmseg settings for the tiny backbone -----------------
DIM, DEPTH = 64, 4  # conftest's `backbone` (tiny_vit(DIM, DEPTH)): DENSE_HEADS size the ViT-S configs' heads for it
DENSE_TINY = [*QUICK_DENSE[1:], "model.backbone.out_indices=[0,1,2,3]"]  # 2 iterations, no workers, tiny backbone
DENSE_HEADS = {
    "segmentation/configs/linear_vit_small.py": [f"model.decode_head.in_channels=[{DIM},{DIM},{DIM},{DIM}]",
                                                 f"model.decode_head.channels={4 * DIM}"],
    "segmentation/configs/upernet_vit_small.py": [f"model.neck.embed_dim={DIM}",
                                                  f"model.decode_head.in_channels=[{DIM},{DIM},{DIM},{DIM}]",
                                                  f"model.decode_head.channels={DIM}",
                                                  f"model.auxiliary_head.in_channels={DIM}",
                                                  f"optim_wrapper.paramwise_cfg.num_layers={DEPTH}"],
    "depth/configs/linear_vit_small.py": [f"model.decode_head.in_channels=[{DIM},{DIM},{DIM},{DIM}]",
                                          f"model.decode_head.channels={4 * DIM}"],
    "depth/configs/dpt_vit_small.py": [f"model.decode_head.in_channels=[{DIM},{DIM},{DIM},{DIM}]",
                                       f"model.decode_head.embed_dims={DIM}",
                                       "model.decode_head.post_process_channels=[8,16,32,64]",
                                       "model.decode_head.channels=16"],
}  # fmt: skip
DENSE_HEADS["depth/configs/dpt_probe_vit_small.py"] = DENSE_HEADS["depth/configs/dpt_vit_small.py"]


def dense_layout(root: Path, splits: tuple, stem: str, hw: tuple[int, int], annotation) -> Path:
    """images/<split>/*.jpg and annotations/<split>/*.png, as ADE20K and our NYU layout keep them."""
    rng = np.random.default_rng(0)
    for split, n in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            name = stem.format(split=split, i=i)
            Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{name}.jpg"
            )
            Image.fromarray(annotation(rng, hw)).save(root / "annotations" / split / f"{name}.png")
    return root


def make_ade(root: Path) -> Path:
    labels = lambda rng, hw: rng.integers(0, 151, hw, dtype=np.uint8)  # noqa: E731
    return dense_layout(root, (("training", 3), ("validation", 2)), "ADE_{split}_{i:08d}", (48, 64), labels)


def make_nyu(root: Path) -> Path:
    depth_mm = lambda rng, hw: rng.integers(500, 9000, hw).astype(np.uint16)  # noqa: E731
    return dense_layout(root, (("train", 3), ("test", 2)), "bedroom_{i:05d}", (60, 80), depth_mm)


def optimizer_groups(cfg) -> tuple[dict[str, tuple[float, float]], torch.nn.Module]:
    """{name: (lr, weight decay)} of every parameter the config's optimizer trains, and the model."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()  # mmseg's default scope, also when a test runs alone
    model = MODELS.build(cfg.model)
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optim.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}, model


# --- official DINOv3 files, and FAIR's DinoVisionTransformer re-stated ---------------------------
# Independent of models/ and of timm: `FairViT` re-states FAIR's DinoVisionTransformer from PROTOCOLS G
# (and a reading of facebookresearch/dinov3's models/vision_transformer.py, layers/rope_position_encoding.py,
# attention.py, ffn_layers.py) with FAIR's parameter names, so an official file loads into it with strict=True.
N_STORAGE = 4


def swiglu_width(dim: int, ratio: float, align: int) -> int:
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)


class FairViT(nn.Module):
    """FAIR's DINOv3 ViT without drop path: keys, shapes and forward as released (norm eps 1e-5, 4 storage
    tokens, masked k bias, axial RoPE on the patch tokens, LayerScale, one final norm over every token).
    With `rescale_coords`, training mode rescales the RoPE coordinates as FAIR's RopePositionEmbedding:
    recomputed before every block, one draw exp(U(-log r, log r)) each, on the periods' device in fp32."""

    def __init__(
        self,
        dim,
        depth,
        heads,
        hidden,
        swiglu=False,
        qkv_bias=True,
        local_cls_norm=False,
        patch=16,
        *,
        rescale_coords=None,
    ):
        super().__init__()
        self.dim, self.heads, self.patch, self.rescale_coords = dim, heads, patch, rescale_coords
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, N_STORAGE, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.rope_embed = nn.Module()
        self.rope_embed.register_buffer("periods", torch.zeros(dim // heads // 4))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
            b.attn = nn.Module()
            b.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            if qkv_bias:
                b.attn.qkv.register_buffer("bias_mask", torch.full((3 * dim,), math.nan))
            b.attn.proj = nn.Linear(dim, dim)
            b.mlp = nn.Module()
            if swiglu:
                b.mlp.w1, b.mlp.w2, b.mlp.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            else:
                b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            b.ls1, b.ls2 = nn.Module(), nn.Module()
            b.ls1.gamma, b.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
            self.blocks.append(b)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        if local_cls_norm:
            self.local_cls_norm = nn.LayerNorm(dim, eps=1e-5)

    def rope(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = dict(device=self.rope_embed.periods.device, dtype=torch.float32)
        ys = torch.arange(0.5, h, **dd) / h
        xs = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(h * w, 2) * 2 - 1  # [HW, 2]
        if self.training and self.rescale_coords is not None:
            r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-r, r).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.rope_embed.periods  # [HW, 2, Dh/4]
        angles = angles.reshape(h * w, -1).repeat(1, 2)  # [HW, Dh]
        return angles.sin(), angles.cos()

    def attention(self, b: nn.Module, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        bias = b.attn.qkv.bias * b.attn.qkv.bias_mask if b.attn.qkv.bias is not None else None
        q, k, v = F.linear(x, b.attn.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)

        def rotate(t):  # rotate-half RoPE on the patch tokens only
            half = t.shape[-1] // 2
            p = t[:, :, 1 + N_STORAGE :]
            p = p * cos + torch.cat((-p[..., half:], p[..., :half]), -1) * sin
            return torch.cat((t[:, :, : 1 + N_STORAGE], p), dim=2)

        q, k = rotate(q), rotate(k)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return b.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, D))

    def mlp(self, b: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if hasattr(b.mlp, "w1"):
            return b.mlp.w3(F.silu(b.mlp.w1(x)) * b.mlp.w2(x))
        return b.mlp.fc2(F.gelu(b.mlp.fc1(x)))

    def blocks_out(self, x: torch.Tensor, masks=None) -> list[torch.Tensor]:
        h, w = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), x)
        B = x.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), x), 1)
        outs = []
        for b in self.blocks:
            sin, cos = self.rope(h, w)  # FAIR's loop: before every block
            x = x + b.ls1.gamma * self.attention(b, b.norm1(x), sin, cos)
            x = x + b.ls2.gamma * self.mlp(b, b.norm2(x))
            outs.append(x)
        return outs

    def forward_features(self, x, masks=None) -> dict:
        x = self.blocks_out(x, masks)[-1]
        n = self.norm(x)
        return {"x_norm_clstoken": n[:, 0], "x_storage_tokens": n[:, 1:5], "x_norm_patchtokens": n[:, 5:]}

    def get_intermediate_layers(self, x, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outs = [self.norm(o) for o in self.blocks_out(x)[-n:]]
        return [(o[:, 1 + N_STORAGE :], o[:, 0]) for o in outs]


def official_sd(dim, depth, heads, hidden, swiglu=False, qkv_bias=True, local_cls_norm=False, seed=0):
    """Random weights in exactly the keys/shapes of an official DINOv3 file: non-zero q, k and v biases
    (k masked), LayerScale of order 1, and RoPE periods off the formula (stored in bf16, as released)."""
    g = torch.Generator().manual_seed(seed)
    ref = FairViT(dim, depth, heads, hidden, swiglu, qkv_bias, local_cls_norm)
    sd = {}
    for k, v in ref.state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("bias_mask"):
            r = torch.ones_like(v)
            r[dim : 2 * dim] = 0
        elif k == "rope_embed.periods":
            dh = dim // heads
            formula = 100.0 ** (2 * torch.arange(dh // 4) / (dh // 2))
            r = (formula * (1 + 0.1 * r.clamp(-1, 1))).bfloat16().float()
        elif re.search(r"(norm\w*)\.weight$|gamma$", k):
            r = 1 + 0.2 * r
        elif v.ndim >= 2 and k not in ("cls_token", "storage_tokens", "mask_token"):
            r = r * v[0].numel() ** -0.5
        else:
            r = 0.5 * r
        sd[k] = r
    return sd


def fair(
    sd: dict, dim, depth, heads, hidden, swiglu=False, qkv_bias=True, local_cls_norm=False, *, rescale_coords=None
) -> FairViT:
    ref = FairViT(dim, depth, heads, hidden, swiglu, qkv_bias, local_cls_norm, rescale_coords=rescale_coords)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def official_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Our student with official-like random weights (LayerScale 1e-5 would make the blocks invisible)."""
    official = models.to_reference(model, "dinov3")
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    hidden = official["blocks.0.mlp.fc1.weight"].shape[0]
    sd = official_sd(dim, len(model.blocks), heads, hidden, seed=seed)
    sd["rope_embed.periods"] = official["rope_embed.periods"]  # keep the formula: timm's own models use it
    models.families.dinov3.load_dinov3(model, sd, "random")
    return model


# --- pretraining runs in a child process (resume and multi-student tests) ---------------------------------

ITERS = 12  # per epoch; 12 images in batches of 4 -> the sampler goes round 4 times an epoch


def command(data: Path, out: Path, workers: int = 0, *extra: str) -> list[str]:
    argv = [*TINY_RUN, "--data-path", str(data), "--output-dir", str(out), "--epochs", "2"]
    argv[argv.index("--num-workers") + 1] = str(workers)
    return [sys.executable, "-m", "pretrain.main", *argv, "--epoch-length", str(ITERS), *extra]


def iterations(out: Path) -> list[dict]:
    path = out / "iterations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def epoch_losses(out: Path) -> list[dict]:
    """log.txt's loss averages per epoch (timings aside): a resumed epoch's line averages the whole epoch."""
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k.startswith("train_loss")} for line in lines]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def interrupt(cmd: list[str], out: Path, sig: int, after: int = 5) -> int:
    """Start `cmd`, send `sig` once `after` iterations are logged; returns the exit status."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while len(iterations(out)) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (75, -signal.SIGKILL), err[-3000:]
    return proc.returncode


def one_teacher_distiller(student, dim: int, token: float = 1.0, patch: float = 1.0, fea: float = 1.0):
    """A Distiller of one teacher named "teacher" (its targets: {"teacher": {"cls", "patches"}})."""
    from models import TeacherTarget
    from pretrain.distiller import Distiller

    return Distiller(student, [TeacherTarget("teacher", dim, 1.0, token, patch, fea)])
