"""The linear-probe grids (DINOv2's 52 classifiers, DINOv3's 13) and the protocols that train them.

Every classifier input is a contiguous slice of one compact feature vector per image,
`[cls(block -k), ..., cls(-1), mean(patches of block -1)]` ((k + 1)D wide), so the frozen
features are computed (and cached) once and each classifier reads its slice without a copy.
DINOv2 (k = 4): last 1 block -> cls(-1) (D), + avgpool (2D); last 4 blocks -> 4 CLS (4D), + avgpool (5D).
DINOv3 (k = 1, dinov3/eval/linear.py): last block CLS + avgpool (2D) only.

A backbone whose summary is not a class token (a CNN, a timm model pooled its own way) has no such
layers: its probe is the same 13 learning rates on its global feature (the summary token) alone.

`PROTOCOLS` is the one place each `--protocol` is defined: its grids and its schedule defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from models import ViT

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
N_LAST_BLOCKS = (1, 4)
AVGPOOL = (False, True)
LR_REFERENCE_BATCH = 256  # lrs are scaled by global batch / 256 (DINOv2 and DINOv3 alike)
# dinov3/eval/linear.py: _DEFAULT_LR_LIST is DINOv2's 13 values; n_last_blocks_list (1,); avgpool True only
DINOV3_LEARNING_RATES = LEARNING_RATES
DINOV3_N_LAST_BLOCKS = (1,)
DINOV3_AVGPOOL = (True,)


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    n_blocks: int
    avgpool: bool
    lr: float  # already scaled by the global batch
    feature_blocks: int = 4  # how many class tokens lead the compact feature it reads (DINOv2's: 4)

    def input_slice(self, dim: int) -> slice:
        """Columns of the compact feature this classifier reads (n_blocks 0: the whole global feature)."""
        if self.n_blocks == 0:
            return slice(0, dim)
        k = self.feature_blocks
        return slice((k - self.n_blocks) * dim, (k + 1 if self.avgpool else k) * dim)


def lr_grid(
    global_batch: int, *, n_last_blocks: tuple[int, ...], avgpool: tuple[bool, ...], learning_rates: tuple[float, ...]
) -> list[ClassifierSpec]:
    """Inputs x learning rates, lrs scaled by global_batch / 256, read from a feature of max(n_last_blocks) CLS."""
    return [
        ClassifierSpec(
            f"blocks{n}_{'cls+avgpool' if avg else 'cls'}_lr{lr:.0e}",
            n,
            avg,
            lr * global_batch / LR_REFERENCE_BATCH,
            feature_blocks=max(n_last_blocks),
        )
        for n in n_last_blocks
        for avg in avgpool
        for lr in learning_rates
    ]


def classifier_grid(global_batch: int) -> list[ClassifierSpec]:
    """DINOv2's 2 x 2 x 13 = 52 classifiers, lrs scaled by global_batch / 256."""
    return lr_grid(global_batch, n_last_blocks=N_LAST_BLOCKS, avgpool=AVGPOOL, learning_rates=LEARNING_RATES)


def dinov3_grid(global_batch: int) -> list[ClassifierSpec]:
    """DINOv3's 1 x 1 x 13 = 13 classifiers (last block, CLS + avgpool), lrs scaled by global_batch / 256."""
    return lr_grid(
        global_batch, n_last_blocks=DINOV3_N_LAST_BLOCKS, avgpool=DINOV3_AVGPOOL, learning_rates=DINOV3_LEARNING_RATES
    )


def global_grid(global_batch: int) -> list[ClassifierSpec]:
    """The 13 classifiers of the global feature, lrs scaled by global_batch / 256."""
    return [
        ClassifierSpec(f"global_lr{lr:.0e}", 0, False, lr * global_batch / LR_REFERENCE_BATCH) for lr in LEARNING_RATES
    ]


