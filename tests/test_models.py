"""Tests for models/: student contracts, DINOv2 numerics against timm, official teacher formats,
checkpoint loading and atomic saves (PROTOCOLS A "Student", "Teachers...", "Reference checkpoint", F).

Every reference here is independent of models/: official key layouts, DINOv2's interpolation
formula, OpenAI CLIP's visual forward and the key mappings are written out in this file, and the
numerics are compared with timm's own VisionTransformer loaded through timm's checkpoint_filter_fn.
All networks are tiny (dim <= 128, depth <= 4) so that the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

import models
from common.io import atomic_save
from models import ViT
from models.errors import MissingFile, UsageError
from tests.helpers import block_outputs, randomize_, rel_err, tiny_spec, tiny_vit

# torch.jit is deprecated in torch 2.14 but OpenAI's CLIP files are TorchScript archives.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

PATCH = 14


# --- the official DINOv2 layout, written out ------------------------------------------------------
def swiglu_hidden(dim: int) -> int:
    """DINOv2's SwiGLUFFNFused width for mlp_ratio 4: (int(4 * dim * 2 / 3) + 7) // 8 * 8 (ViT-g: 4096)."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


def official_dinov2_sd(
    dim: int = 128,
    depth: int = 2,
    grid: int = 4,
    reg: bool = False,
    swiglu: bool = False,
    patch: int = PATCH,
    chunks: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys/shapes of facebookresearch/dinov2's release files."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim, std=0.5)}
    if reg:
        sd["register_tokens"] = r(1, 4, dim)
    sd["mask_token"] = r(1, dim)
    sd["patch_embed.proj.weight"] = r(dim, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["patch_embed.proj.bias"] = r(dim, std=0.1)
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = 1 + r(dim, std=0.2), r(dim, std=0.1)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r(3 * dim, dim, std=dim**-0.5), r(3 * dim, std=0.1)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(dim, dim, std=dim**-0.5), r(dim, std=0.1)
        sd[b + "ls1.gamma"] = 1 + r(dim, std=0.3)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = 1 + r(dim, std=0.2), r(dim, std=0.1)
        if swiglu:  # SwiGLUFFNFused of ViT-g: w12 packs [x1; x2], hidden = silu(x1) * x2, then w3
            h = swiglu_hidden(dim)
            sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"] = r(2 * h, dim, std=dim**-0.5), r(2 * h, std=0.1)
            sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"] = r(dim, h, std=h**-0.5), r(dim, std=0.1)
        else:
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r(4 * dim, dim, std=dim**-0.5), r(4 * dim, std=0.1)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r(dim, 4 * dim, std=(4 * dim) ** -0.5), r(dim, std=0.1)
        sd[b + "ls2.gamma"] = 1 + r(dim, std=0.3)
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dim, std=0.2), r(dim, std=0.1)
    if chunks:  # DINOv2 block_chunks > 0: chunk j holds the global block indices of its slice
        per = depth // chunks
        sd = {
            re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // per}.{m.group(1)}.", k): v
            for k, v in sd.items()
        }
    return sd


def dinov2_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The only renames between the official layout and ours: unchunk blocks, SwiGLU w12/w3 -> fc1/fc2."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")] = v
    return out


def timm_dinov2(sd, dim, depth, heads, grid, reg=False, swiglu=False) -> VisionTransformer:
    """timm's own DINOv2 model (as `vit_*_patch14[_reg4]_dinov2`), loaded via timm's converter."""
    kw = dict(reg_tokens=4, no_embed_class=True) if reg else {}
    if swiglu:
        kw.update(mlp_ratio=(2 * swiglu_hidden(dim) + 0.5) / dim, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    tm = VisionTransformer(
        img_size=grid * PATCH,
        patch_size=PATCH,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        init_values=1.0,
        num_classes=0,
        dynamic_img_size=True,
        **kw,
    )
    tm.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in sd.items()}, tm), strict=True)
    return tm.eval()


