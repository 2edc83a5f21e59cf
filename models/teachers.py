"""Frozen teachers loaded strictly from their official files.

A `Teacher` owns its backbone (always in eval mode, no gradients), family, input normalisation and
dtype, and gives the distillation targets. Which teachers exist, how each is built and read, and where its
file is, is its family's (models.families; `TEACHERS` lists the released ones).
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from urllib.error import URLError

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .checkpoints import Normalization
from .errors import MissingFile, UsageError
from .families import TeacherSpec, family, teacher_spec
from .tokens import Tokens

# Teachers with more parameters are built in bf16 by default: the DINOv3 7B (6.7B), which needs it to fit beside
# a student on one 80 GB GPU. DINOv2's ViT-g (1.1B) stays fp32, as the reference ran it.
BF16_ABOVE = 2e9
# What Teacher.targets takes: crops normalised as pretraining's data pipeline does (ImageNet's mean/std).
CROP_MEAN, CROP_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class Teacher(nn.Module):
    """A frozen teacher: its backbone in eval mode for good (`train()` leaves it so), no gradients, its
    family, dtype and input normalisation, and `targets(images)`, what the distiller learns from.

    `mean`/`std` are the normalisation its input gets: the official one of its weights, unless a caller
    decides otherwise (pretraining's `--teacher-normalization reference` gives CLIP ImageNet's, as the
    reference did).
    """

    def __init__(self, backbone: nn.Module, name: str, spec: TeacherSpec) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.name, self.family = name, spec.family
        self.mean, self.std = tuple(spec.mean), tuple(spec.std)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always eval mode: a teacher's dropout, drop path and RoPE coordinate jitter stay off."""
        return super().train(False)

    @property
    def normalization(self) -> Normalization:
        """What its input is normalised with, as a backbone's: the crops' (CROP_MEAN/CROP_STD), which `normalize`
        turns into its own."""
        return Normalization(tuple(CROP_MEAN), tuple(CROP_STD))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

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
            tokens = self.backbone.forward_tokens(self.normalize(images))
            tokens = tokens.on_grid(grid or tokens.grid)
        return Tokens(tokens.cls.clone(), tokens.patches.clone(), tokens.grid)

    def forward(self, images: torch.Tensor) -> Tokens:
        return self.targets(images)


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


def cache_name(url: str) -> str:
    """The file name an official file is cached under: its URL's last part, after its repository's name for a
    Hugging Face Hub file (`<repo>/resolve/<revision>/<file>`), whose file names repeat across repositories."""
    parts = url.split("?")[0].split("/")
    if len(parts) > 4 and parts[-3] == "resolve":
        return f"{parts[-4]}-{parts[-1]}"
    return parts[-1]


def download(url: str) -> Path:
    """Fetch an official file once into torch hub's cache (real network code; tests never call it). A failure
    is a DownloadError and leaves nothing in the cache (torch writes to a temporary file and renames it)."""
    dst = Path(torch.hub.get_dir()) / "checkpoints" / cache_name(url)
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
        return sum(p.numel() for p in teacher_spec(name).build().parameters())


def default_dtype(name: str) -> torch.dtype:
    """bf16 for teachers over 2B parameters (the DINOv3 7B); float32 otherwise, DINOv2's ViT-g too (as the
    reference ran it)."""
    return torch.bfloat16 if num_params(name) > BF16_ABOVE else torch.float32


def create_teacher(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = True,
    *,
    dtype: torch.dtype | None = None,
) -> Teacher:
    """A frozen Teacher; `checkpoint` is the official file as released.

    With no checkpoint the official file is downloaded. `pretrained=False` gives a random teacher
    and is only meant for demos and tests; callers must say so loudly. `dtype` is that of the
    weights (default: `default_dtype(name)`); a DINOv3 teacher read from a file is built on the
    meta device and filled in place from the file (no second, float32 copy of the network).
    """
    spec = teacher_spec(name)
    dtype = dtype or default_dtype(name)
    path = None
    if pretrained and not checkpoint and not spec.url:
        raise UsageError(f"teacher {name} is read from a file: give it with --teacher-checkpoint")
    if pretrained:
        path = Path(checkpoint) if checkpoint else download(spec.url)
        if not path.is_file():
            raise MissingFile(f"teacher checkpoint not found: {path}")
    model = family(spec.family).load_teacher(spec, path, name=name, dtype=dtype)
    return Teacher(model, name, spec)
