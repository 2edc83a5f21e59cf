"""`--loader dali`: pretraining's augmentation on NVIDIA DALI, decoded by nvJPEG and augmented on the GPU.

One pipeline definition serves both devices: `device="gpu"` decodes with nvJPEG ("mixed") and runs every
operator on the GPU; `device="cpu"` runs the same graph on CPU operators (what the tests exercise without a
GPU). The order of the images is the classic loader's: each pass reads the rank's indices from the same
`data.PositionSampler` (the repeated-augmentation sampler under DDP, already sharded per rank, the consumed
samples of a resumed epoch skipped) and hands their files, in that order, to DALI's file reader (its own
threads read them; it neither shuffles nor shards), so sharding and resume follow that sampler exactly.
DALI draws its random numbers per pipeline, not per sample: a pipeline is built for each pass over the
sampler, seeded by (seed, rank, epoch, first position), so a pass is reproducible but the augmentations
after a resume are not the ones the uninterrupted run drew (docs/design.md).

The augmentation is `data.train_transform`'s (timm's DeiT recipe), with the differences documented in
pretrain/README.md: RRC with a bicubic antialiased resize, flip, RandAugment on timm's `rand-m9-mstd0.5-inc1` op
table, ImageNet normalisation, pixel-mode random erasing. The crop's and the erasing's ranges are read off the
recipe's built transforms (`loaders.recipe_ranges`), so they are the CPU loaders' by construction.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as aug
from nvidia.dali.auto_aug.core import augmentation
from nvidia.dali.auto_aug.rand_augment import apply_rand_augment
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .data import PositionSampler, SingleImageDataset, derive_seed
from .loaders import Erasing, RecipeRanges, recipe_ranges

# timm's rand-m9-mstd0.5-inc1: magnitude 9 on a 0..10 scale (_LEVEL_DENOM), i.e. bin 9 of 11 in DALI's linspace
MAGNITUDE, MAGNITUDE_BINS, NUM_OPS = 9, 11, 2
READER = "files"
FILL = 128  # of the geometric ops; DALI takes one value (rotate), timm fills with the mean colour (124, 116, 104)


# DALI's suite calls these two under their deprecated fn.experimental names, whose warnings it forces on
@augmentation
def equalize(data, _):
    """Histogram equalisation per channel (OpenCV's lookup table; PIL's rounds it slightly differently)."""
    return fn.equalize(data)


@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aug.sharpness_kernel, param_device="auto")
def sharpness(data, kernel):
    """PIL's ImageEnhance.Sharpness (a blend with its 3x3 smoothing kernel) as one 3x3 filter."""
    return fn.filter(data, kernel)


# timm's `_RAND_INCREASING_TRANSFORMS` (rand-...-inc1) by timm's names, at their maximum magnitudes: DALI's linspace
# over 11 bins gives each the fraction m/10 of it at bin m, as timm's level / _LEVEL_DENOM does
TIMM_OPS = {
    "AutoContrast": aug.auto_contrast,
    "Equalize": equalize,
    "Invert": aug.invert,
    "Rotate": aug.rotate.augmentation((0, 30), True),
    "PosterizeIncreasing": aug.posterize.augmentation((4, 0)),  # bits kept: 4 - int(0.9 * 4) = 1 at m9
    "SolarizeIncreasing": aug.solarize.augmentation((256, 0)),  # threshold 256 - 0.9 * 256
    "SolarizeAdd": aug.solarize_add.augmentation((0, 110)),
    "ColorIncreasing": aug.color.augmentation((0, 0.9), True, aug.shift_enhance_range),  # factor 1 +- 0.9 m/10
    "ContrastIncreasing": aug.contrast.augmentation((0, 0.9), True, aug.shift_enhance_range),
    "BrightnessIncreasing": aug.brightness.augmentation((0, 0.9), True, aug.shift_enhance_range),
    "SharpnessIncreasing": sharpness,
    "ShearX": aug.shear_x.augmentation((0, 0.3), True),
    "ShearY": aug.shear_y.augmentation((0, 0.3), True),
    "TranslateXRel": aug.translate_x.augmentation((0, 0.45), True),  # translate_pct 0.45 of the side
    "TranslateYRel": aug.translate_y.augmentation((0, 0.45), True),
}


def rand_augment_ops() -> list:
    """TIMM_OPS, each with an identity twin: timm applies each chosen op with probability 0.5, which a uniform
    choice among the 2 x 15 entries reproduces."""
    ops = list(TIMM_OPS.values())
    return ops + [aug.identity.augmentation(name=f"skip_{op.name}") for op in ops]


