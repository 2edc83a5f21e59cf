"""ImageNet linear probing on a frozen backbone: DINOv2's protocol (PROTOCOLS B, 52 linear classifiers,
the default) or DINOv3's (`--protocol dinov3`, dinov3/eval/linear.py: 13 classifiers).

python -m linear_eval.main --data-path /imagenet --backbone output/pretrain/backbone.pth
torchrun --nproc_per_node=4 -m linear_eval.main --data-path /imagenet --backbone ... --batch-size 128
torchrun --nproc_per_node=8 -m linear_eval.main --protocol dinov3 --data-path /imagenet --backbone ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import distributed as dist_utils
from common.cli import ArgumentParser, OldSwitch, check_positive, evaluation_parser, run, start
from common.features import Features, Progress, cached_features, file_identity, frozen_backbone, image_counts
from common.images import check_readable, seed_worker, skipped_paths
from common.io import atomic_save, prepare_output_dir
from common.results import Results, Timer, print_table, topk_correct, write_results
from common.schedule import warmup_cosine
from models import ViT, safe_load
from models.errors import UsageError

from .classifiers import DEFAULT_PROTOCOL, PROTOCOLS, AllClassifiers, LinearProtocol, Probe, probe_of
from .data import LAYOUT, load_splits, split_holdout, train_transform, val_transform

CHECKPOINT = "checkpoint.pth"


def get_args_parser() -> argparse.ArgumentParser:
    parent = evaluation_parser(
        data_path=f"ImageNet, {LAYOUT}",
        output_dir="output/linear",
        loader=(128, 10),  # every protocol's batch per GPU (LinearProtocol.batch_size)
        resume=True,
        cache_dir="no cache; the val (and held-out) features go to features_<split>.pth",
    )
    p = ArgumentParser("Proteus linear probing", parents=[parent])
    a = p.add_argument
    a(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="dinov2: DINOv2's 52 classifiers (the last 1 or 4 blocks' CLS, with or without avgpool, x 13 lrs), "
        "one-pass epochs (PROTOCOLS B); dinov3: dinov3/eval/linear.py's 13 (the last block's CLS + avgpool "
        "x 13 lrs), epochs of 1250 iterations",
    )
    a("--input-size", type=int, default=224, help="crop size; val is resized to input-size * 256/224 first")
    a("--epochs", type=int, help="cosine to 0 over epochs x epoch length (default: the protocol's, 10)")
    a(
        "--epoch-length",
        type=int,
        help="iterations per epoch (default: the protocol's; dinov2: one pass over train, floor(#train / global "
        "batch): 2502 for ImageNet at global batch 512, the PROTOCOLS B recipe; dinov3: 1250 at any batch)",
    )
    a("--val-from-train", type=float, help="select the classifier on this seeded fraction of train (held out)")
    a("--cache-features", action=OldSwitch, new="--cache-dir <output-dir>")
    a("--seed", type=int, default=0, help="shuffle, augmentations, classifier init and the --val-from-train split")
    a("--print-freq", type=int, default=50, help="iterations between progress lines")
    return p


class Setup(NamedTuple):
    """Everything the probe trains and is evaluated with, loaded and checked before the first step."""

    args: argparse.Namespace
    device: torch.device
    backbone: ViT
    probe: Probe  # the protocol's, for this backbone
    classifiers: AllClassifiers
    optimizer: torch.optim.Optimizer
    schedule: list[float]
    loader: DataLoader
    sampler: DistributedSampler
    start_epoch: int
    eval_features: dict[str, Features]  # "val", and "holdout" with --val-from-train
    train_images: Dataset  # the folder whose unreadable images training skips


def protocol_defaults(args: argparse.Namespace) -> LinearProtocol:
    """The --protocol's record; the flags left unset take its values (--epoch-length may stay None: one pass)."""
    protocol = PROTOCOLS[args.protocol]
    for flag in ("epochs", "epoch_length"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(protocol, flag))
    return protocol


