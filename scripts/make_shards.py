"""`python -m scripts.make_shards --data-path <imagenet root> --to <out>`: the ImageFolder <root>/train as WebDataset
tar shards plus their index, in <out>/train-shards/ (common/shards.py), which `--data-path <out>` then trains on.

For clusters whose shared file system is slow at opening 1.28M small files: the shards are a few hundred large
files, read by random access, so pretraining's samplers, seeds and resume positions are those of the folder. The
image files go in as stored (no re-encoding); the shards are uncompressed, so an image is one positioned read.
The folder is written beside <out>/train-shards and renamed into place: a failure leaves no half set of shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import webdataset

from common.cli import ArgumentParser, run
from common.images import read_image_folder
from common.io import replace_folder
from common.shards import INDEX, SHARDS, index_shards, is_shard_folder
from models.errors import UsageError

PATTERN = "shard-%06d.tar"
EXTENSIONS = {".jpeg": "jpg"}  # WebDataset's name for JPEG; other suffixes keep their own (png, webp, ...)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="the ImageNet root holding train/<class>/<image>")
    p.add_argument("--to", type=Path, required=True, help=f"writes <to>/{SHARDS}/ ({INDEX}, {PATTERN % 0}, ...)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--max-bytes", type=float, default=1e9, help="a shard closes once its images hold this many bytes")
    return p


def sample_keys(paths: list[str], root: Path) -> list[str]:
    """Each image's WebDataset key: its path under the folder without the suffix, dots made `_` (WebDataset splits
    a member's name at the first dot), made unique by its position where two would meet."""
    keys, seen = [], set()
    for i, path in enumerate(paths):
        key = Path(path).relative_to(root).with_suffix("").as_posix().replace(".", "_")
        key = f"{key}_{i}" if key in seen else key
        seen.add(key)
        keys.append(key)
    return keys


def write_shards(folder: Path, train: Path, *, shard_size: int, max_bytes: float) -> dict:
    """The images of the ImageFolder `train`, in its order, as shards in `folder`, and their index."""
    images = read_image_folder(train, None)
    shards: list[str] = []
    with webdataset.ShardWriter(
        str(folder / PATTERN), maxcount=shard_size, maxsize=max_bytes, post=lambda f: shards.append(Path(f).name),
        verbose=0, mtime=0,
    ) as sink:  # fmt: skip
        for (path, label), key in zip(images.samples, sample_keys([p for p, _ in images.samples], train)):
            suffix = Path(path).suffix.lower()
            sink.write({"__key__": key, EXTENSIONS.get(suffix, suffix[1:]): Path(path).read_bytes(), "cls": str(label)})
    return index_shards(folder, shards, images.classes)


def make_shards(args: argparse.Namespace) -> None:
    if args.shard_size < 1 or args.max_bytes <= 0:
        raise UsageError(f"--shard-size {args.shard_size} and --max-bytes {args.max_bytes:g} must be positive")
    train = Path(args.data_path) / "train"
    if not train.is_dir():
        raise UsageError(f"no train/ folder in --data-path {args.data_path} (expected {train}/<class>/<image>)")
    target = args.to / SHARDS

    def write(folder: Path) -> None:
        index = write_shards(folder, train, shard_size=args.shard_size, max_bytes=args.max_bytes)
        (folder / INDEX).write_text(json.dumps(index, separators=(",", ":")))
        print(f"{target}: {len(index['samples'])} images of {len(index['classes'])} classes in "
              f"{len(index['shards'])} shards", flush=True)  # fmt: skip

    replace_folder(target, write, ours=is_shard_folder, what="a folder of shards")


def main(argv: list[str] | None = None) -> int:
    return run(make_shards, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
