"""The backbone contract: what every backbone gives, whatever its family.

A backbone (a student, a teacher's network, anything an evaluation loads) has `embed_dim`, `patch_size`
(the side in pixels of one patch token: a CNN's last stride) and `forward_tokens(images, masks=None)`,
which returns `Tokens`: its summary token and its patch tokens on their grid. The summary is the
final-norm CLS token where the family has one; a family without one defines its own (SigLIP's attention-
pooled MAP head output; mean-pooled patches as the family's own code pools them otherwise). Nothing outside
a family's network needs `cls_token` to exist. A patch map always travels with the grid it lies on
(resampling needs it), and no code unpacks a string-keyed dict by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class Tokens(NamedTuple):
    cls: torch.Tensor  # [B, D]: the summary token (final-norm CLS; CLIP: ln_post(CLS); SigLIP: its MAP head's)
    patches: torch.Tensor  # [B, h*w, D]: the final-norm patch tokens, row-major
    grid: tuple[int, int]  # (h, w) of `patches`

    def on_grid(self, grid: tuple[int, int]) -> Tokens:
        """The same tokens with the patch map resampled to `grid` (itself when it already lies there)."""
        grid = tuple(grid)
        if grid == tuple(self.grid):
            return self
        return self._replace(patches=resample_patches(self.patches, self.grid, grid), grid=grid)


def resample_patches(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] patch tokens on a `grid` (h, w) -> [B, H*W, D] on `size` (H, W): bilinear on the
    [B, D, h, w] map, antialiased when shrinking, in float32."""
    b, _, d = patches.shape
    x = patches.float().transpose(1, 2).reshape(b, d, *grid)
    shrink = size[0] < grid[0] or size[1] < grid[1]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.reshape(b, d, -1).transpose(1, 2)


class Backbone(Protocol):
    """What every network the project distils from, trains or evaluates provides (our ViTs, DINOv3's, any timm
    model through models.timm_backbone.TimmBackbone)."""

    embed_dim: int  # the width of its summary and patch tokens
    patch_size: int  # pixels per patch token (a CNN: its last map's stride)
    summary_is_class_token: bool  # its summary is a final-norm CLS token (DINOv2's probes read class tokens)
    summary_dim: int  # the width of its summary (wider than its tokens where a head follows the pooling)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Tokens:
        """The summary token and the final patch tokens on their grid (`masks`: mask tokens, students only)."""

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """The maps the dense tasks read, with DINOv2's semantics: the last `n` blocks or the listed ones,
        [B, D, h, w] with `reshape`."""