def timm_outputs(tm: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = tm.forward_features(x)
    return out[:, 0], out[:, tm.num_prefix_tokens :]


def timm_rel_err(model: nn.Module, tm: VisionTransformer, x: torch.Tensor) -> float:
    """The larger relative error of our forward_features' normed CLS and patch tokens against timm's model."""
    with torch.no_grad():
        out = model.forward_features(x)
    t_cls, t_patch = timm_outputs(tm, x)
    assert out["x_norm_clstoken"].shape == t_cls.shape and out["x_norm_patchtokens"].shape == t_patch.shape
    return max(rel_err(out["x_norm_clstoken"], t_cls), rel_err(out["x_norm_patchtokens"], t_patch))


def dinov2_interpolate(pos_embed: torch.Tensor, h0: int, w0: int, reg: bool) -> torch.Tensor:
    """DINOv2's DinoVisionTransformer.interpolate_pos_encoding, written directly (grid sizes h0 x w0)."""
    n = pos_embed.shape[1] - 1
    if n == h0 * w0 and h0 == w0:
        return pos_embed
    m = int(math.sqrt(n))
    assert m * m == n
    dim = pos_embed.shape[-1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if reg:  # interpolate_offset 0.0, interpolate_antialias True
        patch_pos = F.interpolate(patch_pos, size=(h0, w0), mode="bicubic", antialias=True)
    else:  # interpolate_offset 0.1, interpolate_antialias False
        sf = ((h0 + 0.1) / m, (w0 + 0.1) / m)
        patch_pos = F.interpolate(patch_pos, scale_factor=sf, mode="bicubic", antialias=False)
    assert patch_pos.shape[-2:] == (h0, w0)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(pos_embed.dtype)


# ================================================================================================
# 1. Student contracts
# ================================================================================================
# PROTOCOLS A "Student": arch -> (dim, depth, heads)
PROTOCOL_STUDENTS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@pytest.mark.parametrize("name", list(PROTOCOL_STUDENTS))
def test_student_architecture_matches_protocol(name):
    dim, depth, heads = PROTOCOL_STUDENTS[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost for ViT-L
        m = models.create_student(name)
    assert m.embed_dim == dim and len(m.blocks) == depth
    assert m.patch_embed.proj.kernel_size == (14, 14) and m.patch_embed.proj.stride == (14, 14)
    assert tuple(m.pos_embed.shape) == (1, 257, dim)
    assert tuple(m.cls_token.shape) == (1, 1, dim) and tuple(m.mask_token.shape) == (1, dim)
    assert m.register_tokens is None and m.num_register_tokens == 0 and m.num_prefix_tokens == 1
    assert (m.interpolate_offset, m.interpolate_antialias) == (0.1, False)
    for blk in m.blocks:
        assert blk.attn.num_heads == heads and blk.attn.head_dim == 64
        assert blk.attn.qkv.bias is not None and blk.attn.proj.bias is not None
        assert tuple(blk.mlp.fc1.weight.shape) == (4 * dim, dim) and tuple(blk.mlp.fc2.weight.shape) == (dim, 4 * dim)
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
        assert blk.norm1.eps == blk.norm2.eps == 1e-6
        assert tuple(blk.ls1.gamma.shape) == (dim,)
    assert isinstance(m.norm, nn.LayerNorm) and m.norm.eps == 1e-6
    assert isinstance(m.norm_pre, nn.Identity)
    config = models.STUDENT_ARCHS[name]
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_hidden) == (dim, depth, heads, 4 * dim)


def test_unknown_student_name():
    with pytest.raises(UsageError, match="vit_tiny.*vit_large"):
        models.create_student("vit_huge")


@pytest.fixture(scope="module")
def vit_tiny_student():
    torch.manual_seed(0)
    return models.create_student("vit_tiny").eval()


def test_student_init(vit_tiny_student):
    m = vit_tiny_student
    sd = m.state_dict()
    assert torch.count_nonzero(m.mask_token) == 0
    assert 0.7e-6 < m.cls_token.std().item() < 1.3e-6
    assert 0.018 < m.pos_embed.std().item() < 0.022
    gammas = [v for k, v in sd.items() if k.endswith(("ls1.gamma", "ls2.gamma"))]
    assert len(gammas) == 24 and all(torch.equal(g, torch.ones_like(g)) for g in gammas)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert len(linears) == 12 * 4
    for lin in linears:
        assert torch.count_nonzero(lin.bias) == 0
        assert 0.018 < lin.weight.std().item() < 0.022
    assert not any("register" in k or "reg_token" in k for k in sd)


def test_student_forward_224_contract(vit_tiny_student):
    m = vit_tiny_student
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = m.forward_features(x)
    assert out["x_norm_clstoken"].shape == (2, 192)
    assert out["x_norm_patchtokens"].shape == (2, 256, 192)
    assert out["x_norm_regtokens"].shape == (2, 0, 192)
    assert out["x_prenorm"].shape == (2, 257, 192)
    assert out["masks"] is None
    normed = m.norm(out["x_prenorm"])
    assert torch.equal(out["x_norm_clstoken"], normed[:, 0])
    assert torch.equal(out["x_norm_patchtokens"], normed[:, 1:])


@pytest.mark.parametrize("reg", [0, 4])
def test_forward_features_any_multiple_of_patch(reg):
    m = tiny_vit(dim=64, heads=1, grid=4, reg=reg, randomize=True)
    x = torch.randn(2, 3, 112, 140)
    with torch.no_grad():
        out = m.forward_features(x)
        normed = m.norm(out["x_prenorm"])
        assert torch.equal(m(x), out["x_norm_clstoken"])  # forward() is the normed CLS token
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, reg, 64)
    assert out["x_norm_patchtokens"].shape == (2, 8 * 10, 64)
    assert torch.equal(out["x_norm_regtokens"], normed[:, 1 : 1 + reg])
    assert torch.equal(out["x_norm_patchtokens"], normed[:, 1 + reg :])


@pytest.mark.parametrize("hw", [(225, 225), (224, 225), (225, 224), (13, 14)])
def test_input_not_multiple_of_patch_raises(hw):
    m = tiny_vit(dim=64, heads=1, grid=4, randomize=True)
    x = torch.randn(1, 3, *hw)
    with pytest.raises(UsageError, match=rf"{hw[0]}x{hw[1]}.*multiple of the patch size 14"):
        m.forward_features(x)
    with pytest.raises(UsageError, match="multiple of the patch size"):
        m.get_intermediate_layers(x)


@pytest.mark.parametrize("reg", [0, 4])
def test_mask_token_replaces_patch_embedding_before_pos_embed(reg):
    m = tiny_vit(dim=64, heads=1, grid=4, reg=reg, randomize=True)
    b, gh, gw = 3, 4, 5
    x = torch.randn(b, 3, gh * PATCH, gw * PATCH)
    masks = torch.rand(b, gh * gw) < 0.5
    masks[2] = False  # one sample without any masked patch
    with torch.no_grad():
        tokens = m.prepare_tokens(x, masks)
        # reference: conv patchify, swap masked patches for the mask token, then add positions
        patches = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=PATCH)
        patches = patches.flatten(2).transpose(1, 2)
        patches = torch.where(masks[..., None], m.mask_token[None], patches)
        pos = dinov2_interpolate(m.pos_embed, gh, gw, reg=bool(reg))
        cls = (m.cls_token + pos[:, :1]).expand(b, -1, -1)
        parts = [cls] + ([m.register_tokens.expand(b, -1, -1)] if reg else []) + [patches + pos[:, 1:]]
        expected = torch.cat(parts, dim=1)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
    # at masked positions the token is exactly mask_token + pos_embed, whatever the image
    pos_patch = pos[0, 1:].expand(b, -1, -1)
    torch.testing.assert_close(tokens[:, 1 + reg :][masks], (m.mask_token + pos_patch[masks]), rtol=0, atol=1e-6)

    with torch.no_grad():
        masked = m.forward_features(x, masks)
        clean = m.forward_features(x)
        manual = m.norm(m.blocks(expected))
    assert masked["masks"] is masks
    torch.testing.assert_close(masked["x_norm_patchtokens"], manual[:, 1 + reg :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked["x_norm_clstoken"][2], clean["x_norm_clstoken"][2])  # unmasked sample
    assert rel_err(masked["x_norm_clstoken"][:2], clean["x_norm_clstoken"][:2]) > 1e-3


@pytest.mark.parametrize("reg", [0, 4])
def test_get_intermediate_layers_dinov2_semantics(reg):
    m = tiny_vit(dim=64, depth=3, heads=1, grid=4, reg=reg, randomize=True)
    gh, gw = 3, 5  # non-square so that a transposed reshape would be caught
    x = torch.randn(2, 3, gh * PATCH, gw * PATCH)
    per_block = block_outputs(m, x)
    with torch.no_grad():
        p = 1 + reg

        def patches(i, norm=True):
            o = m.norm(per_block[i]) if norm else per_block[i]
            return o[:, p:]

        def cls(i, norm=True):
            return (m.norm(per_block[i]) if norm else per_block[i])[:, 0]

        def close(a, b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

        out = m.get_intermediate_layers(x)  # n=1: the last block, normed
        assert isinstance(out, tuple) and len(out) == 1
        close(out[0], patches(2))
        close(out[0], m.forward_features(x)["x_norm_patchtokens"])

        out = m.get_intermediate_layers(x, n=2)  # int n: the last n blocks
        assert len(out) == 2
        close(out[0], patches(1))
        close(out[1], patches(2))

        out = m.get_intermediate_layers(x, n=[0, 2])  # list: these block indices
        assert len(out) == 2
        close(out[0], patches(0))
        close(out[1], patches(2))

        out = m.get_intermediate_layers(x, n=[1], norm=False)
        close(out[0], patches(1, norm=False))

        out = m.get_intermediate_layers(x, n=2, reshape=True)
        for o, i in zip(out, (1, 2)):
            assert o.shape == (2, 64, gh, gw)
            close(o, patches(i).reshape(2, gh, gw, 64).permute(0, 3, 1, 2))
            close(o[1, :, 2, 4], patches(i)[1, 2 * gw + 4])

        out = m.get_intermediate_layers(x, n=[0, 1], return_class_token=True, norm=False)
        assert len(out) == 2 and all(len(pair) == 2 for pair in out)
        for (pt, ct), i in zip(out, (0, 1)):
            close(pt, patches(i, norm=False))
            close(ct, cls(i, norm=False))

        out = m.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
        ((pt, ct),) = out
        assert pt.shape == (2, 64, gh, gw) and ct.shape == (2, 64)
        close(ct, cls(2))
        close(ct, m.forward_features(x)["x_norm_clstoken"])

    with pytest.raises(UsageError):
        m.get_intermediate_layers(x, n=[3])


# ================================================================================================
# 2. Positional-embedding interpolation == DINOv2's formula
# ================================================================================================
def _interp_model(kind: str) -> ViT:
    if kind == "student":  # create_student's own configuration, without paying for its init
        with torch.device("meta"):
            m = models.create_student("vit_tiny")
        m = m.to_empty(device="cpu")
    else:  # the teacher specs as configured for the official DINOv2 files (518 px, 37x37 grid)
        name = "dinov2_vits14_reg" if kind == "reg" else "dinov2_vits14"
        m = tiny_spec(name, dim=48, depth=1, heads=1).build()
    with torch.no_grad():
        m.pos_embed.normal_()
    return m.eval()


@pytest.mark.parametrize("kind", ["plain", "reg", "student"])
@pytest.mark.parametrize("grid", [(16, 16), (16, 20), (20, 16), (8, 10), (40, 40), (8, 32)])
def test_pos_embed_interpolation_is_dinov2_formula(kind, grid):
    m = _interp_model(kind)
    reg = kind == "reg"
    assert m.pos_embed.shape[1] == (1 + 37 * 37 if kind != "student" else 1 + 16 * 16)
    with torch.no_grad():
        got = m.interpolate_pos_encoding(*grid)
    ref = dinov2_interpolate(m.pos_embed.detach(), *grid, reg=reg)
    assert got.shape == (1, 1 + grid[0] * grid[1], m.embed_dim)
    assert torch.equal(got, ref)  # exact, atol 0
    assert torch.equal(got[:, 0], m.pos_embed[:, 0])  # the class position is kept as is


@pytest.mark.parametrize("kind", ["plain", "reg", "student"])
def test_pos_embed_unchanged_at_native_grid(kind):
    m = _interp_model(kind)
    g = int(math.sqrt(m.pos_embed.shape[1] - 1))
    assert m.interpolate_pos_encoding(g, g) is m.pos_embed


def test_pos_embed_interpolation_is_used_by_forward():
    m = _interp_model("plain")
    x = torch.randn(1, 3, 16 * PATCH, 20 * PATCH)
    with torch.no_grad():
        tokens = m.prepare_tokens(x)
        patches = m.patch_embed(x).reshape(1, -1, m.embed_dim)
    ref = dinov2_interpolate(m.pos_embed.detach(), 16, 20, reg=False)
    torch.testing.assert_close(tokens[:, 1:] - patches, ref[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], (m.cls_token + ref[:, :1])[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", [(16, 16), (16, 20)])
def test_pos_embed_vs_timm_resample(grid):
    """PROTOCOLS F: timm's resample equals DINOv2's formula for _reg models, not for plain ones."""
    plain, reg = _interp_model("plain"), _interp_model("reg")
    with torch.no_grad():
        timm_plain = resample_abs_pos_embed(plain.pos_embed, list(grid), num_prefix_tokens=1)
        timm_reg = resample_abs_pos_embed(reg.pos_embed, list(grid), num_prefix_tokens=1)
        ours_plain = plain.interpolate_pos_encoding(*grid)
        ours_reg = reg.interpolate_pos_encoding(*grid)
    assert rel_err(ours_plain, timm_plain) > 0.01
    torch.testing.assert_close(ours_reg, timm_reg, rtol=1e-6, atol=1e-6)


# ================================================================================================
# 3. Numerics against timm's independent DINOv2 implementation
# ================================================================================================
DIM, DEPTH, HEADS, GRID = 128, 2, 2, 4


@pytest.fixture(params=[False, True], ids=["plain", "reg4"])
def dinov2_file(request, tmp_path):
    reg = request.param
    sd = official_dinov2_sd(DIM, DEPTH, GRID, reg=reg)
    path = tmp_path / f"dinov2_tiny{'_reg4' if reg else ''}_pretrain.pth"
    torch.save(sd, path)
    return reg, sd, path


def test_load_backbone_matches_timm_dinov2_native(dinov2_file):
    reg, sd, path = dinov2_file
    ours = models.load_backbone(path).eval()
    assert ours.embed_dim == DIM and len(ours.blocks) == DEPTH and ours.blocks[0].attn.num_heads == HEADS
    assert ours.num_register_tokens == (4 if reg else 0)
    assert (ours.interpolate_offset, ours.interpolate_antialias) == ((0.0, True) if reg else (0.1, False))
    assert torch.equal(ours.mask_token, sd["mask_token"])
    tm = timm_dinov2(sd, DIM, DEPTH, HEADS, GRID, reg=reg)
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    assert timm_outputs(tm, x)[1].shape == (2, GRID * GRID, DIM)
    assert timm_rel_err(ours, tm, x) < 1e-4
    if reg:
        with torch.no_grad():
            assert rel_err(ours.forward_features(x)["x_norm_regtokens"], tm.forward_features(x)[:, 1:5]) < 1e-4


def test_load_backbone_matches_timm_dinov2_other_size(dinov2_file):
    reg, sd, path = dinov2_file
    ours = models.load_backbone(path).eval()
    tm = timm_dinov2(sd, DIM, DEPTH, HEADS, GRID, reg=reg)
    x = torch.randn(2, 3, 4 * PATCH, 6 * PATCH)
    err = timm_rel_err(ours, tm, x)
    if reg:  # timm's antialiased resample to size == DINOv2's reg formula
        assert err < 1e-4
    else:  # DINOv2's plain formula (offset 0.1, no antialias) is not timm's
        assert err > 1e-3


def test_to_dinov2_export_is_official_layout_and_loads_into_timm(dinov2_file):
    reg, sd, path = dinov2_file
    ours = models.load_backbone(path).eval()
    exported = models.to_dinov2(ours)
    assert set(exported) == set(sd)  # the official key set, mask_token included
    for k, v in sd.items():
        assert torch.equal(exported[k], v), k
    tm = timm_dinov2(exported, DIM, DEPTH, HEADS, GRID, reg=reg)  # strict load through timm's converter
    assert timm_rel_err(ours, tm, torch.randn(2, 3, GRID * PATCH, GRID * PATCH)) < 1e-4


def test_to_dinov2_student_keys_are_official():
    m = tiny_vit(dim=64, depth=3, heads=1, grid=16, randomize=True)
    assert set(models.to_dinov2(m)) == set(official_dinov2_sd(64, 3, 16))
    exported = models.to_dinov2(m)
    assert all(not v.requires_grad for v in exported.values())
    with torch.no_grad():
        m.cls_token.add_(1.0)
    assert not torch.equal(exported["cls_token"], m.cls_token)  # a copy, not a view of live weights


# ================================================================================================
# 4. Every teacher family from its official file format
# ================================================================================================
def assert_frozen_eval(teacher: models.Teacher, family: str) -> ViT:
    """A frozen Teacher of `family`, which stays in eval mode; returns its backbone."""
    assert isinstance(teacher, models.Teacher) and teacher.family == family
    teacher.train()  # a teacher never trains: no-op
    assert not teacher.training and all(not mod.training for mod in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    return teacher.backbone


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


@pytest.mark.parametrize(
    "name,dim,heads,reg,swiglu",
    [
        ("dinov2_vits14", 64, 1, False, False),
        ("dinov2_vitb14_reg", 128, 2, True, False),
        ("dinov2_vitg14", 48, 1, False, True),
    ],
)
def test_dinov2_teacher_official_file(tiny_teacher, tmp_path, name, dim, heads, reg, swiglu):
    depth = 1 if swiglu else 2
    tiny_teacher(name, dim=dim, depth=depth, heads=heads)
    sd = official_dinov2_sd(dim, depth, 4, reg=reg, swiglu=swiglu)
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    frozen = models.create_teacher(name, checkpoint=path)
    teacher = assert_frozen_eval(frozen, "dinov2")
    assert frozen.mean == pytest.approx(IMAGENET_MEAN) and frozen.std == pytest.approx(IMAGENET_STD)
    ours = teacher.state_dict()
    expected = dinov2_to_ours(sd)
    assert set(ours) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k
    exported = models.to_dinov2(teacher)  # and back to the official layout (w12/w3 for ViT-g)
    assert set(exported) == set(sd) and all(torch.equal(exported[k], v) for k, v in sd.items())

    tm = timm_dinov2(sd, dim, depth, heads, 4, reg=reg, swiglu=swiglu)
    assert timm_rel_err(teacher, tm, torch.randn(2, 3, 4 * PATCH, 4 * PATCH)) < 1e-4
    if swiglu:  # DINOv2's SwiGLUFFN by hand: x1, x2 = w12(x).chunk(2); w3(silu(x1) * x2)
        z = torch.randn(3, 5, dim)
        x1, x2 = F.linear(z, sd["blocks.0.mlp.w12.weight"], sd["blocks.0.mlp.w12.bias"]).chunk(2, dim=-1)
        ref = F.linear(F.silu(x1) * x2, sd["blocks.0.mlp.w3.weight"], sd["blocks.0.mlp.w3.bias"])
        with torch.no_grad():
            torch.testing.assert_close(teacher.blocks[0].mlp(z), ref, rtol=1e-5, atol=1e-5)


# --- OpenAI CLIP: the visual tower as in openai/CLIP model.py (QuickGELU, LND attention) ---------
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * d, d))])
        )
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(self, res: int, patch: int, width: int, layers: int, heads: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post(CLS): what we distil (the vector before `@ proj`)."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # LND
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0])


