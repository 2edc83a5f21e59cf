"""Frozen teachers (DINOv2, DINOv3, OpenAI CLIP, SynCLR) loaded strictly from their official files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from . import dinov3
from .architectures import CLIP_VIT
from .checkpoints import from_reference, is_torchscript_archive, load_dinov3, load_strict, safe_load, strip_prefix
from .dinov3 import DinoV3ViT
from .vision_transformer import ViT

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_CLIP_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
_SYNCLR_URL = "https://www.dropbox.com/scl/fi/{key}?dl=1"
_DINOV3_URL = "https://dl.fbaipublicfiles.com/dinov3/dinov3_{arch}/dinov3_{arch}_pretrain_{weights}-{hash}.pth"
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3's SAT-493M weights
BF16_ABOVE = 1e9  # teachers with more parameters are built in bf16 by default


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's architecture, file and normalisation. DINOv3's FFN (ffn_ratio, swiglu_align),
    qkv_bias and local_cls_norm are in `vit_kwargs`, FAIR's arguments (PROTOCOLS G)."""

    family: str  # dinov2 | dinov3 | clip | synclr
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    url: str
    num_register_tokens: int = 0
    swiglu: bool = False
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    vit_kwargs: dict = field(default_factory=dict)

    def build(self) -> ViT | DinoV3ViT:
        if self.family == "dinov3":
            kwargs = dict(self.vit_kwargs)
            ratio, align = kwargs.pop("ffn_ratio", 4.0), kwargs.pop("swiglu_align", 0)
            return DinoV3ViT(
                embed_dim=self.embed_dim,
                depth=self.depth,
                num_heads=self.num_heads,
                mlp_hidden=dinov3.ffn_hidden(self.embed_dim, ratio, align),
                swiglu=bool(align),
                patch_size=self.patch_size,
                img_size=self.img_size,
                **kwargs,
            )
        hidden = 2 * 4096 if self.swiglu else 4 * self.embed_dim
        reg = self.num_register_tokens
        kwargs = dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=(hidden + 0.5) / self.embed_dim,
            init_values=1.0 if self.family == "dinov2" else None,
            num_register_tokens=reg,
            interpolate_offset=0.0 if reg else 0.1,
            interpolate_antialias=bool(reg),
            swiglu=self.swiglu,
        )
        kwargs.update(self.vit_kwargs)
        return ViT(**kwargs)


def _dinov2(arch: str, dim: int, depth: int, heads: int, reg: bool) -> TeacherSpec:
    url = _DINOV2_URL.format(arch=arch, reg="_reg4" if reg else "")
    return TeacherSpec("dinov2", dim, depth, heads, 14, 518, url, 4 if reg else 0, swiglu=dim == 1536)


def _dinov3(arch: str, hash: str, dim: int, depth: int, heads: int, sat: bool = False, **vit_kwargs) -> TeacherSpec:
    weights = "sat493m" if sat else "lvd1689m"
    url = _DINOV3_URL.format(arch=arch, weights=weights, hash=hash)
    mean, std = (SAT_MEAN, SAT_STD) if sat else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return TeacherSpec("dinov3", dim, depth, heads, 16, 224, url, 4, mean=mean, std=std, vit_kwargs=vit_kwargs)


_PLUS = dict(ffn_ratio=6.0, swiglu_align=8)
_7B = dict(ffn_ratio=3.0, swiglu_align=64, qkv_bias=False, local_cls_norm=True)
_CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, vit_kwargs=CLIP_VIT)
TEACHERS: dict[str, TeacherSpec] = {
    **{
        f"dinov2_vit{s}14{'_reg' if reg else ''}": _dinov2(f"dinov2_vit{s}14", d, n, h, reg)
        for s, d, n, h in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16), ("g", 1536, 40, 24))
        for reg in (False, True)
    },
    "dinov3_vits16": _dinov3("vits16", "08c60483", 384, 12, 6),
    "dinov3_vits16plus": _dinov3("vits16plus", "4057cbaa", 384, 12, 6, **_PLUS),
    "dinov3_vitb16": _dinov3("vitb16", "73cec8be", 768, 12, 12),
    "dinov3_vitl16": _dinov3("vitl16", "8aa4cbdd", 1024, 24, 16),
    "dinov3_vitl16plus": _dinov3("vitl16plus", "46503df0", 1024, 24, 16, **_PLUS),
    "dinov3_vith16plus": _dinov3("vith16plus", "7c1da9a5", 1280, 32, 20, **_PLUS),
    "dinov3_vit7b16": _dinov3("vit7b16", "a955f4ea", 4096, 40, 32, **_7B),
    "dinov3_vitl16_sat": _dinov3("vitl16", "eadcf0ff", 1024, 24, 16, sat=True, local_cls_norm=True),
    "dinov3_vit7b16_sat": _dinov3("vit7b16", "a6675841", 4096, 40, 32, sat=True, **_7B),
    "clip_vitb16": TeacherSpec(
        "clip",
        768,
        12,
        12,
        16,
        224,
        _CLIP_URL.format(sha="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", file="ViT-B-16.pt"),
        **_CLIP,
    ),
    "clip_vitl14": TeacherSpec(
        "clip",
        1024,
        24,
        16,
        14,
        224,
        _CLIP_URL.format(sha="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", file="ViT-L-14.pt"),
        **_CLIP,
    ),
    "synclr_vitb16": TeacherSpec(
        "synclr",
        768,
        12,
        12,
        16,
        224,
        _SYNCLR_URL.format(key="ogktmm26yojhlgsbwqqti/synclr_vit_b_16.pth?rlkey=2bn6j4upcrqy93d5b9fgrrj02"),
    ),
    "synclr_vitl14": TeacherSpec(
        "synclr",
        1024,
        24,
        16,
        14,
        224,
        _SYNCLR_URL.format(key="al5a8d045ir0zsqo4ogpg/synclr_vit_l_14.pth?rlkey=ksyktxamcs17zqr6wha6ekdp4"),
    ),
}


