"""SigLIP2 (Google's sigmoid-loss image-text models, as open_clip and timm release them): the B/16, L/16, So400m/14
and giant-opt g/16 image towers as teachers at their official resolutions, and the text tower for zero-shot.

The image tower is timm's ViT with a MAP head and no CLS token (timm's `vit_*_siglip_*.v2_webli`), run as a
models.timm_backbone.TimmBackbone: the summary token a student predicts is the MAP head's attention-pooled output.
That is open_clip's image feature itself: its SigLIP2 configs build the tower with `timm_pool: map` and
`timm_proj: none`, so no projection follows the pool (the zero-shot tower still applies open_clip's, empty, head).
Files: open_clip's whole-model release (`open_clip_model.safetensors`: the image tower under `visual.trunk.`, the
text tower under `text.`, `logit_scale`, `logit_bias`), or timm's image-only file (timm's own key names).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from ..checkpoints import StateDict, few_names, safe_load
from ..errors import MissingDependency, UsageError
from .timm import Timm, TimmTeacherSpec, tensors, without_classifier

# open_clip's release of each SigLIP2 model on the Hugging Face Hub (open_clip/pretrained.py: hf_hub 'timm/<config>/',
# whose whole-model file open_clip names HF_SAFE_WEIGHTS_NAME in open_clip/constants.py)
URL = "https://huggingface.co/timm/{config}/resolve/main/open_clip_model.safetensors"
TRUNK = "visual.trunk."  # open_clip's prefix of the timm image tower in its whole-model file
# teacher -> (timm's model and pretrained tag, the open_clip config of its release, width, patch); width and patch
# are the timm model's (tests check them against a build), written here so that importing needs no build
RELEASES = {
    "siglip2_vitb16": ("vit_base_patch16_siglip_224.v2_webli", "ViT-B-16-SigLIP2", 768, 16),
    "siglip2_vitl16": ("vit_large_patch16_siglip_256.v2_webli", "ViT-L-16-SigLIP2-256", 1024, 16),
    "siglip2_so400m14": ("vit_so400m_patch14_siglip_224.v2_webli", "ViT-SO400M-14-SigLIP2", 1152, 14),
    "siglip2_vitg16": ("vit_giantopt_patch16_siglip_256.v2_webli", "ViT-gopt-16-SigLIP2-256", 1536, 16),
}
TOKENIZER_HELP = (
    'fetch it where there is network with: python -c "from transformers import AutoTokenizer; '
    "AutoTokenizer.from_pretrained('{name}').save_pretrained('DIR')\", then give --tokenizer DIR"
)


def _released(name: str) -> TimmTeacherSpec:
    """A released teacher's spec: resolution and mean/std from timm's pretrained_cfg of its tag."""
    model, config, width, patch = RELEASES[name]
    cfg = timm.models.get_pretrained_cfg(model)
    return TimmTeacherSpec(
        "siglip2", model, width, patch, int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std),
        url=URL.format(config=config),
    )  # fmt: skip


TEACHERS = {name: _released(name) for name in RELEASES}
MEAN, STD = TEACHERS["siglip2_vitb16"].mean, TEACHERS["siglip2_vitb16"].std  # 0.5 for every SigLIP2 release


@contextmanager
def _quiet():
    """open_clip warns on the root logger that a model it builds has random weights: ours are loaded next."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def open_clip_configs() -> list[str]:
    """open_clip's SigLIP2 configs (its own and any a caller registered with open_clip.add_model_config)."""
    import open_clip

    return [name for name in open_clip.list_models() if "SigLIP2" in name]


def square(vision_cfg: dict) -> int | None:
    """A vision config's square input size (None for a non-square one)."""
    size = vision_cfg.get("image_size")
    if isinstance(size, (tuple, list)):
        return size[0] if size[0] == size[-1] else None
    return size


