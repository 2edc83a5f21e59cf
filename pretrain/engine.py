"""One training epoch: the teacher's targets once per step, then each student's batched views, loss, step and
EMA on them; logging, stop/save requests."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator

import torch

from common import distributed as dist_utils
from models import Tokens

from .data import derive_seed
from .distiller import TeacherInput, Views, resize
from .masking import make_masks
from .output import describe, log_keys
from .state import Run, Student

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
STUDENT_STREAM = 1  # a 5th key: a later student's seed has more keys than any data sample's


class NonFiniteLoss(RuntimeError):
    """Non-finite numbers where training needs finite ones (a loss, a teacher's weights or targets): exit 3."""


class Preempted(Exception):
    """Raised after the checkpoint a SIGUSR1/SIGTERM asked for is written; the process should exit for requeue."""


def cycle_batches(loader, sampler, epoch: int, *, num_epochs: int, n: int, start: int = 0) -> Iterator:
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
    teachers: list[TeacherInput], images: torch.Tensor, amp_dtype: torch.dtype | None
) -> dict[str, Tokens]:
    """Every teacher's targets for a batch of crops, by name, each on its own token grid: computed once per
    step and shared by every student (each resamples the patch maps to its own grid in student_losses)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return {t.name: t.teacher.targets(resize(images, t.size)) for t in teachers}


def student_losses(
    model,
    teachers: list[TeacherInput],
    images: torch.Tensor,
    *,
    masks: torch.Tensor | None,
    targets: dict[str, Tokens],
    amp_dtype: torch.dtype | None,
    views: Views,
) -> dict[str, torch.Tensor]:
    """One student's losses under autocast on the shared targets, each teacher's patch map resampled to the
    student's grid when the two differ (as Teacher.targets(images, grid) does)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        on_grid = {t.name: targets[t.name].on_grid(views.grid) for t in teachers}
        return model(resize(images, views.student), masks, on_grid)


def forward_losses(
    model,
    teachers: list[TeacherInput],
    images: torch.Tensor,
    *,
    masks: torch.Tensor | None,
    amp_dtype: torch.dtype | None,
    views: Views,
) -> dict[str, torch.Tensor]:
    """Teacher targets and one student's losses: the step's forward for one student (pretrain.benchmark)."""
    targets = teacher_targets(teachers, images, amp_dtype)
    return student_losses(model, teachers, images, masks=masks, targets=targets, amp_dtype=amp_dtype, views=views)


def estimate_statistics(run: Run) -> None:
    """Each teacher's target statistics (CLS and patch tokens apart) on --teacher-stats-batches batches in
    epoch 0's order (round the data again in fresh orders when an epoch is shorter), summed over all ranks,
    then frozen in every student's Standardizers (saved with the heads). Skipped when there is nothing to
    estimate (no standardisation, as one teacher's default; a resumed run). The teachers only run forward and
    the data's randomness is a function of its position, so training sees what it would have."""
    adaptors = run.students[0].distiller.adaptors
    # either standardiser may be the identity (the summary's with --teacher-summary-standardization none)
    fitted = {name: a.cls_std.fitted and a.patch_std.fitted for name, a in adaptors.items()}
    pending = {t.name for t in run.teachers if not fitted[t.name]}
    if not pending:
        return
    config = run.config
    n = config.teacher_stats_batches
    run.out.print(f"estimating the target statistics of {', '.join(sorted(pending))} on {n} batches per process")
    moments: dict[str, list[torch.Tensor]] = {}
    for batch in cycle_batches(run.loader, run.sampler, 0, num_epochs=config.epochs, n=n):
        targets = teacher_targets(run.teachers, run.finish(batch, run.device), AMP[config.precision])
        for name in pending:
            for kind in ("cls", "patches"):
                x = getattr(targets[name], kind).flatten(0, -2).double()
                m = [torch.tensor([float(x.shape[0])], dtype=torch.float64), x.sum(0).cpu(), (x.T @ x).cpu()]
                moments[name + kind] = [a + b for a, b in zip(moments.get(name + kind, [0, 0, 0]), m)]
    summed = {key: [dist_utils.sum_across_ranks(m) for m in value] for key, value in sorted(moments.items())}
    for name in sorted(pending):
        if not all(m.isfinite().all() for kind in ("cls", "patches") for m in summed[name + kind]):
            raise NonFiniteLoss(
                f"the targets of teacher {name} are not finite on the statistics batches (its features overflow "
                f"at --precision {config.precision}, or its file is damaged)"
            )
    for s in run.students:
        for name in pending:
            a = s.distiller.adaptors[name]
            for kind, std in (("cls", a.cls_std), ("patches", a.patch_std)):
                count, total, outer = summed[name + kind]
                std.fit(count.item(), total, outer)


def backward_and_step(model, loss: torch.Tensor, optimizer, *, scaler, clip_grad: float | None = None) -> None:
    """The step's backward and optimizer update, shared with pretrain.benchmark."""
    backward(loss, optimizer, scaler)
    update(model, optimizer, scaler, clip_grad=clip_grad)