def teacher_state_dict(spec: TeacherSpec, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official release file and convert it to our key layout (visual tower only)."""
    if spec.family == "clip":
        if is_torchscript_archive(path):  # OpenAI ships TorchScript archives
            raw = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            raw = safe_load(path)
            raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or not any(k.startswith("visual.") for k in raw):
            raise ValueError(f"{path} is not an OpenAI CLIP checkpoint: no 'visual.' keys")
        sd = strip_prefix(raw, ("visual.",))  # the text tower is left out
        sd.pop("proj", None)  # CLIP's projection: we distil ln_post(CLS) before it
        return from_reference(sd)
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict")
    if spec.family == "synclr":
        raw = raw.get("state_dict", raw.get("model", raw))
        sd = strip_prefix(raw, ("module.visual.", "visual."))
        return from_reference({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))})
    return from_reference(raw)


def download(url: str) -> Path:
    """Fetch an official file once into torch hub's cache (real network code; tests never call it)."""
    name = url.split("/")[-1].split("?")[0]
    dst = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} -> {dst}", flush=True)
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    return dst


def num_params(name: str) -> int:
    """A teacher's parameter count, from a build on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TEACHERS[name].build().parameters())


def default_dtype(name: str) -> torch.dtype:
    """bf16 for teachers over 1B parameters (the DINOv3 7B, the DINOv2 giant), float32 otherwise."""
    return torch.bfloat16 if num_params(name) > BF16_ABOVE else torch.float32


def dinov3_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An official DINOv3 file: the flat state dict of FAIR's DinoVisionTransformer, as released."""
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict")
    if not dinov3.is_official(raw):
        keys = ", ".join(sorted(map(str, raw))[:4])
        what = "a DINOv2-style ViT (pos_embed, no RoPE)" if "pos_embed" in raw else f"keys {keys}, ..."
        raise ValueError(
            f"{path} is not an official DINOv3 checkpoint (no storage_tokens or rope_embed.periods; it holds {what})"
        )
    return raw


def create_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
) -> ViT | DinoV3ViT:
    """A frozen, eval-mode teacher; `checkpoint` is the official file as released.

    With no checkpoint the official file is downloaded. `pretrained=False` gives a random teacher
    and is only meant for demos and tests; callers must say so loudly. `dtype` is that of the
    weights (default: `default_dtype(name)`); a DINOv3 teacher read from a file is built on the
    meta device and filled in place from the file (no second, float32 copy of the network).
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    spec = TEACHERS[name]
    dtype = dtype or default_dtype(name)
    path = None
    if pretrained:
        path = Path(checkpoint) if checkpoint else download(spec.url)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    if spec.family == "dinov3" and pretrained:
        sd = dinov3_state_dict(path)
        with torch.device("meta"):
            model = spec.build()
        model = model.to(dtype).to_empty(device="cpu")
        model.init_non_persistent_buffers()
        load_dinov3(model, sd, f"{path} (teacher {name})")
    else:
        model = spec.build()
        if pretrained:
            sd = teacher_state_dict(spec, path)
            # OpenAI's CLIP has no mask token; SynCLR's converted files most likely none either (StableRep's
            # plain timm ViT layout), else [1, 1, D] (docs/protocols.md, Notes). A teacher never sees masks.
            optional = () if spec.family == "dinov2" else ("mask_token",)
            load_strict(model, sd, f"{path} (teacher {name})", optional=optional)
        model = model.to(dtype)
    model.family = spec.family
    model.input_mean, model.input_std = tuple(spec.mean), tuple(spec.std)
    model.requires_grad_(False)
    return model.eval()
