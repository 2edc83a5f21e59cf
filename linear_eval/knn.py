"""Weighted kNN on frozen final-norm CLS features (DINO/DINOv2 semantics, PROTOCOLS B).

Cosine similarity of L2-normalised features; the k nearest train images vote for their class with
weight exp(sim / T). Top-1/top-5 for every k, from one top-max(k) search per query chunk.

python -m linear_eval.knn --data-path /imagenet --backbone output/pretrain/backbone.pth
torchrun --nproc_per_node=4 -m linear_eval.knn --data-path /imagenet --backbone ... --cache-dir feats/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import distributed as dist_utils
from common.cli import ArgumentParser, check_positive, evaluation_parser, run, start
from common.features import Features, cached_features, frozen_backbone, image_counts, summary_name
from common.io import prepare_output_dir
from common.results import Results, Timer, print_table, topk_correct, write_results
from models.errors import UsageError

from .data import LAYOUT, load_splits, val_transform

SIMILARITY_BUDGET = 2**27  # similarity-matrix elements per query chunk (512 MiB in fp32)


def get_args_parser() -> argparse.ArgumentParser:
    parent = evaluation_parser(
        data_path=f"ImageNet, {LAYOUT}",
        output_dir="output/knn",
        loader=(128, 10),
        cache_dir="no cache; train_features.pth and val_features.pth",
    )
    p = ArgumentParser("Proteus kNN eval", parents=[parent])
    a = p.add_argument
    a("--input-size", type=int, default=224, help="crop size; images are resized to input-size * 256/224 first")
    a(
        "--nb-knn",
        type=int,
        nargs="+",
        default=[10, 20, 100, 200],
        help="the k values to report; a k above the number of readable train images is lowered to it (one warning)",
    )
    a("--temperature", type=float, default=0.07, help="votes are weighted by exp(similarity / T)")
    return p


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    ks: list[int],
    temperature: float,
) -> dict[int, torch.Tensor]:
    """{k: (Q, num_classes) summed vote weights}; features must already be L2-normalised.

    Weights are exp(sim / T) times exp(-max sim / T) per query (DINOv2's softmax up to a per-query
    factor, so the same ranking): finite for any T > 0; plain exp(sim / T) overflows float32 once T < ~0.0113."""
    sims, idx = (queries @ train_features.T).topk(max(ks), dim=1)
    weights, labels = ((sims - sims[:, :1]) / temperature).exp(), train_labels[idx]
    return {
        k: torch.zeros(len(queries), num_classes, device=queries.device).scatter_add_(1, labels[:, :k], weights[:, :k])
        for k in ks
    }


def knn_accuracy(
    train: Features,
    val: Features,
    num_classes: int,
    *,
    ks: list[int],
    temperature: float,
    device: torch.device,
) -> dict[int, dict[str, float]]:
    """Top-1/top-5 (%) per k; each rank scores its shard of val in chunks sized to SIMILARITY_BUDGET."""
    bank = F.normalize(train.features.to(device), dim=1)
    bank_labels = train.targets.to(device)
    queries = torch.tensor(list(dist_utils.shard(len(val.targets))), dtype=torch.long)
    counts = torch.zeros(len(ks), 2, dtype=torch.float64)
    for chunk in queries.split(max(1, SIMILARITY_BUDGET // len(bank))):
        q = F.normalize(val.features[chunk].to(device), dim=1)
        targets = val.targets[chunk].to(device)
        scores = knn_scores(bank, bank_labels, q, num_classes=num_classes, ks=ks, temperature=temperature)
        counts += torch.stack([topk_correct(scores[k], targets).cpu() for k in ks])
    counts = dist_utils.sum_across_ranks(counts) * 100 / len(val.targets)
    return {k: {"top1": c[0].item(), "top5": c[1].item()} for k, c in zip(ks, counts)}


class Setup(NamedTuple):
    """The kNN's memory bank and queries (final-norm CLS features), and the k values it scores."""

    train: Features
    val: Features
    num_classes: int
    ks: list[int]
    feature: str  # what the features are (summary_name)


def prepare(args: argparse.Namespace, device: torch.device) -> Setup:
    check_positive(args, "batch_size", "input_size")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    if args.cache_dir:
        prepare_output_dir(args.cache_dir)  # unwritable: fail now, not after the extraction
    backbone = frozen_backbone(args.backbone, device, args.input_size)
    tf = val_transform(args.input_size, backbone.normalization)
    train, val = load_splits(args.data_path, tf, tf)
    if min(args.nb_knn) < 1:
        raise UsageError(f"--nb-knn values must be positive, got {args.nb_knn}")

    def features(name: str, dataset) -> dict:
        path = Path(args.cache_dir) / f"{name}_features.pth" if args.cache_dir else None
        return cached_features(
            path,
            backbone,
            dataset,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            desc=f"{name} features",
            backbone_path=args.backbone,
            input_size=args.input_size,
            feature_type=f"kNN: {summary_name(backbone)}",
        )

    train_features, val_features = features("train", train), features("val", val)
    ks = usable_ks(args.nb_knn, len(train_features.targets))
    return Setup(
        train=train_features, val=val_features, num_classes=len(train.classes), ks=ks, feature=summary_name(backbone)
    )


def usable_ks(requested: list[int], bank: int) -> list[int]:
    """The distinct k values to score: a k above the bank size (small or smoke-test data) becomes the bank
    size, said in one warning line, so the defaults still run on a tiny folder."""
    too_big = sorted({k for k in requested if k > bank})
    if too_big and dist_utils.is_main():
        print(
            f"warning: --nb-knn {', '.join(map(str, too_big))} exceeds the {bank} readable train images; "
            f"using k={bank} instead",
            flush=True,
        )
    return sorted({min(k, bank) for k in requested})


def knn(args: argparse.Namespace) -> None:
    timer = Timer()
    device = start(args)
    with timer.phase("features"):
        state = prepare(args, device)
    train, val, ks = state.train, state.val, state.ks
    with timer.phase("evaluation"):
        scores = knn_accuracy(train, val, state.num_classes, ks=ks, temperature=args.temperature, device=device)
    if not dist_utils.is_main():
        return
    print_table(["k", "top1", "top5"], [[str(k), f"{s['top1']:.2f}", f"{s['top5']:.2f}"] for k, s in scores.items()])
    results = Results(
        task="knn",
        backbone=args.backbone,
        protocol={
            "name": f"weighted kNN on {state.feature} (PROTOCOLS B)",
            "data_path": str(Path(args.data_path).resolve()),
            "input_size": args.input_size,
            "temperature": args.temperature,
            "nb_knn_requested": args.nb_knn,
        },
        metrics={f"top-{n} k={k}": s[f"top{n}"] for k, s in scores.items() for n in (1, 5)},
        unreadable_images={"train": len(train.dropped), "val": len(val.dropped)},
        timings=timer.timings(),
        details={"images": {"train": image_counts(train), "val": image_counts(val)}},
    )
    print(f"results in {write_results(args.output_dir, results)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(knn, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
