"""The Proteus objective: one meta-architecture for every teacher (PROTOCOLS A, "Losses"), and for several."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from models import Adaptors, DinoV3ViT, Teacher, TeacherTarget, Tokens, ViT
from models.adaptors import Adaptor

LOSSES = ("total", "token", "patch", "fea")  # a one-teacher Distiller's losses by name, in every log and checkpoint
LEVELS = ("token", "patch", "fea")


@dataclass(frozen=True)
class Views:
    """What a student sees of a batch of crops: its input side (the crop resized when it differs) and its token
    grid, to which every teacher's patch tokens are resampled when the teacher's own differs."""

    student: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class TeacherInput:
    """A teacher of the run and the side of the crops it sees (--teacher-input-size)."""

    teacher: Teacher
    size: int

    @property
    def name(self) -> str:
        return self.teacher.name

    @property
    def grid(self) -> tuple[int, int]:
        return (self.size // self.teacher.patch_size,) * 2


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square crops -> size x size, bicubic (as the crop itself), antialiased when shrinking; as they are when
    already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class Distiller(nn.Module):
    """Student + per teacher the three LayerNorm/Linear heads (models.Adaptor); forward returns the losses by
    name (`loss_names`): the weighted "total" and its parts.

    One teacher: the parts are token, patch and fea (LOSSES) and the heads keep their names (token_head, ...).
    Several: the parts are <teacher>_<level>, and the total sums each teacher's lambda-weighted losses times
    its --teacher-weights entry. Each teacher's targets go through its Standardizer (the identity unless
    --teacher-standardization says otherwise) before the MSE.
    Only heads of active losses exist, so DDP never waits for an unused parameter. The masked and
    clean views go through the student in one batched pass: [masked samples ; all samples clean].
    """

    def __init__(self, student: ViT | DinoV3ViT, targets: list[TeacherTarget]) -> None:
        super().__init__()
        self.student = student
        # registered below; the token head reads the summary, wider than the tokens in some models (MobileNetV4's)
        self.adaptors = {t.name: Adaptor(student.embed_dim, t, student.summary_dim) for t in targets}
        if len(targets) == 1:  # the heads at the top under their own names (the reference's, its checkpoints')
            (adaptor,) = self.adaptors.values()
            for name in ("token_head", "patch_head", "fea_head", "cls_std", "patch_std"):
                setattr(self, name, getattr(adaptor, name))  # None for a head of an unused level
            self.loss_names = LOSSES
        else:
            self.teachers = nn.ModuleDict(self.adaptors)
            self.loss_names = ("total", *(f"{t.name}_{level}" for t in targets for level in LEVELS))
        self.masked = any(t.lambda_patch for t in targets)
        if not self.masked and getattr(student, "mask_token", None) is not None:  # never gets a gradient
            student.mask_token.requires_grad_(False)

    def heads_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def export_adaptors(self, student: dict, teachers: dict[str, dict]) -> dict:
        """adaptors.pth's content: the heads and standardisers of every teacher (models.load_adaptors)."""
        targets = [a.target for a in self.adaptors.values()]
        adaptors = Adaptors(self.student.embed_dim, targets, teachers, summary_dim=self.student.summary_dim)
        for name, a in self.adaptors.items():
            adaptors.adaptors[name].load_state_dict(a.state_dict())
        return adaptors.export(student)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None, targets: dict[str, Tokens]
    ) -> dict[str, torch.Tensor]:
        """`masks` (M, N) bool covers the first M samples of the batch (M may be 0 or None); `targets` are each
        teacher's {"cls", "patches"} on the student's grid, by teacher name."""
        n_masked = masks.shape[0] if masks is not None and self.masked else 0
        if n_masked:
            x = torch.cat((images[:n_masked], images))
            view_masks = torch.cat((masks, masks.new_zeros(images.shape[0], masks.shape[1])))
            out = self.student.forward_tokens(x, masks=view_masks)
        else:
            out = self.student.forward_tokens(images)
        cls, patches = out.cls[n_masked:], out.patches
        losses = {"total": images.new_zeros((), dtype=torch.float32)}
        for name, a in self.adaptors.items():
            parts = teacher_losses(a, cls, patches, masks=masks if n_masked else None, target=targets[name])
            t = a.target
            total = t.lambda_token * parts["token"] + t.lambda_patch * parts["patch"] + t.lambda_fea * parts["fea"]
            losses["total"] = losses["total"] + t.weight * total
            losses.update(parts if len(self.adaptors) == 1 else {f"{name}_{k}": v for k, v in parts.items()})
        return losses


def teacher_losses(
    a: Adaptor, cls: torch.Tensor, patches: torch.Tensor, *, masks: torch.Tensor | None, target: Tokens
) -> dict[str, torch.Tensor]:
    """One teacher's token, patch and fea MSE in its standardised space (0 for a level it does not use).
    `patches` holds the masked samples' tokens first when `masks` is given, then every sample's clean ones."""
    n_masked = masks.shape[0] if masks is not None else 0
    t_cls, t_patches = a.cls_std(target.cls.float()), a.patch_std(target.patches.float())
    t = a.target
    zero = cls.new_zeros((), dtype=torch.float32)
    parts = {"token": zero, "patch": zero, "fea": zero}
    token_pred = a.token_head(cls).float() if a.token_head is not None else None
    if t.lambda_token:
        parts["token"] = F.mse_loss(token_pred, t_cls)
    if t.lambda_fea:
        pred = torch.cat((token_pred.unsqueeze(1), a.fea_head(patches[n_masked:]).float()), dim=1)
        parts["fea"] = F.mse_loss(pred, torch.cat((t_cls.unsqueeze(1), t_patches), dim=1))
    if n_masked and t.lambda_patch:
        pred = a.patch_head(patches[:n_masked][masks]).float()
        parts["patch"] = F.mse_loss(pred, t_patches[:n_masked][masks])
    return parts


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """[decay, no decay] by timm's rule: none on biases, norms and LayerScale gammas (ndim <= 1), as the
    reference, nor on `no_decay_names` (weights 1-d in the reference's layout but not in ours: CLIP's
    class_embedding). timm also exempts any `.bias` and reads the names as fnmatch patterns, neither of
    which changes our groups. The layout is ours: timm lists [no decay, decay] and, at weight decay 0, one
    group; checkpoints' optimizer states hold two groups in this order."""
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_decay_names)  # 1.0: any decay > 0 splits
    decayed = {g["weight_decay"] > 0: g["params"] for g in groups}
    return [
        {"params": decayed.get(True, []), "weight_decay": weight_decay},
        {"params": decayed.get(False, []), "weight_decay": 0.0},
    ]


def channels_last(student: nn.Module) -> nn.Module:
    """A convolutional student in channels-last memory format (cuDNN's fast layout for convolutions and their
    batch norms; the inputs follow the weights' format). A ViT, whose only convolution is its patch embedding,
    is left as it is: its tokens are matrices either way."""
    if sum(isinstance(m, nn.Conv2d) for m in student.modules()) > 1:
        student.to(memory_format=torch.channels_last)
    return student


def compile_student(student: ViT | DinoV3ViT) -> None:
    """torch.compile the student's forward_features in place (main.py and benchmark --compile).

    Only the student: the Distiller's boolean-mask indexing has a data-dependent shape and would
    break the graph, and the no-grad teacher is a small share of the step. The module itself is not
    wrapped, so state_dict keys, EMA copies and checkpoints are unchanged.
    """
    network = getattr(student, "model", student)  # a timm student's own model (TimmBackbone.model)
    network.forward_features = torch.compile(network.forward_features)
