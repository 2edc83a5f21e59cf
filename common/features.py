"""Frozen-backbone feature extraction shared by every classification eval: transforms, a
distributed extraction loop with progress and ETA that leaves unreadable images out (reported by path),
and an on-disk cache keyed on everything the features depend on (feature_key)."""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate
from torchvision import transforms

from models import ViT, load_backbone, safe_load
from models.errors import UsageError
from models.exports import backbone_files

from . import distributed as dist_utils
from .images import IMAGE_ERRORS
from .io import atomic_save


def eval_transform(
    input_size: int = 224, resize_size: int | None = 256, *, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
) -> transforms.Compose:
    """Resize the short side (bicubic) then CenterCrop; resize_size=None resizes to input_size."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size or input_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def summary_name(backbone: torch.nn.Module) -> str:
    """What a backbone's summary token is, for protocol names and feature caches."""
    return "final-norm CLS" if backbone.summary_is_class_token else "pooled summary token"


def frozen_backbone(path: str | None, device: torch.device, input_size: int | None) -> ViT:
    """models.load_backbone in eval mode without gradients: every eval reads weights the same way. `input_size`
    None: the caller checks its input size once it knows it."""
    if not path:
        raise UsageError("--backbone is required (a pretrain checkpoint.pth/backbone.pth, DINOv2 or DINOv3 weights)")
    model = load_backbone(path).to(device).eval()
    if input_size is not None and input_size % model.patch_size:
        raise UsageError(f"--input-size {input_size} is not a multiple of the patch size {model.patch_size}")
    model.requires_grad_(False)
    return model


class Unreadable(NamedTuple):
    """An eval sample whose image cannot be decoded: reported by path and left out, never replaced."""

    path: str
    reason: str


def _unwrap(dataset: Dataset) -> Dataset:
    """The dataset under any Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _base_index(dataset: Dataset, i: int) -> int:
    """The index of sample i in the dataset under any Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    return i


def sample_list(dataset: Dataset) -> list[tuple[str, object]] | None:
    """The ordered (image path, target) pairs the dataset reads (Subsets resolved): ImageFolder's `samples`,
    which every file-backed dataset here has (fine_grained.datasets gives torchvision's theirs); None when
    in memory (CIFAR)."""
    if isinstance(dataset, Subset):
        inner = sample_list(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return None if samples is None else [(str(p), t) for p, t in samples]


def _path_of(base: Dataset, i: int) -> str:
    """The image path of sample i of an unwrapped dataset (as sample_list, without building the list)."""
    samples = getattr(base, "samples", None)
    return f"sample {i} of {type(base).__name__}" if samples is None else str(samples[i][0])


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0]


def read_sample(dataset: Dataset, i: int) -> tuple[object, object] | Unreadable:
    """dataset[i] for evaluation; an image that cannot be decoded gives Unreadable(path, reason) instead of
    a traceback or another image (pretrain.data.SkipCorruptImageFolder's substitute, right for training only:
    in an eval it counts an image twice). Datasets with a `loader` are read with it, so only decoding is
    guarded, never the transform."""
    base, j = _unwrap(dataset), _base_index(dataset, i)
    loader = getattr(base, "loader", None)
    if loader is None or not hasattr(base, "samples"):  # torchvision datasets decode and transform in one call
        try:
            return base[j]
        except IMAGE_ERRORS as e:
            return Unreadable(_path_of(base, j), _reason(e))
    path, target = base.samples[j]
    try:
        img = loader(path)
    except Exception as e:  # noqa: BLE001 - the loader only opens and decodes; PIL raises many types
        return Unreadable(str(path), _reason(e))
    if base.transform is not None:
        img = base.transform(img)
    if getattr(base, "target_transform", None) is not None:
        target = base.target_transform(target)
    return img, target


