"""Flags shared by linear_eval.main and linear_eval.knn (spelled as in pretrain), and the error contract:
bad input -> one `error: ...` line on stderr and return code 2, before any long computation."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import torch

from common import distributed as dist_utils
from common.io import prepare_output_dir

from .data import LAYOUT


def add_common_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    a = p.add_argument
    a("--data-path", help=f"ImageNet root: {LAYOUT}")
    a(
        "--backbone",
        help="pretrain checkpoint.pth / backbone.pth, a reference checkpoint, official DINOv2 or DINOv3 weights",
    )
    a(
        "--input-size",
        type=int,
        default=224,
        help="crop size, a multiple of the patch size (224: 14 and 16); val is resized to input-size * 256/224 first",
    )
    a("--batch-size", type=int, default=128, help="per process")
    a("--output-dir", default=output_dir, help="results.json (and checkpoints) go here")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="under torchrun: cuda:LOCAL_RANK")
    a("--num-workers", type=int, default=10, help="data loader processes per process")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def run(
    args: argparse.Namespace,
    prepare: Callable[[argparse.Namespace, torch.device], dict],
    execute: Callable[..., None],
) -> int:
    """prepare(args, device) validates and loads everything (errors -> rc 2); execute(**state) does the work."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dist_utils.exit_on_preemption()
    try:
        try:
            prepare_output_dir(args.output_dir)
            device, _, _ = dist_utils.init_distributed(args.device)
            if not dist_utils.is_main():
                logging.getLogger().setLevel(logging.WARNING)
            state = prepare(args, device)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        execute(**state)
    finally:
        dist_utils.cleanup()
    return 0
