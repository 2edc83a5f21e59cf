"""Any timm image model as a teacher (`--teacher timm:<model_name> --teacher-checkpoint FILE`) or as a student
(`--student timm:<model_name>`, exported in timm's own layout; see docs/protocols.md for its losses).

The file is timm's own state dict of that model (a Hub `model.safetensors`, a `pytorch_model.bin`, or a
timm training checkpoint's `state_dict`), loaded strictly; only the classifier, which a teacher does not
use, may be in it or not. Mean, std and resolution come from the model's `pretrained_cfg`. The network is
a models.timm_backbone.TimmBackbone: its summary token is what the model's head pools (a CLS, a MAP head's
output, a ConvNeXt's pooled map), its patch tokens the last tokens or map. Its files are recognised by
the name the user gives, never by their keys (a timm ViT's keys are SynCLR's).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from ..checkpoints import StateDict, few_names, load_strict, safe_load
from ..errors import UsageError
from ..timm_backbone import TimmBackbone
from .base import Family, TimmArchitecture, with_export_metadata, without

PREFIX = "timm:"


@dataclass(frozen=True)
class TimmTeacherSpec:
    """A timm model as a teacher: what TeacherSpec says of a released one, read from timm's model."""

    family: str
    model_name: str
    embed_dim: int
    patch_size: int
    img_size: int
    mean: tuple
    std: tuple
    model_kwargs: dict = field(default_factory=dict)  # further create_model arguments (tests: tiny models)
    url: str = ""  # no download: timm teachers are read from a file
    token_only: bool = False

    def dense_level(self, input_size: int, student_grid: int) -> float:
        return 1.0

    def create(self, **kwargs) -> nn.Module:
        """timm's model, randomly initialised (any further create_model arguments win)."""
        kwargs = {**self.model_kwargs, **kwargs}
        try:  # a ViT takes other input sizes (--teacher-input-size) only with dynamic_img_size
            return timm.create_model(self.model_name, pretrained=False, dynamic_img_size=True, **kwargs)
        except TypeError:  # a model without the option (CNNs take any size)
            return timm.create_model(self.model_name, pretrained=False, **kwargs)

    def build(self) -> TimmBackbone:
        return TimmBackbone(self.create(num_classes=0), self.model_name)


def tensors(path: str | os.PathLike) -> StateDict:
    """The tensors of a state dict file (unwrapped from a training checkpoint's 'state_dict' or 'model')."""
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a state dict")
    raw = next((raw[k] for k in ("state_dict", "model") if isinstance(raw.get(k), dict)), raw)
    sd = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UsageError(f"{path} holds no tensors (keys: {few_names(sorted(map(str, raw)))})")
    return sd


def without_classifier(spec: TimmTeacherSpec, state_dict: StateDict) -> StateDict:
    """A timm state dict of the model without its classifier's weights, if it holds them."""
    with torch.device("meta"):
        headless, full = spec.create(num_classes=0).state_dict(), spec.create().state_dict()
    classifier = set(full) - set(headless)
    return {k: v for k, v in state_dict.items() if k not in classifier}


