"""ImageNet train/val ImageFolders for the linear probe and kNN, with the checks users need first."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from common.features import eval_transform
from common.images import SkipCorruptImageFolder, read_image_folder
from models.checkpoints import Normalization
from models.errors import MissingFile, UsageError

LAYOUT = "<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image>"


# the backbone's `normalization` (models.load_backbone): ImageNet's for every student pretraining trains
IMAGENET = Normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def train_transform(input_size: int, normalization: Normalization = IMAGENET) -> transforms.Compose:
    """DINOv2 linear-probe augmentation: RandomResizedCrop (bicubic) + horizontal flip, normalised as the
    backbone's inputs were in its training."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(normalization.mean, normalization.std),
        ]
    )


def val_transform(input_size: int, normalization: Normalization = IMAGENET) -> transforms.Compose:
    """Resize 256 + CenterCrop 224 at the default size; the 256/224 ratio is kept at other sizes."""
    resize = round(input_size * 256 / 224)
    return eval_transform(input_size, resize_size=resize, mean=normalization.mean, std=normalization.std)


def image_folder(data_path: str | None, split: str, transform) -> SkipCorruptImageFolder:
    if not data_path:
        raise UsageError(f"--data-path is required (an ImageNet root: {LAYOUT})")
    root = Path(data_path) / split
    if not root.is_dir():
        raise MissingFile(f"no {split}/ folder in --data-path {data_path} (expected {LAYOUT})")
    return read_image_folder(root, transform)


def load_splits(data_path: str | None, train_tf, val_tf) -> tuple[SkipCorruptImageFolder, SkipCorruptImageFolder]:
    """train/ and val/ ImageFolders; val must hold exactly the train classes (same label indices). Their
    skip-to-next-image on a corrupt file serves training batches only: feature extraction reads samples
    through features.read_sample, which leaves an unreadable image out instead."""
    train = image_folder(data_path, "train", train_tf)
    val = image_folder(data_path, "val", val_tf)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UsageError(
            f"val classes do not match train classes in {data_path} ({len(train.classes)} train, "
            f"{len(val.classes)} val; only in train: {only_train[:5] or 'none'}; only in val: {only_val[:5] or 'none'})"
        )
    return train, val


def split_holdout(
    dataset: SkipCorruptImageFolder, fraction: float, seed: int, *, holdout_tf
) -> tuple[Dataset, Dataset]:
    """A seeded random `fraction` of train, seen with `holdout_tf`, for classifier selection; the rest trains."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-from-train must be a fraction in (0, 1), got {fraction}")
    n = len(dataset)
    n_hold = round(n * fraction)
    if not 0 < n_hold < n:
        raise UsageError(f"--val-from-train {fraction} of {n} train images leaves an empty split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    holdout = copy.copy(dataset)  # shares the scanned sample list; only the transform differs
    holdout.transform = holdout_tf
    return Subset(dataset, sorted(perm[n_hold:])), Subset(holdout, sorted(perm[:n_hold]))
