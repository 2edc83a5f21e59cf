"""Training images as WebDataset tar shards with an index, read by random access: for cluster file systems, where
opening 1.28M small files is the bottleneck and a few hundred large ones are not.

Layout (`scripts.make_shards` writes it): `<root>/train-shards/index.json` and `shard-000000.tar`, ... Each shard is
an uncompressed tar in WebDataset's format (`<key>.cls` the label, `<key>.jpg`/`.png`/... the image file's bytes as
stored), in the ImageFolder's order (classes, then files, sorted by name), so sample i is the folder's sample i. The
index gives, per sample, its shard, key, label and the byte range of its image inside the tar; `ShardedImageFolder`
reads an image with one positioned read from an open shard, so the samplers, augmentation seeds and resume
positions of pretraining work on it unchanged.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from models.errors import MissingFile, UsageError

from .images import SkipCorrupt, load_rgb

SHARDS = "train-shards"  # the folder beside (or instead of) train/ in a --data-path
INDEX = "index.json"
FORMAT = "proteus-shards-1"  # the index's "format": a folder with another one is not ours
OPEN_SHARDS = 64  # descriptors a process keeps open (ImageNet in shards of 1000 has 1282: over a ulimit of 1024)


def shard_folder(data_path: str | os.PathLike) -> Path | None:
    """<data_path>/train-shards when it holds an index, else None (a plain ImageFolder root)."""
    folder = Path(data_path) / SHARDS
    return folder if (folder / INDEX).is_file() else None


def is_shard_folder(folder: Path) -> bool:
    """Whether `folder` holds an index of ours (what scripts.make_shards may replace)."""
    try:
        return json.loads((folder / INDEX).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def index_shards(folder: Path, shards: list[str], classes: list[str]) -> dict:
    """The index of shards written in `folder`: every image member's byte range, taken from the tar headers
    (tarfile's offset_data), with its label from the `.cls` member of the same key."""
    samples = []
    for k, name in enumerate(shards):
        labels, images = {}, []
        with tarfile.open(folder / name) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                if ext == "cls":
                    labels[key] = int(tar.extractfile(m).read())
                else:
                    images.append((key, m.name, m.offset_data, m.size))
        samples += [[k, key, member, labels[key], offset, size] for key, member, offset, size in images]
    return {"format": FORMAT, "classes": classes, "shards": shards, "samples": samples}


def read_index(folder: Path) -> dict:
    """The index of a shard folder, one line when it is not one (unreadable JSON, another format)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise MissingFile(f"cannot read the shard index {folder / INDEX}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UsageError(f"{folder / INDEX} is not a shard index written by scripts.make_shards (format {FORMAT})")
    missing = [name for name in index["shards"] if not (folder / name).is_file()]
    if missing:
        raise MissingFile(f"{folder / INDEX} lists {len(missing)} missing shard(s), the first {folder / missing[0]}")
    return index


class ImageBytes(io.BytesIO):
    """An image file's bytes, shown as `<shard>:<key>` in PIL's and load_rgb's messages (not as an object id)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return self.label

    __str__ = __repr__


class ShardedImageFolder(SkipCorrupt):
    """An ImageFolder read from tar shards: `classes`, `class_to_idx`, `samples` (named `<shard>:<key>`),
    `targets` as torchvision's, each image read by `loader` (load_rgb, or a loader's own reader) from its bytes
    in the shard; unreadable images are reported by shard and key and skipped (SkipCorrupt)."""

    def __init__(self, folder: Path, transform=None) -> None:
        index = read_index(folder)
        self.root, self.transform, self.loader = str(folder), transform, load_rgb
        self.classes = index["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.shards = [str(folder / name) for name in index["shards"]]
        rows = index["samples"]
        self.samples = [(f"{index['shards'][shard]}:{key}", label) for shard, key, _, label, _, _ in rows]
        self.row = {name: i for i, (name, _) in enumerate(self.samples)}  # a subset's samples keep their rows
        # (shard, offset, size) per row, in one array
        self.members = np.array([(shard, offset, size) for shard, _, _, _, offset, size in rows], np.int64)
        if not self.samples:
            raise MissingFile(f"no images in the shards of {folder}")
        self.imgs, self.targets = self.samples, [t for _, t in self.samples]
        self.flag_none()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.samples)

    def source(self, name: str) -> ImageBytes:
        """The image file's bytes, read at their offset in the shard (os.pread: no shared file position, so the
        descriptors are safe across fork; each process opens its own)."""
        shard, offset, size = (int(v) for v in self.members[self.row[name]])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"shard truncated: {size} bytes expected at offset {offset}, {len(data)} read")
        return ImageBytes(data, name)

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a data-loader worker: the parent's descriptors are the parent's
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            if len(self._fds) >= OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))  # the longest open
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # spawned workers open their own
