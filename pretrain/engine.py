"""One training epoch: teacher targets, batched student views, loss, step, EMA, logging."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator

import torch

from . import distributed as dist_utils
from .distiller import teacher_targets
from .masking import make_masks


class NonFiniteLoss(RuntimeError):
    pass


def cycle_batches(loader, sampler, epoch: int, num_epochs: int, n: int) -> Iterator:
    """`n` batches for this epoch; re-shuffles and goes round again if the loader is shorter."""
    assert len(loader) > 0, "the loader yields no batch"
    k = 0
    while True:
        sampler.set_epoch(epoch + k * num_epochs)
        for batch in loader:
            if n == 0:
                return
            n -= 1
            yield batch
        k += 1


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
) -> dict[str, float]:
    model.train()
    teacher.eval()  # never trained, whatever model.train() does
    student = model.module.student if hasattr(model, "module") else model.student
    num_patches = (args.input_size // student.patch_size) ** 2
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    sums = torch.zeros(4, dtype=torch.float64)
    start = last = time.time()
    batch_size = None
    for i, (images, _) in enumerate(cycle_batches(loader, sampler, epoch, args.epochs, iters_per_epoch)):
        it = epoch * iters_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[it]
        images = images.to(device, non_blocking=True)
        batch_size = images.shape[0]
        masks = None
        if args.lambda_patch:
            masks = make_masks(batch_size, num_patches, args.mask_probability, args.mask_ratio)
            masks = masks[: int(args.mask_probability * batch_size)].to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            targets = teacher_targets(teacher, images)
            loss, parts = model(images, masks, targets)

        values = torch.stack([loss.detach(), parts["token"], parts["patch"], parts["fea"]]).float()
        values = dist_utils.all_reduce_mean(values).cpu()
        if not torch.isfinite(values).all():
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch} iteration {i} (total {values[0]:.4g}, token {values[1]:.4g}, "
                f"patch {values[2]:.4g}, feature {values[3]:.4g})"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        ema.update(student, step=it)
        sums += values.double()

        if (i + 1) % args.print_freq == 0 or i + 1 == iters_per_epoch:
            now = time.time()
            done = i + 1
            eta = (now - start) / done * (iters_per_epoch - done)
            ips = batch_size * dist_utils.world_size() * done / (now - start)
            if dist_utils.is_main():
                print(
                    f"epoch {epoch} [{done}/{iters_per_epoch}] loss {values[0]:.4f} (token {values[1]:.4f} "
                    f"patch {values[2]:.4f} fea {values[3]:.4f}) lr {lr_schedule[it]:.3e} {ips:.1f} img/s "
                    f"eta {datetime.timedelta(seconds=int(eta))}",
                    flush=True,
                )
                if writer is not None:
                    for name, v in zip(("loss", "loss_token", "loss_patch", "loss_fea"), values.tolist()):
                        writer.add_scalar(f"train/{name}", v, it)
                    writer.add_scalar("train/lr", lr_schedule[it], it)
                    writer.add_scalar("train/images_per_sec", ips, it)
            last = now
    elapsed = max(last - start, 1e-9)
    mean = (sums / max(iters_per_epoch, 1)).tolist()
    return {
        "train_loss": mean[0],
        "train_loss_token": mean[1],
        "train_loss_patch": mean[2],
        "train_loss_fea": mean[3],
        "lr": lr_schedule[(epoch + 1) * iters_per_epoch - 1],
        "images_per_sec": (batch_size or 0) * dist_utils.world_size() * iters_per_epoch / elapsed,
        "epoch_time_sec": elapsed,
    }