class CLIPStandIn(nn.Module):
    """Same state-dict layout as OpenAI's CLIP: visual.* plus a text tower to be ignored."""

    def __init__(self, res: int, patch: int, width: int, layers: int, heads: int):
        super().__init__()
        self.visual = VisualTransformer(res, patch, width, layers, heads, out_dim=32)
        self.transformer = Transformer(32, 1, 1)
        self.token_embedding = nn.Embedding(50, 32)
        self.positional_embedding = nn.Parameter(torch.randn(8, 32))
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, 32))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def clip_to_ours(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI visual.* names -> our (timm) names, written out by hand; proj and the text tower dropped."""
    renames = [
        ("conv1.", "patch_embed.proj."),
        ("ln_pre.", "norm_pre."),
        ("ln_post.", "norm."),
        ("ln_1.", "norm1."),
        ("ln_2.", "norm2."),
        ("attn.in_proj_weight", "attn.qkv.weight"),
        ("attn.in_proj_bias", "attn.qkv.bias"),
        ("attn.out_proj.", "attn.proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ]
    out = {}
    for k, v in raw.items():
        if not k.startswith("visual.") or k == "visual.proj":
            continue
        k = re.sub(r"transformer\.resblocks\.(\d+)\.", r"blocks.\1.", k[len("visual.") :])
        if k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        else:
            for a, b in renames:
                k = k.replace(a, b)
            out[k] = v
    return out


@pytest.mark.parametrize(
    "name,archive", [("clip_vitb16", False), ("clip_vitl14", True)], ids=["state_dict", "torchscript"]
)
def test_clip_teacher_official_file(tiny_teacher, tmp_path, name, archive):
    spec = tiny_teacher(name, dim=128, depth=2, heads=2)
    patch, grid = spec.patch_size, 4
    ref = randomize_(CLIPStandIn(grid * patch, patch, 128, 2, 2), seed=1).eval()
    raw = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    assert {"transformer.resblocks.0.attn.in_proj_weight", "token_embedding.weight", "text_projection"} <= set(raw)
    path = tmp_path / f"{name}.pt"
    if archive:
        torch.jit.save(torch.jit.script(ref), str(path))
    else:
        torch.save(raw, path)
    frozen = models.create_teacher(name, checkpoint=path)
    teacher = assert_frozen_eval(frozen, "clip")
    assert frozen.mean == pytest.approx(CLIP_MEAN, abs=1e-4)
    assert frozen.std == pytest.approx(CLIP_STD, abs=1e-4)

    ours, expected = teacher.state_dict(), clip_to_ours(raw)
    assert set(ours) == set(expected) | {"mask_token"}
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k
    # architecture: conv without bias, ln_pre, LayerNorm eps 1e-5 everywhere, QuickGELU, no LayerScale
    assert teacher.patch_embed.proj.bias is None
    norms = [mod for mod in teacher.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 2 and all(n.eps == 1e-5 for n in norms)
    assert isinstance(teacher.norm_pre, nn.LayerNorm)
    z = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(teacher.blocks[0].mlp.act(z), z * torch.sigmoid(1.702 * z))
    assert isinstance(teacher.blocks[0].ls1, nn.Identity)

    x = torch.randn(2, 3, grid * patch, grid * patch)
    with torch.no_grad():
        out = teacher.forward_features(x)
        target = ref(x)  # OpenAI's forward: ln_post(CLS) before the projection
    assert out["x_norm_clstoken"].shape == (2, 128)
    assert rel_err(out["x_norm_clstoken"], target) < 1e-4
    torch.testing.assert_close(teacher.norm.weight, raw["visual.ln_post.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("make", ["script", "trace"])
def test_torchscript_archives_are_read_as_data_as_torch_jit_reads_them(tmp_path, monkeypatch, make):
    """OpenAI's .pt files are TorchScript archives: their parameters and buffers are taken from the archive as
    data, key for key, value for value and dtype for dtype what torch.jit.load(...).state_dict() gives,
    without torch.jit ever loading it."""
    ref = randomize_(CLIPStandIn(16, 8, 32, 1, 1), seed=3).eval()
    ref.visual.register_buffer("steps", torch.arange(3))  # an integer buffer
    ref.transformer.half()  # OpenAI's files hold fp16 weights beside fp32 ones
    path = tmp_path / "ViT-B-16.pt"
    module = torch.jit.script(ref) if make == "script" else torch.jit.trace(ref, torch.zeros(1, 3, 16, 16))
    torch.jit.save(module, str(path))
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()

    def never(*args, **kwargs):
        raise AssertionError("torch.jit.load ran the archive's code")

    monkeypatch.setattr(torch.jit, "load", never)
    got = models.families.clip.openai_clip_state_dict(path)
    assert list(got) == list(expected) and "visual.steps" in got
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert got["transformer.resblocks.0.ln_1.weight"].dtype == torch.float16


class SetsItsOwnState(nn.Module):
    """A module whose archive runs its own code when torch.jit.load restores it: it prints a marker."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("the archive's code ran")
        self.w = state[0]
        self.training = state[1]


def test_code_in_a_torchscript_archive_is_never_run(tmp_path, capfd):
    ref = CLIPStandIn(16, 8, 32, 1, 1)
    ref.visual.marked = SetsItsOwnState()
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(ref), str(path))
    torch.jit.load(str(path))
    assert "the archive's code ran" in capfd.readouterr().out  # what loading it with torch.jit does
    with pytest.raises(UsageError) as e:
        models.families.clip.openai_clip_state_dict(path)
    assert str(e.value) == (
        f"cannot read TorchScript archive {path}: its __torch__.tests.test_models.SetsItsOwnState sets its state "
        "with the archive's own code (__setstate__), which is never run, so its weights cannot be read as data; "
        + models.checkpoints.CONVERT
    )
    assert "the archive's code ran" not in capfd.readouterr().out
    torch.save(torch.jit.load(str(path), map_location="cpu").state_dict(), tmp_path / "converted.pth")  # the advice
    converted = models.families.clip.openai_clip_state_dict(tmp_path / "converted.pth")
    assert converted.keys() == ref.state_dict().keys()


