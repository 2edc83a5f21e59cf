"""One training epoch: teacher targets, batched student views, loss, step, EMA, logging, stop/save requests."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator

import torch

from common import distributed as dist_utils
from models import Teacher

from .data import derive_seed
from .distiller import LOSSES, Views
from .masking import make_masks
from .output import log_keys
from .state import Run

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint a SIGUSR1/SIGTERM asked for is written; the process should exit for requeue."""


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
    model,
    teacher: Teacher,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    amp_dtype: torch.dtype | None,
    views: Views,
) -> dict[str, torch.Tensor]:
    """The step's forward: teacher targets, then the student's losses (the Distiller's, by name)."""
    images, teacher_images = views.resized(images)
    targets = teacher_targets(teacher, teacher_images, amp_dtype, views)
    return student_losses(model, images, masks, targets, amp_dtype)


def teacher_targets(
    teacher: Teacher, images: torch.Tensor, amp_dtype: torch.dtype | None, views: Views
) -> dict[str, torch.Tensor]:
    """The teacher's part of the forward (its own resize of the crops), under autocast; pretrain.benchmark
    times it alone."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return teacher.targets(images, views.grid)


def student_losses(
    model, images: torch.Tensor, masks: torch.Tensor | None, targets: dict, amp_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The student's part of the forward, under autocast; pretrain.benchmark times it alone."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(images, masks, targets)


def backward_and_step(model, loss: torch.Tensor, optimizer, scaler, clip_grad: float | None = None) -> None:
    """The step's backward and optimizer update."""
    backward(loss, optimizer, scaler)
    update(model, optimizer, scaler, clip_grad)


def backward(loss: torch.Tensor, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()


def update(model, optimizer, scaler, clip_grad: float | None = None) -> None:
    """Gradient clipping (unscaled first) and the optimizer step; the scaler skips it on inf/NaN gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


def check_after_update(model, teacher, images, masks, amp_dtype, views: Views, where: str) -> None:
    """Before a checkpoint is written: the loss of this batch under the UPDATED weights must be finite
    (all ranks agree). A diverging step (e.g. too high an lr) can leave finite but huge weights whose
    own loss was still finite; they must never replace the last good checkpoint."""
    with torch.no_grad():
        loss = forward_losses(model, teacher, images, masks, amp_dtype, views)["total"]
    loss = dist_utils.all_reduce_mean(loss.detach().float().reshape(1)).cpu()
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f"the update of {where} made the loss non-finite ({loss.item():.4g}): the weights diverged")


def train_one_epoch(run: Run) -> dict[str, float]:
    """The rest of the epoch `run.position` stands in; returns the epoch's log.txt line.

    Every random draw is a function of (seed, rank, global iteration) or, in the data, of (seed,
    rank, epoch, position), so a resumed run repeats the uninterrupted one. On a stop or save
    request every rank checkpoints the run where it stands; a stop then raises Preempted.
    """
    args, out, control, pos = run.args, run.out, run.control, run.position
    epoch, start, iters = pos.epoch, pos.iteration, run.iters_per_epoch
    model, teacher, student = run.model, run.teacher, run.distiller.student
    model.train()  # the teacher stays in eval mode (models.Teacher)
    num_patches = (args.input_size // student.patch_size) ** 2
    amp_dtype = AMP[args.precision]
    rank = dist_utils.rank()
    start_time = last = time.time()
    batch_size = None
    batches = cycle_batches(run.loader, run.sampler, epoch, args.epochs, iters, start)
    for i, (images, _) in enumerate(batches, start):
        it = epoch * iters + i
        lr = run.schedule[it]
        torch.manual_seed(derive_seed(args.seed, rank, it))  # masks and drop-path
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(run.device, non_blocking=True)
        batch_size = images.shape[0]
        masks = None
        if args.lambda_patch:
            masks = make_masks(batch_size, num_patches, args.mask_probability, args.mask_ratio)
            masks = masks[: int(args.mask_probability * batch_size)].to(run.device, non_blocking=True)

        losses = forward_losses(model, teacher, images, masks, amp_dtype, run.views)

        # the mean over ranks, with this rank's [stop, save] flags riding along
        values = torch.stack([losses[name].detach() for name in LOSSES]).float()
        values = dist_utils.all_reduce_mean(torch.cat([values, control.flags().to(values.device)])).cpu()
        stop, save = (values[len(LOSSES) :] > 0).tolist()
        mean = dict(zip(LOSSES, values[: len(LOSSES)].tolist()))
        if not all(math.isfinite(v) for v in mean.values()):
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch} iteration {i} (total {mean['total']:.4g}, "
                f"token {mean['token']:.4g}, patch {mean['patch']:.4g}, feature {mean['fea']:.4g})"
            )
        backward_and_step(model, losses["total"], run.optimizer, run.scaler, args.clip_grad)
        run.ema.update(student)  # constant decay: with a step, ModelEmaV3 copies the student at iterations 0 and 1
        for name, v in mean.items():
            pos.sums[name] += v
        pos.iteration = done = i + 1
        out.iteration(epoch, it, mean, lr)

        if stop or save or done == iters:  # a checkpoint follows: only of weights that still work
            check_after_update(model, teacher, images, masks, amp_dtype, run.views, f"epoch {epoch} iteration {i}")
        if stop or save:
            control.signalled |= stop  # every rank agrees now; at the epoch's end main.py stops after its checkpoint
            if done < iters:
                run.save_checkpoint()
                if stop:
                    raise Preempted(f"stopped after iteration {done}/{iters} of epoch {epoch}")

        if done % args.print_freq == 0 or done == iters:
            now = time.time()
            eta = (now - start_time) / (done - start) * (iters - done)
            ips = batch_size * dist_utils.world_size() * (done - start) / (now - start_time)
            out.print(
                f"epoch {epoch} [{done}/{iters}] loss {mean['total']:.4f} (token {mean['token']:.4f} "
                f"patch {mean['patch']:.4f} fea {mean['fea']:.4f}) lr {lr:.3e} {ips:.1f} img/s "
                f"eta {datetime.timedelta(seconds=int(eta))}"
            )
            out.scalars("train", {**log_keys(mean), "lr": lr, "images_per_sec": ips}, it)
            last = now
    elapsed = max(last - start_time, 1e-9)
    return {
        **{f"train_{key}": s / max(iters, 1) for key, s in log_keys(pos.sums).items()},
        "lr": run.schedule[(epoch + 1) * iters - 1],
        "images_per_sec": (batch_size or 0) * dist_utils.world_size() * (iters - start) / elapsed,
        "epoch_time_sec": elapsed,
    }
