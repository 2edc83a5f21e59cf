"""Reading images for every task: 16-bit scaling, corrupt files reported by path, ImageFolder checks."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import distributed

log = logging.getLogger(__name__)

IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on a bad file

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
    """ImageFolder that reports an unreadable image by path and serves the next one instead.

    `skipped` flags each sample found unreadable; it lies in shared memory, so the flags that the
    data-loader workers set are seen by the main process, which counts them (skipped_paths)."""

    max_skips = 50

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skipped = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __getitem__(self, index: int):
        for attempt in range(self.max_skips):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                if not self.skipped[i]:
                    self.skipped[i] = 1
                    log.warning("skipping corrupt image %s (%s)", path, e)
                continue
            return (self.transform(img) if self.transform else img), target
        raise RuntimeError(f"{self.max_skips} consecutive unreadable images from {self.samples[index][0]}")


def skipped_paths(ds: SkipCorruptImageFolder) -> list[str]:
    """The paths of the images `ds` skipped as unreadable on any rank (each once, in sample order)."""
    flags = distributed.sum_across_ranks(ds.skipped.int())
    return [ds.samples[i][0] for i in flags.nonzero().flatten().tolist()]


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
