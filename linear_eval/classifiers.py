"""The DINOv2 linear-probe grid: 52 linear classifiers fed by one frozen feature pass.

Every classifier input is a contiguous slice of one compact feature vector per image,
`[cls(block -4), cls(-3), cls(-2), cls(-1), mean(patches of block -1)]` (5D wide), so the frozen
features are computed (and cached) once and each classifier reads its slice without a copy:
last 1 block -> cls(-1) (D), + avgpool (2D); last 4 blocks -> 4 CLS (4D), + avgpool (5D).

A backbone whose summary is not a class token (a CNN, a timm model pooled its own way) has no such
layers: its probe is the same 13 learning rates on its global feature (the summary token) alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import ViT

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
N_LAST_BLOCKS = (1, 4)
AVGPOOL = (False, True)
LR_REFERENCE_BATCH = 256  # lrs are scaled by global batch / 256


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    n_blocks: int
    avgpool: bool
    lr: float  # already scaled by the global batch

    def input_slice(self, dim: int) -> slice:
        """Columns of the compact 5D feature this classifier reads (n_blocks 0: the whole global feature)."""
        if self.n_blocks == 0:
            return slice(0, dim)
        return slice((4 - self.n_blocks) * dim, (5 if self.avgpool else 4) * dim)


def classifier_grid(global_batch: int) -> list[ClassifierSpec]:
    """The 2 x 2 x 13 = 52 classifiers, lrs scaled by global_batch / 256."""
    return [
        ClassifierSpec(
            f"blocks{n}_{'cls+avgpool' if avg else 'cls'}_lr{lr:.0e}", n, avg, lr * global_batch / LR_REFERENCE_BATCH
        )
        for n in N_LAST_BLOCKS
        for avg in AVGPOOL
        for lr in LEARNING_RATES
    ]


def global_grid(global_batch: int) -> list[ClassifierSpec]:
    """The 13 classifiers of the global feature, lrs scaled by global_batch / 256."""
    return [
        ClassifierSpec(f"global_lr{lr:.0e}", 0, False, lr * global_batch / LR_REFERENCE_BATCH) for lr in LEARNING_RATES
    ]


@torch.no_grad()
def linear_features(backbone: ViT, images: torch.Tensor) -> torch.Tensor:
    """(B, 5D) compact features from get_intermediate_layers(n=4, return_class_token=True, norm=True)."""
    layers = backbone.get_intermediate_layers(images, n=4, return_class_token=True, norm=True)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(dim=1)], dim=-1).float()


@torch.no_grad()
def global_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) the backbone's global feature: its summary token (forward_tokens)."""
    return backbone.forward_tokens(images).cls.float()


@dataclass(frozen=True)
class Probe:
    """Which features a backbone's classifiers read: DINOv2's (class tokens of the last 4 blocks and the
    patch average) or, for a backbone whose summary is not a class token, its global feature."""

    name: str  # results.json's protocol name
    feature_type: str  # what the feature cache records
    grid: Callable[[int], list[ClassifierSpec]]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def width(self, backbone: nn.Module) -> int:
        """The `embed_dim` AllClassifiers slices by."""
        return backbone.embed_dim if self is DINOV2 else backbone.summary_dim


DINOV2 = Probe("DINOv2 linear probe (PROTOCOLS B)", "linear probe: last-4-block CLS + avgpool", classifier_grid,
               linear_features)  # fmt: skip
GLOBAL = Probe("linear probe on the global feature (13 lrs of PROTOCOLS B)", "linear probe: global feature",
               global_grid, global_features)  # fmt: skip


def probe_of(backbone: nn.Module) -> Probe:
    """DINOv2's probe for a backbone whose summary is its class token (our ViTs), else the global feature's."""
    return DINOV2 if backbone.summary_is_class_token else GLOBAL


class AllClassifiers(nn.Module):
    """One nn.Linear per spec (N(0, 0.01) weights, zero bias); forward returns {name: logits}."""

    def __init__(self, specs: list[ClassifierSpec], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.specs, self.embed_dim = specs, embed_dim
        self.heads = nn.ModuleDict()
        for s in specs:
            head = nn.Linear(s.input_slice(embed_dim).stop - s.input_slice(embed_dim).start, num_classes)
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads[s.name] = head

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: self.heads[s.name](features[:, s.input_slice(self.embed_dim)]) for s in self.specs}

    def param_groups(self) -> list[dict]:
        """One SGD param group per classifier, carrying its peak lr as `base_lr` for the schedule."""
        return [{"params": list(self.heads[s.name].parameters()), "lr": s.lr, "base_lr": s.lr} for s in self.specs]
