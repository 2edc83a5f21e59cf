"""The mmsegmentation entry point shared by segmentation/ and depth/: train, evaluate, results.json.

Why a wrapper and not mmseg's tools/train.py: the backbone comes from `--backbone` (anything
`models.load_backbone` accepts, a scripts.export folder too: no conversion step), bad input fails with one
line before mmengine starts, SyncBN becomes BN outside torchrun, `--amp` really switches the optimizer wrapper (the
reference's amp flags were ignored), and `<output-dir>/results.json` (common.results' schema) holds
the final figures, those of the best evaluation during training (on the test split, NYU's published
selection), and the settings that define them (`protocol`: the protocol's name, world size, per-GPU and
global batch, ...).
`--output-dir` is mmseg's work dir (`--work-dir` is accepted too); a run continues from the last
checkpoint there, as every evaluation does (common.cli), when it is of the same backbone (RUN).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

import models
from common.cli import ArgumentParser, MissingDependency, evaluation_parser, run
from common.io import atomic_write_json, file_sha256, prepare_output_dir
from common.results import Results, Timer, write_results
from models.errors import MissingFile, UsageError
from models.families.base import STUDENT_INPUTS

RUN = "run.json"  # in the work dir: the backbone (sha256) its checkpoints were trained from


def get_args_parser(task: str) -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    parent = evaluation_parser(
        data_path="overrides the config's data_root",
        data_required=False,
        output_dir=None,
        output_default="work_dirs/<config name>",
        resume=True,
        renamed={"--data-root": "--data-path"},
        aliases={"--output-dir": ("--work-dir",)},
    )
    p = ArgumentParser(f"Proteus {task} (mmsegmentation)", parents=[parent])
    a = p.add_argument
    a("config", help=f"an mmseg config, e.g. {task}/configs/*.py")
    a("--eval-only", action="store_true", help="evaluate --checkpoint (default: the work dir's last) and stop")
    a("--checkpoint", help="with --eval-only: a trained segmentor checkpoint")
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


def _import_mmseg() -> None:
    try:
        import segmentation.mmseg_ext  # noqa: F401 - registers ProteusViT and friends
    except ImportError as e:
        raise MissingDependency(
            f"mmsegmentation is not usable ({e}); install it with `make mmseg` "
            "(builds mmcv 2.1.0 against your torch, see segmentation/README.md)"
        ) from None


def read_checkpoints_as_data() -> None:
    """Every file mmengine's CheckpointLoader reads for us (resume, --eval-only's load_from) goes through
    mmseg_ext.read_checkpoint (weights_only=True): nothing in a checkpoint or beside it can run code."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from .mmseg_ext import read_checkpoint

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def load_local(filename: str, map_location=None):
        checked = _CHECKED.pop(_file_key(filename), None)  # read by the checks before mmengine started
        return checked if checked is not None else read_checkpoint(filename)  # on the CPU: mmengine moves them


# The checkpoint the checks before mmengine read (resume or --eval-only), handed to mmengine's loader so a
# file of gigabytes (optimizer state included) is read once; keyed on path, size and mtime.
_CHECKED: dict[tuple, object] = {}


