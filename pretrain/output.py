"""What a run writes: console lines, log.txt, iterations.jsonl, tensorboard/, checkpoint and backbone files.

Rank 0 writes them all; on every other rank an Output does nothing (and INFO logging is off), so no
caller asks which rank it is on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from common.io import append_text, atomic_save, atomic_write_text, remove_stale_temp_files

from . import pca
from .distiller import resize

log = logging.getLogger("pretrain")
CHECKPOINT = "checkpoint.pth"
EPOCH_LOG = "log.txt"  # one JSON line per finished epoch: epoch, train_loss*, lr, images_per_sec, epoch_time_sec
ITERATION_LOG = "iterations.jsonl"  # one JSON line per iteration: epoch, iteration, loss*, lr


def log_keys(losses: dict[str, float]) -> dict[str, float]:
    """The Distiller's loss names as the logs name them: total -> loss, token -> loss_token, ..."""
    return {("loss" if name == "total" else f"loss_{name}"): v for name, v in losses.items()}


def describe(losses: dict[str, float], sep: str, fmt: str, *, total: bool = True) -> str:
    """The losses as a line shows them: "token 0.1 patch 0.2 fea 0.3"; with several teachers grouped by
    teacher, "dinov2_vitl14: token 0.1 patch ...; clip_vitl14: token ...". `total`: lead with the total."""
    parts = [f"total {fmt.format(losses['total'])}"] if total else []
    groups: dict[str, list[str]] = {}
    for name, v in losses.items():
        if name != "total":
            teacher, _, level = name.rpartition("_")
            groups.setdefault(teacher, []).append(f"{level} {fmt.format(v)}")
    parts += [f"{t}: {sep.join(g)}" if t else sep.join(g) for t, g in groups.items()]
    return (sep if "" in groups else "; ").join(parts)


def truncate_log(path: Path, key: str, end: int) -> None:
    """Drop JSON lines with `key` >= end (or cut short): a killed run's lines past its checkpoint are logged again."""

    def before(line: str) -> bool:
        try:
            return json.loads(line)[key] < end
        except (ValueError, KeyError):
            return False

    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.endswith("\n") and before(line)]
        if len(keep) < len(lines):
            atomic_write_text("".join(keep), path)


def student_folder(name: str) -> str:
    """A student's subfolder name: its name, a family prefix's ':' written '-' (timm:resnet18 -> timm-resnet18),
    since ':' is not portable in paths."""
    return name.replace(":", "-")


class Output:
    """The run's output folder and console on rank 0; a no-op elsewhere."""

    def __init__(self, folder: str | Path, main: bool) -> None:
        self.folder, self.main = Path(folder), main
        self._tensorboard = None
        self.pictures: torch.Tensor | None = None  # the images of the PCA pictures
        if not main:
            logging.getLogger().setLevel(logging.WARNING)

    def sub(self, name: str) -> Output:
        """The Output of student `name`'s subfolder (each student's when a run has several), made on rank 0."""
        folder = self.folder / student_folder(name)
        if self.main:
            folder.mkdir(exist_ok=True)
        return Output(folder, self.main)

    @property
    def tensorboard(self):
        """The SummaryWriter, made at the first write; imported here, so pretrain.benchmark never loads tensorboard."""
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.folder / "tensorboard"))
        return self._tensorboard

    def print(self, line: str) -> None:
        if self.main:
            print(line, flush=True)

    def remove_stale_temp_files(self, names: tuple[str, ...]) -> None:
        if self.main:
            for p in remove_stale_temp_files(self.folder, names):
                log.warning("removed %s, left by a run killed while writing", p)

    def truncate_logs(self, epoch: int, iteration: int) -> None:
        """Logs end before `epoch` / global `iteration`: where the resumed checkpoint stands (0, 0: a fresh run)."""
        if self.main:
            truncate_log(self.folder / EPOCH_LOG, "epoch", epoch)
            truncate_log(self.folder / ITERATION_LOG, "iteration", iteration)

    def iteration(self, epoch: int, iteration: int, losses: dict[str, float], *, lr: float) -> None:
        if self.main:
            line = {"epoch": epoch, "iteration": iteration, **log_keys(losses), "lr": lr}
            append_text(json.dumps(line) + "\n", self.folder / ITERATION_LOG)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.main:
            for name, v in values.items():
                self.tensorboard.add_scalar(f"{prefix}/{name}", v, step)

    def epoch(self, epoch: int, stats: dict[str, float]) -> None:
        """The epoch's log.txt line and its tensorboard scalars (epoch/<key>)."""
        if self.main:
            append_text(json.dumps({"epoch": epoch, **stats}) + "\n", self.folder / EPOCH_LOG)
            self.scalars("epoch", stats, epoch)

    def load_pictures(self, dataset, input_size: int, device: torch.device) -> None:
        """The dataset's first 4 images (eval transform), whose PCA pictures go to tensorboard."""
        if self.main:
            images = pca.first_images(dataset, input_size)
            if images is None:
                log.warning("no readable image among the dataset's first ones: no PCA pictures in tensorboard")
            else:
                self.pictures = images.to(device)

    def picture(self, tag: str, model: torch.nn.Module, step: int, *, size: int | None = None) -> None:
        """The PCA picture of `model`'s patch tokens on the pictures, resized to `size` (a teacher's input side)."""
        if self.pictures is not None:
            images = self.pictures if size is None else resize(self.pictures, size)
            self.tensorboard.add_image(tag, pca.pca_grid(model, images), step)

    def save(self, obj: object, name: str) -> None:
        """torch.save, atomically, into the output folder."""
        if self.main:
            atomic_save(obj, self.folder / name)

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
