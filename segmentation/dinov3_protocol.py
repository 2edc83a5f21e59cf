"""What DINOv3's ADE20K linear protocol (configs/dinov3_linear.py) needs beyond mmsegmentation, registered on import.

The protocol is facebookresearch/dinov3's dinov3/eval/segmentation (config-ade20k-linear-training.yaml); where mmseg
does the same thing the config uses mmseg's own transforms, head base, loss, slide inference and metric. These are
the parts it does differently:
- `DINOv3Resize`: mmseg's Resize for the image (PIL, bilinear: DINOv3 resizes PIL images), and the label by
  torch's nearest-neighbour rule, as DINOv3 resizes its label tensor; PIL's and OpenCV's nearest pick other pixels.
- `DINOv3PhotoMetricDistortion`: mmseg's distortion (the same draws from numpy's generator, in the same order) with
  DINOv3's saturation and hue: torchvision's, on the RGB image, the hue over the whole circle.
- `BNLinearHead`: Dropout2d, BatchNorm, 1x1 conv (mmseg's heads have no norm before `conv_seg`).
- `DINOv3WarmupOneCycleLR`: DINOv3's WarmupOneCycleLR as its segmentation options and training loop use it.
Configs load it with `custom_imports` (dinov3_linear.py lists it after segmentation.mmseg_ext).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmseg.datasets.transforms import PhotoMetricDistortion, Resize
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS, PARAM_SCHEDULERS, TRANSFORMS
from torch import nn
from torchvision.transforms import functional as tvF

from models.errors import UsageError


@TRANSFORMS.register_module()
class DINOv3Resize(Resize):
    """mmseg's Resize (with backend="pillow" and bilinear, the image as DINOv3's torchvision resize of a PIL image),
    each label map to the image's new size by torch's nearest rule (source index floor(i * in / out))."""

    def _resize_seg(self, results: dict) -> None:
        height, width = results["img_shape"][:2]
        for key in results.get("seg_fields", []):
            seg = results.get(key)
            if seg is not None:
                resized = F.interpolate(torch.from_numpy(seg)[None, None].float(), size=(height, width), mode="nearest")
                results[key] = resized[0, 0].numpy().astype(seg.dtype)


def _on_rgb(img: np.ndarray, adjust, factor: float) -> np.ndarray:
    """torchvision's `adjust(image, factor)` on an mmcv BGR uint8 image, through RGB (the grey weights are RGB's)."""
    rgb = torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)
    return np.ascontiguousarray(adjust(rgb, factor).permute(1, 2, 0).numpy()[..., ::-1])


@TRANSFORMS.register_module()
class DINOv3PhotoMetricDistortion(PhotoMetricDistortion):
    """mmseg's PhotoMetricDistortion (brightness, contrast first or last, saturation, hue, each with probability
    1/2), with DINOv3's saturation (torchvision's blend with the grey image, where mmseg scales HSV's S) and hue
    (torchvision's shift by a factor uniform in `hue_range`, [-0.5, 0.5] the whole circle, where mmseg shifts
    OpenCV's hue by whole steps of 2 degrees)."""

    def __init__(self, *, hue_range: tuple[float, float] = (-0.5, 0.5), **kwargs) -> None:
        super().__init__(hue_delta=0, **kwargs)
        self.hue_lower, self.hue_upper = hue_range

    def saturation(self, img: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            return _on_rgb(img, tvF.adjust_saturation, np.random.uniform(self.saturation_lower, self.saturation_upper))
        return img

    def hue(self, img: np.ndarray) -> np.ndarray:
        if np.random.randint(2):
            return _on_rgb(img, tvF.adjust_hue, np.random.uniform(self.hue_lower, self.hue_upper))
        return img


@MODELS.register_module()
class BNLinearHead(BaseDecodeHead):
    """DINOv3's linear segmentation head: the maps it reads (resized to the first and concatenated when several, as
    mmseg's `resize_concat`), Dropout2d (training only), BatchNorm (`norm_cfg`; SyncBN under torchrun, None: no
    norm), then the 1x1 conv `conv_seg` (mmseg's init: normal, std 0.01, bias 0, which is DINOv3's). The dropout
    comes before the norm, as in DINOv3's head, so the norm's running statistics are those of the dropped-out
    features; at inference (eval mode) there is no dropout, as in DINOv3's predict. The conv reads the normalised
    features directly: `channels` must be the input's width."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.channels != self.in_channels:
            raise UsageError(
                f"BNLinearHead: channels {self.channels} must equal the input's width {self.in_channels} "
                "(no conv before the classifier); leave channels=None for the runner to fill in"
            )
        self.bn = build_norm_layer(self.norm_cfg, self.in_channels)[1] if self.norm_cfg else nn.Identity()

    def forward(self, inputs: list) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(self.bn(x))


def dinov3_one_cycle_lr(peak: float, step: int, *, total_iters: int, warmup_iters: int, warmup_ratio: float) -> float:
    """The rate at schedule step `step` of DINOv3's WarmupOneCycleLR with its segmentation options (pct_start 0,
    anneal "cos", final_div_factor inf, so a final rate of 0): before `warmup_iters`, a linear ramp from
    peak * warmup_ratio to the peak, damped by the run's progress (x (1 - step / total_iters)); from then on
    a cosine from the peak to 0 taken at (step + 1) / total_iters, over the whole run, not restarted after the
    warmup, so the rate steps up from about 0.962 x peak to 0.997 x peak where the warmup ends (1500 of 40k)."""
    if step < warmup_iters:
        ramp = 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
        return peak * ramp * (1 - step / total_iters)
    return peak * (1 + math.cos(math.pi * (step + 1) / total_iters)) / 2


@PARAM_SCHEDULERS.register_module()
class DINOv3WarmupOneCycleLR(LRSchedulerMixin, _ParamScheduler):
    """DINOv3's segmentation learning rate per iteration (`dinov3_one_cycle_lr`, from the optimizer's lr as the
    peak), with DINOv3's timing: its training loop steps the scheduler after every iteration but the first, so
    iteration i trains at schedule step max(i - 1, 0) (the first two both at step 0); mmengine's iteration i would
    be step i, hence the shift. Its momentum options (use_beta1, update_momentum) are off in the segmentation
    configs: AdamW's betas stay as set. Only the warmup with a positive `warmup_ratio` is DINOv3's linear ramp
    (ratio 0 selects another formula there), so a ratio of 0 is refused."""

    def __init__(
        self,
        optimizer,
        *,
        total_iters: int,
        warmup_iters: int,
        warmup_ratio: float,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        by_epoch: bool = False,
        verbose: bool = False,
    ) -> None:
        if not 0 < warmup_ratio <= 1 or not 0 <= warmup_iters < total_iters:
            raise UsageError(
                f"DINOv3WarmupOneCycleLR: warmup_ratio {warmup_ratio} must be in (0, 1] and warmup_iters "
                f"{warmup_iters} below total_iters {total_iters}"
            )
        self.total_iters, self.warmup_iters, self.warmup_ratio = total_iters, warmup_iters, warmup_ratio
        super().__init__(optimizer, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch, verbose=verbose)

    def _get_value(self) -> list[float]:
        step = max(self.last_step - 1, 0)
        return [
            dinov3_one_cycle_lr(
                peak,
                step,
                total_iters=self.total_iters,
                warmup_iters=self.warmup_iters,
                warmup_ratio=self.warmup_ratio,
            )
            for peak in self.base_values
        ]
