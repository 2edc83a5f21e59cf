"""The ViT configurations of the project (one table), the student layouts, and building a ViT from a
configuration or from the shapes of its weights."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dinov3
from .dinov3 import DinoV3ViT
from .errors import UsageError
from .vision_transformer import ViT


def ffn_hidden(dim: int, ratio: float, swiglu_align: int = 0) -> int:
    """The FFN's hidden width, as DINOv2's and DINOv3's code: int(dim * ratio) for an MLP; a SwiGLU takes
    2/3 of it rounded up to a multiple of `swiglu_align` (8: DINOv2's ViT-g, DINOv3's "plus"; 64: the 7B)."""
    hidden = int(dim * ratio)
    if not swiglu_align:
        return hidden
    d = int(hidden * 2 / 3)
    return d + (-d % swiglu_align)


@dataclass(frozen=True)
class ViTConfig:
    """A ViT's width, depth, heads and FFN: what students, teachers and vit_from_state_dict build from."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn_ratio: float = 4.0
    swiglu_align: int = 0  # > 0: a SwiGLU FFN (w1, w2, w3) whose width ffn_hidden rounds up to this

    @property
    def swiglu(self) -> bool:
        return self.swiglu_align > 0

    @property
    def mlp_hidden(self) -> int:
        return ffn_hidden(self.embed_dim, self.ffn_ratio, self.swiglu_align)

    def build(self, layout: str, **kwargs) -> ViT | DinoV3ViT:
        return build_vit(layout, self.embed_dim, self.depth, self.num_heads, self.mlp_hidden, self.swiglu, **kwargs)


# Every ViT size of the project: the students' (PROTOCOLS A, "Student") and the released teachers'
# (DINOv2 PROTOCOLS A; DINOv3 PROTOCOLS G). 64-dim heads except the 7B's 128.
VIT_CONFIGS: dict[str, ViTConfig] = {
    "tiny": ViTConfig(192, 12, 3),
    "small": ViTConfig(384, 12, 6),
    "small_plus": ViTConfig(384, 12, 6, ffn_ratio=6.0, swiglu_align=8),
    "base": ViTConfig(768, 12, 12),
    "large": ViTConfig(1024, 24, 16),
    "large_plus": ViTConfig(1024, 24, 16, ffn_ratio=6.0, swiglu_align=8),
    "huge_plus": ViTConfig(1280, 32, 20, ffn_ratio=6.0, swiglu_align=8),
    "giant": ViTConfig(1536, 40, 24, swiglu_align=8),  # DINOv2's ViT-g: SwiGLU 4096 wide
    "7b": ViTConfig(4096, 40, 32, ffn_ratio=3.0, swiglu_align=64),
}
STUDENT_ARCHS: dict[str, ViTConfig] = {f"vit_{s}": VIT_CONFIGS[s] for s in ("tiny", "small", "base", "large")}
HEAD_DIM = 64  # the heads of a width the table does not hold (narrow test models: one head)

# OpenAI CLIP's ViT in our class: ln_pre (which also drops the patch-embedding bias), QuickGELU, eps 1e-5.
CLIP_VIT = dict(pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5)


@dataclass(frozen=True)
class Layout:
    """How the reference built the student for one teacher family (PROTOCOLS A, "The student's layout"),
    and the architecture of that family's ViTs.

    `vit_kwargs` are ViT options; the rest is init that differs from timm's (trunc normal 0.02
    Linears with zero bias, pos_embed trunc normal 0.02, cls_token N(0, 1e-6), zero mask token).
    """

    vit_kwargs: dict = field(default_factory=dict)
    patch_size: int = 14
    mask_token_std: float = 0.0  # > 0: the mask token is drawn N(0, std) (SynCLR's iBOT MaskedTransformer)
    xavier_qkv: bool = False  # CLIP blocks are nn.MultiheadAttention: in_proj_weight xavier-uniform, not a Linear
    no_weight_decay: tuple[str, ...] = ()  # our names of weights that are 1-d in the reference (never decayed)


LAYOUTS: dict[str, Layout] = {
    "dinov2": Layout(dict(init_values=1.0)),
    "clip": Layout(
        dict(init_values=None, norm_patch_tokens=False, **CLIP_VIT), xavier_qkv=True, no_weight_decay=("cls_token",)
    ),
    "synclr": Layout(dict(init_values=None), mask_token_std=0.02),
    "dinov3": Layout(patch_size=16),  # its own class, models.dinov3.DinoV3ViT, initialised as FAIR's init_weights
}
DINOV3_SUFFIX = "_dinov3"  # vit_small_dinov3 = vit_small in the dinov3 layout