def prepare(args: argparse.Namespace, device: torch.device, timer: Timer) -> Setup:
    """Load and check everything, and extract the eval features, before the first training step."""
    protocol = protocol_defaults(args)
    check_positive(args, "epochs", "batch_size", "input_size", "print_freq")
    backbone = frozen_backbone(args.backbone, device, args.input_size)
    probe = probe_of(backbone, protocol)
    if probe.blocks and len(backbone.blocks) < probe.blocks:
        raise UsageError(f"the backbone has {len(backbone.blocks)} blocks; the protocol reads the last {probe.blocks}")
    size, norm = args.input_size, backbone.normalization  # as the backbone's inputs were in its training
    train, val = load_splits(args.data_path, train_transform(size, norm), val_transform(size, norm))
    check_readable(train)  # none readable: one line here, not a data-loader worker's error in training
    train_images = train  # the folder whose unreadable images training skips (counted at the end)
    num_classes = len(train.classes)
    holdout = None
    if args.val_from_train is not None:
        train, holdout = split_holdout(train, args.val_from_train, args.seed, holdout_tf=val_transform(size, norm))

    world = dist_utils.world_size()
    sampler = DistributedSampler(train, num_replicas=world, rank=dist_utils.rank(), shuffle=True, seed=args.seed)
    loader = DataLoader(
        train,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=seed_worker,
    )
    if args.epoch_length is None:
        args.epoch_length = len(sampler) // args.batch_size
        if args.epoch_length < 1:
            raise UsageError(f"{len(sampler)} train images per process cannot fill a batch of {args.batch_size}")
    check_positive(args, "epoch_length")

    torch.manual_seed(args.seed)  # the same classifier init on every rank
    global_batch = args.batch_size * world
    classifiers = AllClassifiers(probe.grid(global_batch), probe.width(backbone), num_classes).to(device)
    optimizer = torch.optim.SGD(classifiers.param_groups(), momentum=0.9, weight_decay=0.0)
    # lr multiplier, no warmup
    schedule = warmup_cosine(1.0, 0.0, args.epochs * args.epoch_length, warmup_iters=0, warmup_start=0.0)
    start_epoch = resume(args, classifiers, optimizer)

    eval_sets = {"val": val} if holdout is None else {"holdout": holdout, "val": val}
    with timer.phase("features"):
        eval_features = {
            name: eval_set_features(args, backbone, ds, probe=probe, name=name, device=device)
            for name, ds in eval_sets.items()
        }
    return Setup(
        args=args,
        device=device,
        backbone=backbone,
        probe=probe,
        classifiers=classifiers,
        optimizer=optimizer,
        schedule=schedule,
        loader=loader,
        sampler=sampler,
        start_epoch=start_epoch,
        eval_features=eval_features,
        train_images=train_images,
    )


