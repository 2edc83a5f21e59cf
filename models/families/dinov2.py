"""DINOv2 (facebookresearch/dinov2): ViT-S/B/L/g with patch 14, with and without 4 registers.

Its official DinoVisionTransformer names a ViT as timm does, except a chunked checkpoint's
`blocks.<chunk>.<i>.` and ViT-g's SwiGLU `mlp.w12`/`mlp.w3` (timm's packed fc1/fc2). The reference's
default student layout: LayerScale 1.0, patch 14.
"""

from __future__ import annotations

import re

import torch

from ..architectures import VIT_CONFIGS, Layout
from ..checkpoints import StateDict, swap
from .base import (
    BLOCK,
    CLIP_KEYS,
    ROPE_KEYS,
    Family,
    TeacherSpec,
    TimmArchitecture,
    has_any,
    has_layerscale,
    our_shape,
    size_name,
    table_resolution,
    timm_name,
    vit_model_args,
    with_export_metadata,
    without,
)

URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
SWIGLU = (("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3."))  # (ours, DINOv2's) for ViT-g's SwiGLU FFN
CHUNK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # block_chunks > 0: blocks.<chunk>.<i>.
LAYOUT = Layout(dict(init_values=1.0))


def _teacher(size: str, reg: bool) -> TeacherSpec:
    arch = f"dinov2_vit{size[0]}14"
    url = URL.format(arch=arch, reg="_reg4" if reg else "")
    return TeacherSpec("dinov2", LAYOUT, VIT_CONFIGS[size], 14, 518, url, 4 if reg else 0)


class DinoV2(Family):
    name = "dinov2"
    title = "DINOv2"
    in_reference = True
    layout = LAYOUT
    teacher_optional = ()  # its files hold the mask token
    teachers = {
        f"dinov2_vit{size[0]}14{'_reg' if reg else ''}": _teacher(size, reg)
        for size in ("small", "base", "large", "giant")
        for reg in (False, True)
    }

    def owns(self, state_dict) -> bool:
        return has_layerscale(state_dict) and not has_any(state_dict, ROPE_KEYS + CLIP_KEYS)

    def from_official(self, state_dict: StateDict) -> StateDict:
        out = {}
        for k, v in state_dict.items():
            k = CHUNK.sub(r"blocks.\1.", k)
            if m := BLOCK.match(k):
                k = m.group(0) + swap(k[m.end() :], SWIGLU, reverse=True)
            out[k] = our_shape(k, v)
        return out

    def to_official(self, model) -> StateDict:
        swiglu = model.blocks[0].mlp.__class__.__name__ == "GluMlp"
        out = {}
        for k, v in model.state_dict().items():
            if swiglu and (m := BLOCK.match(k)):
                k = m.group(0) + swap(k[m.end() :], SWIGLU, reverse=False)
            out[k] = v.detach().clone().cpu()
        return with_export_metadata(model, out)

    def timm_architecture(self, model, *, img_size: int) -> TimmArchitecture:
        """timm's DINOv2 ViT (`vit_<size>_patch14[_reg4]_dinov2`; another size or patch through its arguments),
        at its position table's resolution; registers as timm's, outside the table (no_embed_class)."""
        size, reg = size_name(model) or "small", model.num_register_tokens
        name = timm_name(f"vit_{size}_patch14{'_reg4' if reg == 4 else ''}_dinov2", "vit_small_patch14_dinov2")
        extra = dict(reg_tokens=reg, no_embed_class=True) if reg else {}
        if model.blocks[0].mlp.__class__.__name__ == "GluMlp":  # the giant's SwiGLU: only its name builds one
            name = "vit_giant_patch14_dinov2"
        return TimmArchitecture(name, vit_model_args(model, img_size=table_resolution(model), **extra))

    def to_timm(self, model) -> StateDict:
        """Our keys are timm's; registers as timm's converter writes them (the CLS carries its position, the
        table only the patches')."""
        sd = without(model.state_dict(), "mask_token")
        if model.num_register_tokens:
            sd["reg_token"] = sd.pop("register_tokens")
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
            sd["pos_embed"] = sd["pos_embed"][:, 1:]
        return sd

    def from_timm(self, state_dict: StateDict, model_args: dict) -> StateDict:
        sd = dict(state_dict)
        if "reg_token" in sd:  # the CLS's position lives in its token: a zero entry for it in our table
            sd["register_tokens"] = sd.pop("reg_token")
            sd["pos_embed"] = torch.cat((torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]), dim=1)
        return sd


FAMILY = DinoV2()
