"""A pretraining run as named state: its pieces (Run), where it stands (Position), its stop and save
requests (StopControl), and the checkpoint that saves and resumes them."""

from __future__ import annotations

import argparse
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from common import distributed as dist_utils
from models import Teacher, safe_load

from .data import PositionSampler
from .distiller import LOSSES, Distiller, Views
from .output import CHECKPOINT, Output

log = logging.getLogger("pretrain")


@dataclass
class Position:
    """`iteration` iterations of `epoch` are trained; `sums` are their loss sums, so that a resumed epoch's
    log.txt line still averages the whole epoch."""

    epoch: int = 0
    iteration: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSSES, 0.0))


class StopControl:
    """SIGUSR1/SIGTERM and --save-every-minutes as per-iteration flags; a context manager restores the old handlers.

    The flags ride on the loss all_reduce, so every rank stops (or saves) after the same iteration;
    the save clock is rank 0's alone for the same reason.
    """

    signals = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, save_every_minutes: float | None = None) -> None:
        self.signalled = False
        self.period = save_every_minutes * 60 if save_every_minutes else None
        self.last_save = time.monotonic()
        self.previous: dict = {}

    def __enter__(self) -> StopControl:
        self.last_save = time.monotonic()  # the clock starts with the training
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def flags(self) -> torch.Tensor:
        """[stop, save] as this rank sees them."""
        due = self.period is not None and dist_utils.is_main() and time.monotonic() - self.last_save >= self.period
        return torch.tensor([float(self.signalled), float(due)])


@dataclass
class Run:
    """Everything a pretraining run holds; main.build makes it, engine.train_one_epoch advances it."""

    args: argparse.Namespace
    device: torch.device
    distiller: Distiller  # the student and its loss heads
    model: torch.nn.Module  # what the step calls: the distiller, under DDP when there are several processes
    teacher: Teacher
    views: Views  # what the student and the teacher see of each batch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3  # of the student
    schedule: list[float]  # the lr of every global iteration
    loader: DataLoader
    sampler: PositionSampler
    iters_per_epoch: int
    out: Output
    control: StopControl
    position: Position = field(default_factory=Position)

    def state_dict(self) -> dict:
        """checkpoint.pth: "epoch" is the last finished epoch (as the reference's), "iteration_in_epoch" counts
        the iterations of the next one already trained."""
        pos, iters = self.position, self.iters_per_epoch
        finished = pos.iteration == iters
        return {
            "student": self.distiller.student.state_dict(),
            "heads": self.distiller.heads_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"iteration": pos.epoch * iters + pos.iteration, "iters_per_epoch": iters},
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict(),
            "epoch": pos.epoch if finished else pos.epoch - 1,
            "iteration_in_epoch": pos.iteration % iters,
            "epoch_loss_sums": None if finished else [pos.sums[k] for k in LOSSES],
            "world_size": dist_utils.world_size(),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
        }

    def save_checkpoint(self) -> None:
        self.out.save(self.state_dict(), CHECKPOINT)
        self.out.flush()
        self.control.last_save = time.monotonic()

    def resume(self, fresh: bool = False) -> None:
        """Load --resume, else <output-dir>/checkpoint.pth if present and not `fresh`, and stand where it stood."""
        args, out = self.args, self.out
        path = args.resume or (out.folder / CHECKPOINT)
        if not args.resume and (fresh or not Path(path).exists()):
            out.truncate_logs(0, 0)  # a fresh run in an old output dir: its logs start anew, not appended to
            return
        ckpt = safe_load(path)
        if not isinstance(ckpt, dict) or not {"student", "heads", "optimizer", "args"} <= set(ckpt):
            keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(
                f"{path} is not a pretraining checkpoint.pth (it holds {keys}); --resume takes the checkpoint.pth "
                "of a pretraining run, not an exported backbone or another task's checkpoint"
            )
        trained = {"student_layout": "dinov2", **ckpt["args"]}  # checkpoints from before --student-layout
        for key in ("student", "teacher", "student_layout"):
            if trained[key] != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{path} was trained with {flag} {trained[key]}, not {getattr(args, key)}")
        self.distiller.student.load_state_dict(ckpt["student"])
        heads = self.distiller.load_state_dict(ckpt["heads"], strict=False)  # the student is loaded above
        missing = [k for k in heads.missing_keys if not k.startswith("student.")]
        if missing or heads.unexpected_keys:
            raise ValueError(
                f"{path} has other loss heads than this run (were --lambda-* changed?): "
                f"missing {missing}, unexpected {heads.unexpected_keys}"
            )
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty unless that run used fp16; a fresh fp16 scaler then starts at its initial scale
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt["args"]["precision"] != args.precision:
            log.warning("%s was trained with --precision %s, now %s", path, ckpt["args"]["precision"], args.precision)
        self.ema.module.load_state_dict(ckpt["ema"])
        epoch, done = ckpt["epoch"] + 1, ckpt.get("iteration_in_epoch", 0)
        if ckpt["args"]["epochs"] != args.epochs and epoch < args.epochs:
            log.warning("%s was trained with --epochs %d, now %d: the lr follows the cosine of a %d-epoch run from "
                        "here", path, ckpt["args"]["epochs"], args.epochs, args.epochs)  # fmt: skip
        world = dist_utils.world_size()
        if done and ckpt["world_size"] != world:
            log.warning("%s was written by %d processes, not %d: the rest of epoch %d differs from the uninterrupted "
                        "run", path, ckpt["world_size"], world, epoch)  # fmt: skip
        out.truncate_logs(epoch, ckpt["scheduler"]["iteration"])
        where = f", at iteration {done} of epoch {epoch}" if done else ""
        out.print(f"resumed from {path} after epoch {ckpt['epoch']}{where}")
        sums = dict(zip(LOSSES, ckpt["epoch_loss_sums"])) if done else dict.fromkeys(LOSSES, 0.0)
        self.position = Position(epoch, done, sums)