# --- SynCLR: timm ViT names under (module.)visual., checkpoint['model'] or ['state_dict'] -------
@pytest.mark.parametrize(
    "name,wrapper,prefix", [("synclr_vitb16", "model", "module.visual."), ("synclr_vitl14", "state_dict", "visual.")]
)
def test_synclr_teacher_official_file(tiny_teacher, tmp_path, name, wrapper, prefix):
    spec = tiny_teacher(name, dim=128, depth=2, heads=2)
    patch, grid = spec.patch_size, 4
    ref = VisionTransformer(
        img_size=grid * patch, patch_size=patch, embed_dim=128, depth=2, num_heads=2, num_classes=0, init_values=None
    )
    ref = randomize_(ref, seed=2).eval()
    inner = {prefix + k: v.detach().clone() for k, v in ref.state_dict().items()}
    inner[prefix + "head.weight"] = torch.randn(10, 128)  # classification/projection head: dropped
    inner[prefix + "head.bias"] = torch.randn(10)
    inner[prefix.replace("visual.", "") + "image_projector.weight"] = torch.randn(16, 128)  # outside visual
    torch.save({wrapper: inner, "epoch": 7, "optimizer": {}}, tmp_path / "synclr.pth")

    frozen = models.create_teacher(name, checkpoint=tmp_path / "synclr.pth")
    teacher = assert_frozen_eval(frozen, "synclr")
    assert frozen.mean == pytest.approx(IMAGENET_MEAN)
    ours = teacher.state_dict()
    assert set(ours) == set(ref.state_dict()) | {"mask_token"}
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert isinstance(teacher.blocks[0].ls1, nn.Identity)  # no LayerScale

    assert timm_rel_err(teacher, ref, torch.randn(2, 3, grid * patch, grid * patch)) < 1e-4