class Indexed(Dataset):
    """Yields (index, read_sample) so shards gathered from every rank can be put back in order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, tuple[object, object] | Unreadable]:
        return i, read_sample(self.dataset, i)


def collate_readable(batch: list) -> tuple[list | None, list[Unreadable]]:
    """default_collate of the readable (index, image, target); the unreadable ones are passed on to be reported."""
    good = [(i, *s) for i, s in batch if not isinstance(s, Unreadable)]
    return (default_collate(good) if good else None), [s for _, s in batch if isinstance(s, Unreadable)]


class Progress:
    """Prints `desc [done/total] ... eta` every `every` steps on the main rank."""

    def __init__(self, desc: str, total: int, every: int = 20) -> None:
        self.desc, self.total, self.every, self.start = desc, total, every, time.time()

    def step(self, done: int, extra: str = "") -> None:
        if not dist_utils.is_main() or (done % self.every and done != self.total):
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"{self.desc} [{done}/{self.total}] {extra}eta {datetime.timedelta(seconds=int(eta))}", flush=True)


class Features(NamedTuple):
    """One split's frozen features, in dataset order: what every evaluation reads (a cache file holds the
    same fields as a plain dict, which torch.load(weights_only=True) reads back)."""

    features: torch.Tensor  # [N, ...]: one row per readable image
    targets: torch.Tensor  # [N, ...]: its label(s)
    index: torch.Tensor  # [N]: its index in the dataset
    dropped: list[str]  # the unreadable images' paths, left out


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int = 8,
    desc: str = "features",
) -> Features:
    """fn(images) -> (B, ...) for every readable sample, in dataset order, on CPU; shards across ranks.

    Returns features, targets, index (each row's dataset index) and dropped (the unreadable images' paths,
    each also reported as a warning line): an unreadable image is left out, so rows and labels stay aligned."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    shard = Subset(Indexed(dataset), list(range(rank, len(dataset), world)))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        shuffle=False,
        collate_fn=collate_readable,
    )
    indices, feats, targets = [], [], []
    progress = Progress(desc, len(loader))
    for step, (batch, unreadable) in enumerate(loader, 1):
        for u in unreadable:
            print(f"warning: unreadable image {u.path} ({u.reason}); left out of {desc}", flush=True)
        if batch is not None:
            idx, images, target = batch
            feats.append(fn(images.to(device, non_blocking=True)).float().cpu())
            indices.append(idx)
            targets.append(torch.as_tensor(target))
        progress.step(step)
    local = (feats[0].shape[1:], targets[0].shape[1:], targets[0].dtype) if feats else None
    shapes = [local]
    if world > 1:  # a rank whose whole shard was unreadable still joins the gathers, with empty tensors
        shapes = [None] * world
        torch.distributed.all_gather_object(shapes, local)
    shape = next((x for x in shapes if x is not None), None)
    if shape is None:
        raise UsageError(f"{desc}: none of the {len(dataset)} images is readable")
    idx = torch.cat(indices) if feats else torch.zeros(0, dtype=torch.long)
    feats = torch.cat(feats) if feats else torch.zeros(0, *shape[0])
    targets = torch.cat(targets) if targets else torch.zeros(0, *shape[1], dtype=shape[2])
    if world > 1:
        idx, feats, targets = (dist_utils.gather(t) for t in (idx, feats, targets))
    order = torch.argsort(idx)
    idx = idx[order]
    kept = set(idx.tolist())
    base = _unwrap(dataset)
    dropped = [_path_of(base, _base_index(dataset, i)) for i in range(len(dataset)) if i not in kept]
    return Features(feats[order], targets[order], idx, dropped)


def file_identity(path: str | Path) -> dict[str, object]:
    """Resolved path, size and mtime: a backbone file re-written in place is another backbone (an exported
    folder: its config.json's and weight file's, summed and latest)."""
    stats = [f.stat() for f in backbone_files(path)]
    size, mtime = sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)
    return {"path": str(Path(path).resolve()), "size": size, "mtime_ns": mtime}


