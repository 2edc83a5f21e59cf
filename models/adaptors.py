"""A student's adaptors: per teacher, the LayerNorm+Linear heads that map student tokens to that teacher's
width, and the standardisation of that teacher's targets (PHI-S, per-channel z-score or none).

With several teachers the summed loss is dominated by whichever has the largest features unless each
teacher's targets are standardised. PHI-S (Ranzinger et al., "PHI-S: Distribution Balancing for
Label-Free Multi-Teacher Distillation", used by AM-RADIO v2.5) rotates the centred features into
their principal axes, then by a normalised Hadamard matrix, which spreads the variance equally over
every channel, and divides by one scalar: y = H U^T (x - mean) / alpha. Being a rotation and one
scale, it is inverted exactly, so `Adaptors` gives each teacher's features in its original space.

The summary (CLS) and the patch tokens are standardised apart, each with its own statistics, so the token
loss, an MSE like the patch losses, sees targets of unit scale too. `TeacherTarget.summary_standardization`
"none" keeps the summary as the teacher gives it while the patches are standardised (what RADIO's released
normaliser does to summary tokens); its token head then predicts the raw summary and `predict` returns it as is.

`adaptors.pth` (written by pretraining next to backbone.pth) holds the heads and statistics; `load_adaptors`
reads it (weights_only), or its safetensors + JSON form in a folder written by scripts.export (models.exports),
and `Adaptors(backbone, images)` predicts every teacher's CLS and patch features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import UsageError
from .tokens import Tokens

STANDARDIZATIONS = ("phi-s", "zscore", "none")
FORMAT = "proteus-adaptors"


class Prediction(NamedTuple):
    """What a student predicts of one teacher through its adaptor, in the teacher's own space."""

    cls: torch.Tensor | None  # [B, D_t]: the teacher's summary token (None: no token head)
    patches: torch.Tensor | None  # [B, h*w, D_t]: its patch tokens on the student's grid (None: no patch head)
    grid: tuple[int, int]  # (h, w) of `patches`


def head(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, eps=1e-5), nn.Linear(dim_in, dim_out))


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % k for k in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4)."""
    residues = {(k * k) % q for k in range(1, q)}
    chi = lambda a: 0 if a % q == 0 else (1 if a % q in residues else -1)  # noqa: E731
    h = torch.ones(q + 1, q + 1, dtype=torch.float64)
    for i in range(q):
        for j in range(q):
            h[i + 1, j + 1] = chi(j - i) + (i == j)
    h[1:, 0] = -1
    return h


def hadamard(n: int) -> torch.Tensor:
    """An n x n Hadamard matrix scaled to be orthogonal (entries +-1/sqrt(n)), float64: Sylvester's doubling
    of 1 or of a Paley matrix. Covers every ViT width in use (384 = 12*32, 768 = 12*64, 1024, 1280 = 20*64,
    1536, 4096, ...); other widths raise ValueError."""
    for k in range(n.bit_length(), -1, -1):
        m = n >> k
        if m << k != n:
            continue
        if m == 1:
            h = torch.ones(1, 1, dtype=torch.float64)
        elif m % 4 == 0 and _is_prime(m - 1):
            h = _paley(m - 1)
        else:
            continue
        for _ in range(k):
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        return h / math.sqrt(n)
    raise UsageError(f"no Hadamard matrix of order {n} is constructed here: use --teacher-standardization zscore")


class Standardizer(nn.Module):
    """Standardises one kind of a teacher's tokens (its CLS, or its patches) with statistics estimated once
    and then frozen (buffers: saved in checkpoints and adaptors.pth). kind "none" is the identity and has no
    buffers, so a one-teacher run's checkpoint holds what it held before standardisation existed."""

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in STANDARDIZATIONS:
            raise UsageError(f"unknown standardization {kind!r}; choose from {', '.join(STANDARDIZATIONS)}")
        self.kind = kind
        if kind != "none":
            self.register_buffer("estimated", torch.tensor(False))
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("scale", torch.ones(dim))  # zscore: per-channel std; phi-s: alpha in every channel
            if kind == "phi-s":
                self.register_buffer("rotation", torch.eye(dim))  # H U^T

    @property
    def fitted(self) -> bool:
        return self.kind == "none" or bool(self.estimated)

    def fit(self, count: float, total: torch.Tensor, outer: torch.Tensor) -> None:
        """From the moments of `count` tokens: their sum [D] and the sum of their outer products [D, D] (float64)."""
        if self.kind == "none":
            return
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        if self.kind == "zscore":
            self.scale.copy_(cov.diagonal().clamp_min(1e-12).sqrt())
        elif self.kind == "phi-s":
            eigenvalues, eigenvectors = torch.linalg.eigh(cov)
            self.rotation.copy_(hadamard(cov.shape[0]) @ eigenvectors.T)
            self.scale.fill_(eigenvalues.clamp_min(0).mean().clamp_min(1e-24).sqrt().item())
        self.mean.copy_(mean)
        self.estimated.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        with torch.autocast(x.device.type, enabled=False):  # in float32 under the step's bf16 autocast too
            x = x.float() - self.mean
            if self.kind == "phi-s":
                x = x @ self.rotation.T
            return x / self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return y
        with torch.autocast(y.device.type, enabled=False):
            y = y.float() * self.scale
            if self.kind == "phi-s":
                y = y @ self.rotation
            return y + self.mean


