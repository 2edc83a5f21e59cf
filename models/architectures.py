"""Student architectures and layouts, and inferring a ViT's shape and layout from its weights."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from timm.models import register_model
from torch import nn

from . import dinov3
from .dinov3 import DinoV3ViT
from .vision_transformer import ViT

# name -> (embed_dim, depth, num_heads); PROTOCOLS A, "Student".
STUDENT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
# Every released DINOv2-style ViT uses 64-dim heads; the giant's SwiGLU hidden width is 4096.
HEAD_DIM = 64
SWIGLU_HIDDEN = {1536: 4096}

# OpenAI CLIP's ViT in our class: ln_pre (which also drops the patch-embedding bias), QuickGELU, eps 1e-5.
CLIP_VIT = dict(pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5)


@dataclass(frozen=True)
class Layout:
    """How the reference built the student for one teacher family (PROTOCOLS A, "The student's layout").

    `vit_kwargs` are ViT options; the rest is init that differs from timm's (trunc normal 0.02
    Linears with zero bias, pos_embed trunc normal 0.02, cls_token N(0, 1e-6), zero mask token).
    """

    vit_kwargs: dict = field(default_factory=dict)
    mask_token_std: float = 0.0  # > 0: the mask token is drawn N(0, std) (SynCLR's iBOT MaskedTransformer)
    xavier_qkv: bool = False  # CLIP blocks are nn.MultiheadAttention: in_proj_weight xavier-uniform, not a Linear
    no_weight_decay: tuple[str, ...] = ()  # our names of weights that are 1-d in the reference (never decayed)


LAYOUTS: dict[str, Layout] = {
    "dinov2": Layout(dict(init_values=1.0)),
    "clip": Layout(
        dict(init_values=None, norm_patch_tokens=False, **CLIP_VIT), xavier_qkv=True, no_weight_decay=("cls_token",)
    ),
    "synclr": Layout(dict(init_values=None), mask_token_std=0.02),
    "dinov3": Layout(),  # its own class, models.dinov3.DinoV3ViT, initialised as FAIR's init_weights
}
DINOV3_SUFFIX = "_dinov3"  # vit_small_dinov3 = vit_small in the dinov3 layout


def create_student(
    name: str,
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    layout: str | None = None,
) -> ViT | DinoV3ViT:
    """A randomly initialised student (no registers) in a reference layout, initialised as the reference.

    dinov2 (default): LayerScale 1.0. clip: CLIP's ViT (conv1 without bias, ln_pre, QuickGELU, eps
    1e-5, no LayerScale, ln_post on the CLS only). synclr: timm's ViT without LayerScale. These have
    patch 14 by default. dinov3: the released DINOv3 ViT-S/16 arguments at this size (patch 16, axial
    RoPE, 4 storage tokens, LayerScale 1e-5, LayerNorm eps 1e-5, masked k bias, MLP x4); a name with
    the suffix `_dinov3` (`vit_small_dinov3`) selects it.
    """
    if name.endswith(DINOV3_SUFFIX) and name[: -len(DINOV3_SUFFIX)] in STUDENT_ARCHS:
        if layout not in (None, "dinov3"):
            raise ValueError(f"student '{name}' is in the dinov3 layout, not {layout}")
        name, layout = name[: -len(DINOV3_SUFFIX)], "dinov3"
    layout = layout or "dinov2"
    if name not in STUDENT_ARCHS:
        choices = [*STUDENT_ARCHS, *(n + DINOV3_SUFFIX for n in STUDENT_ARCHS)]
        raise ValueError(f"unknown student '{name}'; choose from {', '.join(choices)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown student layout '{layout}'; choose from {', '.join(LAYOUTS)}")
    dim, depth, heads = STUDENT_ARCHS[name]
    if layout == "dinov3":
        return DinoV3ViT(
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_hidden=dinov3.ffn_hidden(dim, 4.0),
            patch_size=patch_size or 16,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
        )
    spec = LAYOUTS[layout]
    model = ViT(
        img_size=img_size,
        patch_size=patch_size or 14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        drop_path_rate=drop_path_rate,
        **spec.vit_kwargs,
    )
    with torch.no_grad():
        if spec.mask_token_std:
            nn.init.normal_(model.mask_token, std=spec.mask_token_std)
        if spec.xavier_qkv:
            for blk in model.blocks:
                nn.init.xavier_uniform_(blk.attn.qkv.weight)
    return model


def layout_of(state_dict: dict[str, torch.Tensor]) -> str:
    """The layout of a ViT state dict in our key names: RoPE periods only in DINOv3, ln_pre only in CLIP,
    LayerScale only in DINOv2."""
    if dinov3.is_dinov3(state_dict):
        return "dinov3"
    if "norm_pre.weight" in state_dict:
        return "clip"
    if any(k.endswith(".ls1.gamma") for k in state_dict):
        return "dinov2"
    return "synclr"


def student_name_for_dim(dim: int) -> str | None:
    return next((n for n, (d, _, _) in STUDENT_ARCHS.items() if d == dim), None)


def vit_from_state_dict(state_dict: dict[str, torch.Tensor], img_size: int | None = None, **kwargs) -> ViT | DinoV3ViT:
    """Build an empty ViT whose shape and layout match a state dict in our (timm) key names, or a
    DINOv3 one in ours or FAIR's.

    img_size defaults to the position table's grid x patch size (DINOv3's RoPE has no table: any size)."""
    if dinov3.is_dinov3(state_dict):
        official = state_dict if dinov3.is_official(state_dict) else dinov3.to_official(state_dict)
        return dinov3.from_state_dict_shapes(official, **kwargs)
    try:
        dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        num_pos = state_dict["pos_embed"].shape[1] - 1
    except KeyError as e:
        raise ValueError(f"not a ViT backbone state dict: key {e} is missing") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = int(round(num_pos**0.5))
    num_reg = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    swiglu = dim in SWIGLU_HIDDEN and state_dict["blocks.0.mlp.fc1.weight"].shape[0] == 2 * SWIGLU_HIDDEN[dim]
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return ViT(
        img_size=img_size or grid * patch_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=max(1, dim // HEAD_DIM),  # narrower test models: one head
        mlp_ratio=(hidden + 0.5) / dim,  # int(dim * ratio) must give back exactly `hidden`
        num_register_tokens=num_reg,
        interpolate_offset=0.0 if num_reg else 0.1,
        interpolate_antialias=bool(num_reg),
        swiglu=swiglu,
        **LAYOUTS[layout_of(state_dict)].vit_kwargs,
        **kwargs,
    )


def _register_with_timm(name: str) -> None:
    """`timm.create_model("proteus_vit_small", drop_path_rate=0.1)` builds our student."""

    def build(pretrained: bool = False, **kwargs) -> ViT | DinoV3ViT:
        if pretrained:
            raise ValueError("Proteus students have no hub weights: use models.load_backbone(path)")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return create_student(name, **kwargs)

    build.__name__ = build.__qualname__ = f"proteus_{name}"
    register_model(build)


for _name in STUDENT_ARCHS:
    _register_with_timm(_name)
    _register_with_timm(_name + DINOV3_SUFFIX)
