"""The ViT configurations of the project (one table), what a layout is, and building a ViT from a
configuration or from the shapes of its weights. Each family's layout lives in its module (models.families)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

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

    def build(self, layout: Layout, **kwargs) -> nn.Module:
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


def timm_vit(
    embed_dim: int,
    depth: int,
    num_heads: int,
    *,
    mlp_hidden: int,
    swiglu: bool = False,
    patch_size: int,
    img_size: int = 224,
    num_register_tokens: int = 0,
    **kwargs,
) -> ViT:
    """Our timm-based ViT (models.vision_transformer.ViT) of this shape: the builder of most layouts."""
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
        **kwargs,
    )


@dataclass(frozen=True)
class Layout:
    """A family's ViT architecture, and how the reference built and initialised its student in it
    (PROTOCOLS A, "The student's layout"). Each family module (models.families) defines its own.

    `builder` makes the network (`timm_vit`, or the family's own class); `vit_kwargs` are its options;
    the rest is init that differs from the class's own (timm's: trunc normal 0.02 Linears with zero bias,
    pos_embed trunc normal 0.02, cls_token N(0, 1e-6), zero mask token).
    """

    vit_kwargs: dict = field(default_factory=dict)
    patch_size: int = 14
    builder: Callable[..., nn.Module] = timm_vit
    mask_token_std: float = 0.0  # > 0: the mask token is drawn N(0, std) (SynCLR's iBOT MaskedTransformer)
    xavier_qkv: bool = False  # CLIP blocks are nn.MultiheadAttention: in_proj_weight xavier-uniform, not a Linear
    no_weight_decay: tuple[str, ...] = ()  # our names of weights that are 1-d in the reference (never decayed)

    def init_student(self, model: nn.Module) -> nn.Module:
        """The reference's init where it differs from the class's own."""
        with torch.no_grad():
            if self.mask_token_std:
                nn.init.normal_(model.mask_token, std=self.mask_token_std)
            if self.xavier_qkv:
                for blk in model.blocks:
                    nn.init.xavier_uniform_(blk.attn.qkv.weight)
        return model


# positional past three: the layout, then the ViT's shape as VIT_CONFIGS holds it (tests/test_layers.py)
def build_vit(
    layout: Layout,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_hidden: int,
    swiglu: bool = False,
    *,
    patch_size: int | None = None,
    img_size: int = 224,
    num_register_tokens: int = 0,
    **kwargs,
) -> nn.Module:
    """The one constructor of our ViTs: this shape in `layout`'s architecture (patch size: the layout's),
    initialised as its class does; `kwargs` are further options of the class (they win over the layout's)."""
    return layout.builder(
        embed_dim,
        depth,
        num_heads,
        mlp_hidden=mlp_hidden,
        swiglu=swiglu,
        patch_size=patch_size or layout.patch_size,
        img_size=img_size,
        num_register_tokens=num_register_tokens,
        **{**layout.vit_kwargs, **kwargs},
    )


def heads_for(dim: int) -> int:
    """The number of heads of a width: the table's, else 64-dim heads (at least one)."""
    return next((c.num_heads for c in VIT_CONFIGS.values() if c.embed_dim == dim), max(1, dim // HEAD_DIM))


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def depth_of(state_dict: dict[str, torch.Tensor]) -> int:
    """The number of blocks of a ViT state dict (blocks.<i>.* keys)."""
    blocks = [int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))]
    if not blocks:
        raise UsageError("not a ViT backbone state dict: it has no blocks.<i>.* keys")
    return 1 + max(blocks)


def timm_vit_from_state_dict(
    layout: Layout, state_dict: dict[str, torch.Tensor], img_size: int | None = None, **kwargs
) -> ViT:
    """An empty ViT (`timm_vit`) in `layout` whose shape matches a state dict in our (timm) key names.

    img_size defaults to the position table's grid x patch size.
    """
    try:
        dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        num_pos = state_dict["pos_embed"].shape[1] - 1
        fc1, fc2 = state_dict["blocks.0.mlp.fc1.weight"], state_dict["blocks.0.mlp.fc2.weight"]
    except KeyError as e:
        raise UsageError(f"not a ViT backbone state dict: key {e} is missing") from None
    grid = int(round(num_pos**0.5))
    hidden = fc2.shape[1]
    return build_vit(
        layout,
        dim,
        depth_of(state_dict),
        heads_for(dim),
        hidden,
        swiglu=fc1.shape[0] == 2 * hidden,  # timm's packed SwiGLU: fc1 holds w1 and w2
        patch_size=patch_size,
        img_size=img_size or grid * patch_size,
        num_register_tokens=state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0,
        **kwargs,
    )
