"""The DINOv2 linear-probe grid: 52 linear classifiers fed by one frozen feature pass.

Every classifier input is a contiguous slice of one compact feature vector per image,
`[cls(block -4), cls(-3), cls(-2), cls(-1), mean(patches of block -1)]` (5D wide), so the frozen
features are computed (and cached) once and each classifier reads its slice without a copy:
last 1 block -> cls(-1) (D), + avgpool (2D); last 4 blocks -> 4 CLS (4D), + avgpool (5D).
"""

from __future__ import annotations

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
        """Columns of the compact 5D feature this classifier reads."""
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


@torch.no_grad()
def linear_features(backbone: ViT, images: torch.Tensor) -> torch.Tensor:
    """(B, 5D) compact features from get_intermediate_layers(n=4, return_class_token=True, norm=True)."""
    layers = backbone.get_intermediate_layers(images, n=4, return_class_token=True, norm=True)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(dim=1)], dim=-1).float()


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