def build_vit(
    layout: str,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_hidden: int,
    swiglu: bool = False,
    patch_size: int | None = None,
    img_size: int = 224,
    num_register_tokens: int = 0,
    **kwargs,
) -> ViT | DinoV3ViT:
    """The one constructor of our ViTs: this shape in `layout`'s architecture (patch size: the layout's),
    initialised as its class does; `kwargs` are further options of the class (they win over the layout's)."""
    spec = LAYOUTS[layout]
    patch_size = patch_size or spec.patch_size
    if layout == "dinov3":
        return DinoV3ViT(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_hidden=mlp_hidden,
            swiglu=swiglu,
            patch_size=patch_size,
            img_size=img_size,
            **kwargs,
        )
    packed = 2 * mlp_hidden if swiglu else mlp_hidden  # timm's SwiGLUPacked: fc1 holds w1 and w2
    return ViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=(packed + 0.5) / embed_dim,  # int(dim * ratio) gives back exactly `packed`
        num_register_tokens=num_register_tokens,
        swiglu=swiglu,
        **{**spec.vit_kwargs, **kwargs},
    )


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
            raise UsageError(f"student '{name}' is in the dinov3 layout, not {layout}")
        name, layout = name[: -len(DINOV3_SUFFIX)], "dinov3"
    layout = layout or "dinov2"
    if name not in STUDENT_ARCHS:
        choices = [*STUDENT_ARCHS, *(n + DINOV3_SUFFIX for n in STUDENT_ARCHS)]
        raise UsageError(f"unknown student '{name}'; choose from {', '.join(choices)}")
    if layout not in LAYOUTS:
        raise UsageError(f"unknown student layout '{layout}'; choose from {', '.join(LAYOUTS)}")
    model = STUDENT_ARCHS[name].build(layout, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate)
    spec = LAYOUTS[layout]
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


def heads_for(dim: int) -> int:
    """The number of heads of a width: the table's, else 64-dim heads (at least one)."""
    return next((c.num_heads for c in VIT_CONFIGS.values() if c.embed_dim == dim), max(1, dim // HEAD_DIM))


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def vit_from_state_dict(state_dict: dict[str, torch.Tensor], img_size: int | None = None, **kwargs) -> ViT | DinoV3ViT:
    """Build an empty ViT whose shape and layout match a state dict in our (timm) key names, or a
    DINOv3 one in ours or FAIR's.

    img_size defaults to the position table's grid x patch size (DINOv3's RoPE has no table: any size).
    """
    if dinov3.is_dinov3(state_dict):
        official = state_dict if dinov3.is_official(state_dict) else dinov3.to_official(state_dict)
        return _dinov3_from_state_dict(official, **kwargs)
    try:
        dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        num_pos = state_dict["pos_embed"].shape[1] - 1
        fc1, fc2 = state_dict["blocks.0.mlp.fc1.weight"], state_dict["blocks.0.mlp.fc2.weight"]
    except KeyError as e:
        raise UsageError(f"not a ViT backbone state dict: key {e} is missing") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k)))
    grid = int(round(num_pos**0.5))
    hidden = fc2.shape[1]
    return build_vit(
        layout_of(state_dict),
        dim,
        depth,
        heads_for(dim),
        hidden,
        swiglu=fc1.shape[0] == 2 * hidden,  # timm's packed SwiGLU: fc1 holds w1 and w2
        patch_size=patch_size,
        img_size=img_size or grid * patch_size,
        num_register_tokens=state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0,
        **kwargs,
    )


def _dinov3_from_state_dict(state_dict: dict[str, torch.Tensor], **kwargs) -> DinoV3ViT:
    """An empty DinoV3ViT whose shape matches an official-layout state dict (heads from the RoPE periods)."""
    try:
        dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        head_dim = 4 * state_dict["rope_embed.periods"].numel()
    except KeyError as e:
        raise UsageError(f"not a DINOv3 backbone state dict: key {e} is missing") from None
    blocks = [int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))]
    if not blocks:
        raise UsageError("not a DINOv3 backbone state dict: it has no blocks.<i>.* keys")
    swiglu = "blocks.0.mlp.w1.weight" in state_dict
    fc1 = state_dict.get("blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise UsageError("not a DINOv3 backbone state dict: blocks.0 has no mlp.fc1 or mlp.w1 weight")
    return build_vit(
        "dinov3",
        dim,
        1 + max(blocks),
        max(1, dim // head_dim),
        fc1.shape[0],
        swiglu=swiglu,
        patch_size=patch_size,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        local_cls_norm="local_cls_norm.weight" in state_dict,
        **kwargs,
    )
