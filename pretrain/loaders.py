"""How a training batch reaches the device (--loader): what the data-loader workers do to each image, and
what the step does to their batch on its device.

- `classic`: timm's whole transform in the workers (RRC, flip, RandAugment, to-tensor, normalise,
  RandomErasing); the workers hand over float32 crops.
- `cpu` (default): the same PIL stages in the workers, which hand over uint8 (H, W, 3) crops (4x fewer bytes
  between processes and to the device) with each sample's erasing boxes and seed; normalisation and erasing run
  batched on the device. The boxes are drawn in the worker from the sample's python generator exactly where
  timm's RandomErasing draws them, so they are the classic path's boxes; the noise comes from a generator
  on the device seeded with the sample's seed, advanced past the worker's torch draws, so on a CPU device
  every pixel is the classic path's, and on CUDA the same N(0, 1) noise from the GPU's generator.

- `dali`: NVIDIA DALI decodes and augments on the GPU (pretrain/dali.py); its batches arrive finished.

A loader is a `Stages` record in `LOADERS`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import functional as F

from common.images import to_rgb

from .data import RECIPE, train_transform

# torch draws made by the worker's PIL stages before erasing: torchvision's RandomHorizontalFlip draws one
# torch.rand(1); the crop and RandAugment draw from python's `random`. The classic path's erasing noise
# comes after them on the same seeded generator (tests/test_loaders.py pins it).
WORKER_TORCH_DRAWS = 1


class Erasing(NamedTuple):
    """timm's RandomErasing settings, read from the recipe's transform (one source for both paths)."""

    probability: float
    min_area: float
    max_area: float
    log_aspect_ratio: tuple[float, float]
    min_count: int
    max_count: int
    mode: str  # pixel: per-pixel N(0, 1); rand: one N(0, 1) colour per box; const: zeros

    @classmethod
    def of(cls, erasing: RandomErasing) -> Erasing:
        e = erasing
        return cls(e.probability, e.min_area, e.max_area, e.log_aspect_ratio, e.min_count, e.max_count, e.mode)

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, h, w) of each box, drawn from python's `random` as timm's RandomErasing draws them for
        a (C, height, width) image: the same calls in the same order, so the same seed gives the same boxes."""
        if random.random() > self.probability:
            return []
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count, self.max_count)
        area, found = height * width, []
        for _ in range(count):
            for _attempt in range(10):
                target = random.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(random.uniform(*self.log_aspect_ratio))
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    found.append((random.randint(0, height - h), random.randint(0, width - w), h, w))
                    break
        return found


def recipe_stages(input_size: int, mean, std) -> tuple[transforms.Compose, transforms.Compose, Erasing]:
    """The recipe split where the two paths part: the PIL stages (crop, flip, RandAugment), the tensor stages
    (to-tensor, normalise, erasing) and the erasing settings."""
    primary, secondary, final = create_transform(input_size, mean=mean, std=std, separate=True, **RECIPE)
    (erasing,) = [t for t in final.transforms if isinstance(t, RandomErasing)]
    return transforms.Compose(primary.transforms + secondary.transforms), final, Erasing.of(erasing)