def random_erasing(images, size: int, erasing: Erasing):
    """timm's pixel-mode, one-box RandomErasing with `erasing`'s settings on normalised CHW images of side `size`:
    with its probability, a box of a uniform share of the area and a log-uniform aspect, filled with N(0, 1)
    noise per pixel and channel. timm redraws a box that does not fit (up to 10 times); here its sides are
    clamped to the image instead."""
    if erasing.mode != "pixel" or erasing.max_count != 1:  # the only erasing the graph below draws
        raise ValueError(f"DALI's random erasing draws one pixel-mode box, not {erasing}")
    area = fn.random.uniform(range=(erasing.min_area, erasing.max_area)) * (size * size)
    ratio = dmath.exp(fn.random.uniform(range=erasing.log_aspect_ratio))
    h = dmath.clamp(dmath.floor(dmath.sqrt(area * ratio) + 0.5), 1.0, size - 1.0)
    w = dmath.clamp(dmath.floor(dmath.sqrt(area / ratio) + 0.5), 1.0, size - 1.0)
    top = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (size - h + 1))
    left = dmath.floor(fn.random.uniform(range=(0.0, 1.0)) * (size - w + 1))
    ones = images * 0.0 + 1.0
    box = 1.0 - fn.erase(ones, anchor=fn.stack(top, left), shape=fn.stack(h, w), axis_names="HW", fill_value=0.0)
    erase = fn.cast(fn.random.coin_flip(probability=erasing.probability), dtype=types.FLOAT)
    return images + (fn.random.normal(images) - images) * box * erase


@pipeline_def(enable_conditionals=True)
def augmentation_pipeline(files: list[str], labels: list[int], *, size: int, device: str, ranges: RecipeRanges):
    """`files` in this order -> the training crops, [B, 3, size, size] float, ImageNet-normalised, and `labels`;
    device "gpu" or "cpu"; the recipe's `ranges`. The list is the sampler's for this rank, so the reader neither
    shuffles nor shards."""
    encoded, labels = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=READER)
    images = fn.decoders.image_random_crop(
        encoded,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.RGB,
        random_area=ranges.crop_scale,
        random_aspect_ratio=ranges.crop_ratio,
        num_attempts=10,
    )
    images = fn.resize(images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
    images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    images = apply_rand_augment(
        rand_augment_ops(),
        images,
        n=NUM_OPS,
        m=MAGNITUDE,
        num_magnitude_bins=MAGNITUDE_BINS,
        shape=(size, size),
        fill_value=FILL,
        interp_type=types.INTERP_LINEAR,
    )
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in IMAGENET_DEFAULT_MEAN],
        std=[255 * s for s in IMAGENET_DEFAULT_STD],
    )
    return random_erasing(images, size, ranges.erasing), labels


class DaliLoader:
    """What the engine needs of a DataLoader (len, batch_size, dataset, iteration over (images, labels) of the
    sampler's current epoch and start), each pass a DALI pipeline fed the sampler's files in order."""

    def __init__(
        self,
        dataset,
        sampler: PositionSampler,
        *,
        batch_size: int,
        size: int,
        device: torch.device,
        num_threads: int,
    ) -> None:
        self.dataset, self.sampler, self.batch_size, self.size = dataset, sampler, batch_size, size
        self.device, self.num_threads = device, max(1, num_threads)
        self.ranges = recipe_ranges(size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # the classic loader's drop_last

    def files(self) -> tuple[list[str], list[int]]:
        """This pass's files and labels in the sampler's order, as many as fill whole batches."""
        indices = [index for index, _ in self.sampler][: len(self) * self.batch_size]
        if isinstance(self.dataset, SingleImageDataset):  # --single-image: every sample is its one photograph
            return [self.dataset.path] * len(indices), [0] * len(indices)
        samples = [self.dataset.samples[i] for i in indices]
        return [path for path, _ in samples], [label for _, label in samples]

    def pipeline(self):
        """This pass's pipeline, seeded by where the pass starts (see the module's docstring)."""
        gpu, sampler = self.device.type == "cuda", self.sampler
        index = self.device.index if self.device.index is not None else torch.cuda.current_device() if gpu else None
        pipe = augmentation_pipeline(
            *self.files(),
            size=self.size,
            device="gpu" if gpu else "cpu",
            ranges=self.ranges,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=index,  # None: CPU operators only
            seed=derive_seed(sampler.seed, sampler.rank, sampler.epoch, sampler.start) % 2**31,
            prefetch_queue_depth=2,
        )
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not len(self):
            return
        batches = DALIGenericIterator(
            self.pipeline(), ["images", "labels"], reader_name=READER, last_batch_policy=LastBatchPolicy.DROP
        )
        for (out,) in batches:
            yield out["images"], out["labels"].view(-1)
