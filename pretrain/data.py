"""Pretraining data: ImageNet train folder (or a proxy subset / one image) with the DeiT augmentation."""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset, Sampler

from common.images import check_readable, load_rgb, read_image_folder, seed_worker
from common.shards import SHARDS, ShardedImageFolder, shard_folder
from models.errors import MissingFile, UsageError

log = logging.getLogger(__name__)

IMAGENET_TRAIN_SIZE = 1_281_167  # a single-image "epoch" has as many crops as an ImageNet epoch
SUBSET_SEED = 0  # proxy subsets are the same whatever --seed is, so ablations compare like with like


# PROTOCOLS A's augmentation, as timm's create_transform arguments
RECIPE = dict(
    is_training=True,
    auto_augment="rand-m9-mstd0.5-inc1",
    color_jitter=0.3,
    interpolation="bicubic",
    re_prob=0.25,
    re_mode="pixel",
    re_count=1,
)


def train_transform(input_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """PROTOCOLS A: RRC bicubic, flip, RandAugment m9 mstd0.5 inc1, normalise, RandomErasing 0.25."""
    return create_transform(input_size, mean=mean, std=std, **RECIPE)


class SingleImageDataset(Dataset):
    """The paper's single-image ablation: every sample is a fresh augmentation of one photograph."""

    def __init__(self, path: str | Path, transform, length: int = IMAGENET_TRAIN_SIZE) -> None:
        try:
            self.image = load_rgb(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --single-image {path}: {e}") from None
        self.path, self.transform, self.length = str(path), transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.transform(self.image), 0


def subset_samples(
    samples: list[tuple[str, int]], classes_fraction: float, images_fraction: float
) -> list[tuple[str, int]]:
    """Keep a seeded random fraction of the classes, then of each kept class's images."""
    rng = random.Random(SUBSET_SEED)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    classes = sorted(by_class)
    keep = sorted(rng.sample(classes, max(1, math.ceil(classes_fraction * len(classes)))))
    out = []
    for c in keep:
        items = by_class[c]
        n = max(1, math.ceil(images_fraction * len(items)))
        out += sorted(rng.sample(items, n))
    return out


def build_dataset(
    data_path: str | None,
    input_size: int,
    single_image: str | None = None,
    *,
    subset_classes: float = 1.0,
    subset_images_per_class: float = 1.0,
    transform=None,
    read=None,
) -> Dataset:
    """The training images under `transform` (default: the recipe's whole transform, the classic loader's),
    each read by `read` (default: common.images.load_rgb): <data_path>/train-shards when it holds an index
    (common.shards), else the ImageFolder <data_path>/train."""
    transform = transform or train_transform(input_size)
    if single_image:
        return SingleImageDataset(single_image, transform)
    if not data_path:
        raise UsageError("--data-path is required (an ImageNet root holding train/), or give --single-image")
    for name, frac in (("--subset-classes", subset_classes), ("--subset-images-per-class", subset_images_per_class)):
        if not 0 < frac <= 1:
            raise UsageError(f"{name} must be a fraction in (0, 1], got {frac}")
    train = Path(data_path) / "train"
    if shards := shard_folder(data_path):
        ds = ShardedImageFolder(shards, transform)
    elif not train.is_dir():
        raise MissingFile(
            f"no train/ folder nor {SHARDS}/ shards in --data-path {data_path} (expected {train}/<class>/<image>)"
        )
    else:
        ds = read_image_folder(train, transform)
    if read is not None:
        ds.loader = read
    if subset_classes < 1 or subset_images_per_class < 1:
        ds.samples = ds.imgs = subset_samples(ds.samples, subset_classes, subset_images_per_class)
        ds.targets = [t for _, t in ds.samples]
    check_readable(ds)
    return ds


def worker_init(worker_id: int) -> None:
    """Pretraining workers: the main process alone decides when to stop on SIGUSR1/SIGTERM (slurm signals them all)."""
    seed_worker(worker_id)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys (seed, rank, epoch, position...), never from process history."""
    return int(np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(1)[0])


class PositionSampler(Sampler):
    """Wraps the epoch sampler to yield (index, seed) with seed = f(seed, rank, epoch, position in the epoch).

    Augmentation then depends on where a sample sits in the epoch, not on which DataLoader worker
    or how many earlier draws served it; `start` skips the samples a resumed run already consumed
    without loading them.
    """

    def __init__(self, sampler: Sampler, seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos, index in enumerate(self.sampler):
            if pos >= self.start:
                yield index, derive_seed(self.seed, self.rank, self.epoch, pos)


class SeededDataset(Dataset):
    """Seeds python, numpy and torch from the key's seed before reading sample `index` (see PositionSampler)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_sample(seed)
        return self.dataset[index]


def seed_sample(seed: int) -> None:
    """The generators a sample's augmentation draws from, seeded with its key's seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # transforms draw on the CPU generator only