def config_of(state_dict: StateDict, path: str | os.PathLike) -> str:
    """The open_clip SigLIP2 config whose model has exactly this file's keys and shapes. The file alone says it
    (adaptors.pth need not name a released teacher), and it covers every resolution open_clip releases."""
    import open_clip

    if not any(k.startswith("text.") for k in state_dict):
        raise UsageError(
            f"{path} holds no text tower (a timm image-only file?): zero-shot needs open_clip's whole-model file "
            "open_clip_model.safetensors"
        )
    if f"{TRUNK}pos_embed" not in state_dict:
        raise UsageError(f"{path} is not an open_clip SigLIP2 file: no {TRUNK}pos_embed")
    patch = state_dict[f"{TRUNK}patch_embed.proj.weight"].shape[-1]
    size = math.isqrt(state_dict[f"{TRUNK}pos_embed"].shape[1]) * patch
    want = {k: tuple(v.shape) for k, v in state_dict.items()}
    candidates = [n for n in open_clip_configs() if square(open_clip.get_model_config(n)["vision_cfg"]) == size]
    for name in candidates:
        with torch.device("meta"), _quiet():
            model = open_clip.create_model(name, device="meta")
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == want:
            return name
    raise UsageError(
        f"{path} matches none of open_clip's SigLIP2 configs at {size} px ({few_names(candidates) or 'none'}) in its "
        "keys and shapes"
    )


class SigLIP2Text(nn.Module):
    """open_clip's SigLIP2 model with the tokenizer of its text tower (what zero-shot loads from the files)."""

    def __init__(self, clip: nn.Module, tokenizer, config: str) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.config = config


def hf_tokenizer(config: str, folder: str | os.PathLike | None):
    """open_clip's tokenizer of a SigLIP2 config, read offline: from `folder` (a saved Hugging Face tokenizer), else
    from the Hugging Face cache under the config's hf_tokenizer_name. With the config's own kwargs (context length,
    `clean`), as open_clip.get_tokenizer builds it."""
    import open_clip

    try:
        import transformers  # noqa: F401  (open_clip's HFTokenizer imports it only when built)
        from open_clip.tokenizer import HFTokenizer
    except ImportError:
        raise MissingDependency(
            "SigLIP2's zero-shot reads its tokenizer with transformers: pip install transformers"
        ) from None
    text = open_clip.get_model_config(config)["text_cfg"]
    name = text["hf_tokenizer_name"]
    source = str(folder) if folder else name
    try:
        return HFTokenizer(
            source, context_length=text["context_length"], local_files_only=True, **text.get("tokenizer_kwargs", {})
        )
    except (OSError, ValueError) as e:
        where = f"--tokenizer {folder}" if folder else f"the Hugging Face cache has no {name}"
        why = str(e).strip().splitlines()[0] if folder else "nothing is downloaded here"
        raise UsageError(f"no SigLIP2 tokenizer ({where}: {why}); {TOKENIZER_HELP.format(name=name)}") from None


