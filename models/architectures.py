"""Student architectures and inferring a ViT's shape from its weights."""

from __future__ import annotations

import re

import torch
from timm.models import register_model

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


def create_student(name: str, img_size: int = 224, patch_size: int = 14, drop_path_rate: float = 0.0) -> ViT:
    """A randomly initialised student in the DINOv2 layout (LayerScale 1.0, no registers)."""
    if name not in STUDENT_ARCHS:
        raise ValueError(f"unknown student '{name}'; choose from {', '.join(STUDENT_ARCHS)}")
    dim, depth, heads = STUDENT_ARCHS[name]
    return ViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        init_values=1.0,
        drop_path_rate=drop_path_rate,
    )


def student_name_for_dim(dim: int) -> str | None:
    return next((n for n, (d, _, _) in STUDENT_ARCHS.items() if d == dim), None)


def vit_from_state_dict(state_dict: dict[str, torch.Tensor], **kwargs) -> ViT:
    """Build an empty ViT whose shape matches a state dict in our (timm-named) layout."""
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
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=dim,
        depth=depth,
        num_heads=max(1, dim // HEAD_DIM),  # narrower test models: one head
        mlp_ratio=(hidden + 0.5) / dim,  # int(dim * ratio) must give back exactly `hidden`
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        num_register_tokens=num_reg,
        interpolate_offset=0.0 if num_reg else 0.1,
        interpolate_antialias=bool(num_reg),
        swiglu=swiglu,
        pre_norm="norm_pre.weight" in state_dict,
        **kwargs,
    )


def _register_with_timm(name: str) -> None:
    """`timm.create_model("proteus_vit_small", drop_path_rate=0.1)` builds our student."""

    def build(pretrained: bool = False, **kwargs) -> ViT:
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
