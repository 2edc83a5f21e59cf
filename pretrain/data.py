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
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

IMAGENET_TRAIN_SIZE = 1_281_167  # a single-image "epoch" has as many crops as an ImageNet epoch
SUBSET_SEED = 0  # proxy subsets are the same whatever --seed is, so ablations compare like with like


def train_transform(input_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """PROTOCOLS A: RRC bicubic, flip, RandAugment m9 mstd0.5 inc1, normalise, RandomErasing 0.25."""
    return create_transform(
        input_size,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.3,
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=mean,
        std=std,
    )


# PIL modes of 16-bit greyscale images (PNG, TIFF): convert("RGB") clips them, so they turn white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image, path: str | Path = "") -> Image.Image:
    """RGB for the model. 16-bit greyscale is scaled to 8 bits (65535 -> 255, i.e. / 257) instead of
    clipped; modes without a defined 8-bit scale (float, or 32-bit values outside 0..65535) are refused
    with the path, so a loader reports and skips them like a corrupt file."""
    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{path}: mode {img.mode} values {a.min():.0f}..{a.max():.0f} are not 16-bit")
        img = Image.fromarray(np.round(a / 257).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError(f"{path}: a float image (mode F) has no 8-bit scale; convert it to 8 or 16 bits")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """torchvision's pil_loader, with 16-bit images scaled correctly (`to_rgb`): every loader uses this."""
    with Image.open(path) as img:
        return to_rgb(img, path)


class SkipCorruptImageFolder(ImageFolder):
    """ImageFolder that reports an unreadable image by path and serves the next one instead."""

    max_skips = 50

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
        self.reported: set[str] = set()

    def __getitem__(self, index: int):
        for attempt in range(self.max_skips):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                if path not in self.reported:
                    self.reported.add(path)
                    log.warning("skipping corrupt image %s (%s)", path, e)
                continue
            return (self.transform(img) if self.transform else img), target
        raise RuntimeError(f"{self.max_skips} consecutive unreadable images from {self.samples[index][0]}")


class SingleImageDataset(Dataset):
    """The paper's single-image ablation: every sample is a fresh augmentation of one photograph."""

    def __init__(self, path: str | Path, transform, length: int = IMAGENET_TRAIN_SIZE) -> None:
        try:
            self.image = load_rgb(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read --single-image {path}: {e}") from None
        self.transform, self.length = transform, length

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
    subset_classes: float = 1.0,
    subset_images_per_class: float = 1.0,
) -> Dataset:
    transform = train_transform(input_size)
    if single_image:
        return SingleImageDataset(single_image, transform)
    if not data_path:
        raise ValueError("--data-path is required (an ImageNet root holding train/), or give --single-image")
    for name, frac in (("--subset-classes", subset_classes), ("--subset-images-per-class", subset_images_per_class)):
        if not 0 < frac <= 1:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {frac}")
    train = Path(data_path) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"no train/ folder in --data-path {data_path} (expected {train}/<class>/<image>)")
    ds = read_image_folder(train, transform)
    if subset_classes < 1 or subset_images_per_class < 1:
        ds.samples = ds.imgs = subset_samples(ds.samples, subset_classes, subset_images_per_class)
        ds.targets = [t for _, t in ds.samples]
    check_readable(ds)
    return ds


def read_image_folder(root: Path, transform) -> SkipCorruptImageFolder:
    """ImageFolder of root/<class>/<image>; no class folder, or a class folder without images, is one line."""
    try:
        return SkipCorruptImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        empty = [d for d in classes if not any(p.suffix.lower() in IMG_EXTENSIONS for p in d.rglob("*"))]
        if empty and len(empty) < len(classes):
            shown = ", ".join(str(d) for d in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise FileNotFoundError(
                f"{len(empty)} of the {len(classes)} class folders in {root} hold no image: {shown} "
                f"(extensions {', '.join(IMG_EXTENSIONS)}); remove them or add images, since every class is a label"
            ) from None
        raise FileNotFoundError(
            f"no images in {root}: expected {root}/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)} ({e})"
        ) from None


def check_readable(ds: SkipCorruptImageFolder) -> None:
    """Fail before training when the first images are all unreadable (a dataset of corrupt files), with the
    first path, instead of a worker's RuntimeError mid-epoch."""
    for path, _ in ds.samples[: ds.max_skips]:
        try:
            load_rgb(path)
            return
        except Exception:  # noqa: BLE001 - what SkipCorruptImageFolder skips
            continue
    n = min(len(ds.samples), ds.max_skips)
    raise ValueError(f"none of the first {n} images of {ds.root} is readable (first: {ds.samples[0][0]})")


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # transforms draw on the CPU generator only
        return self.dataset[index]