class SigLIPZeroShot:
    """Zero-shot as open_clip evaluates SigLIP2 (open_clip_train/zero_shot.py and its build_zero_shot_classifier):
    per class the 80 OpenAI ImageNet templates through the config's tokenizer (SigLIP2's Gemma tokenizer, texts
    canonicalized: lower case, punctuation removed; 64 tokens), each text embedding L2-normalised, their mean
    renormalised; image embeddings L2-normalised; scored as SigLIP's sigmoid logits
    exp(logit_scale) * image @ classes + logit_bias. Images are resized to the tower's square (open_clip's SigLIP
    preprocessing, resize_mode 'squash'), mean/std 0.5."""

    protocol = (
        "SigLIP2 zero-shot (open_clip): 80 OpenAI ImageNet templates, canonicalized, SigLIP2 tokenizer, mean of "
        "normalised text embeddings, exp(logit_scale) * cos + logit_bias"
    )
    crop_protocol = "open_clip's SigLIP eval resize: the whole image resized (bicubic) to {size}x{size}, no crop"
    mean, std = MEAN, STD

    def load(self, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> SigLIP2Text:
        """open_clip's SigLIP2 model from open_clip's whole-model file (strictly, fp32), with its tokenizer."""
        try:
            import open_clip
        except ImportError:
            raise MissingDependency("zero-shot needs open_clip: pip install open_clip_torch") from None
        raw = safe_load(path)
        if not isinstance(raw, dict):
            raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
        sd = raw.get("state_dict", raw)
        config = config_of(sd, path)
        with _quiet():
            clip = open_clip.create_model(config)
        clip.load_state_dict(sd, strict=True)  # config_of matched every key and shape
        return SigLIP2Text(clip.float().eval().requires_grad_(False), hf_tokenizer(config, tokenizer), config)

    def width(self, model: SigLIP2Text) -> int:
        """The width of the feature a student's adaptor predicts: the MAP head's pooled output."""
        return model.clip.visual.trunk.num_features

    def image_size(self, model: SigLIP2Text) -> int:
        return model.clip.visual.image_size[0]

    def embed(self, model: SigLIP2Text, summary: torch.Tensor) -> torch.Tensor:
        """A predicted pooled feature -> the normalised image embedding, as encode_image maps the trunk's."""
        return F.normalize(model.clip.visual.head(summary), dim=-1)

    def encode_image(self, model: SigLIP2Text, images: torch.Tensor) -> torch.Tensor:
        return model.clip.encode_image(images, normalize=True)

    def crop(self, model: SigLIP2Text) -> transforms.Compose:
        """open_clip's SigLIP eval geometry: the whole image resized (bicubic) to the square input, no crop;
        [0, 1] pixels."""
        size = self.image_size(model)
        bicubic = transforms.InterpolationMode.BICUBIC
        return transforms.Compose([transforms.Resize((size, size), interpolation=bicubic), transforms.ToTensor()])

    def preprocess(self, model: SigLIP2Text) -> transforms.Compose:
        """open_clip's SigLIP eval transform: its squash resize, mean/std 0.5."""
        return transforms.Compose([self.crop(model), transforms.Normalize(self.mean, self.std)])

    def classifier(self, model: SigLIP2Text, names: list[str], device: torch.device) -> torch.Tensor:
        """[embed dim, classes]: open_clip's zero-shot classifier with OpenAI's 80 ImageNet templates."""
        import open_clip
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return open_clip.build_zero_shot_classifier(
            model.clip, model.tokenizer, names, OPENAI_IMAGENET_TEMPLATES, device=device
        )

    def logits(self, model: SigLIP2Text, embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """SigLIP's sigmoid-loss logits (their sigmoid is each class's probability; the ranking is the cosine's)."""
        scale, bias = model.clip.logit_scale.exp().item(), model.clip.logit_bias.item()
        return scale * embeddings @ classifier + bias


class SigLIP2(Timm):
    name = "siglip2"
    title = "SigLIP2"
    # A SigLIP2 image tower's keys and shapes are SigLIP's (the timm family's vit_*_siglip_* teachers), and the
    # backbone state dicts the registry is asked about hold no text tower (whose Gemma vocabulary alone would tell
    # SigLIP2 from SigLIP): its files are recognised by the teacher name the user gives, as timm's are.
    detects = False
    student_prefix = ""  # its image towers are timm models: students of them are timm's (timm:<model>)
    mean, std = MEAN, STD
    teachers = TEACHERS
    zero_shot = SigLIPZeroShot()

    def spec(self, name: str, **model_kwargs) -> TimmTeacherSpec:
        """Released teacher `name`'s spec built from its timm model, with further create_model arguments (tests:
        a tiny one)."""
        if name not in RELEASES:
            raise UsageError(f"unknown SigLIP2 teacher '{name}'; choose from {', '.join(RELEASES)}")
        model, config = RELEASES[name][:2]
        return dataclasses.replace(super().spec(model, **model_kwargs), url=URL.format(config=config))

    def resolve(self, name: str) -> TimmTeacherSpec | None:
        return None  # timm:<model> names are the timm family's

    def is_own(self, model: nn.Module) -> bool:
        return False  # its networks are timm's (a student of one is the timm family's)

    def read_teacher(self, spec: TimmTeacherSpec, path: str | os.PathLike) -> StateDict:
        """The image tower in timm's names, from open_clip's whole-model file (its `visual.trunk.` part: the text
        tower, logit scale and bias are zero-shot's) or timm's own file."""
        sd = tensors(path)
        if any(k.startswith(TRUNK) for k in sd):
            sd = {k.removeprefix(TRUNK): v for k, v in sd.items() if k.startswith(TRUNK)}
        return without_classifier(spec, sd)

    def release_file(self, model: nn.Module) -> dict:
        """open_clip's layout of the image tower (its whole-model file without the text tower, which distillation
        does not read)."""
        return {TRUNK + k: v for k, v in self.to_official(model).items()}


FAMILY = SigLIP2()