@pytest.mark.parametrize("shape", [None, (1, 1, 64), (1, 64)], ids=["none", "timm-1x1xD", "1xD"])
def test_synclr_teacher_mask_token_optional(tiny_teacher, tmp_path, shape):
    """What the official SynCLR files hold is not settled by code (docs/protocols.md, Notes, A): they
    follow StableRep's `module.visual.` layout of a plain timm ViT (no mask token: the likely case),
    and the only SynCLR code with a token, its and the reference's MaskedTransformer, makes it
    [1, 1, D]. The teacher never receives masks, so we load any of these, keep a token that is there,
    and give the same outputs; a token of another width is refused, named."""
    tiny_teacher("synclr_vitl14", dim=64, depth=2, heads=1)
    ref = randomize_(VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=1,
                                       num_classes=0, init_values=None), seed=3).eval()  # fmt: skip
    inner = {"module.visual." + k: v for k, v in ref.state_dict().items()}
    token = None if shape is None else torch.randn(shape)
    if token is not None:
        inner["module.visual.mask_token"] = token
    torch.save({"model": inner}, tmp_path / "synclr.pth")
    teacher = models.create_teacher("synclr_vitl14", checkpoint=tmp_path / "synclr.pth").backbone
    expected = torch.zeros(1, 64) if token is None else token.reshape(1, 64)  # none: our zeros, never used
    assert torch.equal(teacher.mask_token, expected)
    assert timm_rel_err(teacher, ref, torch.randn(2, 3, 56, 56)) < 1e-4
    inner["module.visual.mask_token"] = torch.randn(1, 1, 128)
    torch.save({"model": inner}, tmp_path / "wide.pth")
    with pytest.raises(UsageError, match=r"shape mismatch.*mask_token"):
        models.create_teacher("synclr_vitl14", checkpoint=tmp_path / "wide.pth")


