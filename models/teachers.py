"""Frozen teachers (DINOv2, DINOv3, OpenAI CLIP, SynCLR) loaded strictly from their official files.

A `Teacher` owns its backbone (always in eval mode, no gradients), family, input normalisation and
dtype, and gives the distillation targets; `TEACHERS` says how each one is built and where its file is.
"""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from . import dinov3
from .architectures import VIT_CONFIGS, ViTConfig
from .checkpoints import (
    from_reference,
    is_torchscript_archive,
    load_dinov3,
    load_strict,
    safe_load,
    strip_prefix,
    torchscript_state_dict,
)
from .dinov3 import DinoV3ViT
from .errors import MissingFile, UsageError
from .tokens import Tokens
from .vision_transformer import ViT

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"
_CLIP_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
_SYNCLR_URL = "https://www.dropbox.com/scl/fi/{key}?dl=1"
_DINOV3_URL = "https://dl.fbaipublicfiles.com/dinov3/dinov3_{arch}/dinov3_{arch}_pretrain_{weights}-{hash}.pth"
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3's SAT-493M weights
# Teachers with more parameters are built in bf16 by default: the DINOv3 7B (6.7B), which needs it to fit beside
# a student on one 80 GB GPU. DINOv2's ViT-g (1.1B) stays fp32, as the reference ran it (issue 11: reference
# protocols by default).
BF16_ABOVE = 2e9
# What Teacher.targets takes: crops normalised as pretraining's data pipeline does (ImageNet's mean/std).
CROP_MEAN, CROP_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher's architecture (a ViTConfig in its family's layout), file and normalisation.

    `vit_kwargs` are further options of its class: DINOv3's qkv_bias and local_cls_norm (FAIR's
    arguments, PROTOCOLS G); CLIP's final norm over every token (the CLIP-layout student norms the CLS only).
    """

    family: str  # dinov2 | dinov3 | clip | synclr: also the layout it is built in (models.LAYOUTS)
    config: ViTConfig
    patch_size: int
    img_size: int
    url: str
    num_register_tokens: int = 0
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    token_only: bool = False  # the reference distilled it with the CLS loss alone (CLIP), see dense_level
    vit_kwargs: dict = field(default_factory=dict)

    def dense_level(self, input_size: int, student_grid: int) -> float:
        """The default weight of its patch and feature losses for a student whose token grid is `student_grid`
        when it sees `input_size` pixels: 1, except for a token-only teacher (CLIP) whose patch map matches the
        student's grid, which the reference distils with the CLS loss alone. A CLIP map resampled to another
        grid (S/14 <- CLIP B/16, the two-teacher recipes) keeps its dense levels, as every other teacher."""
        return 0.0 if self.token_only and input_size // self.patch_size == student_grid else 1.0

    def build(self) -> ViT | DinoV3ViT:
        return self.config.build(
            self.family,
            patch_size=self.patch_size,
            img_size=self.img_size,
            num_register_tokens=self.num_register_tokens,
            **self.vit_kwargs,
        )


class Teacher(nn.Module):
    """A frozen teacher: its backbone in eval mode for good (`train()` leaves it so), no gradients, its
    family, dtype and input normalisation, and `targets(images)`, what the distiller learns from.

    `mean`/`std` are the normalisation its input gets: the official one of its weights, unless a caller
    decides otherwise (pretraining's `--teacher-normalization reference` gives CLIP ImageNet's, as the
    reference did).
    """

    def __init__(self, backbone: ViT | DinoV3ViT, name: str, spec: TeacherSpec) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.name, self.family = name, spec.family
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always eval mode: a teacher's dropout, drop path and RoPE coordinate jitter stay off."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.cls_token.dtype

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def non_finite(self) -> list[str]:
        """The names of its weights (parameters and buffers) holding NaN or inf: a damaged file, whose targets
        would be NaN."""
        return [k for k, v in self.backbone.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Crops normalised with CROP_MEAN/CROP_STD -> normalised with the teacher's mean/std."""
        if self.mean == tuple(CROP_MEAN) and self.std == tuple(CROP_STD):
            return images
        t = lambda v: torch.tensor(v, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # noqa: E731
        return (images * t(CROP_STD) + t(CROP_MEAN) - t(self.mean)) / t(self.std)

    def targets(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> Tokens:
        """The final-norm CLS (CLIP: ln_post(CLS)) and patch tokens of `images` (normalised with
        CROP_MEAN/CROP_STD), on the teacher's own grid or, with `grid` (h, w), resampled to it
        (Tokens.on_grid). Computed in inference mode; the returned tensors are ordinary ones (autograd may
        save them)."""
        with torch.inference_mode():
            out = self.backbone.forward_features(self.normalize(images))
            own = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            tokens = Tokens(out["x_norm_clstoken"], out["x_norm_patchtokens"], own).on_grid(grid or own)
        return Tokens(tokens.cls.clone(), tokens.patches.clone(), tokens.grid)

    def forward(self, images: torch.Tensor) -> Tokens:
        return self.targets(images)


def _dinov2(size: str, reg: bool) -> TeacherSpec:
    arch = f"dinov2_vit{size[0]}14"
    url = _DINOV2_URL.format(arch=arch, reg="_reg4" if reg else "")
    return TeacherSpec("dinov2", VIT_CONFIGS[size], 14, 518, url, 4 if reg else 0)


def _dinov3(arch: str, hash: str, size: str, sat: bool = False, **vit_kwargs) -> TeacherSpec:
    weights = "sat493m" if sat else "lvd1689m"
    url = _DINOV3_URL.format(arch=arch, weights=weights, hash=hash)
    mean, std = (SAT_MEAN, SAT_STD) if sat else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return TeacherSpec("dinov3", VIT_CONFIGS[size], 16, 224, url, mean=mean, std=std, vit_kwargs=vit_kwargs)


def _clip(size: str, patch: int, file: str, sha: str) -> TeacherSpec:
    url = _CLIP_URL.format(sha=sha, file=file)
    return TeacherSpec(
        "clip", VIT_CONFIGS[size], patch, 224, url, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, token_only=True,
        vit_kwargs=dict(norm_patch_tokens=True),
    )  # fmt: skip


def _synclr(size: str, patch: int, key: str) -> TeacherSpec:
    return TeacherSpec("synclr", VIT_CONFIGS[size], patch, 224, _SYNCLR_URL.format(key=key))


_7B = dict(qkv_bias=False, local_cls_norm=True)
TEACHERS: dict[str, TeacherSpec] = {
    **{
        f"dinov2_vit{size[0]}14{'_reg' if reg else ''}": _dinov2(size, reg)
        for size in ("small", "base", "large", "giant")
        for reg in (False, True)
    },
    "dinov3_vits16": _dinov3("vits16", "08c60483", "small"),
    "dinov3_vits16plus": _dinov3("vits16plus", "4057cbaa", "small_plus"),
    "dinov3_vitb16": _dinov3("vitb16", "73cec8be", "base"),
    "dinov3_vitl16": _dinov3("vitl16", "8aa4cbdd", "large"),
    "dinov3_vitl16plus": _dinov3("vitl16plus", "46503df0", "large_plus"),
    "dinov3_vith16plus": _dinov3("vith16plus", "7c1da9a5", "huge_plus"),
    "dinov3_vit7b16": _dinov3("vit7b16", "a955f4ea", "7b", **_7B),
    "dinov3_vitl16_sat": _dinov3("vitl16", "eadcf0ff", "large", sat=True, local_cls_norm=True),
    "dinov3_vit7b16_sat": _dinov3("vit7b16", "a6675841", "7b", sat=True, **_7B),
    "clip_vitb16": _clip("base", 16, "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "clip_vitl14": _clip(
        "large", 14, "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
    ),
    "synclr_vitb16": _synclr("base", 16, "ogktmm26yojhlgsbwqqti/synclr_vit_b_16.pth?rlkey=2bn6j4upcrqy93d5b9fgrrj02"),
    "synclr_vitl14": _synclr("large", 14, "al5a8d045ir0zsqo4ogpg/synclr_vit_l_14.pth?rlkey=ksyktxamcs17zqr6wha6ekdp4"),
}


def openai_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP release file's whole state dict (visual and text towers, OpenAI's key names): the
    TorchScript archive OpenAI ships (read as data, its code never run), or a state dict (under 'state_dict' or
    not) read with weights_only."""
    if is_torchscript_archive(path):
        raw = torchscript_state_dict(path)
    else:
        raw = safe_load(path)
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or not any(k.startswith("visual.") for k in raw):
        raise UsageError(f"{path} is not an OpenAI CLIP checkpoint: no 'visual.' keys")
    return dict(raw)


def teacher_state_dict(spec: TeacherSpec, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official release file and convert it to our key layout (visual tower only)."""
    if spec.family == "clip":
        sd = strip_prefix(openai_clip_state_dict(path), ("visual.",))  # the text tower is left out
        sd.pop("proj", None)  # CLIP's projection: we distil ln_post(CLS) before it
        return from_reference(sd)
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
    if spec.family == "synclr":
        raw = raw.get("state_dict", raw.get("model", raw))
        sd = strip_prefix(raw, ("module.visual.", "visual."))
        return from_reference({k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))})
    return from_reference(raw)


