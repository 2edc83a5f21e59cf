"""Our ViT and what mmsegmentation lacks for the DINOv2 dense protocols, registered on import.

Configs load it with `custom_imports = dict(imports=["models.mmseg"])`. It provides:
- `ProteusViT`: any checkpoint `models.load_backbone` accepts, run at any input size (DINOv2
  pos-embed interpolation), returning the blocks in `out_indices` without CLS or final norm;
  frozen (linear probe) or fine-tuned, with drop path.
- `ViTLayerDecayOptimizerConstructor`: layer-wise lr decay keyed on OUR parameter names (mmseg's
  own constructor matches `backbone.layers.*`, so with this backbone its multipliers never apply:
  the reference's defect).
- `DPTDepthHead`, `LinearDepthHead`: mmseg's DPT and 1x1-conv heads as depth heads (one channel,
  no output activation, SiLog loss on `gt_depth_map`).
"""

from __future__ import annotations

import re

import torch
from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.models.decode_heads.dpt_head import DPTHead
from mmseg.models.decode_heads.fcn_head import FCNHead
from mmseg.models.utils import resize
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from .architectures import create_student
from .checkpoints import load_backbone


@MODELS.register_module()
class ProteusViT(BaseModule):
    def __init__(
        self,
        checkpoint: str | None = None,
        arch: str = "vit_small",
        img_size: int = 518,
        out_indices: tuple[int, ...] = (3, 5, 7, 11),
        frozen: bool = False,
        drop_path_rate: float = 0.0,
        with_cls_token: bool = False,
        final_norm: bool = False,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg)
        if checkpoint:
            self.vit = load_backbone(checkpoint, drop_path_rate=drop_path_rate)
        else:  # random weights: only for tests and smoke runs
            self.vit = create_student(arch, img_size=img_size, drop_path_rate=drop_path_rate)
        depth = len(self.vit.blocks)
        if not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} out of range for a {depth}-block backbone")
        self.out_indices, self.frozen = tuple(out_indices), frozen
        self.with_cls_token, self.final_norm = with_cls_token, final_norm
        # parameters that never reach the outputs get no gradient, which DDP rejects: freeze them
        self.vit.mask_token.requires_grad_(False)  # no masking downstream
        self.vit.norm.requires_grad_(final_norm)
        for block in self.vit.blocks[max(out_indices) + 1 :]:
            block.requires_grad_(False)
        if frozen:
            self.vit.requires_grad_(False)

    def init_weights(self) -> None:
        """Weights come from the checkpoint; mmengine must not re-initialise them."""

    def train(self, mode: bool = True) -> ProteusViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()  # a linear probe never updates the backbone (no drop path either)
        return self

    def forward(self, x: torch.Tensor) -> list:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            outs = self.vit.get_intermediate_layers(
                x, n=list(self.out_indices), reshape=True, return_class_token=self.with_cls_token, norm=self.final_norm
            )
        return [list(o) for o in outs] if self.with_cls_token else list(outs)


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for everything after the blocks."""
    m = re.match(r"backbone\.vit\.blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if re.match(r"backbone\.vit\.(cls_token|pos_embed|register_tokens|mask_token|patch_embed)", name):
        return 0
    return num_layers + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """lr x decay_rate ** (num_layers + 1 - layer_id); no weight decay on 1-d params and tokens.

    paramwise_cfg = dict(num_layers=12, decay_rate=0.65)
    """

    def add_params(self, params: list, module: nn.Module, **kwargs) -> None:
        num_layers = self.paramwise_cfg["num_layers"]
        decay_rate = self.paramwise_cfg["decay_rate"]
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            no_wd = p.ndim == 1 or name.endswith((".bias", "cls_token", "pos_embed", "register_tokens"))
            scale = decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers))
            params.append({"params": [p], "lr": self.base_lr * scale, "weight_decay": 0.0 if no_wd else self.base_wd})


class DepthHeadMixin:
    """Makes an mmseg decode head a depth head: loss on gt_depth_map, positive predictions.

    The head ends in a plain 1-channel conv (no activation); SiLog clamps inside the loss and the
    prediction is clamped to the evaluation's minimum depth so log-metrics stay finite.
    """

    min_depth = 1e-3

    def loss_by_feat(self, pred: torch.Tensor, batch_data_samples: list) -> dict:
        gt = torch.stack([s.gt_depth_map.data for s in batch_data_samples])
        pred = resize(pred, size=gt.shape[2:], mode="bilinear", align_corners=self.align_corners)
        losses = self.loss_decode if isinstance(self.loss_decode, nn.ModuleList) else [self.loss_decode]
        out: dict = {}
        for loss in losses:
            out[loss.loss_name] = out.get(loss.loss_name, 0) + loss(pred, gt)
        return out

    def predict_by_feat(self, pred: torch.Tensor, batch_img_metas: list) -> torch.Tensor:
        return super().predict_by_feat(pred, batch_img_metas).clamp(min=self.min_depth)


@MODELS.register_module()
class DPTDepthHead(DepthHeadMixin, DPTHead):
    """mmseg's DPT (readout "project") predicting one depth channel."""


@MODELS.register_module()
class LinearDepthHead(DepthHeadMixin, FCNHead):
    """Linear probe: the resized, concatenated levels -> a 1x1 conv to one depth channel."""