# ================================================================================================
# 5. Strict teacher loading
# ================================================================================================
@pytest.fixture
def small_dinov2(tiny_teacher, tmp_path):
    tiny_teacher("dinov2_vits14", dim=64, depth=2, heads=1)

    def write(sd, fname="file.pth"):
        torch.save(sd, tmp_path / fname)
        return tmp_path / fname

    return official_dinov2_sd(64, 2, 4), write


@pytest.mark.parametrize("key", ["blocks.1.ls2.gamma", "mask_token", "norm.bias"])
def test_teacher_missing_key_is_named(small_dinov2, key):
    sd, write = small_dinov2
    del sd[key]
    with pytest.raises(UsageError, match=rf"missing keys: .*{re.escape(key)}"):
        models.create_teacher("dinov2_vits14", checkpoint=write(sd))


def test_teacher_unexpected_key_is_named(small_dinov2):
    sd, write = small_dinov2
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    with pytest.raises(UsageError, match=r"unexpected keys: .*blocks\.0\.attn\.q_norm\.weight"):
        models.create_teacher("dinov2_vits14", checkpoint=write(sd))


def test_teacher_shape_mismatch_is_named(small_dinov2):
    _, write = small_dinov2
    sd = official_dinov2_sd(64, 2, grid=5)  # a file for another image size: only pos_embed differs
    with pytest.raises(UsageError, match=r"shape mismatch.*pos_embed \(1, 26, 64\) vs \(1, 17, 64\)") as e:
        models.create_teacher("dinov2_vits14", checkpoint=write(sd))
    assert "cls_token" not in str(e.value)
    sd = official_dinov2_sd(96, 2, grid=4)  # another model size
    with pytest.raises(UsageError, match=r"shape mismatch.*blocks\.0\.attn\.qkv\.weight \(288, 96\) vs \(192, 64\)"):
        models.create_teacher("dinov2_vits14", checkpoint=write(sd))