def backward(loss: torch.Tensor, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()


def update(model, optimizer, scaler, *, clip_grad: float | None = None) -> None:
    """Gradient clipping (unscaled first) and the optimizer step; the scaler skips it on inf/NaN gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


def student_seed(seed: int, rank: int, it: int, *, index: int) -> int:
    """The seed of the random draws (masks, and drop path from the same global generators) of the `index`-th
    student listed at global iteration `it`. The first student's is (seed, rank, it), what a run of it alone
    draws (SeedSequence pads keys with zeros, so it is also the seed of sample 0 of data epoch `it`; changing
    it would change every existing run). Each later one adds its index and a key of its own: students of one
    run never share masks or drop path, and no later student's seed is a data sample's (seed, rank, epoch,
    position)."""
    if index == 0:
        return derive_seed(seed, rank, it)
    return derive_seed(seed, rank, it, index, STUDENT_STREAM)


def student_step(
    run: Run, s: Student, images: torch.Tensor, *, targets: dict, it: int, index: int
) -> tuple[torch.Tensor, ...]:
    """Student `s`'s share of global iteration `it`: its masks, forward on the shared targets, backward,
    update and EMA; its graph is freed before the next student runs. Returns (its losses in
    `run.loss_names` order, detached, its masks). `index` is its place in --student: its masks and drop path
    are seeded by student_seed, a function of (seed, rank, iteration, index), so a resumed run repeats them
    and the first student draws what it would draw alone."""
    config = run.config
    torch.manual_seed(student_seed(config.seed, dist_utils.rank(), it, index=index))
    for group in s.optimizer.param_groups:
        group["lr"] = run.schedule[it]
    masks = None
    if s.distiller.masked:
        batch_size, num_patches = images.shape[0], s.views.grid[0] * s.views.grid[1]
        masks = make_masks(batch_size, num_patches, config.mask_probability, mask_ratio=config.mask_ratio)
        masks = masks[: int(config.mask_probability * batch_size)].to(run.device, non_blocking=True)
    losses = student_losses(
        s.model, run.teachers, images, masks=masks, targets=targets, amp_dtype=AMP[config.precision], views=s.views
    )
    backward_and_step(s.model, losses["total"], s.optimizer, scaler=s.scaler, clip_grad=config.clip_grad)
    s.ema.update(
        s.distiller.student
    )  # constant decay: with a step, ModelEmaV3 copies the student at iterations 0 and 1
    return torch.stack([losses[name].detach() for name in run.loss_names]).float(), masks


def check_after_update(run: Run, images, targets, *, masks: list, where: str) -> None:
    """Before a checkpoint is written: every student's loss of this batch under its UPDATED weights must be
    finite (all ranks agree). A diverging step (e.g. too high an lr) can leave finite but huge weights whose
    own loss was still finite; they must never replace the last good checkpoint."""
    amp_dtype = AMP[run.config.precision]
    with torch.no_grad():
        values = [
            student_losses(
                s.model,
                run.teachers,
                images,
                masks=m,
                targets=targets,
                amp_dtype=amp_dtype,
                views=s.views,
            )["total"]
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
    random draw is a function of (seed, rank, global iteration, student index) or, in the data, of
    (seed, rank, epoch, position), so a resumed run repeats the uninterrupted one. On a stop or save
    request every rank checkpoints the run where it stands; a stop then raises Preempted.
    """
    config, control, pos = run.config, run.control, run.position
    epoch, start, iters = pos.epoch, pos.iteration, run.iters_per_epoch
    for s in run.students:
        s.model.train()  # the teacher stays in eval mode (models.Teacher)
    amp_dtype = AMP[config.precision]
    start_time = last = time.time()
    batch_size = None
    batches = cycle_batches(run.loader, run.sampler, epoch, num_epochs=config.epochs, n=iters, start=start)
    for i, batch in enumerate(batches, start):
        it = epoch * iters + i
        lr = run.schedule[it]
        images = run.finish(batch, run.device)
        batch_size = images.shape[0]
        targets = teacher_targets(run.teachers, images, amp_dtype)
        steps = (student_step(run, s, images, targets=targets, it=it, index=k) for k, s in enumerate(run.students))
        values, masks = zip(*steps)

        # the means over ranks of every student's losses, with this rank's [stop, save] flags riding along
        values = torch.cat([*values, control.flags().to(run.device)])
        values = dist_utils.all_reduce_mean(values).cpu()
        stop, save = (values[-2:] > 0).tolist()
        names = run.loss_names
        means = [dict(zip(names, v)) for v in values[:-2].reshape(len(run.students), len(names)).tolist()]
        for s, mean in zip(run.students, means):
            if not all(math.isfinite(v) for v in mean.values()):
                raise NonFiniteLoss(
                    f"non-finite loss{run.of(s)} at epoch {epoch} iteration {i} ({describe(mean, ', ', '{:.4g}')})"
                )
        pos.iteration = done = i + 1
        for s, mean in zip(run.students, means):
            for name, v in mean.items():
                s.sums[name] += v
            s.out.iteration(epoch, it, mean, lr=lr)

        if stop or save or done == iters:  # a checkpoint follows: only of weights that still work
            check_after_update(run, images, targets, masks=masks, where=f"epoch {epoch} iteration {i}")
        if stop or save:
            control.signalled |= stop  # every rank agrees now; at the epoch's end main.py stops after its checkpoint
            if done < iters:
                run.save_checkpoint()
                if stop:
                    raise Preempted(f"stopped after iteration {done}/{iters} of epoch {epoch}")

        if done % config.print_freq == 0 or done == iters:
            now = time.time()
            eta = (now - start_time) / (done - start) * (iters - done)
            ips = batch_size * dist_utils.world_size() * (done - start) / (now - start_time)
            for s, mean in zip(run.students, means):
                run.out.print(
                    f"epoch {epoch} [{done}/{iters}]{run.of(s, ' ')} loss {mean['total']:.4f} "
                    f"({describe(mean, ' ', '{:.4f}', total=False)}) lr {lr:.3e} {ips:.1f} "
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