def _file_key(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _read_for_mmengine(path: str | os.PathLike) -> object:
    """The checkpoint as data (mmseg_ext.read_checkpoint), kept for mmengine's loader to take."""
    from .mmseg_ext import read_checkpoint

    _CHECKED.clear()  # one run's checkpoint at a time
    state = _CHECKED[_file_key(path)] = read_checkpoint(path)
    return state


def build_config(args: argparse.Namespace, task: str):
    from mmengine.config import Config

    _CHECKED.clear()

    if not Path(args.config).is_file():
        raise MissingFile(f"config not found: {args.config}")
    if args.checkpoint and not args.eval_only:  # it would be ignored: training starts from --backbone
        raise UsageError("--checkpoint goes with --eval-only; a training run continues by itself (or --resume FILE)")
    cfg = Config.fromfile(args.config)
    vit = models.load_backbone(args.backbone)  # readable, of the config's kind: fail here, not inside mmengine
    check_backbone_kind(cfg, vit, args)
    cfg.model.backbone.checkpoint = str(args.backbone)
    if vit.normalization != STUDENT_INPUTS:  # not ImageNet-normalised in training: its own mean/std, in 0-255
        preprocessor = cfg.model.data_preprocessor
        preprocessor.mean = [255 * v for v in vit.normalization.mean]
        preprocessor.std = [255 * v for v in vit.normalization.std]
    if args.reference_pos_embed:
        if cfg.model.backbone.type != "ProteusViT":
            raise UsageError("--reference-pos-embed resizes our ViTs' position table; leave it out for a timm model")
        cfg.model.backbone.reference_pos_embed = True
    if args.data_path:
        for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[split].dataset.data_root = args.data_path
    if args.cfg_options:
        check_overrides(cfg, args.cfg_options)
        cfg.merge_from_dict(args.cfg_options)
    for split in ("train_dataloader", "test_dataloader"):
        ds = cfg[split].dataset
        for key, sub in ds.data_prefix.items():
            folder = Path(ds.data_root) / sub
            if not folder.is_dir() and not (args.eval_only and split == "train_dataloader"):
                raise MissingFile(
                    f"{task} data missing: {folder} ({key}) does not exist; expected layout in {task}/README.md"
                )
    if cfg.model.backbone.type == "ProteusTimm":
        fit_timm_heads(cfg, vit)
    else:
        fit_vit_heads(cfg, vit, args)
    cfg.work_dir = args.output_dir or str(Path("work_dirs") / Path(args.config).stem)
    cfg.launcher = args.launcher or ("pytorch" if "RANK" in os.environ else "none")
    # mmengine keys its logger, message hub and visualizer by name: one name per run, so two runs in
    # one process (tests, notebooks) never write into each other's folders
    run_id = f"{Path(args.config).stem}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
    cfg.experiment_name = run_id
    cfg.visualizer.name = run_id
    if args.amp:
        if not torch.cuda.is_available():  # mmengine's AmpOptimWrapper asserts a GPU (or NPU/MLU) deep inside
            raise UsageError("--amp needs a GPU: mmengine's AmpOptimWrapper does not run on CPU")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = "bfloat16"
    if not args.eval_only:  # continue from --resume, else from the work dir's last checkpoint if any
        cfg.resume = True
        cfg.load_from = check_resumable(Path(cfg.work_dir), args.resume, args.backbone)
    if args.eval_only:
        ckpt = args.checkpoint or _last_checkpoint(Path(cfg.work_dir))
        if not ckpt or not Path(ckpt).is_file():
            raise MissingFile(f"--eval-only needs --checkpoint or a checkpoint in {cfg.work_dir}")
        check_evaluable(ckpt)
        cfg.load_from = str(ckpt)
    if args.show_dir:
        cfg.default_hooks.visualization.update(draw=True, interval=1)
        cfg.visualizer.save_dir = args.show_dir
    prepare_output_dirs(cfg, args)
    check_dataset_files(cfg, task, args.eval_only)
    return cfg


_KINDS = {bool: ("True or False", (bool,)), int: ("an integer", (int,)), float: ("a number", (int, float))}


def check_overrides(cfg, options: dict) -> None:
    """A --cfg-options value of another kind than the config's own for that key (a number or a flag:
    `train_cfg.max_iters=abc`) would fail deep inside mmengine without naming the key; None (unset)
    and keys the config lacks are mmengine's to judge."""
    for key, value in options.items():
        current = _config_value(cfg, key)
        if type(current) not in _KINDS or value is None:
            continue
        expected, kinds = _KINDS[type(current)]
        if type(value) not in kinds:
            raise UsageError(f"--cfg-options {key}={value}: expected {expected} (the config's value is {current!r})")


def _config_value(cfg, key: str):
    """The config's value at a dotted key (list items by index), or None where it has none."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif not isinstance(node, (list, tuple)) and hasattr(node, "get") and part in node:
            node = node.get(part)
        else:
            return None
    return node


def check_resumable(work_dir: Path, resume: str | None, backbone: str) -> str | None:
    """The checkpoint to continue from (None: start afresh): --resume FILE, else the work dir's last.
    It must be of the same --backbone (a finished run of another backbone in the default work dir would
    otherwise be reported as this one's) and a dense run's checkpoint, read as data."""
    if resume:
        if not Path(resume).is_file():
            raise MissingFile(f"--resume {resume}: no such file")
        origin = Path(resume).parent
    else:
        resume = _last_checkpoint(work_dir)
        if resume is None:
            return None  # mmengine starts afresh
        if not Path(resume).is_file():
            marker, name = work_dir / "last_checkpoint", Path(resume).name
            raise MissingFile(f"resuming: {marker} names {name}, which is not in {work_dir}")
        origin = work_dir
    recorded = json.loads((origin / RUN).read_text())["backbone"] if (origin / RUN).is_file() else None
    if recorded and recorded["sha256"] != file_sha256(backbone):
        raise UsageError(
            f"{resume} was trained from the backbone {recorded['path']}, not {backbone}: "
            "use another --output-dir (or remove its checkpoints to start afresh)"
        )
    check_training_state(resume)
    return resume


def check_training_state(path: str) -> None:
    """A resume reads the checkpoint's meta and message hub (a KeyError inside mmengine without them)."""
    state = _read_for_mmengine(path)
    if not isinstance(state, dict) or not {"meta", "state_dict", "message_hub"} <= state.keys():
        raise UsageError(
            f"{path} holds no training state (meta, message hub, optimizer) to resume from: "
            "evaluate it with --eval-only --checkpoint, or train afresh"
        )


def check_evaluable(ckpt: str) -> None:
    """--eval-only: the checkpoint, ours or from elsewhere, is read as data and holds a state dict
    (whether it covers the model is checked when mmengine loads it)."""
    obj = _read_for_mmengine(ckpt)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint {ckpt} holds no state dict (a dict of tensors, or one under 'state_dict')")


def prepare_output_dirs(cfg, args: argparse.Namespace) -> None:
    """An unwritable --output-dir or --show-dir would fail inside mmengine (a traceback), the show dir
    after the whole training; also removes the temp files of a save killed mid-write."""
    from .mmseg_ext import stale_saves

    for flag, folder in (("--output-dir", cfg.work_dir), ("--show-dir", args.show_dir)):
        try:
            if folder:
                prepare_output_dir(folder)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from None
    if os.environ.get("RANK", "0") == "0":  # the rank that saves
        for tmp in stale_saves(Path(cfg.work_dir)):
            tmp.unlink(missing_ok=True)


def _unreadable(path: str, decode: bool) -> str | None:
    """Why PIL cannot open the image (or decode it, with `decode`); None when it can."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
    except UnidentifiedImageError:
        return "not an image file"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def check_dataset_files(cfg, task: str, eval_only: bool) -> None:
    """What mmseg finds only mid-run, one line before it starts: every image (listed as mmseg lists
    it) needs its annotation, and every file must open. The evaluated splits are decoded in full (a
    damaged image there would end the run after the whole training; ADE20K's 2000 validation
    images take seconds); training files by their header only (20k files)."""
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    splits = [("test", cfg.test_dataloader.dataset, True)]
    if not eval_only:
        splits += [("val", cfg.val_dataloader.dataset, True), ("train", cfg.train_dataloader.dataset, False)]
    checked = []
    for split, dataset_cfg, decode in splits:
        if dataset_cfg in checked:
            continue  # val is the test split in our configs
        checked.append(dataset_cfg)
        dataset = DATASETS.build({**dataset_cfg.to_dict(), "pipeline": [], "serialize_data": False})
        pairs = [(d["img_path"], d.get("seg_map_path") or d.get("depth_map_path")) for d in dataset.data_list]
        if not pairs:
            raise UsageError(f"{task} data: no images in {dataset.data_prefix['img_path']} ({split} split)")
        missing = [(img, ann) for img, ann in pairs if ann and not Path(ann).is_file()]
        if missing:
            img, ann = missing[0]
            raise UsageError(
                f"{task} data: {len(missing)} of {len(pairs)} {split} images have no annotation, "
                f"e.g. {img} (expected {ann})"
            )
        files = [p for pair in pairs for p in pair if p]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            reasons = list(pool.map(partial(_unreadable, decode=decode), files))
        bad = [(f, r) for f, r in zip(files, reasons) if r]
        if bad:
            raise UsageError(
                f"{task} data: {len(bad)} of {len(files)} {split}-split files cannot be read, "
                f"e.g. {bad[0][0]} ({bad[0][1]}); replace or remove them"
            )


def _join_cpu_process_group(cfg) -> None:
    """torchrun without CUDA (a CPU dry run of a multi-GPU job): mmengine's pytorch launcher would
    call torch.cuda.set_device, so join a gloo group here (mmengine then uses it), keep DDP off
    device ids, and use per-process BN, since SyncBN needs CUDA. GPU runs are left to mmengine (NCCL)."""
    import torch.distributed as dist

    if cfg.launcher != "pytorch" or torch.cuda.is_available():
        return
    cfg.pop("sync_bn", None)  # a fine-tuned timm backbone's BN as SyncBN: CUDA only
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


# the mmseg backbone of each kind of backbone file, and the configs written for it
DENSE_BACKBONES = {"ProteusViT": "the *_vit_*.py configs", "ProteusTimm": "the *_timm.py configs"}


def check_backbone_kind(cfg, model: torch.nn.Module, args: argparse.Namespace) -> None:
    """A timm student's export runs the *_timm.py configs, our ViTs the ViT ones: the other kind would fail deep
    inside mmseg."""
    from . import mmseg_ext

    own = next(name for name in DENSE_BACKBONES if getattr(mmseg_ext, name).takes(model))
    if cfg.model.backbone.type != own:
        what = f"timm:{model.name}" if own == "ProteusTimm" else "one of our ViTs"
        raise UsageError(
            f"--backbone {args.backbone} is {what}, and {args.config} is for {cfg.model.backbone.type} backbones: "
            f"use {DENSE_BACKBONES[own]} in {Path(args.config).parent}"
        )


def fit_timm_heads(cfg, net: torch.nn.Module) -> None:
    """The *_timm.py configs leave the widths of the maps to the model (`in_channels=None`): each head gets those
    of the maps it reads (timm's feature_info), a head with `channels=None` its input's width. A single-stride
    model (a ViT) gets Feature2Pyramid first when a head reads several maps, as our ViT configs have it."""
    backbone = cfg.model.backbone
    indices = list(backbone.out_indices if backbone.get("out_indices") is not None else net.dense_indices())
    count = len(net.model.feature_info)
    if not all(0 <= i < count for i in indices) or indices != sorted(set(indices)):
        raise UsageError(
            f"model.backbone.out_indices {indices}: increasing indices of timm:{net.name}'s {count} feature maps"
        )
    widths, strides = net.map_widths(indices), net.map_strides(indices)
    for head in _heads(cfg):
        if not _reads_within(head, len(indices)):
            raise UsageError(
                f"the {head.type} reads maps {head.in_index} of {len(indices)}: timm:{net.name} has only {count} "
                f"feature maps (out_indices {indices}); set model.backbone.out_indices and the heads' in_index"
            )
    _fill_head_widths(cfg, widths)
    multi_level = isinstance(cfg.model.decode_head.in_index, (list, tuple))
    if len(set(strides)) == 1 and multi_level and not cfg.model.get("neck"):
        norm_cfg = cfg.get("norm_cfg", dict(type="BN", requires_grad=True))
        cfg.model.neck = dict(type="Feature2Pyramid", embed_dim=widths[0], rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg)


def _heads(cfg) -> list:
    return [cfg.model.decode_head, *([cfg.model.auxiliary_head] if cfg.model.get("auxiliary_head") else [])]


def _reads_within(head, count: int) -> bool:
    """Whether every map a head reads (its in_index, negative ones counted from the end) is among `count`."""
    index = head.in_index
    return all(-count <= i < count for i in (index if isinstance(index, (list, tuple)) else [index]))


def _fill_head_widths(cfg, widths: list[int]) -> None:
    """Heads with `in_channels=None` get the widths of the maps they read, heads with `channels=None` their
    input's width: one config serves backbones of every width."""
    for head in _heads(cfg):
        index = head.in_index
        if head.get("in_channels") is None:
            head.in_channels = [widths[i] for i in index] if isinstance(index, (list, tuple)) else widths[index]
        if "channels" in head and head.channels is None:
            head.channels = head.in_channels


def fit_vit_heads(cfg, vit: torch.nn.Module, args: argparse.Namespace) -> None:
    """A config that leaves the heads' widths to the model (`in_channels=None`, as dinov3_linear.py, one config
    for every size) gets the ViT's width for each block it reads; then the sizes must fit (check_backbone_fits)."""
    indices = list(cfg.model.backbone.out_indices)
    for head in _heads(cfg):
        if head.get("in_channels") is None and not _reads_within(head, len(indices)):
            raise UsageError(
                f"the {head.type} reads maps {head.in_index}, and the backbone gives {len(indices)} "
                f"(out_indices {indices}): set model.backbone.out_indices and the heads' in_index"
            )
    _fill_head_widths(cfg, [vit.embed_dim] * len(indices))
    check_backbone_fits(cfg, vit, args)


def check_backbone_fits(cfg, vit: torch.nn.Module, args: argparse.Namespace) -> None:
    """A ViT-Ti file with a ViT-S config would fail at the first forward, deep inside mmseg."""
    depth, width = len(vit.blocks), vit.embed_dim
    about = f"--backbone {args.backbone} is a ViT with {depth} blocks of width {width}"
    if cfg.model.backbone.get("reference_pos_embed"):  # a DINOv3 backbone has no table to resize
        from .mmseg_ext import check_reference_pos_embed

        check_reference_pos_embed(vit)
    indices = list(cfg.model.backbone.out_indices)
    if not all(-depth <= i < depth for i in indices):  # negative: counted from the last block
        raise UsageError(f"{about}, but {args.config} takes blocks {indices}: use the config of that size")
    neck, head = cfg.model.get("neck"), cfg.model.decode_head
    expected = neck.embed_dim if neck else head.in_channels
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    if expected != width:
        raise UsageError(
            f"{about}, but {args.config} expects width {expected}: use the config of that size, "
            "or set the head's widths with --cfg-options"
        )


def _last_checkpoint(work_dir: Path) -> str | None:
    """The checkpoint `last_checkpoint` names, by its file name in this work dir: mmengine writes the
    file beside its checkpoints but with an absolute path, which a moved or copied work dir outgrows."""
    marker = work_dir / "last_checkpoint"
    return str(work_dir / Path(marker.read_text().strip()).name) if marker.is_file() else None


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


def protocol_name(cfg) -> str | None:
    """The protocol a config runs, as its `protocol_name` says (ours: "Proteus ADE20K linear probe", ...;
    DINOv3's: "DINOv3 ADE20K linear"), so results.json tells protocols apart that share a task and a head;
    None for a config of someone else's that names none."""
    name = cfg.get("protocol_name")
    return str(name) if name is not None else None


def run_protocol(cfg, amp: bool) -> dict:
    """The settings of this run that define its figures, so a table can tell whether it may stand next
    to the paper's (scripts.evaluate_all): the paper's runs used 4 GPUs x the config's per-GPU batch."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    batch = cfg.train_dataloader.batch_size
    return {
        "world_size": world,
        "batch_per_gpu": batch,  # per process
        "global_batch": world * batch,
        "max_iters": cfg.train_cfg.max_iters,
        "val_interval": cfg.train_cfg.val_interval,
        "reference_pos_embed": bool(cfg.model.backbone.get("reference_pos_embed", False)),
        "amp": amp,
    }


def dense(task: str, argv: list[str] | None) -> None:
    timer = Timer()
    _import_mmseg()
    args = get_args_parser(task).parse_args(argv)
    cfg = build_config(args, task)
    work_dir = Path(cfg.work_dir)
    read_checkpoints_as_data()
    from .mmseg_ext import DenseRunner

    _join_cpu_process_group(cfg)
    runner = DenseRunner.from_cfg(cfg)
    if torch.distributed.is_initialized():
        world, backend = torch.distributed.get_world_size(), torch.distributed.get_backend()
        runner.logger.info(f"distributed: {world} processes, backend {backend}")
    backbone = {"path": str(Path(args.backbone).resolve()), "sha256": file_sha256(args.backbone)}
    if not args.eval_only:
        if runner.rank == 0:
            atomic_write_json({"backbone": backbone, "config": str(args.config)}, work_dir / RUN)
        with timer.phase("training"):
            runner.train()
    with timer.phase("testing"):
        final = {k: float(v) for k, v in runner.test().items()}
    if runner.rank != 0:
        return
    best = best_on_test(work_dir, cfg.default_hooks.checkpoint)
    metrics = {f"{k} final": v for k, v in final.items()}
    notes = {}
    if best:
        metrics |= {f"{k} best on test": v for k, v in best["metrics"].items()}
        notes = {f"{k} best on test": f"iter {best['iter']}" for k in best["metrics"]}
    results = Results(
        task=task,
        backbone=args.backbone,
        protocol={"name": protocol_name(cfg), "config": str(args.config), **run_protocol(cfg, args.amp)},
        metrics=metrics,
        metric_notes=notes,
        unreadable_images={},  # none: every file is checked before mmengine starts (check_dataset_files)
        timings=timer.timings(),
        details={
            # the trained model at the end (iter None: --eval-only of `checkpoint`)
            "final": {"iter": None if args.eval_only else runner.iter, "metrics": final},
            "best_on_test": best,
            "checkpoint": cfg.load_from if args.eval_only else None,
        },
    )
    out = write_results(work_dir, results)
    print(json.dumps({k: v for k, v in results.details.items() if k != "checkpoint"} | {"protocol": results.protocol},
                     indent=2))  # fmt: skip
    print(f"results: {out}")


def main(task: str, argv: list[str] | None = None) -> int:
    """segmentation.main and depth.main: common.cli.run's contract (bad input and CheckpointMismatchError: one
    `error:` line, exit 2; SIGUSR1/SIGTERM: exit 75, the requeued job continues from the last checkpoint)."""
    return run(dense, task, argv)