def eval_set_features(
    args: argparse.Namespace, backbone: ViT, dataset: Dataset, *, probe: Probe, name: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """The probe's compact features of an eval split (unreadable images left out), from
    <cache-dir>/features_<name>.pth when cached."""
    path = Path(args.cache_dir) / f"features_{name}.pth" if args.cache_dir else None
    fn = lambda x: probe.features(backbone, x)
    desc = f"{name} features"
    kind = probe.feature_type
    return cached_features(
        path,
        fn,
        dataset,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc=desc,
        backbone_path=args.backbone,
        input_size=args.input_size,
        feature_type=kind,
    )


def resume(args: argparse.Namespace, classifiers: AllClassifiers, optimizer: torch.optim.Optimizer) -> int:
    """Load --resume, else <output-dir>/checkpoint.pth if present; returns the first epoch to train."""
    path = args.resume or Path(args.output_dir) / CHECKPOINT
    if not args.resume and not Path(path).exists():
        return 0
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or not {"classifiers", "optimizer", "epoch", "args"} <= set(ckpt):
        raise UsageError(f"{path} is not a linear_eval checkpoint (it lacks classifiers/optimizer/epoch/args)")
    for key, now in run_identity(args).items():
        then = ckpt["args"].get(key, UNRECORDED.get(key))
        if then != now:
            raise UsageError(f"{path} was run with {key} {then}, not {now}; use another --output-dir")
    classifiers.load_state_dict(ckpt["classifiers"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if dist_utils.is_main():
        print(f"resumed from {path} after epoch {ckpt['epoch']}", flush=True)
    return ckpt["epoch"] + 1


# a setting a checkpoint does not record had one possible value when it was written
UNRECORDED = {"protocol": DEFAULT_PROTOCOL}


def run_identity(args: argparse.Namespace) -> dict:
    """What a checkpoint must share with the current run to be resumed (the lr schedule depends on it)."""
    return {
        "protocol": args.protocol,  # another grid: other classifiers
        "backbone": file_identity(args.backbone),  # path, size, mtime: a re-exported file is another backbone
        "data_path": str(Path(args.data_path).resolve()),
        "epochs": args.epochs,
        "epoch_length": args.epoch_length,
        "batch_size_global": args.batch_size * dist_utils.world_size(),
        "val_from_train": args.val_from_train,
    }


def epoch_batches(loader: DataLoader, sampler: DistributedSampler, epoch: int, *, length: int):
    """`length` batches; each epoch starts a fresh seeded shuffle (and re-shuffles if one pass is too short),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    done, passes = 0, 0
    while True:
        sampler.set_epoch(epoch * 1000 + passes)
        for batch in loader:
            yield batch
            done += 1
            if done == length:
                return
        passes += 1


def save_checkpoint(args: argparse.Namespace, classifiers: AllClassifiers, optimizer, *, epoch: int) -> None:
    atomic_save(
        {
            "classifiers": classifiers.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"iteration": (epoch + 1) * args.epoch_length, "total": args.epochs * args.epoch_length},
            "epoch": epoch,
            "args": run_identity(args),
        },
        Path(args.output_dir) / CHECKPOINT,
    )


def train(setup: Setup) -> None:
    """Epochs start_epoch..epochs-1: frozen features -> the grid's summed losses -> one SGD step; checkpoint each
    epoch."""
    args, device, backbone, classifiers = setup.args, setup.device, setup.backbone, setup.classifiers
    optimizer, schedule, loader, sampler = setup.optimizer, setup.schedule, setup.loader, setup.sampler
    start_epoch = setup.start_epoch
    model = classifiers
    if dist_utils.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            classifiers, device_ids=[device.index] if device.type == "cuda" else None
        )
    if dist_utils.is_main() and start_epoch >= args.epochs:
        print(f"linear probe: all {args.epochs} epochs are trained, nothing left to train: evaluating", flush=True)
    elif dist_utils.is_main():
        global_batch = args.batch_size * dist_utils.world_size()
        print(
            f"linear probe ({args.protocol}): {len(classifiers.specs)} classifiers, "
            f"world {dist_utils.world_size()}, global batch {global_batch} (lrs x {global_batch / 256:g}), "
            f"{args.epoch_length} it/epoch, epochs {start_epoch}..{args.epochs - 1}",
            flush=True,
        )
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed + 10_000 * epoch + dist_utils.rank())  # augmentations replay on resume
        progress = Progress(f"epoch {epoch}", args.epoch_length, every=args.print_freq)
        for i, (images, targets) in enumerate(epoch_batches(loader, sampler, epoch, length=args.epoch_length)):
            it = epoch * args.epoch_length + i
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * schedule[it]
            features = setup.probe.features(backbone, images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            losses = [F.cross_entropy(logits, targets) for logits in model(features).values()]
            loss = torch.stack(losses).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.step(i + 1, f"mean loss {loss.item() / len(losses):.4f} lr x{schedule[it]:.3f} ")
        if dist_utils.is_main():
            save_checkpoint(args, classifiers, optimizer, epoch=epoch)
        dist_utils.barrier()


@torch.no_grad()
def evaluate(
    classifiers: AllClassifiers, data: Features, device: torch.device, *, batch_size: int
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 (%) of every classifier; each rank scores its shard, counts are summed over ranks."""
    classifiers.eval()
    rows = torch.tensor(list(dist_utils.shard(len(data.targets))), dtype=torch.long)
    counts = torch.zeros(len(classifiers.specs), 2, dtype=torch.float64)
    for chunk in rows.split(batch_size):
        targets = data.targets[chunk].to(device)
        outputs = classifiers(data.features[chunk].to(device))
        counts += torch.stack([topk_correct(logits, targets).cpu() for logits in outputs.values()])
    counts = dist_utils.sum_across_ranks(counts) * 100 / len(data.targets)
    return {s.name: {"top1": c[0].item(), "top5": c[1].item()} for s, c in zip(classifiers.specs, counts)}


def report(
    args: argparse.Namespace,
    classifiers: AllClassifiers,
    scores: dict[str, dict[str, dict[str, float]]],
    *,
    eval_features: dict[str, dict],
    train_skipped: list[str],
    timer: Timer,
    protocol: str,
) -> None:
    select_on = "holdout" if "holdout" in scores else "val"
    best = max(classifiers.specs, key=lambda s: scores[select_on][s.name]["top1"])  # first of equals wins
    table = {
        s.name: {
            "n_blocks": s.n_blocks,
            "avgpool": s.avgpool,
            "lr": s.lr,
            **{
                key if split == "val" else f"{split}_{key}": v
                for split in scores
                for key, v in scores[split][s.name].items()
            },
        }
        for s in classifiers.specs
    }
    selection = "train holdout (--val-from-train)" if select_on == "holdout" else "val (as the reference)"
    columns = [k for k in table[best.name] if k.endswith(("top1", "top5"))]
    print_table(
        ["classifier", "lr", *columns],
        [[("* " if s is best else "  ") + s.name, f"{s.lr:.3g}", *(f"{table[s.name][c]:.2f}" for c in columns)]
         for s in classifiers.specs],
    )  # fmt: skip
    images = {
        "train": {"dropped": len(train_skipped), "unreadable": train_skipped},  # skipped in this run's epochs
        **{name: image_counts(data) for name, data in eval_features.items()},
    }
    results = Results(
        task="linear",
        backbone=args.backbone,
        protocol={
            "name": protocol,
            "recipe": args.protocol,  # the --protocol value
            "data_path": str(Path(args.data_path).resolve()),
            "input_size": args.input_size,
            "global_batch": args.batch_size * dist_utils.world_size(),
            "epochs": args.epochs,
            "epoch_length": args.epoch_length,
            "selection": selection,
        },
        metrics={"top-1": table[best.name]["top1"], "top-5": table[best.name]["top5"]},
        metric_notes={"top-1": best.name, "top-5": best.name},
        unreadable_images={split: counts["dropped"] for split, counts in images.items()},
        timings=timer.timings(),
        details={
            "best": {"name": best.name, **table[best.name]},
            "classifiers": table,
            "images": images,
        },
    )
    path = write_results(args.output_dir, results)
    print(
        f"best ({selection}): {best.name} val top-1 {table[best.name]['top1']:.2f} "
        f"top-5 {table[best.name]['top5']:.2f}; all numbers in {path}",
        flush=True,
    )


def linear_eval(args: argparse.Namespace) -> None:
    timer = Timer()
    if getattr(args, "cache_features", False):  # the old switch: the cache in the output folder, as it was
        args.cache_dir = args.cache_dir or args.output_dir
    device = start(args)
    if args.cache_dir:
        prepare_output_dir(args.cache_dir)  # unwritable: fail now, not after the extraction
    setup = prepare(args, device, timer)
    eval_features = setup.eval_features
    with timer.phase("training"):
        train(setup)
    train_skipped = skipped_paths(setup.train_images)  # on every rank: a collective
    classifiers = setup.classifiers
    with timer.phase("evaluation"):
        scores = {
            name: evaluate(classifiers, data, device, batch_size=args.batch_size)
            for name, data in eval_features.items()
        }
    if dist_utils.is_main():
        protocol = setup.probe.name
        report(
            args,
            classifiers,
            scores,
            eval_features=eval_features,
            train_skipped=train_skipped,
            timer=timer,
            protocol=protocol,
        )


def main(argv: list[str] | None = None) -> int:
    return run(linear_eval, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
