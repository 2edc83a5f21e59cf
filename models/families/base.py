"""What a backbone family is: `Family`, the interface each module of models/families implements, and
`TeacherSpec`, one released teacher of a family.

A family holds everything about one kind of backbone: its released teachers, how to recognise its
files, its key conversion both ways (official <-> ours), its normalisation, its student layout, its
text tower (zero-shot) and what dense fine-tuning must freeze. Nothing outside its module names it.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..architectures import STUDENT_ARCHS, VIT_CONFIGS, Layout, ViTConfig, timm_vit_from_state_dict
from ..checkpoints import EXPORT_METADATA, Normalization, StateDict, load_strict, safe_load
from ..errors import UsageError

# What every family's state-dict test looks at: the keys that only some families have.
ROPE_KEYS = ("storage_tokens", "rope_embed.periods", "rope.periods")  # DINOv3 (FAIR's names and ours)
CLIP_KEYS = ("class_embedding", "norm_pre.weight", "ln_pre.weight")  # OpenAI CLIP's ViT (its names and ours)


BLOCK = re.compile(r"^blocks\.(\d+)\.")


def our_shape(key: str, value: torch.Tensor) -> torch.Tensor:
    """A timm-ViT token in our shape: cls_token [1, 1, D], pos_embed [1, N, D], mask_token [1, D] (the
    official layouts store some of them flatter or, SynCLR's mask token, deeper)."""
    if key == "cls_token":
        return value.reshape(1, 1, -1)
    if key == "pos_embed" and value.ndim == 2:
        return value.unsqueeze(0)
    if key == "mask_token":
        return value.reshape(1, -1)
    return value


def has_any(state_dict: Mapping[str, object], keys: tuple[str, ...]) -> bool:
    return any(k in state_dict for k in keys)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def has_layerscale(state_dict: Mapping[str, object]) -> bool:
    return any(k.endswith(".ls1.gamma") for k in state_dict)


@dataclass(frozen=True)
class TeacherSpec:
    """A released teacher: its architecture (a ViTConfig in its family's layout), file and normalisation.

    `vit_kwargs` are further options of its class: DINOv3's qkv_bias and local_cls_norm (FAIR's
    arguments, PROTOCOLS G); CLIP's final norm over every token (the CLIP-layout student norms the CLS only).
    """

    family: str  # the name of its models.families module
    layout: Layout  # the architecture it is built in
    config: ViTConfig
    patch_size: int
    img_size: int
    url: str
    num_register_tokens: int = 0
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    token_only: bool = False  # the reference distilled it with the CLS loss alone (CLIP), see dense_level
    vit_kwargs: dict = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def dense_level(self, input_size: int, student_grid: int) -> float:
        """The default weight of its patch and feature losses for a student whose token grid is `student_grid`
        when it sees `input_size` pixels: 1, except for a token-only teacher (CLIP) whose patch map matches the
        student's grid, which the reference distils with the CLS loss alone. A CLIP map resampled to another
        grid (S/14 <- CLIP B/16, the two-teacher recipes) keeps its dense levels, as every other teacher."""
        return 0.0 if self.token_only and input_size // self.patch_size == student_grid else 1.0

    def build(self) -> nn.Module:
        """The network with random weights (its class's own init)."""
        return self.config.build(
            self.layout,
            patch_size=self.patch_size,
            img_size=self.img_size,
            num_register_tokens=self.num_register_tokens,
            **self.vit_kwargs,
        )


class TimmArchitecture(NamedTuple):
    """How timm builds a network of ours: `timm.create_model(name, num_classes=0, **model_args)` (the
    arguments JSON values, what the Hub's config.json keeps as `model_args`), into which the family's
    `to_timm` loads strictly."""

    name: str  # timm's model name: its defaults supply what the arguments do not (norm, activation, LayerScale)
    model_args: dict  # the shape, its position table's resolution, the pooling: what makes it this network


def timm_name(*names: str) -> str:
    """The first of these timm model names the installed timm has (the last one always: a family's fallback)."""
    return next((n for n in names if timm.is_model(n)), names[-1])


def size_name(model: nn.Module) -> str:
    """The VIT_CONFIGS size of a ViT's width and depth ("small"), or "" for a shape the table does not hold."""
    shape = (model.embed_dim, len(model.blocks))
    return next((name for name, c in VIT_CONFIGS.items() if (c.embed_dim, c.depth) == shape), "")


def vit_model_args(model: nn.Module, *, img_size: int, **extra) -> dict:
    """create_model arguments giving timm's ViT (VisionTransformer or Eva) our network's shape at `img_size`,
    taking any other input size (dynamic_img_size), its CLS as the pooled feature and no classifier."""
    dim, mlp = model.embed_dim, model.blocks[0].mlp
    hidden = (mlp.fc1_g if hasattr(mlp, "fc1_g") else mlp.fc1).out_features
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # timm takes int(dim * ratio): a ratio that rounds down one short
        ratio = (hidden + 0.5) / dim
    shape = dict(embed_dim=dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads, mlp_ratio=ratio)
    size = dict(img_size=int(img_size), patch_size=int(model.patch_size), dynamic_img_size=True)
    return {**size, **shape, "global_pool": "token", "num_classes": 0, **extra}


def table_resolution(model: nn.Module) -> int:
    """The input side a ViT's position table is laid out for: what timm's model of it is built at, whatever size
    an export was asked for (the table is the network's; Family.at_resolution sets it)."""
    return int(model.patch_embed.grid_size[0] * model.patch_size)


def without(state_dict: StateDict, *prefixes: str) -> StateDict:
    """A copy of the tensors of a state dict, on the CPU, without the keys that start with any of `prefixes`."""
    return {k: v.detach().clone().cpu() for k, v in state_dict.items() if not k.startswith(prefixes)}


class ZeroShot(Protocol):
    """A family's text tower, as zero-shot classification (linear_eval.zeroshot) uses it. A student predicts the
    teacher's summary token through its adaptor; `embed` maps that to the image embedding the text tower scores."""

    protocol: str  # what results.json says was run
    crop_protocol: str  # what results.json says `crop` does, {size} standing for image_size
    mean: tuple  # the image tower's own normalisation (the teacher's own figure)
    std: tuple

    def load(self, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> nn.Module:
        """The whole image-text model from its official file, fp32, eval mode, no gradients; `tokenizer`: a saved
        tokenizer folder, for towers whose tokenizer is a file of its own."""

    def crop(self, model: nn.Module) -> Callable:
        """The geometry of the image tower's own eval transform (PIL image -> [0, 1] tensor, not normalised): the
        crops both the teacher and the student are scored on."""

    def preprocess(self, model: nn.Module) -> Callable:
        """The image tower's own eval transform: `crop`, then its own mean/std (the teacher's own figure)."""

    def width(self, model: nn.Module) -> int:
        """The width of the summary token a student's adaptor predicts."""

    def image_size(self, model: nn.Module) -> int:
        """The image tower's own input size."""

    def embed(self, model: nn.Module, summary: torch.Tensor) -> torch.Tensor:
        """A (predicted) summary token -> the normalised image embedding."""

    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The image tower's own normalised embedding."""

    def classifier(self, model: nn.Module, names: list[str], device: torch.device) -> torch.Tensor:
        """[embed dim, classes]: the class names' text embeddings, prompts as the family's evaluation makes them."""

    def logits(self, model: nn.Module, embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """[images, classes] scores as the family's evaluation ranks them."""


class Family:
    """One backbone family. A module of models/families defines a subclass and one instance, FAMILY;
    models/families/__init__.py lists it. The defaults serve a timm-based ViT family (DINOv2, CLIP,
    SynCLR); override what differs."""

    name: str = ""  # its module's name: what adaptors.pth, --student-layout and TeacherSpec.family say
    title: str = ""  # how people write it
    teachers: Mapping[str, TeacherSpec] = {}  # its released teachers by name
    detects: bool = True  # its files are recognised by their keys (owns); else only by the name the user gives
    layout: Layout | None = None  # its student layout (None: it has none)
    student_suffix: str = ""  # a student name with this suffix is in this layout (vit_small_dinov3)
    mean: tuple = IMAGENET_DEFAULT_MEAN  # the normalisation of its released weights
    in_reference: bool = False  # the reference release distilled its teachers: the paper's input setting applies
    std: tuple = IMAGENET_DEFAULT_STD
    teacher_optional: tuple[str, ...] = ("mask_token",)  # keys its teacher files may lack (a teacher never masks)
    position_table: bool = True  # its ViT has a learned position table (not RoPE): dense tasks may resize it once
    eval_only: tuple[str, ...] = ()  # submodules whose training-mode behaviour is pretraining's: off downstream
    pretraining_only: tuple[str, ...] = ()  # submodules that reach no downstream output: dense tasks freeze them
    # its students' drop path in pretraining: every block at the rate (True), or the linear ramp from 0 in the
    # first block that every student gets when fine-tuned downstream (False)
    pretraining_drop_path_uniform: bool = False
    zero_shot: ZeroShot | None = None  # its text tower, if it has one
    # what a student distilled from its teachers must carry when shared (scripts.export's model card); None: nothing
    licence: str | None = None

    def dense_configs(self, size: str) -> str:
        """The part of the dense configs' names (segmentation/configs/linear_{}.py) that fits its backbones of a
        model size (small, base, large): ViTs of its layout by default. A family with its own student layout has
        `vit_<size><suffix>_layout` configs: the Proteus protocols at the crop and blocks that layout's
        patch size and family call for (vit_small_dinov3_layout), named so they are not taken for the family's
        own evaluation protocols."""
        return f"vit_{size}{self.student_suffix}_layout" if self.student_suffix else f"vit_{size}"

    # --- recognising and converting files ---------------------------------------------------------
    def owns(self, state_dict: Mapping[str, object]) -> bool:
        """Whether a backbone state dict (official names or ours) is one of this family's. The families'
        tests exclude each other: at most one family owns any state dict."""
        raise NotImplementedError

    def resolve(self, name: str) -> TeacherSpec | None:
        """The spec of a teacher name this family builds on demand (timm:<model>), else None."""
        return None

    def from_official(self, state_dict: StateDict) -> StateDict:
        """Official (or our) key names and shapes -> ours."""
        return dict(state_dict)

    def to_official(self, model: nn.Module) -> StateDict:
        """Our model -> the official key names and shapes, loading strictly into the official model code."""
        raise UsageError(f"the {self.name} family has no export layout")

    # --- timm's layout (scripts/export.py) -----------------------------------------------------------
    def timm_architecture(self, model: nn.Module, *, img_size: int) -> TimmArchitecture | None:
        """The timm model that is this network, weight for weight, at `img_size` (None: timm has no
        architecture for it, and an export keeps the reference layout)."""
        return None

    def at_resolution(self, model: nn.Module, img_size: int) -> nn.Module:
        """The network set to `img_size` (an export at a resolution of its own): a position table resampled there
        by the network's own rule, which timm's code then uses without resampling; the network itself where it
        has no table (RoPE, a CNN, a timm model, which resamples as timm does anyway)."""
        return model.at_resolution(img_size) if self.position_table else model

    def to_timm(self, model: nn.Module) -> StateDict:
        """Our network's weights in timm's names, strictly loadable into `timm_architecture(model)`'s model
        (what only pretraining uses, a mask token, is left out)."""
        raise UsageError(f"timm has no architecture for the {self.title} layout")

    def from_timm(self, state_dict: StateDict, model_args: dict) -> StateDict:
        """timm's weights of one of this family's networks (from `to_timm`) -> what `load_backbone` loads (what
        to_timm left out set as a new network has it)."""
        return dict(state_dict)

    def release_file(self, model: nn.Module) -> dict:
        """What the family's release file of this network holds, as read_teacher reads it (tests write tiny
        ones; a converted network can be handed to the family's own code)."""
        return self.to_official(model)

    def read_teacher(self, spec: TeacherSpec, path: str | os.PathLike) -> StateDict:
        """A teacher's release file in our key names (what load_teacher loads strictly)."""
        raw = safe_load(path)
        if not isinstance(raw, dict):
            raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
        return self.from_official(raw)

    # --- students ----------------------------------------------------------------------------------
    student_prefix: str = ""  # a student name with this prefix is one of this family's models (timm:resnet18)

    def create_student(
        self,
        arch: str,
        *,
        img_size: int = 224,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
        pretraining: bool = False,
    ) -> nn.Module:
        """A randomly initialised student `arch` (a STUDENT_ARCHS size) in this family's layout, initialised as
        the reference; for `pretraining`, with the family's pretraining drop-path schedule."""
        if arch not in STUDENT_ARCHS:
            raise UsageError(f"unknown student '{arch}'; choose from {', '.join(STUDENT_ARCHS)}")
        schedule = dict(drop_path_uniform=True) if pretraining and self.pretraining_drop_path_uniform else {}
        model = STUDENT_ARCHS[arch].build(
            self.layout, patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate, **schedule
        )
        return self.layout.init_student(model)

    def load_student_weights(self, student: nn.Module, path: str | os.PathLike) -> None:
        """Start a student from a weight file (--student-pretrained), strictly."""
        raise UsageError(f"--student-pretrained starts timm students (timm:<model>), not {self.title}-layout ones")

    def student_patch_size(self, arch: str) -> int:
        """The side in pixels of one token of student `arch` (its grid at an input size is size // this)."""
        return self.layout.patch_size

    def student_no_weight_decay(self, student: nn.Module) -> tuple[str, ...]:
        """Our names of a student's weights that are never decayed (1-d in the reference's layout)."""
        return self.layout.no_weight_decay if self.layout else ()

    def is_own(self, model: nn.Module) -> bool:
        """Whether a network is one of this family's (what to_official can write)."""
        return self.detects and self.owns(model.state_dict())

    def release_like(self, model: nn.Module) -> str | None:
        """The released model (a `teachers` name) whose architecture `model` has, or None: the figures its authors
        published for that release describe networks of this shape. Each release is built on the meta device (no
        memory, no weights) and compared tensor shape by tensor shape."""
        shapes = _shapes(model)
        for name, spec in self.teachers.items():
            with torch.device("meta"):
                release = spec.build()
            if _shapes(release) == shapes:
                return name
        return None

    # --- building networks -----------------------------------------------------------------------
    def load_teacher(
        self, spec: TeacherSpec, path: str | os.PathLike | None, *, name: str, dtype: torch.dtype
    ) -> nn.Module:
        """The teacher's network with its file's weights (strictly), in `dtype`; random without a file."""
        model = spec.build()
        if path is not None:
            load_strict(
                model, self.read_teacher(spec, path), f"{path} (teacher {name})", optional=self.teacher_optional
            )
        return model.to(dtype)

    def empty_backbone(self, state_dict: StateDict, img_size: int | None = None, **kwargs) -> nn.Module:
        """A randomly initialised network whose shape matches a state dict of this family in our names."""
        return timm_vit_from_state_dict(self.layout, state_dict, img_size=img_size, **kwargs)

    def load_backbone(self, state_dict: StateDict, source: str, *, trained: dict, **kwargs) -> nn.Module:
        """A backbone from a state dict of this family (official names or ours), strictly; `trained` is what an
        export records of its training resolution (models.checkpoints.export_metadata)."""
        sd = self.from_official(state_dict)
        patch_size = sd["patch_embed.proj.weight"].shape[-1]
        if trained and trained["patch_size"] != patch_size:
            raise UsageError(f"{source} records patch size {trained['patch_size']} but its weights have {patch_size}")
        model = self.empty_backbone(sd, img_size=trained.get("img_size"), **kwargs)
        load_strict(model, sd, source, optional=("mask_token",))
        return model


# what a student's inputs are normalised with in pretraining (pretrain.data: the ImageNet-normalised crops)
STUDENT_INPUTS = Normalization(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))


def with_export_metadata(
    network: nn.Module,
    state_dict: StateDict,
    *,
    img_size: int | None = None,
    normalization: Normalization = STUDENT_INPUTS,
    **names: str,
) -> StateDict:
    """`state_dict` carrying in its `_metadata` (export_metadata) the resolution the model is built at (pretraining's
    exports: the training one) and the mean and std its inputs had, and `names` (family, model) where the weights
    alone do not say them."""
    out = OrderedDict(state_dict)
    img_size = img_size or network.patch_embed.img_size[0]
    record = {"img_size": int(img_size), "patch_size": int(network.patch_size), **names}
    record.update(mean=list(normalization.mean), std=list(normalization.std))
    out._metadata = OrderedDict({EXPORT_METADATA: record})
    return out