@dataclass(frozen=True)
class TeacherTarget:
    """What a student learns from one teacher: its width, the weight of its loss in the total, its loss
    levels' weights (a head exists only for a level in use) and how its targets are standardised (the
    summary token's and the patch tokens' kinds, each with its own statistics)."""

    name: str
    dim: int
    weight: float = 1.0
    lambda_token: float = 1.0
    lambda_patch: float = 1.0
    lambda_fea: float = 1.0
    standardization: str = "none"  # of the patch tokens, and of the summary unless said below
    summary_standardization: str | None = None  # of the summary (CLS) token; None: `standardization`

    def __post_init__(self) -> None:
        if self.summary_standardization is None:  # also an adaptors.pth without the field: both alike
            object.__setattr__(self, "summary_standardization", self.standardization)


class Adaptor(nn.Module):
    """One teacher's heads and target standardisers. The heads predict standardised targets; `predict`
    returns them in the teacher's own space. The token head reads the student's summary token, `summary_dim`
    wide (default: `student_dim`, the width of its patch tokens, which the patch and fea heads read)."""

    def __init__(self, student_dim: int, target: TeacherTarget, summary_dim: int | None = None) -> None:
        super().__init__()
        self.target = target
        dim = target.dim
        summary_dim = summary_dim or student_dim
        self.token_head = head(summary_dim, dim) if (target.lambda_token or target.lambda_fea) else None
        self.patch_head = head(student_dim, dim) if target.lambda_patch else None
        self.fea_head = head(student_dim, dim) if target.lambda_fea else None
        self.cls_std = Standardizer(dim, target.summary_standardization)
        self.patch_std = Standardizer(dim, target.standardization)

    def predict(self, tokens: Tokens) -> Prediction:
        """The teacher's summary and patch tokens predicted from the student's (its forward_tokens): the summary
        by the token head, patches by the all-token (fea) head, else the masked-patch head; de-standardised.
        A level without a head is None."""
        cls = self.cls_std.inverse(self.token_head(tokens.cls)) if self.token_head is not None else None
        patch_head = self.fea_head if self.fea_head is not None else self.patch_head
        patches = self.patch_std.inverse(patch_head(tokens.patches)) if patch_head is not None else None
        return Prediction(cls, patches, tokens.grid)


class Adaptors(nn.Module):
    """Every teacher's adaptor of one student, as `load_adaptors` reads them from adaptors.pth."""

    def __init__(
        self, student_dim: int, targets: list[TeacherTarget], teachers: dict | None = None, *, summary_dim: int = 0
    ) -> None:
        super().__init__()
        self.student_dim, self.summary_dim = student_dim, summary_dim or student_dim
        self.adaptors = nn.ModuleDict({t.name: Adaptor(student_dim, t, self.summary_dim) for t in targets})
        self.teachers = teachers or {}  # per teacher: family, patch size, input size, mean, std (informative)

    def forward(self, backbone: nn.Module, images: torch.Tensor) -> dict[str, Prediction]:
        """Each teacher's Prediction (summary [B, D_t], patches [B, N, D_t]) for `images` normalised as the
        student's input (ImageNet mean/std), the patches on the student's grid."""
        tokens = backbone.forward_tokens(images)
        return {name: a.predict(tokens) for name, a in self.adaptors.items()}

    def export(self, student: dict) -> dict:
        """adaptors.pth's content (plain tensors and Python values: readable with weights_only=True)."""
        return {
            "format": FORMAT,
            "student": {**student, "dim": self.student_dim, "summary_dim": self.summary_dim},
            "teachers": {
                name: {**asdict(a.target), **self.teachers.get(name, {}), "state_dict": a.state_dict()}
                for name, a in self.adaptors.items()
            },
        }


def load_adaptors(path: str | Path) -> Adaptors:
    """adaptors.pth (pretraining's export), or the adaptors.json + adaptors.safetensors of a folder written by
    scripts.export (the folder, or either file) -> Adaptors, strictly; one clear line for any other file."""
    from .checkpoints import safe_load
    from .exports import ADAPTORS_JSON, ADAPTORS_WEIGHTS, read_adaptor_files

    path = Path(path)
    exported = path.is_dir() or path.name in (ADAPTORS_JSON, ADAPTORS_WEIGHTS)
    data = read_adaptor_files(path) if exported else safe_load(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path} is not an adaptors.pth written by pretraining (no 'format': '{FORMAT}')")
    fields = TeacherTarget.__dataclass_fields__
    targets, teachers = [], {}
    for name, entry in data["teachers"].items():
        targets.append(TeacherTarget(**{k: v for k, v in entry.items() if k in fields}))
        teachers[name] = {k: v for k, v in entry.items() if k not in fields and k != "state_dict"}
    student = data["student"]
    adaptors = Adaptors(student["dim"], targets, teachers, summary_dim=student.get("summary_dim", student["dim"]))
    for name, entry in data["teachers"].items():
        adaptors.adaptors[name].load_state_dict(entry["state_dict"])
    return adaptors.eval()