def test_teacher_wrong_family_file(small_dinov2, tiny_teacher, tmp_path):
    sd, write = small_dinov2
    clip_raw = CLIPStandIn(4 * 14, 14, 64, 2, 1).state_dict()
    with pytest.raises(UsageError, match="dinov2_vits14"):
        models.create_teacher("dinov2_vits14", checkpoint=write(clip_raw, "clip.pt"))
    tiny_teacher("clip_vitl14", dim=64, depth=2, heads=1)
    with pytest.raises(UsageError, match="not an OpenAI CLIP checkpoint"):
        models.create_teacher("clip_vitl14", checkpoint=write(sd, "dinov2.pth"))
    tiny_teacher("synclr_vitl14", dim=64, depth=2, heads=1)
    with pytest.raises(UsageError, match=r"unexpected keys: .*ls1\.gamma"):
        models.create_teacher("synclr_vitl14", checkpoint=write({"model": sd}, "dinov2_in_model.pth"))


def test_teacher_unknown_name_and_missing_file(tiny_teacher, tmp_path):
    with pytest.raises(UsageError, match=r"unknown teacher 'dinov4_vits16'.*dinov2_vits14.*dinov3_vits16.*synclr"):
        models.create_teacher("dinov4_vits16", checkpoint=tmp_path / "x.pth")
    tiny_teacher("dinov2_vits14")
    with pytest.raises(MissingFile, match="nope.pth"):
        models.create_teacher("dinov2_vits14", checkpoint=tmp_path / "nope.pth")


# ================================================================================================
# 6. load_backbone on every checkpoint format we accept
# ================================================================================================
def _assert_same_weights(model: ViT, expected: dict[str, torch.Tensor]):
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("patch,dim,depth", [(14, 128, 2), (16, 192, 1)])
def test_load_backbone_exported_flat(tmp_path, patch, dim, depth):
    m = tiny_vit(dim=dim, depth=depth, heads=dim // 64, grid=4, patch=patch, randomize=True)
    atomic_save(models.to_dinov2(m), tmp_path / "backbone.pth")
    loaded = models.load_backbone(tmp_path / "backbone.pth").eval()
    assert loaded.embed_dim == dim and len(loaded.blocks) == depth
    assert loaded.blocks[0].attn.num_heads == dim // 64
    assert loaded.patch_embed.proj.kernel_size == (patch, patch) and loaded.patch_size == patch
    assert loaded.num_register_tokens == 0 and loaded.register_tokens is None
    assert (loaded.interpolate_offset, loaded.interpolate_antialias) == (0.1, False)
    _assert_same_weights(loaded, m.state_dict())
    x = torch.randn(1, 3, 4 * patch, 5 * patch)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_features(x)["x_norm_patchtokens"],
            m.forward_features(x)["x_norm_patchtokens"],
            rtol=0,
            atol=0,
        )


def reference_checkpoint(student: dict[str, torch.Tensor]) -> dict:
    """The reference release's checkpoint.pth (PROTOCOLS A, "Reference checkpoint")."""
    teacher = official_dinov2_sd(192, 1, 4, seed=5)
    model = {"student.backbone." + k: v for k, v in student.items()}
    model.update({"teacher.backbone." + k: v for k, v in teacher.items()})
    for head in ("token_head", "patch_head", "fea_head"):
        model.update(
            {
                f"{head}.0.weight": torch.ones(128),
                f"{head}.0.bias": torch.zeros(128),
                f"{head}.1.weight": torch.randn(192, 128),
                f"{head}.1.bias": torch.randn(192),
            }
        )
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "scaler": {"scale": 65536.0},
        "model_ema": {k: v + 1.0 for k, v in student.items()},
        "args": argparse.Namespace(
            model="models_proteus_dinov2",
            target_model="vit_base",
            lr=5e-4,
            epochs=300,
            mask_probability=0.5,
            output_dir="/ckpt",
            resume="",
        ),
    }


@pytest.mark.parametrize("chunks", [0, 2], ids=["flat_blocks", "chunked_blocks"])
def test_load_backbone_reference_release_checkpoint(tmp_path, chunks):
    student = official_dinov2_sd(128, 4, 4, chunks=chunks, seed=3)
    if chunks:
        assert "blocks.1.3.ls2.gamma" in student and "blocks.0.1.norm1.weight" in student
    torch.save(reference_checkpoint(student), tmp_path / "checkpoint.pth")
    loaded = models.load_backbone(tmp_path / "checkpoint.pth")
    assert loaded.embed_dim == 128 and len(loaded.blocks) == 4 and loaded.blocks[0].attn.num_heads == 2
    assert loaded.num_register_tokens == 0 and loaded.patch_size == 14
    _assert_same_weights(loaded, dinov2_to_ours(student))  # student weights, not EMA nor teacher


