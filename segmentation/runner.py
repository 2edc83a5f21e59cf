"""The mmsegmentation entry point shared by segmentation/ and depth/: train, evaluate, results.json.

Why a wrapper and not mmseg's tools/train.py: the backbone comes from `--backbone` (any file
`models.load_backbone` accepts, no conversion step), bad input fails with one line before mmengine
starts, SyncBN becomes BN outside torchrun, `--amp` really switches the optimizer wrapper (the
reference's amp flags were ignored), and `<work-dir>/results.json` holds the final figure and,
named as such, the best of the evaluations during training (on the test split, as the reference
published).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import torch

import models


def get_args_parser(task: str) -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(f"Proteus {task} (mmsegmentation)")
    a = p.add_argument
    a("config", help=f"an mmseg config, e.g. {task}/configs/*.py")
    a("--backbone", required=True, help="student checkpoint/export, reference checkpoint or DINOv2 weights")
    a("--work-dir", help="checkpoints, logs and results.json (default: work_dirs/<config name>)")
    a("--data-root", help="dataset root, overriding the config's data_root")
    a("--eval-only", action="store_true", help="evaluate --checkpoint (default: the work dir's last) and stop")
    a("--checkpoint", help="with --eval-only: a trained segmentor checkpoint")
    a("--resume", action="store_true", help="resume from the last checkpoint in the work dir")
    a("--amp", action="store_true", help="bf16 autocast (AmpOptimWrapper; GPU only)")
    a(
        "--reference-pos-embed",
        action="store_true",
        help="as the reference's backbone: pos_embed resized once to the 518 grid (plain bicubic) and that "
        "table fine-tuned (default: DINOv2's interpolation of the pretrained table in every forward)",
    )
    a("--show-dir", help="write a PNG (prediction overlay / depth map) per evaluated image here")
    a("--launcher", choices=("none", "pytorch", "slurm"), help="default: pytorch under torchrun, else none")
    a("--cfg-options", nargs="+", action=DictAction, help="override config entries: key=value ...")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _import_mmseg() -> None:
    try:
        import segmentation.mmseg_ext  # noqa: F401 - registers ProteusViT and friends
    except ImportError as e:
        raise ImportError(
            f"mmsegmentation is not usable ({e}); install it with `make mmseg` "
            "(builds mmcv 2.1.0 against your torch, see segmentation/README.md)"
        ) from None


def trust_checkpoints_in(work_dir: Path) -> None:
    """mmengine checkpoints pickle its message hub (bound methods included), which torch >= 2.6
    refuses with weights_only=True. Unpickle fully only what this run's work dir holds (written by
    mmengine for us); read every other file with weights_only=True."""
    from mmengine.runner.checkpoint import CheckpointLoader

    trusted = work_dir.resolve()

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def load_local(filename: str, map_location=None):
        path = Path(filename).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {filename}")
        return torch.load(path, map_location=map_location, weights_only=trusted not in path.parents)


def build_config(args: argparse.Namespace, task: str):
    from mmengine.config import Config

    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config not found: {args.config}")
    cfg = Config.fromfile(args.config)
    vit = models.load_backbone(args.backbone)  # readable, a ViT: fail here, not inside mmengine
    cfg.model.backbone.checkpoint = str(args.backbone)
    if args.reference_pos_embed:
        cfg.model.backbone.reference_pos_embed = True
    if args.data_root:
        for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[split].dataset.data_root = args.data_root
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    for split in ("train_dataloader", "test_dataloader"):
        ds = cfg[split].dataset
        for key, sub in ds.data_prefix.items():
            folder = Path(ds.data_root) / sub
            if not folder.is_dir() and not (args.eval_only and split == "train_dataloader"):
                raise FileNotFoundError(
                    f"{task} data missing: {folder} ({key}) does not exist; expected layout in {task}/README.md"
                )
    check_backbone_fits(cfg, vit, args)
    cfg.work_dir = args.work_dir or str(Path("work_dirs") / Path(args.config).stem)
    cfg.launcher = args.launcher or ("pytorch" if "RANK" in os.environ else "none")
    # mmengine keys its logger, message hub and visualizer by name: one name per run, so two runs in
    # one process (tests, notebooks) never write into each other's folders
    run_id = f"{Path(args.config).stem}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    cfg.experiment_name = run_id
    cfg.visualizer.name = run_id
    if args.amp:
        if not torch.cuda.is_available():  # mmengine's AmpOptimWrapper asserts a GPU (or NPU/MLU) deep inside
            raise ValueError("--amp needs a GPU: mmengine's AmpOptimWrapper does not run on CPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = "bfloat16"
    if args.resume:
        cfg.resume = True
    if args.eval_only:
        ckpt = args.checkpoint or _last_checkpoint(Path(cfg.work_dir))
        if not ckpt or not Path(ckpt).is_file():
            raise FileNotFoundError(f"--eval-only needs --checkpoint or a checkpoint in {cfg.work_dir}")
        if Path(cfg.work_dir).resolve() not in Path(ckpt).resolve().parents:
            models.safe_load(ckpt)  # another run's file: it must load with weights_only=True
        cfg.load_from = str(ckpt)
    if args.show_dir:
        cfg.default_hooks.visualization.update(draw=True, interval=1)
        cfg.visualizer.save_dir = args.show_dir
    return cfg


def _join_cpu_process_group(cfg) -> None:
    """torchrun without CUDA (a CPU dry run of a multi-GPU job): mmengine's pytorch launcher would
    call torch.cuda.set_device, so join a gloo group here (mmengine then uses it), keep DDP off
    device ids, and use per-process BN, since SyncBN needs CUDA. GPU runs are left to mmengine (NCCL)."""
    import torch.distributed as dist

    if cfg.launcher != "pytorch" or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cfg.model_wrapper_cfg = dict(
        type="MMDistributedDataParallel",
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get("find_unused_parameters", False),
    )
    _sync_bn_to_bn(cfg.model)


def _sync_bn_to_bn(node) -> None:
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _sync_bn_to_bn(value)


def check_backbone_fits(cfg, vit: torch.nn.Module, args: argparse.Namespace) -> None:
    """A ViT-Ti file with a ViT-S config would fail at the first forward, deep inside mmseg."""
    depth, width = len(vit.blocks), vit.embed_dim
    about = f"--backbone {args.backbone} is a ViT with {depth} blocks of width {width}"
    indices = list(cfg.model.backbone.out_indices)
    if max(indices) >= depth:
        raise ValueError(f"{about}, but {args.config} takes blocks {indices}: use the config of that size")
    neck, head = cfg.model.get("neck"), cfg.model.decode_head
    expected = neck.embed_dim if neck else head.in_channels
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    if expected != width:
        raise ValueError(
            f"{about}, but {args.config} expects width {expected}: use the config of that size, "
            "or set the head's widths with --cfg-options"
        )


def _last_checkpoint(work_dir: Path) -> str | None:
    marker = work_dir / "last_checkpoint"
    return marker.read_text().strip() if marker.is_file() else None


def best_on_test(work_dir: Path, checkpoint_hook: dict) -> dict | None:
    """The best of the evaluations during training (segmentation.mmseg_ext.EvaluationHistoryHook), by the
    metric and rule the config's CheckpointHook keeps (`save_best`, `rule`); None without them."""
    from .mmseg_ext import EVALUATIONS

    path, metric, rule = work_dir / EVALUATIONS, checkpoint_hook.get("save_best"), checkpoint_hook.get("rule")
    if not path.is_file() or not isinstance(metric, str) or rule not in ("greater", "less"):
        return None
    history = [json.loads(line) for line in path.read_text().splitlines()]
    history = [e for e in history if metric in e["metrics"]]
    if not history:
        return None
    sign = 1 if rule == "greater" else -1
    best = max(history, key=lambda e: (sign * e["metrics"][metric], -e["iter"]))  # ties: the earliest
    return {"iter": best["iter"], "metric": metric, "rule": rule, "metrics": best["metrics"]}


