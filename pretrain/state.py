"""A pretraining run as named state: its pieces (Run), where it stands (Position), its stop and save
requests (StopControl), and the checkpoint that saves and resumes them."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from common import distributed as dist_utils
from common.io import atomic_save_all, finish_saves
from models import safe_load
from models.errors import UsageError
from models.families import DEFAULT_LAYOUT

from .config import Config
from .data import PositionSampler
from .distiller import Distiller, TeacherInput, Views
from .output import CHECKPOINT, Output, student_folder

COMMIT = ".checkpoint.commit"  # the journal of a checkpoint being written (common.io.atomic_save_all)

log = logging.getLogger("pretrain")


@dataclass
class Position:
    """`iteration` iterations of `epoch` are trained (by every student: they step together)."""

    epoch: int = 0
    iteration: int = 0


class StopControl:
    """SIGUSR1/SIGTERM/SIGINT and --save-every-minutes as per-iteration flags; a context manager restores the old
    handlers, unless it stopped the run: the process is then exiting 75 with its checkpoint written, and a later
    stop signal (slurm's TERM after its USR1, a re-delivery by common.distributed's watcher) has nothing to do.

    The flags ride on the loss all_reduce, so every rank stops (or saves) after the same iteration;
    the save clock is rank 0's alone for the same reason.
    """

    signals = dist_utils.STOP_SIGNALS

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
        if self.signalled:
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def flags(self) -> torch.Tensor:
        """[stop, save] as this rank sees them."""
        due = self.period is not None and dist_utils.is_main() and time.monotonic() - self.last_save >= self.period
        return torch.tensor([float(self.signalled), float(due)])


@dataclass
class Student:
    """One student of the run and everything that is its own; the teacher, the data and the schedule are
    the run's. `sums` are the loss sums of the epoch's iterations so far, so that a resumed epoch's log.txt
    line still averages the whole epoch."""

    name: str  # as --student lists it; its folder under --output-dir when there are several
    layout: str
    distiller: Distiller  # the student and its loss heads
    model: torch.nn.Module  # what the step calls: the distiller, under its own DDP wrapper with several processes
    views: Views  # what it and the teacher see of each batch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3  # of the student
    out: Output  # its checkpoint, logs, tensorboard and exports
    sums: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sums = self.sums or dict.fromkeys(self.distiller.loss_names, 0.0)


@dataclass
class Run:
    """Everything a pretraining run holds; main.build makes it, engine.train_one_epoch advances it.

    One or several teachers (--teacher a,b), one or several students (--student a,b): one student writes
    into --output-dir itself, several each into <output-dir>/<name>/. They save, resume and stop together."""

    config: Config  # the resolved command line
    device: torch.device
    teachers: list[TeacherInput]
    students: list[Student]
    schedule: list[float]  # the lr of every global iteration
    loader: DataLoader
    finish: Callable[[Any, torch.device], torch.Tensor]  # a loader's batch -> the step's images on the device
    sampler: PositionSampler
    iters_per_epoch: int
    out: Output  # --output-dir and the console
    control: StopControl
    position: Position = field(default_factory=Position)

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Every student's losses by name (they learn from the same teachers)."""
        return self.students[0].distiller.loss_names

    def of(self, s: Student, sep: str = " of ") -> str:
        """How messages name a student: not at all when it is the only one."""
        return f"{sep}{s.name}" if len(self.students) > 1 else ""

    def checkpoints(self) -> list[Path]:
        return [s.out.folder / CHECKPOINT for s in self.students]

    def kept(self) -> str:
        """What a stopped run says it leaves on disk: its last good checkpoints (never written after a failure)."""
        kept = [str(p) for p in self.checkpoints() if p.exists()]
        if not kept:
            return "no checkpoint was written"
        return f"the last good checkpoint{'s' if len(kept) > 1 else ''} {', '.join(kept)} " + (
            "are untouched" if len(kept) > 1 else "is untouched"
        )

    def next_epoch(self) -> None:
        self.position = Position(self.position.epoch + 1)
        for s in self.students:
            s.sums = dict.fromkeys(self.loss_names, 0.0)

    def state_dict(self, s: Student) -> dict:
        """Student `s`'s checkpoint.pth: "epoch" is the last finished epoch (as the reference's),
        "iteration_in_epoch" counts the iterations of the next one already trained."""
        pos, iters = self.position, self.iters_per_epoch
        finished = pos.iteration == iters
        return {
            "student": s.distiller.student.state_dict(),
            "student_name": s.name,  # which student it is: a timm model's weights do not say it themselves
            "heads": s.distiller.heads_state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": {"iteration": pos.epoch * iters + pos.iteration, "iters_per_epoch": iters},
            "scaler": s.scaler.state_dict(),
            "ema": s.ema.module.state_dict(),
            "epoch": pos.epoch if finished else pos.epoch - 1,
            "iteration_in_epoch": pos.iteration % iters,
            "epoch_loss_sums": None if finished else [s.sums[k] for k in self.loss_names],
            "world_size": dist_utils.world_size(),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.flags().items()},
        }

    def save_checkpoint(self) -> None:
        """Every student's checkpoint.pth, written as one unit: a kill at any moment leaves them all at one place
        (finish_saves completes or undoes an interrupted save when the run starts again)."""
        if self.out.main:
            atomic_save_all({p: self.state_dict(s) for s, p in zip(self.students, self.checkpoints())}, self.journal())
        for s in self.students:
            s.out.flush()
        self.control.last_save = time.monotonic()

    def journal(self, folder: Path | None = None) -> Path:
        return (folder or self.out.folder) / COMMIT

    def finish_saves(self, folder: Path, paths: list[Path]) -> None:
        """Complete (or undo) a save of `paths` (the run in `folder`) a kill interrupted, on rank 0 before any
        rank reads them."""
        if self.out.main:
            try:
                finish_saves(self.journal(folder), paths)
            except PermissionError as e:
                raise UsageError(f"cannot complete the save a kill interrupted in {folder} ({e.strerror}: "
                                 f"{e.filename}): the folder must be writable to resume from it") from None  # fmt: skip
        dist_utils.barrier()

    def resume(self, fresh: bool = False) -> None:
        """Load every student's checkpoint: --resume (a file; with several students the folder holding
        <name>/checkpoint.pth), else their checkpoint.pth in the output folders if present and not `fresh`;
        and stand where they stood, which must be one place."""
        config = self.config
        several = len(self.students) > 1
        if config.resume:
            resume = Path(config.resume)
            paths = [resume / student_folder(s.name) / CHECKPOINT if several else resume for s in self.students]
            self.finish_saves(resume if several else paths[0].parent, paths)
        else:
            paths = self.checkpoints()
            self.finish_saves(self.out.folder, paths)
        if not config.resume and (fresh or not any(p.exists() for p in paths)):
            for s in self.students:  # a fresh run in an old output dir: its logs start anew, not appended to
                s.out.truncate_logs(0, 0)
            return
        ckpts = [self.load_checkpoint(s, p) for s, p in zip(self.students, paths)]  # one missing: a clear error
        if len({(c["epoch"], c.get("iteration_in_epoch", 0)) for c in ckpts}) > 1:
            places = ", ".join(
                f"{p} after epoch {c['epoch']} + {c.get('iteration_in_epoch', 0)} it" for p, c in zip(paths, ckpts)
            )
            raise UsageError(f"the students' checkpoints stand at different places ({places}); they resume together")
        ckpt = ckpts[0]
        path = Path(config.resume or self.out.folder) if several else paths[0]  # how messages name what was resumed
        if ckpt["args"]["precision"] != config.precision:
            log.warning("%s was trained with --precision %s, now %s", path, ckpt["args"]["precision"], config.precision)
        trained_loader = ckpt["args"].get("loader", "classic")  # a checkpoint without one ran the classic loader
        if trained_loader != config.loader:
            log.warning("%s was trained with --loader %s, now %s: the crops from here on may differ from the "
                        "uninterrupted run's", path, trained_loader, config.loader)  # fmt: skip
        epoch, done = ckpt["epoch"] + 1, ckpt.get("iteration_in_epoch", 0)
        if ckpt["args"]["epochs"] != config.epochs and epoch < config.epochs:
            log.warning("%s was trained with --epochs %d, now %d: the lr follows the cosine of a %d-epoch run from "
                        "here", path, ckpt["args"]["epochs"], config.epochs, config.epochs)  # fmt: skip
        world = dist_utils.world_size()
        if done and ckpt["world_size"] != world:
            log.warning("%s was written by %d processes, not %d: the rest of epoch %d differs from the uninterrupted "
                        "run", path, ckpt["world_size"], world, epoch)  # fmt: skip
        for s, c in zip(self.students, ckpts):
            s.out.truncate_logs(epoch, c["scheduler"]["iteration"])
            s.sums = dict(zip(self.loss_names, c["epoch_loss_sums"])) if done else dict.fromkeys(self.loss_names, 0.0)
        where = f"at iteration {done} of epoch {epoch}" if done else f"after epoch {ckpt['epoch']}"
        self.out.print(f"resumed from {path} {where}")
        self.position = Position(epoch, done)

    def load_checkpoint(self, s: Student, path: Path) -> dict:
        """Student `s` as `path` holds it (weights, heads, optimizer, scaler, EMA); returns the checkpoint."""
        flags = self.config.flags()  # as the checkpoint stores them
        ckpt = safe_load(path)
        if not isinstance(ckpt, dict) or not {"student", "heads", "optimizer", "args"} <= set(ckpt):
            keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise UsageError(
                f"{path} is not a pretraining checkpoint.pth (it holds {keys}); --resume takes the checkpoint.pth "
                "of a pretraining run, not an exported backbone or another task's checkpoint"
            )
        trained = {"student_layout": DEFAULT_LAYOUT, **ckpt["args"]}  # checkpoints from before --student-layout
        if "teacher_standardization" in trained:  # without the summary's own flag, it was standardised as the patches
            trained.setdefault("teacher_summary_standardization", trained["teacher_standardization"])
        # the standardisations decide the heads' buffers: named here rather than as other heads below
        standardizations = ("teacher_standardization", "teacher_summary_standardization")
        for key in ("student", "teacher", "student_layout", *standardizations):
            if key in trained and trained[key] != flags[key]:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{path} was trained with {flag} {trained[key]}, not {flags[key]}")
        s.distiller.student.load_state_dict(ckpt["student"])
        heads = s.distiller.load_state_dict(ckpt["heads"], strict=False)  # the student is loaded above
        missing = [k for k in heads.missing_keys if not k.startswith("student.")]
        if missing or heads.unexpected_keys:
            raise UsageError(
                f"{path} has other loss heads than this run (were --lambda-* changed?): "
                f"missing {missing}, unexpected {heads.unexpected_keys}"
            )
        s.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty unless that run used fp16; a fresh fp16 scaler then starts at its initial scale
            s.scaler.load_state_dict(ckpt["scaler"])
        s.ema.module.load_state_dict(ckpt["ema"])
        return ckpt
