"""One training epoch: teacher targets, batched student views, loss, step, EMA, logging, stop/save requests."""

from __future__ import annotations

import datetime
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common import distributed as dist_utils

from .data import derive_seed
from .distiller import teacher_targets
from .masking import make_masks

ITERATION_LOG = "iterations.jsonl"  # one JSON line per iteration on rank 0: epoch, iteration, losses, lr


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint a SIGUSR1/SIGTERM asked for is written; the process should exit for requeue."""


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


def cycle_batches(loader, sampler, epoch: int, num_epochs: int, n: int, start: int = 0) -> Iterator:
    """Batches `start`..`n - 1` of this epoch; re-shuffles and goes round again if the loader is shorter.

    `sampler` is a data.PositionSampler: the `start` batches a resumed run already trained on are
    skipped in the sampler, so they are never loaded.
    """
    sampler.set_epoch(epoch)
    per_round = len(loader)
    assert per_round > 0, "the loader yields no batch"
    k, skip = divmod(start, per_round)
    n -= start
    while n > 0:
        sampler.set_epoch(epoch + k * num_epochs, skip * loader.batch_size)
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return
        k, skip = k + 1, 0


def forward_losses(
    model, teacher, images: torch.Tensor, masks: torch.Tensor | None, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher targets and the student's loss under autocast: the step's forward, shared with pretrain.benchmark."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        targets = teacher_targets(teacher, images)
        return model(images, masks, targets)


def backward_and_step(model, loss: torch.Tensor, optimizer, scaler, clip_grad: float | None = None) -> None:
    """The step's backward and optimizer update, shared with pretrain.benchmark."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


def check_after_update(model, teacher, images, masks, amp_dtype, where: str) -> None:
    """Before a checkpoint is written: the loss of this batch under the UPDATED weights must be finite
    (all ranks agree). A diverging step (e.g. too high an lr) can leave finite but huge weights whose
    own loss was still finite; they must never replace the last good checkpoint."""
    with torch.no_grad():
        loss, _ = forward_losses(model, teacher, images, masks, amp_dtype)
    loss = dist_utils.all_reduce_mean(loss.detach().float().reshape(1)).cpu()
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f"the update of {where} made the loss non-finite ({loss.item():.4g}): the weights diverged")


def train_one_epoch(
    model,
    teacher,
    loader,
    sampler,
    optimizer,
    scaler,
    ema,
    lr_schedule: list[float],
    epoch: int,
    iters_per_epoch: int,
    args,
    device: torch.device,
    writer=None,
    start: int = 0,
    sums: torch.Tensor | None = None,
    control: StopControl | None = None,
    checkpoint: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Iterations `start`.. of `epoch`; `sums` carries a resumed epoch's loss sums so its log line is whole.

    Every random draw is a function of (seed, rank, global iteration) or, in the data, of (seed,
    rank, epoch, position), so a resumed run repeats the uninterrupted one. On a stop or save
    request `checkpoint(iterations done in this epoch, sums)` runs on every rank; a stop then
    raises Preempted.
    """
    model.train()
    teacher.eval()  # never trained, whatever model.train() does
    student = model.module.student if hasattr(model, "module") else model.student
    num_patches = (args.input_size // student.patch_size) ** 2
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    sums = torch.zeros(4, dtype=torch.float64) if sums is None else sums.clone()
    main_rank, rank = dist_utils.is_main(), dist_utils.rank()
    iter_log = Path(args.output_dir) / ITERATION_LOG
    start_time = last = time.time()
    batch_size = None
    batches = cycle_batches(loader, sampler, epoch, args.epochs, iters_per_epoch, start)
    for i, (images, _) in enumerate(batches, start):
        it = epoch * iters_per_epoch + i
        torch.manual_seed(derive_seed(args.seed, rank, it))  # masks and drop-path
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[it]
        images = images.to(device, non_blocking=True)
        batch_size = images.shape[0]
        masks = None
        if args.lambda_patch:
            masks = make_masks(batch_size, num_patches, args.mask_probability, args.mask_ratio)
            masks = masks[: int(args.mask_probability * batch_size)].to(device, non_blocking=True)

        loss, parts = forward_losses(model, teacher, images, masks, amp_dtype)

        values = torch.stack([loss.detach(), parts["token"], parts["patch"], parts["fea"]]).float()
        flags = control.flags() if control is not None else torch.zeros(2)
        values = dist_utils.all_reduce_mean(torch.cat([values, flags.to(values.device)])).cpu()
        stop, save = (values[4:] > 0).tolist()
        values = values[:4]
        if not torch.isfinite(values).all():
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch} iteration {i} (total {values[0]:.4g}, token {values[1]:.4g}, "
                f"patch {values[2]:.4g}, feature {values[3]:.4g})"
            )
        backward_and_step(model, loss, optimizer, scaler, args.clip_grad)
        ema.update(student)  # constant decay: with a step, ModelEmaV3 copies the student at iterations 0 and 1
        sums += values.double()
        losses = dict(zip(("loss", "loss_token", "loss_patch", "loss_fea"), values.tolist()))
        if main_rank:
            with open(iter_log, "a") as f:
                f.write(json.dumps({"epoch": epoch, "iteration": it, **losses, "lr": lr_schedule[it]}) + "\n")

        done = i + 1
        if stop or save or done == iters_per_epoch:  # a checkpoint follows: only of weights that still work
            check_after_update(model, teacher, images, masks, amp_dtype, f"epoch {epoch} iteration {i}")
        if stop or save:
            control.signalled |= stop  # every rank agrees now; at the epoch's end main.py stops after its checkpoint
            if done < iters_per_epoch:
                checkpoint(done, sums)
                control.last_save = time.monotonic()
                if stop:
                    raise Preempted(f"stopped after iteration {done}/{iters_per_epoch} of epoch {epoch}")

        if done % args.print_freq == 0 or done == iters_per_epoch:
            now = time.time()
            eta = (now - start_time) / (done - start) * (iters_per_epoch - done)
            ips = batch_size * dist_utils.world_size() * (done - start) / (now - start_time)
            if main_rank:
                print(
                    f"epoch {epoch} [{done}/{iters_per_epoch}] loss {values[0]:.4f} (token {values[1]:.4f} "
                    f"patch {values[2]:.4f} fea {values[3]:.4f}) lr {lr_schedule[it]:.3e} {ips:.1f} img/s "
                    f"eta {datetime.timedelta(seconds=int(eta))}",
                    flush=True,
                )
                if writer is not None:
                    for name, v in losses.items():
                        writer.add_scalar(f"train/{name}", v, it)
                    writer.add_scalar("train/lr", lr_schedule[it], it)
                    writer.add_scalar("train/images_per_sec", ips, it)
            last = now
    elapsed = max(last - start_time, 1e-9)
    mean = (sums / max(iters_per_epoch, 1)).tolist()
    return {
        "train_loss": mean[0],
        "train_loss_token": mean[1],
        "train_loss_patch": mean[2],
        "train_loss_fea": mean[3],
        "lr": lr_schedule[(epoch + 1) * iters_per_epoch - 1],
        "images_per_sec": (batch_size or 0) * dist_utils.world_size() * (iters_per_epoch - start) / elapsed,
        "epoch_time_sec": elapsed,
    }