@pytest.mark.parametrize("wrap", ["dinov2_training", "state_dict_ddp"])
def test_load_backbone_common_wrappers(tmp_path, wrap):
    """DINOv2's own training checkpoints ({"teacher": backbone + heads}) and DDP state_dict wrappers."""
    sd = official_dinov2_sd(64, 2, 2, seed=5)
    if wrap == "dinov2_training":
        teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.mlp.0.weight": torch.zeros(8, 64)}
        ckpt = {"teacher": teacher, "iteration": 10}
    else:
        ckpt = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "w.pth")
    loaded = models.load_backbone(tmp_path / "w.pth")
    assert loaded.embed_dim == 64 and len(loaded.blocks) == 2
    _assert_same_weights(loaded, dinov2_to_ours(sd))


def test_load_backbone_refuses_pickled_objects(tmp_path):
    _EXECUTED.clear()
    student = official_dinov2_sd(64, 1, 4)
    torch.save(
        {"model": {"student.backbone." + k: v for k, v in student.items()}, "args": _Payload()}, tmp_path / "evil.pth"
    )
    with pytest.raises(UsageError, match="evil.pth") as e:
        models.load_backbone(tmp_path / "evil.pth")
    assert not _EXECUTED  # nothing was unpickled
    assert "a pickle that imports tests.test_models._mark_executed: refused" in str(e.value)


def test_load_backbone_bad_files(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint\xff" * 50)
    with pytest.raises(UsageError, match="cannot read checkpoint") as e:
        models.load_backbone(tmp_path / "garbage.pth")
    assert "it is not a torch file (it starts with b'\\x00not a checkpoin" in str(e.value), str(e.value)
    assert "weights_only" not in str(e.value)
    torch.save(official_dinov2_sd(64, 1, 4), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated.pth"):
        models.load_backbone(tmp_path / "truncated.pth")
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, tmp_path / "nobackbone.pth")
    with pytest.raises(UsageError, match="no ViT backbone"):
        models.load_backbone(tmp_path / "nobackbone.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(UsageError, match="list"):
        models.load_backbone(tmp_path / "list.pth")
    with pytest.raises(MissingFile):
        models.load_backbone(tmp_path / "missing.pth")


_EXECUTED: list[str] = []


def _mark_executed():
    _EXECUTED.append("unpickled")
    return "pwned"


class _Payload:
    def __reduce__(self):
        return (_mark_executed, ())


# ================================================================================================
# 7. atomic_save
# ================================================================================================
def test_atomic_save_writes_file(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 4}
    path = tmp_path / "sub" / "dir" / "ckpt.pth"
    atomic_save(obj, path)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 4 and torch.equal(back["w"], obj["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_save_crash_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "ckpt.pth"
    atomic_save({"epoch": 1, "w": torch.ones(4)}, path)
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise exc("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(exc, match="disk full"):
        atomic_save({"epoch": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind


def one_teacher_per_family() -> list[str]:
    """The first registered teacher of each family."""
    return list({spec.family: name for name, spec in reversed(models.TEACHERS.items())}.values())


@pytest.mark.parametrize("reader", ["teacher", "adaptors"])
def test_every_reader_of_a_weight_file_refuses_code(reader, tiny_teacher, tmp_path, monkeypatch):
    """A pickle with code given as a teacher file (every family) or as adaptors.pth: one line, never run."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _System()}}, path)
    names = one_teacher_per_family() if reader == "teacher" else ["adaptors"]
    for name in names:
        with pytest.raises(UsageError, match="refused, code in a weight file is never run") as e:
            if reader == "teacher":
                tiny_teacher(name)
                models.create_teacher(name, path)
            else:
                models.load_adaptors(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert not (tmp_path / "never-run").exists()


def test_no_model_of_ours_is_registered_with_timm():
    """Our ViTs' forward_features returns DINOv2's dict, not timm's tensor, so timm's contract
    (forward_head(forward_features(x))) does not hold for them: none is in timm's registry."""
    import timm

    assert timm.list_models("proteus_*") == [] and timm.list_models("vit_small_dinov3") == []
    m = models.create_student("vit_tiny", drop_path_rate=0.1, img_size=112)
    assert isinstance(m, models.ViT) and m.embed_dim == 192 and m.pos_embed.shape == (1, 65, 192)
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


class _System:
    def __reduce__(self):
        return (os.system, ("touch never-run",))


def test_unreadable_weight_files_say_what_they_are(tmp_path):
    """Each kind of file that is not a weight file: what it is, in one line, never torch's weights_only advice."""
    import pickle

    (tmp_path / "random.pth").write_bytes(bytes(range(1, 200)))
    (tmp_path / "text.pth").write_text("101 not weights\n")
    with open(tmp_path / "legacy_code.pth", "wb") as f:
        pickle.dump({"x": _System()}, f)
    torch.save({"x": _System()}, tmp_path / "zip_code.pth")
    with open(tmp_path / "plain.pth", "wb") as f:
        pickle.dump({"x": 1}, f, protocol=2)
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), tmp_path / "archive.pt")
    torch.save({"w": torch.zeros(8)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    expected = {
        "random.pth": "it is not a torch file (it starts with b'\\x01\\x02",
        "text.pth": "it is not a torch file (it starts with b'101 not weights",
        "legacy_code.pth": f"it is a pickle that imports {os.system.__module__}.system: refused",
        "zip_code.pth": f"it is a pickle that imports {os.system.__module__}.system: refused",
        "plain.pth": "it is a plain Python pickle, not a torch checkpoint",
        "archive.pt": "it is a TorchScript archive (OpenAI CLIP's .pt format), which only the clip_* teachers and "
        "--clip-checkpoint read (its tensors, as data; its code is never run)",
        "truncated.pth": "it is a truncated or damaged torch checkpoint",
    }
    for name, message in expected.items():
        with pytest.raises(UsageError) as e:
            models.safe_load(tmp_path / name)
        text = str(e.value)
        assert text.startswith(f"cannot read checkpoint {tmp_path / name}: {message}"), text
        assert "weights_only" not in text and "\n" not in text
    assert not (tmp_path / "never-run").exists() and not os.path.exists("never-run")
