"""What DINOv3's own dense protocols need beyond mmsegmentation, registered on import.

Both are facebookresearch/dinov3's evaluations as its code runs them; where mmseg (or segmentation.mmseg_ext,
e.g. `ProteusViT(center_pad=True)`, `DepthHeadMixin`) does the same thing, the configs use that. These are the
parts they do differently. The two protocols' schedulers are different formulas in DINOv3 (its segmentation
and depth code each define a WarmupOneCycleLR): each is named for the one it reproduces.

ADE20K linear (segmentation/configs/dinov3_linear.py; dinov3/eval/segmentation, config-ade20k-linear-training.yaml):
- `DINOv3Resize`: mmseg's Resize for the image (PIL, bilinear: DINOv3 resizes PIL images), and the label by
  torch's nearest-neighbour rule, as DINOv3 resizes its label tensor; PIL's and OpenCV's nearest pick other pixels.
- `DINOv3PhotoMetricDistortion`: mmseg's distortion (the same draws from numpy's generator, in the same order) with
  DINOv3's saturation and hue: torchvision's, on the RGB image, the hue over the whole circle.
- `BNLinearHead`: Dropout2d, BatchNorm, 1x1 conv (mmseg's heads have no norm before `conv_seg`).
- `DINOv3SegWarmupOneCycleLR`: dinov3/eval/segmentation/schedulers.py's WarmupOneCycleLR as its segmentation
  options and training loop use it.

NYU-Depth V2 linear (depth/configs/dinov3_linear.py; dinov3/eval/depth at 6876159, config-nyu.yaml):
- `DepthBinsHead`: BN, a 1x1 conv to 256 depth-bin scores, depth as their normalised weighting of bin depths.
- `WarmupSigLoss`: DINOv3's SigLoss, its variance term left out of the first calls.
- `DINOv3DepthWarmupOneCycleLR` / `DINOv3DepthWarmupOneCycleMomentum`: dinov3/eval/depth/schedulers.py's
  WarmupOneCycleLR, the lr and Adam's beta1.
- `BoxCrop` / `DepthColorAug`: DINOv3's fixed NYU crop and its depth colour augmentation.

Configs load it with `custom_imports`, after segmentation.mmseg_ext.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.transforms import BaseTransform
from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.momentum_scheduler import MomentumSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmseg.datasets.transforms import PhotoMetricDistortion, Resize
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS, PARAM_SCHEDULERS, TRANSFORMS
from torch import nn
from torchvision.transforms import functional as tvF

from models.errors import UsageError
from segmentation.mmseg_ext import DepthHeadMixin


# --- ADE20K linear (dinov3/eval/segmentation) ---------------------------------------------------------------
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


class _PerIteration(_ParamScheduler):
    """mmengine's parameter scheduler stepped per iteration unless told otherwise (mmengine's default is per
    epoch): DINOv3's schedules count iterations. The schedulers below pass these keywords on as `timing`."""

    def __init__(
        self,
        optimizer,
        param_name: str,
        *,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        by_epoch: bool = False,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            optimizer, param_name, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch, verbose=verbose
        )


