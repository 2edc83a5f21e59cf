"""DINOv3 (facebookresearch/dinov3): ViT-S/S+/B/L/H+/7B with patch 16, and the satellite ViT-L and 7B.

Its network is our DinoV3ViT (models.dinov3: timm's Eva with DINOv3's RoPE, 4 storage tokens and
masked k bias). Its files are FAIR's flat DinoVisionTransformer state dicts; they are checked key by key
in FAIR's names and loaded into a network built on the meta device (no second copy of a 7B). The
DINOv3-layout student is a released ViT-S/16's arguments at the student's size, selected by a student
name's `_dinov3` suffix.
"""

from __future__ import annotations

import os

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .. import dinov3
from ..architectures import VIT_CONFIGS, Layout, build_vit, depth_of
from ..checkpoints import StateDict, check_keys, load_strict, safe_load
from ..dinov3 import DinoV3ViT
from ..errors import UsageError
from .base import (
    ROPE_KEYS,
    Family,
    TeacherSpec,
    TimmArchitecture,
    has_any,
    size_name,
    timm_name,
    vit_model_args,
    without,
)

URL = "https://dl.fbaipublicfiles.com/dinov3/dinov3_{arch}/dinov3_{arch}_pretrain_{weights}-{hash}.pth"
LICENCE = (
    "Distilled from DINOv3 weights, which are released under the DINOv3 License "
    "(https://ai.meta.com/resources/models-and-libraries/dinov3-license/): this model is a derivative, the DINOv3 "
    "License agreement must travel with it when you share it, and publications using it should acknowledge DINOv3 "
    "(Siméoni et al., 2025, arXiv:2508.10104)."
)
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3's SAT-493M weights
STUDENT_SUFFIX = "_dinov3"  # vit_small_dinov3 = vit_small in the dinov3 layout


def build_dinov3(
    embed_dim: int,
    depth: int,
    num_heads: int,
    *,
    mlp_hidden: int,
    swiglu: bool = False,
    patch_size: int,
    img_size: int = 224,
    num_register_tokens: int = 0,  # DINOv3 has its 4 storage tokens, never DINOv2's registers
    **kwargs,
) -> DinoV3ViT:
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


LAYOUT = Layout(patch_size=16, builder=build_dinov3)  # initialised as FAIR's init_weights (DinoV3ViT's own)
_7B = dict(qkv_bias=False, local_cls_norm=True)


def _teacher(arch: str, hash: str, size: str, *, sat: bool = False, **vit_kwargs) -> TeacherSpec:
    weights = "sat493m" if sat else "lvd1689m"
    url = URL.format(arch=arch, weights=weights, hash=hash)
    mean, std = (SAT_MEAN, SAT_STD) if sat else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return TeacherSpec("dinov3", LAYOUT, VIT_CONFIGS[size], 16, 224, url, mean=mean, std=std, vit_kwargs=vit_kwargs)


def load_dinov3(model: DinoV3ViT, state_dict: StateDict, source: str) -> None:
    """Load a state dict in FAIR's DINOv3 layout strictly: every key is checked in FAIR's names (the
    bias_mask buffers and the RoPE periods included), then converted and loaded."""
    check_keys(dinov3.to_official(model.state_dict()), state_dict, source)
    try:
        ours = dinov3.from_official(state_dict, model)
    except ValueError as e:
        raise UsageError(f"weights in {source}: {e}") from None
    load_strict(model, ours, source)


def read_official(path: str | os.PathLike) -> StateDict:
    """An official DINOv3 file: the flat state dict of FAIR's DinoVisionTransformer, as released."""
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
    if not dinov3.is_official(raw):
        keys = ", ".join(sorted(map(str, raw))[:4])
        what = "a DINOv2-style ViT (pos_embed, no RoPE)" if "pos_embed" in raw else f"keys {keys}, ..."
        raise UsageError(
            f"{path} is not an official DINOv3 checkpoint (no storage_tokens or rope_embed.periods; it holds {what})"
        )
    return raw


def _filled(model: DinoV3ViT, state_dict: StateDict, source: str, *, dtype: torch.dtype | None = None) -> DinoV3ViT:
    """A network built on the meta device, made real and filled in place from an official state dict."""
    model = (model.to(dtype) if dtype else model).to_empty(device="cpu")
    model.init_non_persistent_buffers()
    load_dinov3(model, state_dict, source)
    return model