def dataset_identity(dataset: Dataset) -> dict[str, object]:
    """Which images, in which order, with which labels: the data root, the number of samples and a hash of
    the ordered (absolute path, target) list, or of the pixels and targets of an in-memory set (CIFAR)."""
    base = _unwrap(dataset)
    h = hashlib.sha256()
    samples = sample_list(dataset)
    if samples is not None:
        for path, target in samples:
            h.update(f"{os.path.abspath(path)}\t{_plain(target)}\n".encode())
    else:
        h.update(str([_base_index(dataset, i) for i in range(len(dataset))]).encode())
        if hasattr(base, "data"):
            h.update(memoryview(np.ascontiguousarray(base.data)).cast("B"))  # no copy of the pixels
        h.update(str(_plain(getattr(base, "targets", None))).encode())
    root = getattr(base, "root", None)
    return {"root": os.path.abspath(root) if root else None, "n": len(dataset), "sha256": h.hexdigest()}


def _plain(target: object) -> object:
    return target.tolist() if isinstance(target, torch.Tensor) else target


def feature_key(backbone_path: str, dataset: Dataset, input_size: int, *, feature_type: str) -> dict[str, object]:
    """Everything cached features depend on; the names read in the log line of a cache that is recomputed."""
    return {
        "backbone file": file_identity(backbone_path),
        "image list": dataset_identity(dataset),
        "input size": input_size,
        "preprocessing": repr(getattr(_unwrap(dataset), "transform", None)),  # resize, crop, mean/std
        "feature type": feature_type,
    }


def _load_cache(path: Path, key: dict) -> Features | None:
    """The cache file's content when its stored key is `key`; else None, saying why on the main rank."""
    if not path.is_file():
        return None
    try:
        stored = safe_load(path)
    except UsageError as e:
        why = f"is unreadable ({e})"
    else:
        old = stored.get("key") if isinstance(stored, dict) else None
        if old == key and set(Features._fields) <= stored.keys():
            return Features(**{name: stored[name] for name in Features._fields})
        if not isinstance(old, dict):
            why = "has no cache key (an older format)"
        else:
            why = "was written for a different " + " and ".join(k for k in key if old.get(k) != key[k])
    if dist_utils.is_main():
        print(f"cache {path} {why}; recomputing", flush=True)
    return None


def cached_features(
    path: str | Path | None,
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    desc: str,
    backbone_path: str,
    input_size: int,
    feature_type: str,
) -> Features:
    """extract_features through the cache file `path` (None: no cache). A cache is reused only when its stored
    feature_key matches this run's; otherwise it is recomputed and overwritten atomically by the main rank."""
    out = None
    if path is not None:
        path = Path(path)
        key = feature_key(backbone_path, dataset, input_size, feature_type=feature_type)
        # rank 0 decides: ranks that disagreed would wait in different collectives
        out = _load_cache(path, key) if dist_utils.is_main() else None
        if dist_utils.broadcast_from_main(out is not None) and out is None:
            out = _load_cache(path, key)
            if out is None:
                raise UsageError(f"cache {path} is valid on rank 0 but not here: use a --cache-dir every node sees")
    if out is None:
        out = extract_features(fn, dataset, device, batch_size=batch_size, num_workers=num_workers, desc=desc)
        if path is not None and dist_utils.is_main():
            if out.dropped:  # an I/O hiccup must not be frozen into the cache
                print(f"{desc}: not cached, since {len(out.dropped)} images were unreadable", flush=True)
            else:
                atomic_save({**out._asdict(), "key": key}, path)
    if out.dropped and dist_utils.is_main():
        print(f"{desc}: {len(out.dropped)} of {len(dataset)} images unreadable, left out", flush=True)
    return out


def image_counts(features: Features) -> dict[str, object]:
    """What results.json says of one evaluated split: images evaluated, dropped, and the dropped paths."""
    return {"evaluated": len(features.targets), "dropped": len(features.dropped), "unreadable": features.dropped}
