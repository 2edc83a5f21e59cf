"""Frozen-backbone feature extraction shared by every classification eval: transforms, a
distributed extraction loop with progress and ETA, and an on-disk cache."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models import ViT, atomic_save, load_backbone, safe_load
from pretrain import distributed as dist_utils


def eval_transform(
    input_size: int = 224, resize_size: int | None = 256, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
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


def frozen_backbone(path: str | None, device: torch.device, input_size: int) -> ViT:
    """models.load_backbone in eval mode without gradients: every eval reads weights the same way."""
    if not path:
        raise ValueError("--backbone is required (a pretrain checkpoint.pth/backbone.pth or DINOv2 weights)")
    model = load_backbone(path).to(device).eval()
    if input_size % model.patch_size:
        raise ValueError(f"--input-size {input_size} is not a multiple of the patch size {model.patch_size}")
    model.requires_grad_(False)
    return model


class Indexed(Dataset):
    """Yields (index, image, target) so shards gathered from every rank can be put back in order."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        img, target = self.dataset[i]
        return i, img, target


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


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 8,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(images) -> (B, ...) for every sample, in dataset order, on CPU; shards across ranks."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    shard = torch.utils.data.Subset(Indexed(dataset), list(range(rank, len(dataset), world)))
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda", shuffle=False
    )
    indices, feats, targets = [], [], []
    progress = Progress(desc, len(loader))
    for step, (idx, images, target) in enumerate(loader, 1):
        out = fn(images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        indices.append(idx)
        targets.append(torch.as_tensor(target))
        progress.step(step)
    idx, feats, targets = torch.cat(indices), torch.cat(feats), torch.cat(targets)
    if world > 1:
        idx, feats, targets = (_gather(t) for t in (idx, feats, targets))
    order = torch.argsort(idx)
    return feats[order], targets[order]


def _gather(t: torch.Tensor) -> torch.Tensor:
    """all_gather of uneven first dims (gloo and NCCL), concatenated."""
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = t.to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist_utils.world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([t.shape[0]], device=dev))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).cpu()


def cached(path: str | Path | None, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load `path` if it exists, else compute and write it atomically (main rank)."""
    if path is not None and Path(path).is_file():
        return safe_load(path)
    result = compute()
    if path is not None and dist_utils.is_main():
        atomic_save(result, path)
    return result


def cached_features(
    path: str | Path | None,
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    desc: str,
    backbone_path: str,
    input_size: int,
) -> dict:
    """extract_features through `cached`, refusing a cache file written for another backbone or input size."""
    source = {"backbone": str(Path(backbone_path).resolve()), "input_size": input_size}

    def compute() -> dict:
        feats, targets = extract_features(fn, dataset, device, batch_size, num_workers, desc)
        return {"features": feats, "targets": targets, **source}

    out = cached(path, compute)
    if any(out.get(k) != v for k, v in source.items()):
        found = ", ".join(f"{k} {out.get(k)}" for k in source)
        raise ValueError(f"{path} holds features of {found}; delete it or cache elsewhere")
    return out
