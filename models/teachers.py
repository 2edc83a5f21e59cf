"""Frozen teachers (DINOv2, OpenAI CLIP, SynCLR) loaded strictly from their official files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .architectures import CLIP_VIT
from .checkpoints import from_reference, is_torchscript_archive, load_strict, safe_load, strip_prefix
from .vision_transformer import ViT

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_CLIP_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
_SYNCLR_URL = "https://www.dropbox.com/scl/fi/{key}?dl=1"


@dataclass(frozen=True)
class TeacherSpec:
    family: str  # dinov2 | clip | synclr
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

    def build(self) -> ViT:
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


_CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, vit_kwargs=CLIP_VIT)
TEACHERS: dict[str, TeacherSpec] = {
    **{
        f"dinov2_vit{s}14{'_reg' if reg else ''}": _dinov2(f"dinov2_vit{s}14", d, n, h, reg)
        for s, d, n, h in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16), ("g", 1536, 40, 24))
        for reg in (False, True)
    },
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


def create_teacher(name: str, checkpoint: str | os.PathLike | None = None, pretrained: bool = True) -> ViT:
    """A frozen, eval-mode teacher; `checkpoint` is the official file as released.

    With no checkpoint the official file is downloaded. `pretrained=False` gives a random teacher
    and is only meant for demos and tests; callers must say so loudly.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    spec = TEACHERS[name]
    model = spec.build()
    if pretrained:
        path = Path(checkpoint) if checkpoint else download(spec.url)
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {path}")
        sd = teacher_state_dict(spec, path)
        # OpenAI's CLIP has no mask token; SynCLR's converted files most likely none either (StableRep's
        # plain timm ViT layout), else [1, 1, D] (docs/protocols.md, Notes). A teacher never sees masks.
        optional = () if spec.family == "dinov2" else ("mask_token",)
        load_strict(model, sd, f"{path} (teacher {name})", optional=optional)
    model.family = spec.family
    model.input_mean, model.input_std = tuple(spec.mean), tuple(spec.std)
    model.requires_grad_(False)
    return model.eval()