@torch.no_grad()
def block_features(backbone: ViT, images: torch.Tensor, n: int = 4) -> torch.Tensor:
    """(B, (n + 1)D) compact features from get_intermediate_layers(n=n, return_class_token=True, norm=True):
    the final-norm CLS of the last n blocks, then the mean of the last block's normed patch tokens."""
    layers = backbone.get_intermediate_layers(images, n=n, return_class_token=True, norm=True)
    return torch.cat([cls for _, cls in layers] + [layers[-1][0].mean(dim=1)], dim=-1).float()


linear_features = partial(block_features, n=4)  # DINOv2's (B, 5D)
last_block_features = partial(block_features, n=1)  # DINOv3's (B, 2D)


@torch.no_grad()
def global_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, D) the backbone's global feature: its summary token (forward_tokens)."""
    return backbone.forward_tokens(images).cls.float()


@dataclass(frozen=True)
class Probe:
    """Which features a backbone's classifiers read: class tokens of the last `blocks` blocks and the patch
    average (DINOv2: 4, DINOv3: 1) or, for a backbone whose summary is not a class token, its global feature."""

    name: str  # results.json's protocol name
    feature_type: str  # what the feature cache records
    grid: Callable[[int], list[ClassifierSpec]]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    blocks: int = 0  # the last blocks whose CLS it reads (0: the global feature, no blocks)

    def width(self, backbone: nn.Module) -> int:
        """The `embed_dim` AllClassifiers slices by."""
        return backbone.embed_dim if self.blocks else backbone.summary_dim


DINOV2 = Probe("DINOv2 linear probe (PROTOCOLS B)", "linear probe: last-4-block CLS + avgpool", classifier_grid,
               linear_features, blocks=4)  # fmt: skip
GLOBAL = Probe("linear probe on the global feature (13 lrs of PROTOCOLS B)", "linear probe: global feature",
               global_grid, global_features)  # fmt: skip
DINOV3 = Probe("DINOv3 linear probe (dinov3/eval/linear.py)", "linear probe: last-block CLS + avgpool",
               dinov3_grid, last_block_features, blocks=1)  # fmt: skip
# DINOv3's 13 lrs are DINOv2's, so the global-feature grid is the same; the name says whose schedule trained it
GLOBAL_DINOV3 = Probe("DINOv3 linear probe on the global feature (13 lrs of dinov3/eval/linear.py)",
                      "linear probe: global feature", global_grid, global_features)  # fmt: skip


@dataclass(frozen=True)
class LinearProtocol:
    """One `--protocol`: its grids and the defaults of the flags that shape its schedule."""

    key: str  # the --protocol value
    probe: Probe  # a backbone whose summary is its class token
    global_probe: Probe  # any other backbone
    epochs: int
    epoch_length: int | None  # iterations per epoch; None: one pass over train at the run's global batch
    batch_size: int  # per GPU: --batch-size's default (one for every protocol)
    reference_gpus: int  # the run its numbers were published from: global batch = batch_size x this


PROTOCOLS = {
    p.key: p
    for p in (
        # PROTOCOLS B: 10 one-pass epochs at 4 x 128 (2502 iterations each on ImageNet-1k)
        LinearProtocol("dinov2", DINOV2, GLOBAL, epochs=10, epoch_length=None, batch_size=128, reference_gpus=4),
        # dinov3/eval/linear.py TrainConfig: epochs 10, epoch_length 1250, batch_size 128 per GPU; the README
        # launches it through dinov3/run/submit.py, whose defaults are 1 node x 8 GPUs (global batch 1024)
        LinearProtocol("dinov3", DINOV3, GLOBAL_DINOV3, epochs=10, epoch_length=1250, batch_size=128, reference_gpus=8),
    )
}
DEFAULT_PROTOCOL = "dinov2"


def probe_of(backbone: nn.Module, protocol: LinearProtocol = PROTOCOLS[DEFAULT_PROTOCOL]) -> Probe:
    """The protocol's block probe for a backbone whose summary is its class token (our ViTs), else its
    global feature's."""
    return protocol.probe if backbone.summary_is_class_token else protocol.global_probe


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