class Timm(Family):
    name = "timm"
    title = "timm"
    detects = False
    student_prefix = PREFIX
    position_table = False  # --reference-pos-embed is our ViTs'

    def dense_configs(self, size: str) -> str:
        """One set of configs for every timm model, its heads sized from the model's feature_info."""
        return "timm"

    def __init__(self) -> None:
        self._specs: dict[str, TimmTeacherSpec] = {}

    def spec(self, model_name: str, **model_kwargs) -> TimmTeacherSpec:
        """The spec of one timm model (built on the meta device once to read its width, patch and config)."""
        if not timm.is_model(model_name):
            raise UsageError(
                f"unknown timm model '{model_name}' (timm {timm.__version__}: timm.list_models() lists them)"
            )
        probe = TimmTeacherSpec(self.name, model_name, 0, 0, 0, (), (), model_kwargs)
        with torch.device("meta"):
            backbone = probe.build()
        if backbone.summary_dim != backbone.embed_dim:
            raise UsageError(
                f"timm model {model_name}'s pooled feature is {backbone.summary_dim} wide but its tokens "
                f"{backbone.embed_dim}: a teacher's summary and patch tokens must share one width"
            )
        cfg = backbone.model.pretrained_cfg
        return TimmTeacherSpec(
            self.name,
            model_name,
            embed_dim=backbone.embed_dim,
            patch_size=backbone.patch_size,
            img_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(cfg.get("mean", ())),
            std=tuple(cfg.get("std", ())),
            model_kwargs=model_kwargs,
        )

    def resolve(self, name: str) -> TimmTeacherSpec | None:
        if not name.startswith(PREFIX):
            return None
        if name not in self._specs:
            self._specs[name] = self.spec(name.removeprefix(PREFIX))
        return self._specs[name]

    def owns(self, state_dict) -> bool:
        return False

    def read_teacher(self, spec: TimmTeacherSpec, path: str | os.PathLike) -> StateDict:
        """timm's state dict of the model, without its classifier (which a teacher does not use)."""
        return without_classifier(spec, tensors(path))

    def load_teacher(self, spec: TimmTeacherSpec, path, *, name: str, dtype: torch.dtype) -> nn.Module:
        model = spec.build()
        if path is not None:
            load_strict(model.model, self.read_teacher(spec, path), f"{path} (teacher {name})")
        return model.to(dtype)

    # --- students -----------------------------------------------------------------------------------
    def student_model(self, arch: str, **kwargs) -> nn.Module:
        """timm's model `arch` without its classifier, randomly initialised as timm does (the paper's students
        start from random weights); a ViT at `img_size` that takes other sizes too."""
        return self._student_model(arch, **kwargs)[0]

    def _student_model(self, arch: str, **kwargs) -> tuple[nn.Module, dict]:
        """student_model's network and the size arguments timm took for it."""
        if not timm.is_model(arch):
            raise UsageError(f"unknown timm model '{arch}' (timm {timm.__version__}: timm.list_models() lists them)")
        img_size = kwargs.pop("img_size", None)
        kwargs.setdefault("num_classes", 0)
        # a ViT at its size that takes others too; a windowed model (MaxViT, Swin) at its size; a CNN takes neither
        sized = (dict(img_size=img_size, dynamic_img_size=True), dict(img_size=img_size))
        for extra in sized if img_size is not None else ():
            try:
                return timm.create_model(arch, pretrained=False, **extra, **kwargs), extra
            except TypeError:
                continue
        return timm.create_model(arch, pretrained=False, **kwargs), {}

    def create_student(
        self,
        arch: str,
        *,
        img_size: int = 224,
        patch_size: int | None = None,
        drop_path_rate: float = 0.0,
        pretraining: bool = False,  # timm's own drop-path schedule either way
    ) -> nn.Module:
        if patch_size:
            raise UsageError(f"a timm student's patch size is its own (timm:{arch})")
        kwargs = dict(drop_path_rate=drop_path_rate) if drop_path_rate else {}
        student = TimmBackbone(self.student_model(arch, img_size=img_size, **kwargs), arch)
        student.img_size = img_size
        return student

    def load_student_weights(self, student: TimmBackbone, path: str | os.PathLike) -> None:
        """timm's own file of the student's model (a Hub model.safetensors, ...), strictly; its classifier may be
        in it or not."""
        with torch.device("meta"):
            whole = self.student_model(student.name, num_classes=1000, img_size=getattr(student, "img_size", None))
        classifier = set(whole.state_dict()) - set(student.model.state_dict())
        sd = {k: v for k, v in tensors(path).items() if k not in classifier}
        # timm's own adaptation of a file to the model built (a ViT's position table resized to its size, as
        # timm.create_model(pretrained=True) does), where the model's module has one
        adapt = getattr(sys.modules[type(student.model).__module__], "checkpoint_filter_fn", None)
        if adapt is not None:
            try:
                sd = adapt(sd, student.model)
            except (KeyError, RuntimeError, ValueError) as e:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"{path} is not timm's file of {student.name} ({why})") from None
        load_strict(student.model, sd, f"{path} (--student-pretrained, timm:{student.name})")

    def student_patch_size(self, arch: str) -> int:
        with torch.device("meta"):
            return TimmBackbone(self.student_model(arch)).patch_size

    def is_own(self, model: nn.Module) -> bool:
        return isinstance(model, TimmBackbone)

    def student_no_weight_decay(self, student: TimmBackbone) -> tuple[str, ...]:
        """What timm's own model exempts from weight decay (a ViT's position table and tokens)."""
        names = getattr(student.model, "no_weight_decay", lambda: ())()
        return tuple(f"model.{n}" for n in names)

    def to_official(self, model: TimmBackbone) -> StateDict:
        """timm's own state dict of the model, recording which model it is and the resolution it was trained at
        (timm.create_model(model, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...)) loads
        it strictly)."""
        sd = {k: v.detach().clone().cpu() for k, v in model.model.state_dict().items()}
        size = getattr(model, "img_size", None) or model.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        return with_export_metadata(model, sd, img_size=size, family=self.name, model=model.name)

    def timm_architecture(self, model: TimmBackbone, *, img_size: int) -> TimmArchitecture:
        """The model itself, built as the student was: at its training size where timm takes one, no classifier."""
        with torch.device("meta"):
            _, size = self._student_model(model.name, img_size=getattr(model, "img_size", None) or img_size)
        return TimmArchitecture(model.name, {**size, "num_classes": 0})

    def at_resolution(self, model: TimmBackbone, img_size: int) -> nn.Module:
        """The student set to `img_size` as timm sets a model (`set_input_size`: a ViT's table resampled by timm's
        rule, the student's own; a CNN as it is); a model that takes no such input is one line."""
        if img_size == getattr(model, "img_size", None):
            return model
        try:
            with torch.no_grad():
                model.eval().forward_tokens(torch.zeros(1, 3, img_size, img_size))
        except (AssertionError, RuntimeError) as e:  # timm's size checks (a windowed or fixed-size model)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"timm's {model.name} takes no {img_size} px inputs ({why})") from None
        out = copy.deepcopy(model)
        if hasattr(out.model, "set_input_size"):
            out.model.set_input_size(img_size=img_size)
        out.img_size = img_size
        return out

    def to_timm(self, model: TimmBackbone) -> StateDict:
        return without(model.model.state_dict())

    def load_backbone(self, state_dict: StateDict, source: str, *, trained: dict, **kwargs) -> nn.Module:
        if "model" not in trained:
            raise UsageError(f"{source} does not record which timm model it is")
        model = self.create_student(trained["model"], img_size=trained["img_size"], **kwargs)
        load_strict(model.model, state_dict, source)
        return model

    def empty_backbone(self, state_dict: StateDict, img_size: int | None = None, **kwargs) -> nn.Module:
        raise UsageError("a timm model's weights do not say which model they are: load it with timm.create_model")


FAMILY = Timm()