class DinoV3(Family):
    name = "dinov3"
    title = "DINOv3"
    layout = LAYOUT
    student_suffix = STUDENT_SUFFIX
    position_table = False  # RoPE
    eval_only = ("rope",)  # its coordinate rescaling: FAIR evaluates without it
    licence = LICENCE
    pretraining_only = ("local_cls_norm",)  # the 7B's and the satellite ViT-L's: local crops' CLS in training
    # FAIR's pretraining builds its student with the same drop-path rate in every block
    # (dinov3/models/vision_transformer.py, DinoVisionTransformer.__init__); its dense evaluations freeze the
    # backbone, so fine-tuning here keeps the linear ramp of every other layout
    pretraining_drop_path_uniform = True
    teachers = {
        "dinov3_vits16": _teacher("vits16", "08c60483", "small"),
        "dinov3_vits16plus": _teacher("vits16plus", "4057cbaa", "small_plus"),
        "dinov3_vitb16": _teacher("vitb16", "73cec8be", "base"),
        "dinov3_vitl16": _teacher("vitl16", "8aa4cbdd", "large"),
        "dinov3_vitl16plus": _teacher("vitl16plus", "46503df0", "large_plus"),
        "dinov3_vith16plus": _teacher("vith16plus", "7c1da9a5", "huge_plus"),
        "dinov3_vit7b16": _teacher("vit7b16", "a955f4ea", "7b", **_7B),
        "dinov3_vitl16_sat": _teacher("vitl16", "eadcf0ff", "large", sat=True, local_cls_norm=True),
        "dinov3_vit7b16_sat": _teacher("vit7b16", "a6675841", "7b", sat=True, **_7B),
    }

    def owns(self, state_dict) -> bool:
        return has_any(state_dict, ROPE_KEYS)

    def from_official(self, state_dict: StateDict) -> StateDict:
        """Ours is FAIR's names for this family: the network's own converter needs the model (timm's filter)."""
        return state_dict if dinov3.is_official(state_dict) else dinov3.to_official(state_dict)

    def to_official(self, model) -> StateDict:
        return {k: v.detach().clone().cpu() for k, v in dinov3.to_official(model.state_dict()).items()}

    def load_teacher(self, spec: TeacherSpec, path, *, name: str, dtype: torch.dtype) -> nn.Module:
        if path is None:
            return spec.build().to(dtype)
        sd = read_official(path)
        with torch.device("meta"):
            model = spec.build()
        return _filled(model, sd, f"{path} (teacher {name})", dtype=dtype)

    def empty_backbone(self, state_dict: StateDict, img_size: int | None = None, **kwargs) -> DinoV3ViT:
        """Any size (RoPE has no position table); heads from the RoPE periods."""
        sd = self.from_official(state_dict)
        try:
            dim = sd["cls_token"].shape[-1]
            patch_size = sd["patch_embed.proj.weight"].shape[-1]
            head_dim = 4 * sd["rope_embed.periods"].numel()
        except KeyError as e:
            raise UsageError(f"not a DINOv3 backbone state dict: key {e} is missing") from None
        swiglu = "blocks.0.mlp.w1.weight" in sd
        fc1 = sd.get("blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight")
        if fc1 is None:
            raise UsageError("not a DINOv3 backbone state dict: blocks.0 has no mlp.fc1 or mlp.w1 weight")
        try:
            depth = depth_of(sd)
        except UsageError:
            raise UsageError("not a DINOv3 backbone state dict: it has no blocks.<i>.* keys") from None
        return build_vit(
            LAYOUT,
            dim,
            depth,
            max(1, dim // head_dim),
            fc1.shape[0],
            swiglu=swiglu,
            patch_size=patch_size,
            img_size=img_size or 224,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            local_cls_norm="local_cls_norm.weight" in sd,
            **kwargs,
        )

    def load_backbone(self, state_dict: StateDict, source: str, *, trained: dict, **kwargs) -> DinoV3ViT:
        sd = self.from_official(state_dict)
        with torch.device("meta"):  # the size it records it was trained at: what a timm export says of it
            model = self.empty_backbone(sd, img_size=trained.get("img_size"), **kwargs)
        return _filled(model, sd, source)

    def timm_architecture(self, model, *, img_size: int) -> TimmArchitecture:
        """timm's DINOv3 Eva (`vit_<size>_patch16_dinov3`; another size, the q/v biases and a SwiGLU through its
        arguments), its CLS as the pooled feature (timm's default pools the mean)."""
        name = timm_name(f"vit_{size_name(model) or 'small'}_patch16_dinov3", "vit_small_patch16_dinov3")
        swiglu = dict(swiglu_mlp=True, swiglu_align_to=1) if hasattr(model.blocks[0].mlp, "fc1_g") else {}
        qkv_bias = model.blocks[0].attn.q_bias is not None
        return TimmArchitecture(name, vit_model_args(model, img_size=img_size, qkv_bias=qkv_bias, **swiglu))

    def to_timm(self, model) -> StateDict:
        """Our keys are timm's Eva's, less what timm's converter drops from FAIR's files: the mask token, the
        RoPE periods (timm computes them) and `local_cls_norm` (pretraining's)."""
        if not torch.equal(model.rope.periods.float().cpu(), model.rope._compute_periods()):
            raise UsageError(
                "its RoPE periods are not the formula's (a released DINOv3 file stores them rounded), which timm's "
                "DINOv3 computes: timm cannot give its outputs"
            )
        return without(model.state_dict(), "mask_token", "rope.", "local_cls_norm.")

    def from_timm(self, state_dict: StateDict, model_args: dict) -> StateDict:
        """timm's Eva weights -> ours: a zero mask token (as a new network has) and the formula's RoPE periods."""
        dim = state_dict["cls_token"].shape[-1]
        rope = dinov3.Rope(dim // int(model_args["num_heads"]), temperature=dinov3.ROPE_BASE, rotate_half=True)
        return {**state_dict, "mask_token": torch.zeros(1, dim), "rope.periods": rope.periods}


FAMILY = DinoV3()