def main(task: str, argv: list[str] | None = None) -> int:
    try:
        _import_mmseg()
        args = get_args_parser(task).parse_args(argv)
        cfg = build_config(args, task)
        trust_checkpoints_in(Path(cfg.work_dir))
    except (ImportError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    from mmengine.runner import Runner

    from common.distributed import exit_on_preemption

    exit_on_preemption()  # slurm's warning signal: exit 75; the requeued job resumes (--resume)
    _join_cpu_process_group(cfg)
    runner = Runner.from_cfg(cfg)
    if torch.distributed.is_initialized():
        world, backend = torch.distributed.get_world_size(), torch.distributed.get_backend()
        runner.logger.info(f"distributed: {world} processes, backend {backend}")
    from .mmseg_ext import CheckpointMismatchError

    try:
        if not args.eval_only:
            runner.train()
        metrics = runner.test()
    except CheckpointMismatchError as e:
        return _fail(str(e))
    work_dir = Path(cfg.work_dir)
    results = {
        "config": args.config,
        "backbone": str(args.backbone),
        # the trained model at the end (iter None: --eval-only of cfg.load_from)
        "final": {
            "iter": None if args.eval_only else runner.iter,
            "metrics": {k: float(v) for k, v in metrics.items()},
        },
        "best_on_test": best_on_test(work_dir, cfg.default_hooks.checkpoint),
    }
    if args.eval_only:
        results["checkpoint"] = cfg.load_from
    if runner.rank == 0:
        out = work_dir / "results.json"
        out.write_text(json.dumps(results, indent=2))
        print(json.dumps({k: results[k] for k in ("final", "best_on_test")}, indent=2))
        print(f"results: {out}")
    return 0