class RecipeRanges(NamedTuple):
    """The recipe's random ranges, read off its built transforms, for a loader that draws them with its own
    operators (DALI): RandomResizedCrop's area scale and aspect ratio, and the erasing settings."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    erasing: Erasing


def recipe_ranges(input_size: int) -> RecipeRanges:
    augment, _, erasing = recipe_stages(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    crop = augment.transforms[0]  # timm's RandomResizedCropAndInterpolation
    return RecipeRanges(tuple(crop.scale), tuple(crop.ratio), erasing)


class UInt8Crop:
    """The 'cpu' loader's worker transform: the recipe's PIL stages (`augment`), then the crop as a uint8
    (H, W, 3) tensor and its erasing record."""

    def __init__(self, augment: transforms.Compose, erasing: Erasing) -> None:
        self.augment, self.erasing = augment, erasing

    def __call__(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_uint8(self.augment(img))
        return image, self.record(image)

    def record(self, image: torch.Tensor) -> torch.Tensor:
        """(max_count, 5) int64: per box (seed, top, left, h, w), h = 0 for no box. The seed is the sample's
        (data.SeededDataset seeded torch's generator with it); the boxes are drawn here, where timm's
        RandomErasing would draw them."""
        record = torch.zeros(self.erasing.max_count, 5, dtype=torch.int64)
        record[:, 0] = torch.initial_seed()
        for k, box in enumerate(self.erasing.boxes(*image.shape[:2])):
            record[k, 1:] = torch.tensor(box)
        return record


class DraftRead:
    """--jpeg-draft: the dataset's reader, which crops as it decodes. It draws the crop as the recipe's
    RandomResizedCrop does (the same python draws, from the header's size), lets libjpeg decode at 1/2, 1/4 or
    1/8 scale when the crop keeps at least the output size at that scale, and resizes the crop's box of the
    smaller image. It changes pixels (DCT scaling, then a shorter bicubic resize); without a reduction it is
    the recipe's crop exactly."""

    def __init__(self, crop) -> None:
        self.crop = crop  # timm's RandomResizedCropAndInterpolation
        self.resample = F.pil_modes_mapping[crop.interpolation]

    def __call__(self, path) -> Image.Image:
        with Image.open(path) as img:
            return self.decode(img, path)

    def decode(self, img: Image.Image, path="") -> Image.Image:
        top, left, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        out_h, out_w = self.crop.size
        reduce = 1
        while reduce < 8 and h >= 2 * reduce * out_h and w >= 2 * reduce * out_w:
            reduce *= 2
        width, height = img.size
        if reduce > 1:
            img.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
        rgb = to_rgb(img, path)
        if rgb.size == (width, height):
            return F.resized_crop(rgb, top, left, h, w, [out_h, out_w], self.crop.interpolation)
        sx, sy = width / rgb.width, height / rgb.height
        box = (left / sx, top / sy, (left + w) / sx, (top + h) / sy)
        return rgb.resize((out_w, out_h), self.resample, box=box)


def to_uint8(img) -> torch.Tensor:
    """An RGB PIL image as a uint8 (H, W, 3) tensor: its own layout; the device makes it (3, H, W)."""
    return torch.from_numpy(np.array(img, np.uint8, copy=True))


class DeviceFinish:
    """The 'cpu' loader's batch on the device: uint8 -> float / 255, normalised, then erased (timm's order)."""

    def __init__(self, erasing: Erasing, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> None:
        self.erasing = erasing
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)  # float32, as timm hands them to Normalize
        self.on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std) per device, copied once

    def __call__(self, batch, device: torch.device) -> torch.Tensor:
        (images, records), _ = batch
        # (B, H, W, 3) uint8 -> (B, 3, H, W) float / 255, as torchvision's to_tensor does per image
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype())
        x.div_(255)
        if device not in self.on:
            self.on[device] = self.mean.to(device).view(-1, 1, 1), self.std.to(device).view(-1, 1, 1)
        mean, std = self.on[device]
        x.sub_(mean).div_(std)
        erase(x, records, mode=self.erasing.mode)
        return x


def erase(x: torch.Tensor, records: torch.Tensor, *, mode: str) -> None:
    """Fills each sample's boxes in place, the noise drawn from a generator on x's device seeded with the
    sample's seed and advanced past the worker's torch draws (box after box, as timm fills them)."""
    for i, rows in enumerate(records.tolist()):
        boxes = [r for r in rows if r[3] > 0]
        if not boxes:
            continue
        g = torch.Generator(x.device).manual_seed(boxes[0][0])
        torch.rand(WORKER_TORCH_DRAWS, generator=g, device=x.device)
        for _, top, left, h, w in boxes:
            x[i, :, top : top + h, left : left + w] = fill(mode, (x.shape[1], h, w), g, like=x)


def fill(mode: str, shape: tuple[int, int, int], g: torch.Generator, *, like: torch.Tensor) -> torch.Tensor:
    """timm's erasing fill for one box: per-pixel normal, one normal colour, or zeros."""
    if mode == "pixel":
        return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(generator=g)
    if mode == "rand":
        return torch.empty((shape[0], 1, 1), dtype=like.dtype, device=like.device).normal_(generator=g)
    return torch.zeros((shape[0], 1, 1), dtype=like.dtype, device=like.device)


def classic_finish(batch, device: torch.device) -> torch.Tensor:
    """The 'classic' loader's batch is the finished float crops: moved as they are."""
    images, _ = batch
    return images.to(device, non_blocking=True)


class Stages(NamedTuple):
    """A loader: the worker transform, what turns a collated batch into the step's float images on a device,
    and the dataset's image reader when it is not the usual one (common.images.load_rgb)."""

    transform: Callable[[Any], Any]
    finish: Callable[[Any, torch.device], torch.Tensor]
    read: Callable[[Any], Image.Image] | None = None


def cpu_stages(input_size: int) -> Stages:
    augment, _, erasing = recipe_stages(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return Stages(UInt8Crop(augment, erasing), DeviceFinish(erasing))


def draft_stages(input_size: int) -> Stages:
    """The 'cpu' loader with --jpeg-draft: the crop moves into the reader (DraftRead)."""
    augment, _, erasing = recipe_stages(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    crop, *rest = augment.transforms
    return Stages(UInt8Crop(transforms.Compose(rest), erasing), DeviceFinish(erasing), DraftRead(crop))


def classic_stages(input_size: int) -> Stages:
    return Stages(train_transform(input_size), classic_finish)


# --loader's values (its Stages: the worker side, and `finish` on the device). DALI reads and augments the files
# itself and hands over finished crops; its dataset (listing the files, serving the PCA pictures) keeps the
# classic transform.
LOADERS: dict[str, Callable[[int], Stages]] = {"cpu": cpu_stages, "classic": classic_stages, "dali": classic_stages}


def loader_stages(name: str, input_size: int, *, jpeg_draft: bool = False) -> Stages:
    """The stages of --loader `name` (with --jpeg-draft: the cpu loader's crop-while-decoding variant)."""
    return draft_stages(input_size) if jpeg_draft else LOADERS[name](input_size)
