"""Any timm image model under the backbone contract (models.tokens): a ViT with or without a CLS token,
registers or a MAP head, or a CNN whose last feature map is its patch grid.

The summary token is what the model's own head pools before its classifier (`forward_head(pre_logits=True)`):
the final-norm CLS for a CLS-pooled ViT, the attention-pooled MAP output for SigLIP, the mean of the tokens
for an average-pooled ViT, the pooled and normed last map for a ConvNeXt. The patch tokens are
`forward_features`' patch tokens (prefix tokens removed), or a CNN's last map flattened row-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import UsageError
from .tokens import Tokens


class TimmBackbone(nn.Module):
    """A timm model (built without a classifier) with `embed_dim`, `patch_size` and `forward_tokens`. Its
    weights are the timm model's, under `model.`; `model.state_dict()` is timm's own layout.

    `summary_dim` is the width of the summary token, which a model with a head of its own after the pooling
    (MobileNetV4's conv_head, EfficientViT's) makes wider than its patch tokens (`embed_dim`).
    As a student it has no mask token: masked patches are masked in pixel space (`mask_pixels`)."""

    summary_is_class_token = False  # its summary is what its head pools, whatever the model

    def __init__(self, model: nn.Module, name: str = "") -> None:
        super().__init__()
        self.model = model
        self.name = name  # timm's name of the model (what an export records to be rebuilt)
        self.embed_dim = model.num_features
        self.summary_dim = getattr(model, "head_hidden_size", None) or model.num_features
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)  # a ViT's CLS and register tokens
        # the stride of the last map (a ViT's: its patch, a hybrid's: its backbone's times its patch, a Swin's: 32),
        # which timm records for every model; a patch embedding's own size is that only for a plain ViT
        self.patch_size = int(model.feature_info[-1]["reduction"])
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"  # Swin-like maps: [B, H, W, C]

    def mask_pixels(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """`x` with the pixels of each masked cell of the token grid set to 0: after normalisation, the mean
        colour. `masks` [B, h*w] bool on the grid forward_tokens gives (cells of patch_size pixels)."""
        p = self.patch_size
        keep = ~masks.reshape(x.shape[0], 1, x.shape[-2] // p, x.shape[-1] // p)
        keep = keep.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return x * keep.to(x.dtype)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> Tokens:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = x.to(next(self.model.parameters()).dtype)
        if masks is not None:
            x = self.mask_pixels(x, masks)
        features = self.model.forward_features(x)
        if features.ndim == 4:  # a CNN's last map [B, C, H, W], or [B, H, W, C] for a model whose output is NHWC
            nchw = features.permute(0, 3, 1, 2) if self.channels_last_output else features
            grid = tuple(nchw.shape[-2:])
            if grid != (h // self.patch_size, w // self.patch_size):
                raise UsageError(
                    f"{type(self.model).__name__} gives a {grid[0]}x{grid[1]} map for {h}x{w} pixels, not the input "
                    f"size / its stride {self.patch_size}: a model whose maps do not tile its input cannot be used"
                )
            patches = nchw.flatten(2).transpose(1, 2)
        else:
            grid = (h // self.patch_size, w // self.patch_size)
            patches = features[:, self.num_prefix_tokens :]
            if patches.shape[1] != grid[0] * grid[1]:
                raise UsageError(
                    f"{type(self.model).__name__} gave {patches.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid"
                )
        summary = self.model.forward_head(features, pre_logits=True)
        return Tokens(summary, patches, grid)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """DINOv2's semantics (the maps the dense tasks read) through timm's `forward_intermediates`: the last `n`
        blocks or stages (int) or the listed indices; [B, D, h, w] maps with `reshape`, else [B, h*w, D]
        tokens; with `return_class_token` each paired with its CLS (a model without one has none to give)."""
        if return_class_token and getattr(self.model, "cls_token", None) is None:
            raise UsageError(f"a timm {type(self.model).__name__} has no class token to return")
        take = n if isinstance(n, int) else sorted(n)  # an int: timm's own "last n", whatever it counts as a stage
        kwargs = dict(return_prefix_tokens=True) if return_class_token else {}
        outs = self.model.forward_intermediates(
            x, indices=take, norm=norm, output_fmt="NCHW", intermediates_only=True, **kwargs
        )
        maps = [o[0] if return_class_token else o for o in outs]
        if not reshape:
            maps = [m.flatten(2).transpose(1, 2) for m in maps]
        if return_class_token:
            return tuple((m, o[1][:, 0]) for m, o in zip(maps, outs))
        return tuple(maps)

    def dense_indices(self) -> tuple[int, ...]:
        """The four maps a dense head reads, as `get_intermediate_layers` indices: a multi-scale model's last four
        stages (strides 4 to 32 for most CNNs, as mmseg's ResNet and ConvNeXt give UperNet), or a single-stride
        model's (a ViT's) blocks that end each quarter of its depth ([2, 5, 8, 11] of 12, as DINOv3 reads)."""
        info = self.model.feature_info
        if len({i["reduction"] for i in info}) > 1:
            return tuple(range(len(info)))[-4:]
        return tuple((k + 1) * len(info) // 4 - 1 for k in range(4))

    def map_widths(self, indices: Sequence[int]) -> list[int]:
        """The channels of the maps `get_intermediate_layers(n=indices)` gives (timm's feature_info)."""
        return [int(self.model.feature_info[i]["num_chs"]) for i in indices]

    def map_strides(self, indices: Sequence[int]) -> list[int]:
        """The strides in pixels of those maps."""
        return [int(self.model.feature_info[i]["reduction"]) for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).cls
