"""One training epoch: the teacher's targets once per step, then each student's batched views, loss, step and
EMA on them; logging, stop/save requests."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator

import torch

from common import distributed as dist_utils
from models import Teacher, resample_patches

from .data import derive_seed
from .distiller import LOSSES, Views, resize
from .masking import make_masks
from .output import log_keys
from .state import Run, Student

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


def teacher_targets(
    teacher: Teacher, images: torch.Tensor, amp_dtype: torch.dtype | None, size: int
) -> dict[str, torch.Tensor]:
    """The teacher's targets for a batch of crops, on its own token grid: computed once per step and shared
    by every student (each resamples the patch map to its own grid in student_losses)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return teacher.targets(resize(images, size))


def student_losses(
    model,
    teacher: Teacher,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    targets: dict[str, torch.Tensor],
    amp_dtype: torch.dtype | None,
    views: Views,
) -> dict[str, torch.Tensor]:
    """One student's losses under autocast on the shared targets, the teacher's patch map resampled to the
    student's grid when the two differ (as Teacher.targets(images, grid) does)."""
    own = (views.teacher // teacher.patch_size,) * 2
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if tuple(views.grid) != own:
            targets = {**targets, "patches": resample_patches(targets["patches"], own, tuple(views.grid))}
        return model(resize(images, views.student), masks, targets)


def forward_losses(
    model,
    teacher: Teacher,
    images: torch.Tensor,
    masks: torch.Tensor | None,
    amp_dtype: torch.dtype | None,
    views: Views,
) -> dict[str, torch.Tensor]:
    """Teacher targets and one student's losses: the step's forward for one student (pretrain.benchmark)."""
    targets = teacher_targets(teacher, images, amp_dtype, views.teacher)
    return student_losses(model, teacher, images, masks, targets, amp_dtype, views)


def backward_and_step(model, loss: torch.Tensor, optimizer, scaler, clip_grad: float | None = None) -> None:
    """The step's backward and optimizer update, shared with pretrain.benchmark."""
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


def student_step(run: Run, s: Student, images: torch.Tensor, targets: dict, it: int) -> tuple[torch.Tensor, ...]:
    """Student `s`'s share of global iteration `it`: its masks, forward on the shared targets, backward,
    update and EMA; its graph is freed before the next student runs. Returns (its losses in LOSSES order,
    detached, its masks). Masks and drop path are seeded by (seed, rank, iteration) for each student, so
    every student draws what it would draw alone."""
    args = run.args
    torch.manual_seed(derive_seed(args.seed, dist_utils.rank(), it))
    for group in s.optimizer.param_groups:
        group["lr"] = run.schedule[it]
    masks = None
    if args.lambda_patch:
        batch_size, num_patches = images.shape[0], s.views.grid[0] * s.views.grid[1]
        masks = make_masks(batch_size, num_patches, args.mask_probability, args.mask_ratio)
        masks = masks[: int(args.mask_probability * batch_size)].to(run.device, non_blocking=True)
    losses = student_losses(s.model, run.teacher, images, masks, targets, AMP[args.precision], s.views)
    backward_and_step(s.model, losses["total"], s.optimizer, s.scaler, args.clip_grad)
    s.ema.update(
        s.distiller.student
    )  # constant decay: with a step, ModelEmaV3 copies the student at iterations 0 and 1
    return torch.stack([losses[name].detach() for name in LOSSES]).float(), masks


def check_after_update(run: Run, images, targets, masks: list, where: str) -> None:
    """Before a checkpoint is written: every student's loss of this batch under its UPDATED weights must be
    finite (all ranks agree). A diverging step (e.g. too high an lr) can leave finite but huge weights whose
    own loss was still finite; they must never replace the last good checkpoint."""
    amp_dtype = AMP[run.args.precision]
    with torch.no_grad():
        values = [
            student_losses(s.model, run.teacher, images, m, targets, amp_dtype, s.views)["total"]
            for s, m in zip(run.students, masks)
        ]
    values = dist_utils.all_reduce_mean(torch.stack(values).detach().float()).cpu()
    for s, loss in zip(run.students, values.tolist()):
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"the update of {where}{run.of(s)} made the loss non-finite ({loss:.4g}): the weights diverged"
            )


def train_one_epoch(run: Run) -> list[dict[str, float]]:
    """The rest of the epoch `run.position` stands in; returns each student's log.txt line of the epoch.

    Each step runs the teacher once and then the students one after another on its targets. Every
    random draw is a function of (seed, rank, global iteration) or, in the data, of (seed, rank, epoch,
    position), so a resumed run repeats the uninterrupted one. On a stop or save request every rank
    checkpoints the run where it stands; a stop then raises Preempted.
    """
    args, control, pos = run.args, run.control, run.position
    epoch, start, iters = pos.epoch, pos.iteration, run.iters_per_epoch
    for s in run.students:
        s.model.train()  # the teacher stays in eval mode (models.Teacher)
    amp_dtype = AMP[args.precision]
    start_time = last = time.time()
    batch_size = None
    batches = cycle_batches(run.loader, run.sampler, epoch, args.epochs, iters, start)
    for i, (images, _) in enumerate(batches, start):
        it = epoch * iters + i
        lr = run.schedule[it]
        images = images.to(run.device, non_blocking=True)
        batch_size = images.shape[0]
        targets = teacher_targets(run.teacher, images, amp_dtype, args.teacher_input_size)
        values, masks = zip(*(student_step(run, s, images, targets, it) for s in run.students))

        # the means over ranks of every student's losses, with this rank's [stop, save] flags riding along
        values = torch.cat([*values, control.flags().to(run.device)])
        values = dist_utils.all_reduce_mean(values).cpu()
        stop, save = (values[-2:] > 0).tolist()
        means = [dict(zip(LOSSES, v)) for v in values[:-2].reshape(len(run.students), len(LOSSES)).tolist()]
        for s, mean in zip(run.students, means):
            if not all(math.isfinite(v) for v in mean.values()):
                raise NonFiniteLoss(
                    f"non-finite loss{run.of(s)} at epoch {epoch} iteration {i} (total {mean['total']:.4g}, "
                    f"token {mean['token']:.4g}, patch {mean['patch']:.4g}, feature {mean['fea']:.4g})"
                )
        pos.iteration = done = i + 1
        for s, mean in zip(run.students, means):
            for name, v in mean.items():
                s.sums[name] += v
            s.out.iteration(epoch, it, mean, lr)

        if stop or save or done == iters:  # a checkpoint follows: only of weights that still work
            check_after_update(run, images, targets, masks, f"epoch {epoch} iteration {i}")
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
            for s, mean in zip(run.students, means):
                run.out.print(
                    f"epoch {epoch} [{done}/{iters}]{run.of(s, ' ')} loss {mean['total']:.4f} (token "
                    f"{mean['token']:.4f} patch {mean['patch']:.4f} fea {mean['fea']:.4f}) lr {lr:.3e} {ips:.1f} "
                    f"img/s eta {datetime.timedelta(seconds=int(eta))}"
                )
                s.out.scalars("train", {**log_keys(mean), "lr": lr, "images_per_sec": ips}, it)
            last = now
    elapsed = max(last - start_time, 1e-9)
    shared = {
        "lr": run.schedule[(epoch + 1) * iters - 1],
        "images_per_sec": (batch_size or 0) * dist_utils.world_size() * (iters - start) / elapsed,
        "epoch_time_sec": elapsed,
    }
    return [
        {**{f"train_{key}": v / max(iters, 1) for key, v in log_keys(s.sums).items()}, **shared} for s in run.students
    ]
