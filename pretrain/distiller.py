"""The Proteus objective: one meta-architecture for every teacher (PROTOCOLS A, "Losses")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from models import DinoV3ViT, ViT

LOSSES = ("total", "token", "patch", "fea")  # the Distiller's losses by name, in every log and checkpoint


def head(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, eps=1e-5), nn.Linear(dim_in, dim_out))


@dataclass(frozen=True)
class Views:
    """What each network sees of a batch of crops: the student's and the teacher's input side (the crop
    resized when it differs; --teacher-input-size) and the student's token grid, to which the teacher's
    patch tokens are resampled when its own differs (models.resample_patches)."""

    student: int
    teacher: int
    grid: tuple[int, int]

    def resized(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's images, the teacher's images) from one batch of crops."""
        return resize(images, self.student), resize(images, self.teacher)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square crops -> size x size, bicubic (as the crop itself), antialiased when shrinking; as they are when
    already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class Distiller(nn.Module):
    """Student + the three LayerNorm/Linear heads; forward returns the losses by name (LOSSES): the weighted
    "total" and its parts.

    Only heads of active losses exist, so DDP never waits for an unused parameter. The masked and
    clean views go through the student in one batched pass: [masked samples ; all samples clean].
    """

    def __init__(
        self,
        student: ViT | DinoV3ViT,
        teacher_dim: int,
        lambda_token: float = 1.0,
        lambda_patch: float = 1.0,
        lambda_fea: float = 1.0,
    ) -> None:
        super().__init__()
        self.student = student
        self.lambda_token, self.lambda_patch, self.lambda_fea = lambda_token, lambda_patch, lambda_fea
        d = student.embed_dim
        self.token_head = head(d, teacher_dim) if (lambda_token or lambda_fea) else None
        self.patch_head = head(d, teacher_dim) if lambda_patch else None
        self.fea_head = head(d, teacher_dim) if lambda_fea else None
        if not lambda_patch:  # no masked view: the mask token never gets a gradient
            student.mask_token.requires_grad_(False)

    def heads_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None, targets: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`masks` (M, N) bool covers the first M samples of the batch (M may be 0 or None)."""
        n_masked = masks.shape[0] if masks is not None and self.lambda_patch else 0
        if n_masked:
            x = torch.cat((images[:n_masked], images))
            view_masks = torch.cat((masks, masks.new_zeros(images.shape[0], masks.shape[1])))
            out = self.student.forward_features(x, masks=view_masks)
        else:
            out = self.student.forward_features(images)
        cls = out["x_norm_clstoken"][n_masked:]
        patches = out["x_norm_patchtokens"]
        t_cls, t_patches = targets["cls"].float(), targets["patches"].float()

        zero = images.new_zeros((), dtype=torch.float32)
        parts = {"token": zero, "patch": zero, "fea": zero}
        token_pred = self.token_head(cls).float() if self.token_head is not None else None
        if self.lambda_token:
            parts["token"] = F.mse_loss(token_pred, t_cls)
        if self.lambda_fea:
            pred = torch.cat((token_pred.unsqueeze(1), self.fea_head(patches[n_masked:]).float()), dim=1)
            parts["fea"] = F.mse_loss(pred, torch.cat((t_cls.unsqueeze(1), t_patches), dim=1))
        if n_masked:
            pred = self.patch_head(patches[:n_masked][masks]).float()
            parts["patch"] = F.mse_loss(pred, t_patches[:n_masked][masks])
        total = self.lambda_token * parts["token"] + self.lambda_patch * parts["patch"] + self.lambda_fea * parts["fea"]
        return {"total": total, **parts}


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


def compile_student(student: ViT | DinoV3ViT) -> None:
    """torch.compile the student's forward_features in place (main.py and benchmark --compile).

    Only the student: the Distiller's boolean-mask indexing has a data-dependent shape and would
    break the graph, and the no-grad teacher is a small share of the step. The module itself is not
    wrapped, so state_dict keys, EMA copies and checkpoints are unchanged.
    """
    student.forward_features = torch.compile(student.forward_features)