class DownloadError(MissingFile):
    """An official file is not in torch hub's cache and cannot be fetched (no network, an HTTP error): bad input,
    said in one line with where to put the file instead. `reason` is the failure alone."""

    def __init__(self, url: str, dst: Path, reason: str) -> None:
        super().__init__(
            f"cannot download {url} ({reason}): without network, fetch it where there is some (python -m "
            f"scripts.fetch_teachers NAME, e.g. on a login node) or put the file at {dst} yourself, or pass "
            "the file with --teacher-checkpoint"
        )
        self.url, self.dst, self.reason = url, dst, reason


def download(url: str) -> Path:
    """Fetch an official file once into torch hub's cache (real network code; tests never call it). A failure
    is a DownloadError and leaves nothing in the cache (torch writes to a temporary file and renames it)."""
    name = url.split("/")[-1].split("?")[0]
    dst = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not dst.is_file():
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading {url} -> {dst}", flush=True)
            torch.hub.download_url_to_file(url, str(dst), progress=True)
        except (OSError, http.client.HTTPException) as e:
            dst.unlink(missing_ok=True)  # it was not there before: whatever is there now is incomplete
            reason = e.reason if type(e) is URLError else e  # URLError's own text wraps it in <urlopen error>
            raise DownloadError(url, dst, str(reason) or type(e).__name__) from None
    return dst


def num_params(name: str) -> int:
    """A teacher's parameter count, from a build on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TEACHERS[name].build().parameters())


def default_dtype(name: str) -> torch.dtype:
    """bf16 for teachers over 2B parameters (the DINOv3 7B); float32 otherwise, DINOv2's ViT-g too (as the
    reference ran it)."""
    return torch.bfloat16 if num_params(name) > BF16_ABOVE else torch.float32


def dinov3_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
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


def create_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """A frozen Teacher; `checkpoint` is the official file as released.

    With no checkpoint the official file is downloaded. `pretrained=False` gives a random teacher
    and is only meant for demos and tests; callers must say so loudly. `dtype` is that of the
    weights (default: `default_dtype(name)`); a DINOv3 teacher read from a file is built on the
    meta device and filled in place from the file (no second, float32 copy of the network).
    """
    if name not in TEACHERS:
        raise UsageError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    spec = TEACHERS[name]
    dtype = dtype or default_dtype(name)
    path = None
    if pretrained:
        path = Path(checkpoint) if checkpoint else download(spec.url)
        if not path.is_file():
            raise MissingFile(f"teacher checkpoint not found: {path}")
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
    return Teacher(model, name, spec)
