"""Fine-grained transfer (PROTOCOLS C): frozen final-norm CLS features at 224, logistic regression
swept over 45 C values, on 12 datasets.

python -m fine_grained.main --backbone output/pretrain/backbone.pth --data-path /data/fine_grained
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from common import distributed as dist_utils
from common.cli import ArgumentParser, check_positive, evaluation_parser, run
from common.features import Features, cached_features, eval_transform, frozen_backbone, summary_name
from common.io import atomic_write_text, prepare_output_dir
from common.results import Results, Timer, write_results
from models.errors import UsageError

from . import logreg
from .datasets import CALTECH_SPLITS, DATASETS, Spec, SplitOptions, build_split, parse_names, protocol_splits
from .metrics import METRICS

NORMALIZATION = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)}
# The paper's table was measured with CLIP's mean/std for every student and the reference's Caltech-101
# split (PROTOCOLS C): results.json's `protocol` holds these keys, scripts.evaluate_all compares them.
PAPER_PROTOCOL = {"normalization": "clip", "caltech_split": "reference"}


def get_args_parser() -> argparse.ArgumentParser:
    parent = evaluation_parser(
        data_path="one folder per dataset name: <data-path>/<name>/ (see README)",
        output_dir="output/fine_grained",
        loader=(256, 8),
        cache_dir="<output-dir>/features",
        renamed={"--data-root": "--data-path"},
    )
    p = ArgumentParser("Proteus fine-grained evaluation", parents=[parent])
    a = p.add_argument
    a("--datasets", default=",".join(DATASETS), help="comma-separated subset of the 12 datasets")
    a(
        "--input-size",
        type=int,
        default=224,
        help="Resize (short side, bicubic) and CenterCrop size; a multiple of the patch size (224: 14 and 16)",
    )
    a(
        "--normalization",
        choices=("backbone", *NORMALIZATION),
        default="backbone",
        help="input mean/std: backbone = what the backbone's inputs had in training (our students: imagenet; an "
        "official file: its release's); imagenet; clip = the paper's table",
    )
    a(
        "--caltech-split",
        choices=CALTECH_SPLITS,
        default="reference",
        help="Caltech-101 train: 30 draws per class with replacement (reference: the paper's test set) or 30 distinct",
    )
    a("--download", action="store_true", help="let torchvision download the datasets it can")
    a("--max-iter", type=int, default=logreg.MAX_ITER, help="L-BFGS iterations per fit (protocol: 1000; smoke tests)")
    return p


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir or Path(args.output_dir) / "features")


def cache_path(args: argparse.Namespace, dataset: str, split: str) -> Path:
    """One cache file per dataset and split; what it holds is checked against common.features.feature_key."""
    return cache_dir(args) / f"{dataset}_{split}.pth"


def features(
    args: argparse.Namespace, model: torch.nn.Module, device: torch.device, *, name: str, split: str, ds
) -> dict:
    """Final-norm CLS features of one split (unreadable images left out), from the cache when its key matches."""
    return cached_features(
        cache_path(args, name, split),
        lambda im: model.forward_tokens(im).cls,
        ds,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc=f"{name} {split} features",
        backbone_path=args.backbone,
        input_size=args.input_size,
        feature_type=f"fine-grained: {summary_name(model)}",
    )


def evaluate(
    spec: Spec, features: dict[str, Features], train_size: int, *, device: torch.device, max_iter: int
) -> dict:
    """Standardise, sweep C on train -> val, refit on trainval at the best C, score on test. The 20% val rule
    is drawn on the train_size on-disk images, whether or not some were unreadable."""
    split_xy = {k: (f.features, f.targets) for k, f in features.items()}
    split_xy["train"] = (*split_xy["train"], features["train"].index)
    s = protocol_splits(spec, split_xy, train_size)
    metric = METRICS[spec.metric]
    (xtr, ytr), (xv, yv), (xtv, ytv), (xte, yte) = (tuple(t.to(device) for t in s[k]) for k in s)
    xtr, xv = logreg.standardize(xtr, xv)
    xtv, xte = logreg.standardize(xtv, xte)
    k = max(logreg.num_outputs(y) for y in (ytv, yte))
    if k != spec.num_classes:  # e.g. Caltech-101 without BACKGROUND_Google: a different benchmark
        print(f"warning: {spec.name}: {k} classes in the data, the protocol has {spec.num_classes}", flush=True)
    best = logreg.sweep((xtr, ytr), (xv, yv), metric, num_classes=k, max_iter=max_iter, desc=f"{spec.name} C sweep")
    theta = logreg.fit(xtv, ytv, best.best_C, num_classes=k, max_iter=max_iter)
    return {
        "metric": spec.metric,
        "value": metric(logreg.predict(theta, xte).cpu(), yte.cpu()),
        "best_C": best.best_C,
        "val_score": best.val_score,
        "n_train": len(xtr),
        "n_val": len(xv),
        "n_test": len(xte),
        "dropped": {k: f.dropped for k, f in features.items()},
    }


def input_normalization(args: argparse.Namespace, model: torch.nn.Module) -> tuple[str, tuple, tuple]:
    """(name, mean, std) of --normalization; `backbone` is named after the table entry it equals, if any."""
    if args.normalization != "backbone":
        return args.normalization, *NORMALIZATION[args.normalization]
    mean, std = model.normalization
    same = [k for k, (m, s) in NORMALIZATION.items() if tuple(m) == tuple(mean) and tuple(s) == tuple(std)]
    return (same[0] if same else "backbone"), mean, std


def protocol(args: argparse.Namespace, feature: str, model: torch.nn.Module) -> dict:
    """What results.json says about comparability with the paper's table (PROTOCOLS C); `feature`: what the
    features are (summary_name)."""
    name, mean, std = input_normalization(args, model)
    settings = {"normalization": name, "caltech_split": args.caltech_split}
    paper = all(settings[k] == v for k, v in PAPER_PROTOCOL.items())
    return {
        "name": f"logistic regression on {feature}, 45 C values (PROTOCOLS C)",
        "input_size": args.input_size,
        **settings,
        "mean": list(mean),
        "std": list(std),
        "max_iter": args.max_iter,
        "paper_protocol": paper,
        "note": "the paper's protocol (CLIP mean/std, reference Caltech-101 split)"
        if paper
        else "not the paper's protocol: use --normalization clip --caltech-split reference to compare with its table",
    }


def markdown(results: dict[str, dict], mean: float) -> str:
    rows = ["| dataset | metric | test | best C | val | train / val / test |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['metric']} | {r['value']:.2f} | {r['best_C']:.3g} | {r['val_score']:.2f} "
            f"| {r['n_train']} / {r['n_val']} / {r['n_test']} |"
        )
    rows.append(f"| **mean** | | **{mean:.2f}** | | | |")
    return "\n".join(rows) + "\n"


def metric_name(name: str, result: dict) -> str:
    """results.json's metric name of one dataset's figure, e.g. "cub200 acc"."""
    return f"{name} {result['metric']}"


def mean_name(evaluated: int) -> str:
    """The mean's name: "mean" over all 12 datasets (the paper's figure), else it says over how many."""
    return "mean" if evaluated == len(DATASETS) else f"mean ({evaluated} of {len(DATASETS)})"


def fine_grained(args: argparse.Namespace) -> int:
    timer = Timer()
    names = parse_names(args.datasets)
    check_positive(args, "input_size", "batch_size", "max_iter")
    device = dist_utils.resolve_device(args.device)
    prepare_output_dir(args.output_dir)
    prepare_output_dir(cache_dir(args))  # unwritable: fail now, not after an extraction
    model = frozen_backbone(args.backbone, device, args.input_size)
    _, norm_mean, norm_std = input_normalization(args, model)
    transform = eval_transform(args.input_size, args.input_size, mean=norm_mean, std=norm_std)
    # every layout is checked before any feature is extracted
    options = SplitOptions(caltech=args.caltech_split)
    splits = {}
    for n in names:
        spec = DATASETS[n]
        splits[n] = {
            s: build_split(spec, args.data_path, s, transform=transform, download=args.download, options=options)
            for s in spec.splits
        }
    results, failed = {}, {}
    for name in names:  # a dataset that fails (e.g. no readable image) costs only itself
        try:
            with timer.phase(name):
                feats = {
                    split: features(args, model, device, name=name, split=split, ds=ds)
                    for split, ds in splits[name].items()
                }
                results[name] = evaluate(
                    DATASETS[name], feats, len(splits[name]["train"]), device=device, max_iter=args.max_iter
                )
        except UsageError as e:
            failed[name] = str(e)
            print(f"error: {name}: {e}", file=sys.stderr, flush=True)
            continue
        print(f"{name}: {results[name]['metric']} {results[name]['value']:.2f}", flush=True)
    if not results:
        return 2
    mean = sum(r["value"] for r in results.values()) / len(results)
    summary = Results(
        task="fine_grained",
        backbone=args.backbone,
        protocol=protocol(args, summary_name(model), model),
        metrics={**{metric_name(n, r): r["value"] for n, r in results.items()}, mean_name(len(results)): mean},
        unreadable_images={f"{n} {split}": len(p) for n, r in results.items() for split, p in r["dropped"].items()},
        timings=timer.timings(),
        details={"datasets": results, "failed": failed},
    )
    write_results(args.output_dir, summary)
    table = markdown(results, mean) + f"\n{summary.protocol['note']}\n"
    table += "".join(f"\nFAILED {name}: {why}\n" for name, why in failed.items())
    atomic_write_text(table, Path(args.output_dir) / "results.md")
    print(table, end="")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run(fine_grained, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
