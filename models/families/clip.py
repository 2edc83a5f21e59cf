"""OpenAI CLIP (openai/CLIP): ViT-B/16 and ViT-L/14 image towers, and the text tower for zero-shot.

Its ViT: conv1 without bias, class_embedding [D], positional_embedding [N+1, D], ln_pre, QuickGELU,
LayerNorm eps 1e-5, nn.MultiheadAttention blocks (`transformer.resblocks.<i>.*`), ln_post. We distil
ln_post(CLS), the feature before CLIP's projection `proj`, which zero-shot applies. Files: OpenAI's
TorchScript archives (read as data, their code never run) or state dicts. The reference's CLIP student
norms the CLS only (ln_post) and learns from the CLS loss alone at the teacher's grid (token_only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn
from torchvision import transforms

from ..architectures import VIT_CONFIGS, Layout
from ..checkpoints import StateDict, is_torchscript_archive, safe_load, strip_prefix, swap, torchscript_state_dict
from ..errors import MissingDependency, UsageError
from .base import (
    BLOCK,
    CLIP_KEYS,
    ROPE_KEYS,
    Family,
    TeacherSpec,
    TimmArchitecture,
    has_any,
    our_shape,
    size_name,
    table_resolution,
    timm_name,
    vit_model_args,
    with_export_metadata,
    without,
)

URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
# OpenAI CLIP's ViT in our class: ln_pre (which also drops the patch-embedding bias), QuickGELU, eps 1e-5.
CLIP_VIT = dict(pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5)
LAYOUT = Layout(
    dict(init_values=None, norm_patch_tokens=False, **CLIP_VIT), xavier_qkv=True, no_weight_decay=("cls_token",)
)
# (ours, OpenAI's) for the parts CLIP names differently
TOP = (
    ("patch_embed.proj.", "conv1."),
    ("cls_token", "class_embedding"),
    ("pos_embed", "positional_embedding"),
    ("norm_pre.", "ln_pre."),
    ("norm.", "ln_post."),
)
IN_BLOCK = (
    ("norm1.", "ln_1."),
    ("norm2.", "ln_2."),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
OFFICIAL_BLOCK = "transformer.resblocks."
LOGIT_SCALE = 100.0  # the CLIP paper's zero-shot logits: 100 * cosine similarity


def _teacher(size: str, patch: int, file: str, *, sha: str) -> TeacherSpec:
    return TeacherSpec(
        "clip", LAYOUT, VIT_CONFIGS[size], patch, 224, URL.format(sha=sha, file=file), mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD, token_only=True, vit_kwargs=dict(norm_patch_tokens=True),
    )  # fmt: skip


def openai_clip_state_dict(path: str | os.PathLike) -> StateDict:
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


class ClipZeroShot:
    """Zero-shot as the CLIP paper (and open_clip) runs it: per class the 80 OpenAI ImageNet prompt templates,
    each text embedding L2-normalised, their mean renormalised; image embeddings L2-normalised; logits
    100 * image @ classes. The student's predicted ln_post(CLS) goes through CLIP's own projection."""

    protocol = "CLIP zero-shot: 80 OpenAI ImageNet templates, mean of normalised text embeddings, 100 * cos"
    crop_protocol = "CLIP's eval crop: the short side resized (bicubic) to {size}, a centre crop {size}x{size}"
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def load(self, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> nn.Module:
        """open_clip's CLIP from OpenAI's file (read with weights_only, or its TorchScript archive read as data),
        fp32. `tokenizer` is not read: CLIP's BPE tokenizer ships inside open_clip."""
        try:
            from open_clip.model import build_model_from_openai_state_dict
        except ImportError:
            raise MissingDependency("zero-shot needs open_clip: pip install open_clip_torch") from None
        raw = openai_clip_state_dict(path)
        if "visual.proj" not in raw:
            raise UsageError(
                f"{path} is not a ViT CLIP (no visual.proj): no ln_post(CLS) feature was distilled from it"
            )
        try:
            clip = build_model_from_openai_state_dict(raw, cast_dtype=None)
        except (KeyError, RuntimeError) as e:
            why = str(e).strip().splitlines()[0]
            raise UsageError(f"{path} is not a complete OpenAI CLIP checkpoint: {why}") from None
        return clip.float().eval().requires_grad_(False)

    def width(self, model: nn.Module) -> int:
        """The width of the feature a student's adaptor predicts: CLIP's visual width, before `proj`."""
        return model.visual.proj.shape[0]

    def image_size(self, model: nn.Module) -> int:
        return model.visual.image_size[0]

    def embed(self, model: nn.Module, summary: torch.Tensor) -> torch.Tensor:
        """A predicted ln_post(CLS) -> the normalised image embedding (CLIP's projection)."""
        return F.normalize(summary @ model.visual.proj, dim=-1)

    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images, normalize=True)

    def crop(self, model: nn.Module) -> transforms.Compose:
        """CLIP's eval geometry: the short side resized (bicubic) to the input size, a centre crop; [0, 1] pixels."""
        size = self.image_size(model)
        return transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
            transforms.ToTensor(),
        ])  # fmt: skip

    def preprocess(self, model: nn.Module) -> transforms.Compose:
        """CLIP's eval transform: its crop, its mean/std."""
        return transforms.Compose([self.crop(model), transforms.Normalize(self.mean, self.std)])

    def classifier(self, model: nn.Module, names: list[str], device: torch.device) -> torch.Tensor:
        """[embed dim, classes]: open_clip's zero-shot classifier with OpenAI's 80 ImageNet templates."""
        import open_clip
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        return open_clip.build_zero_shot_classifier(model, tokenizer, names, OPENAI_IMAGENET_TEMPLATES, device=device)

    def logits(self, model: nn.Module, embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * embeddings @ classifier


class Clip(Family):
    name = "clip"
    title = "CLIP"
    in_reference = True
    layout = LAYOUT
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    zero_shot = ClipZeroShot()
    teachers = {
        "clip_vitb16": _teacher(
            "base", 16, "ViT-B-16.pt", sha="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
        ),
        "clip_vitl14": _teacher(
            "large", 14, "ViT-L-14.pt", sha="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
        ),
    }

    def owns(self, state_dict) -> bool:
        return has_any(state_dict, CLIP_KEYS) and not has_any(state_dict, ROPE_KEYS)

    def from_official(self, state_dict: StateDict) -> StateDict:
        out = {}
        for k, v in state_dict.items():
            if k.startswith(OFFICIAL_BLOCK):
                i, rest = k[len(OFFICIAL_BLOCK) :].split(".", 1)
                k = f"blocks.{i}." + swap(rest, IN_BLOCK, reverse=True)
            elif not BLOCK.match(k):
                k = swap(k, TOP, reverse=True)
            out[k] = our_shape(k, v)
        return out

    def read_teacher(self, spec: TeacherSpec, path) -> StateDict:
        sd = strip_prefix(openai_clip_state_dict(path), ("visual.",))  # the text tower is left out
        sd.pop("proj", None)  # CLIP's projection: we distil ln_post(CLS) before it
        return self.from_official(sd)

    def release_file(self, model: nn.Module) -> dict:
        """OpenAI's layout of the whole model, the visual tower under `visual.` (without the projection, which
        the distillation does not use; zero-shot reads the whole file)."""
        return {f"visual.{k}": v for k, v in self.to_official(model).items()}

    def to_official(self, model) -> StateDict:
        out = {}
        for k, v in model.state_dict().items():
            v = v.detach().clone().cpu()
            if m := BLOCK.match(k):
                k = f"{OFFICIAL_BLOCK}{m.group(1)}." + swap(k[m.end() :], IN_BLOCK, reverse=False)
            else:
                k = swap(k, TOP, reverse=False)
            if k == "class_embedding":
                v = v.reshape(-1)
            elif k == "positional_embedding":
                v = v[0]
            out[k] = v
        return with_export_metadata(model, out)

    def timm_architecture(self, model, *, img_size: int) -> TimmArchitecture:
        """timm's OpenAI CLIP ViT (`vit_<size>_patch<p>_clip_quickgelu_224`: ln_pre, QuickGELU, eps 1e-5) with its
        final norm after the pooling (fc_norm): ln_post on the CLS only, the patch tokens the last block's, as
        our CLIP-layout student; at its position table's resolution."""
        size, patch = size_name(model) or "base", model.patch_size
        name = timm_name(f"vit_{size}_patch{patch}_clip_quickgelu_224", "vit_base_patch16_clip_quickgelu_224")
        return TimmArchitecture(name, vit_model_args(model, img_size=table_resolution(model), fc_norm=True))

    def to_timm(self, model) -> StateDict:
        return {
            (f"fc_{k}" if k.startswith("norm.") else k): v for k, v in without(model.state_dict(), "mask_token").items()
        }

    def from_timm(self, state_dict: StateDict, model_args: dict) -> StateDict:
        return {k.removeprefix("fc_") if k.startswith("fc_norm.") else k: v for k, v in state_dict.items()}


FAMILY = Clip()