def _cosine(start: float, end: float, pct: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def dinov3_seg_one_cycle_lr(
    peak: float, step: int, *, total_iters: int, warmup_iters: int, warmup_ratio: float
) -> float:
    """The rate at schedule step `step` of dinov3/eval/segmentation/schedulers.py's WarmupOneCycleLR with the
    segmentation options (pct_start 0, anneal "cos", final_div_factor inf, so a final rate of 0): before
    `warmup_iters`, a linear ramp from peak * warmup_ratio to the peak, damped by the run's progress
    (x (1 - step / total_iters)); from then on a cosine from the peak to 0 taken at (step + 1) / total_iters,
    over the whole run, not restarted after the warmup, so the rate steps up from about 0.962 x peak to
    0.997 x peak where the warmup ends (1500 of 40k)."""
    if step < warmup_iters:
        ramp = 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
        return peak * ramp * (1 - step / total_iters)
    return _cosine(peak, 0.0, (step + 1) / total_iters)


@PARAM_SCHEDULERS.register_module()
class DINOv3SegWarmupOneCycleLR(LRSchedulerMixin, _PerIteration):
    """DINOv3's segmentation learning rate per iteration (`dinov3_seg_one_cycle_lr`, from the optimizer's lr as the
    peak), with DINOv3's timing: its training loop steps the scheduler after every iteration but the first, so
    iteration i trains at schedule step max(i - 1, 0) (the first two both at step 0); mmengine's iteration i would
    be step i, hence the shift. Its momentum options (use_beta1, update_momentum) are off in the segmentation
    configs: AdamW's betas stay as set. Only the warmup with a positive `warmup_ratio` is DINOv3's linear ramp
    (ratio 0 selects another formula there), so a ratio of 0 is refused."""

    def __init__(self, optimizer, *, total_iters: int, warmup_iters: int, warmup_ratio: float, **timing) -> None:
        if not 0 < warmup_ratio <= 1 or not 0 <= warmup_iters < total_iters:
            raise UsageError(
                f"DINOv3SegWarmupOneCycleLR: warmup_ratio {warmup_ratio} must be in (0, 1] and warmup_iters "
                f"{warmup_iters} below total_iters {total_iters}"
            )
        self.total_iters, self.warmup_iters, self.warmup_ratio = total_iters, warmup_iters, warmup_ratio
        super().__init__(optimizer, **timing)

    def _get_value(self) -> list[float]:
        step = max(self.last_step - 1, 0)
        return [
            dinov3_seg_one_cycle_lr(
                peak,
                step,
                total_iters=self.total_iters,
                warmup_iters=self.warmup_iters,
                warmup_ratio=self.warmup_ratio,
            )
            for peak in self.base_values
        ]


# --- NYU-Depth V2 linear (dinov3/eval/depth at 6876159) ---------------------------------------------------
def depth_bins(min_depth: float, max_depth: float, n_bins: int) -> torch.Tensor:
    """The bins' depths: n_bins evenly spaced from min_depth to max_depth, both included (DINOv3's "linear"
    bins_strategy). Each bin is a single depth, not an interval: there are no edges."""
    return torch.linspace(min_depth, max_depth, n_bins)


def depth_from_bins(scores: torch.Tensor, bins: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """[B, n_bins, h, w] scores -> [B, 1, h, w] depth: DINOv3's "linear" norm_strategy (AdaBins' default),
    weights relu(score) + eps normalised to sum 1 over the bins (no softmax), depth their weighting of the bins."""
    weights = torch.relu(scores) + eps
    weights = weights / weights.sum(dim=1, keepdim=True)
    return (weights * bins.to(weights).view(1, -1, 1, 1)).sum(dim=1, keepdim=True)


@MODELS.register_module()
class DepthBinsHead(DepthHeadMixin, BaseDecodeHead):
    """DINOv3's linear depth head: BN over the (resized, concatenated) levels, a 1x1 conv to n_bins scores
    (weights N(0, 0.01), bias 0: BaseDecodeHead's init of `conv_seg`), depth from the scores and the bins at
    the patch grid, resized to the target by the caller (the loss's ground truth, the input at test).

    out_channels is 1, the depth map's: mmseg's estimators size their outputs from it.
    """

    def __init__(
        self,
        in_channels: int | list[int],
        *,
        n_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        norm_cfg: dict | None = None,
        **kwargs,
    ) -> None:
        width = sum(in_channels) if isinstance(in_channels, (list, tuple)) else in_channels
        kwargs.update(num_classes=1, out_channels=1, dropout_ratio=0.0)
        super().__init__(in_channels, width, norm_cfg=norm_cfg, **kwargs)
        self.bn = build_norm_layer(norm_cfg, width)[1] if norm_cfg else nn.Identity()
        self.conv_seg = nn.Conv2d(width, n_bins, kernel_size=1)
        self.min_depth = min_depth  # DepthHeadMixin's clamp: a no-op here, every depth lies within the bins
        self.register_buffer("bins", depth_bins(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, inputs: list) -> torch.Tensor:
        return depth_from_bins(self.conv_seg(self.bn(self._transform_inputs(inputs))), self.bins)


@MODELS.register_module()
class WarmupSigLoss(nn.Module):
    """DINOv3's SigLoss (dinov3/eval/depth/loss.py, from BinsFormer and AdaBins) over the pixels whose ground
    truth is not `ignored` (0: no measurement, or padding), all images of the batch together:
    g = log(pred + eps) - log(gt + eps), loss = sqrt(mean_weight * mean(g)^2 + var(g)) with the unbiased
    variance, the variance left out of the first `warm_iter` calls (a count of calls, not of iterations, kept
    out of checkpoints as DINOv3 keeps it: a resumed run warms up again)."""

    def __init__(
        self,
        *,
        eps: float = 1e-3,
        mean_weight: float = 0.15,
        warm_iter: int = 100,
        ignored: float = 0.0,
        loss_weight: float = 1.0,
        loss_name: str = "loss_sig",
    ) -> None:
        super().__init__()
        self.eps, self.mean_weight, self.warm_iter, self.ignored = eps, mean_weight, warm_iter, ignored
        self.loss_weight, self._loss_name, self.calls = loss_weight, loss_name, 0

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignored
        g = torch.log(pred[valid] + self.eps) - torch.log(target[valid] + self.eps)
        loss = self.mean_weight * g.mean() ** 2
        if self.calls < self.warm_iter:
            self.calls += 1
        else:
            loss = loss + g.var()
        # DINOv3's guard: |loss| where the sum is not positive (sqrt's gradient at 0 is infinite)
        return self.loss_weight * (loss.sqrt() if loss > 0 else loss.abs())


def dinov3_depth_one_cycle_lr(
    step: int, *, peak: float, total: int, warmup: int, div_factor: float = 25.0, final_div_factor: float = 1000.0
) -> float:
    """DINOv3's WarmupOneCycleLR (dinov3/eval/depth/schedulers.py) at 0-based `step`. Warmup: from
    peak / final_div_factor up a linear ramp toward a cosine over the whole run, ending near
    (1 + cos(pi warmup / total)) / 2 of the peak (0.75 at 12.8k of 38.4k), never at the peak itself. Then that
    cosine, from peak to peak / div_factor / final_div_factor over all `total` steps, taken one step ahead."""
    if step < warmup:
        ceiling = peak * (1 + math.cos(math.pi * step / total)) / 2
        return peak / final_div_factor + ceiling * step / warmup
    return _cosine(peak, peak / div_factor / final_div_factor, (step + 1) / total)


def dinov3_depth_one_cycle_beta1(
    step: int, *, total: int, warmup: int, base: float = 0.85, peak: float = 0.95
) -> float:
    """Adam's beta1 under DINOv3's WarmupOneCycleLR: 0 through the warmup (its code sets no momentum there, so
    the optimizer's own beta1 is never used), then a cosine from `base` up to `peak` over the remaining steps."""
    return 0.0 if step < warmup else _cosine(base, peak, (step - warmup) / (total - warmup))


class _DINOv3DepthWarmupOneCycle(_PerIteration):
    """mmengine's OneCycleLR is torch's (phases set by pct_start, starting at peak / div_factor), not the
    formula DINOv3 trains with: these give DINOv3's, the peak lr being the optimizer's."""

    def __init__(
        self,
        optimizer,
        param_name: str,
        *,
        total_steps: int,
        warmup_steps: int,
        div_factor: float = 25.0,
        final_div_factor: float = 1000.0,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        **timing,
    ) -> None:
        if not 0 <= warmup_steps < total_steps:
            raise UsageError(f"warmup_steps {warmup_steps}: from 0 to total_steps {total_steps} excluded")
        self.total, self.warmup = total_steps, warmup_steps
        self.div_factor, self.final_div_factor = div_factor, final_div_factor
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        super().__init__(optimizer, param_name, **timing)

    def _get_value(self) -> list[float]:
        step, span = self.last_step, dict(total=self.total, warmup=self.warmup)
        if self.param_name == "lr":
            factors = dict(div_factor=self.div_factor, final_div_factor=self.final_div_factor)
            return [dinov3_depth_one_cycle_lr(step, peak=peak, **span, **factors) for peak in self.base_values]
        beta1 = dinov3_depth_one_cycle_beta1(step, **span, base=self.base_momentum, peak=self.max_momentum)
        return [beta1 for _ in self.base_values]


@PARAM_SCHEDULERS.register_module()
class DINOv3DepthWarmupOneCycleLR(LRSchedulerMixin, _DINOv3DepthWarmupOneCycle):
    """dinov3/eval/depth/schedulers.py's WarmupOneCycleLR, the lr (`dinov3_depth_one_cycle_lr`)."""


@PARAM_SCHEDULERS.register_module()
class DINOv3DepthWarmupOneCycleMomentum(MomentumSchedulerMixin, _DINOv3DepthWarmupOneCycle):
    """dinov3/eval/depth/schedulers.py's WarmupOneCycleLR, Adam's beta1 (`dinov3_depth_one_cycle_beta1`)."""


@TRANSFORMS.register_module()
class BoxCrop(BaseTransform):
    """A fixed crop of the image and its maps: `box` (x1, y1, x2, y2) on a `reference` (h, w) image, scaled to the
    image's size and truncated as DINOv3's NYUCrop does; (43, 45, 608, 472) on 480x640 is its NYU training crop."""

    def __init__(self, box: tuple[int, int, int, int], reference: tuple[int, int] = (480, 640)) -> None:
        self.box, self.reference = tuple(box), tuple(reference)

    def transform(self, results: dict) -> dict:
        h, w = results["img"].shape[:2]
        (x1, y1, x2, y2), (ref_h, ref_w) = self.box, self.reference
        rows = slice(int(y1 / ref_h * h), int(y2 / ref_h * h))
        cols = slice(int(x1 / ref_w * w), int(x2 / ref_w * w))
        for key in ["img", *results.get("seg_fields", [])]:
            results[key] = results[key][rows, cols]
        results["img_shape"] = results["img"].shape[:2]
        return results


@TRANSFORMS.register_module()
class DepthColorAug(BaseTransform):
    """DINOv3's depth colour augmentation (transforms.py's ColorAug, from the Monocular-Depth-Estimation-Toolbox):
    with probability `prob`, on the 0-255 image, x ** gamma, x brightness, x one factor per channel, clipped
    to [0, 255]; float32 out (the data preprocessor normalises it). Draws in DINOv3's order; the channel factors
    are independent and alike, so mmcv's BGR order changes nothing."""

    def __init__(
        self, *, prob: float = 0.5, gamma_range=(0.9, 1.1), brightness_range=(0.9, 1.1), color_range=(0.9, 1.1)
    ) -> None:
        self.prob, self.gamma_range, self.brightness_range = prob, gamma_range, brightness_range
        self.color_range = color_range

    def transform(self, results: dict) -> dict:
        if np.random.rand() < self.prob:
            img = results["img"].astype(np.float64)
            gamma = np.random.uniform(min(self.gamma_range), max(self.gamma_range))
            brightness = np.random.uniform(min(self.brightness_range), max(self.brightness_range))
            colors = np.random.uniform(min(self.color_range), max(self.color_range), size=3)
            results["img"] = np.clip(img**gamma * brightness * colors, 0, 255).astype(np.float32)
        return results
