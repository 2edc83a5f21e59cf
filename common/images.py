"""Reading images for every task: 16-bit scaling, corrupt files reported by path, ImageFolder checks."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from models.errors import MissingFile, UsageError

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
            raise UsageError(f"{path}: mode {img.mode} values {a.min():.0f}..{a.max():.0f} are not 16-bit")
        img = Image.fromarray(np.round(a / 257).astype(np.uint8), "L")
    elif img.mode == "F":
        raise UsageError(f"{path}: a float image (mode F) has no 8-bit scale; convert it to 8 or 16 bits")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """torchvision's pil_loader, with 16-bit images scaled correctly (`to_rgb`): every loader uses this."""
    with Image.open(path) as img:
        return to_rgb(img, path)


def walk_once(root: str, tops: list[str]) -> list[list[tuple[str, list[str]]]]:
    """For each folder of `tops` (under `root`), (folder, file names) of every folder under it, as
    os.walk(top, followlinks=True), but reading each real folder once: every top's own tree first, then
    each symlinked folder whose real path has not been read yet (`root` counts as read). A link back up
    the tree (a cycle, which os.walk follows ~40 levels deep) or a second way into a folder would
    otherwise repeat its images; it is left out with a warning naming the link."""
    found: list[list[tuple[str, list[str]]]] = [[] for _ in tops]
    seen = {os.path.realpath(root)}
    pending = list(enumerate(tops))  # the links found are queued behind every top's own tree
    while pending:
        k, start = pending.pop(0)
        for folder, subfolders, files in os.walk(start):  # links are listed, not followed
            real = os.path.realpath(folder)
            if real in seen:
                log.warning("not following %s: it leads to %s, whose images are already read", folder, real)
                subfolders.clear()
                continue
            seen.add(real)
            found[k].append((folder, files))
            links = [os.path.join(folder, s) for s in subfolders if os.path.islink(os.path.join(folder, s))]
            pending += [(k, link) for link in sorted(links)]
    return found


class LinkSafeImageFolder(ImageFolder):
    """torchvision's ImageFolder (classes and files sorted by name) whose folders are scanned by
    `walk_once`: a symlink cycle or a second link to a folder does not repeat its images."""

    # positional past three: torchvision's DatasetFolder.make_dataset, overridden (tests/test_layers.py)
    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        classes = sorted(class_to_idx)
        samples = []
        for name, walked in zip(classes, walk_once(directory, [os.path.join(directory, c) for c in classes])):
            for folder, files in sorted(walked):
                paths = (os.path.join(folder, f) for f in sorted(files))
                samples += [(path, class_to_idx[name]) for path in paths if valid(path)]
        found = {t for _, t in samples}
        empty = [name for name in classes if class_to_idx[name] not in found]
        if empty and not allow_empty:
            raise MissingFile(f"Found no valid file for the classes {', '.join(empty)}")
        return samples


class NoReadableImage(UsageError):
    """Not one image of a folder can be read: bad input, one line. A DataLoader re-raises a worker's exception
    as its type built from one string, "Caught ... in DataLoader worker" and the worker's whole traceback;
    keeping that string's last line, the original message, keeps the error one line in the main process."""

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.removeprefix(f"{__name__}.{type(self).__qualname__}: "))


class SkipCorrupt:
    """A map-style image dataset (`samples` of (name, label), `loader`, `transform`, `root`) that reports an
    unreadable image by name and serves the next readable one instead, however many unreadable images follow
    each other.

    `skipped` flags each sample found unreadable; it lies in shared memory, so the flags that the
    data-loader workers set are seen by the main process, which counts them (skipped_paths), and every
    worker passes over a flagged image without reading it again (a run of R bad files would otherwise
    cost R reads for each of them)."""

    samples: list[tuple[str, int]]

    def flag_none(self) -> None:
        self.skipped = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __getitem__(self, index: int):
        img, target = self.read(index)
        return (self.transform(img) if self.transform else img), target

    def source(self, name: str):
        """What `loader` opens for the sample called `name`: here the file's path itself."""
        return name

    def read(self, index: int) -> tuple[Image.Image, int]:
        """The first readable image from sample `index` on, wrapping around the dataset once; NoReadableImage
        naming the dataset's root when none is left."""
        i = index
        while (i := self._unflagged_from(i)) is not None:
            name, target = self.samples[i]
            try:
                return self.loader(self.source(name)), target
            except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
                self.skipped[i] = 1
                log.warning("skipping corrupt image %s (%s)", name, e)
        raise NoReadableImage(
            f"no readable image in {self.root}: all {len(self.samples)} images failed to load "
            f"(first: {self.samples[0][0]}; the reasons are in the warnings above)"
        )

    def _unflagged_from(self, start: int) -> int | None:
        """The first sample at or after `start`, wrapping around, not yet found unreadable (None: none)."""
        flags = self.skipped.numpy()[: len(self.samples)]  # a subset may have shortened `samples`
        if start < len(flags) and not flags[start]:
            return start  # the usual case, without a scan of the flags
        for lo, hi in ((start, len(flags)), (0, start)):
            if lo < hi:
                j = lo + int(flags[lo:hi].argmin())  # the first 0 in [lo, hi), if any
                if not flags[j]:
                    return j
        return None


class SkipCorruptImageFolder(SkipCorrupt, LinkSafeImageFolder):
    """ImageFolder whose unreadable images are reported by path and skipped (SkipCorrupt)."""

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
        self.flag_none()


def skipped_paths(ds: SkipCorrupt) -> list[str]:
    """The names (paths; <shard>:<key>) of the images `ds` skipped as unreadable on any rank (each once, in order)."""
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
            raise MissingFile(
                f"{len(empty)} of the {len(classes)} class folders in {root} hold no image: {shown} "
                f"(extensions {', '.join(IMG_EXTENSIONS)}); remove them or add images, since every class is a label"
            ) from None
        raise MissingFile(
            f"no images in {root}: expected {root}/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)} ({e})"
        ) from None


def check_readable(ds: SkipCorrupt) -> None:
    """Fail before training, in one line naming the folder, when no image of it is readable (a dataset of
    corrupt files), instead of a data-loader worker's error mid-epoch. Reads up to the first readable image;
    those found unreadable on the way are flagged and counted like any other."""
    ds.read(0)


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
