"""Run every downstream protocol on one backbone and put our numbers next to the paper's.

python -m scripts.evaluate_all --backbone out/s/backbone.pth --output-dir out/s/eval \
    --data-imagenet /data/imagenet --data-fine-grained /data/fine_grained \
    --data-ade20k data/ade/ADEChallengeData2016 --data-nyu data/nyu \
    --adaptors out/s/adaptors.pth --clip-checkpoint ViT-L-14.pt

Each task runs in its own subprocess (`python -m linear_eval.main`, `linear_eval.knn`,
`linear_eval.zeroshot`, `fine_grained.main`, `segmentation.main CONFIG`, `depth.main CONFIG`) with its
output and log in <output-dir>/<task>/. A task whose dataset folder is missing is skipped with one line;
so is the zero-shot row without --adaptors and --clip-checkpoint, or when the adaptors hold no CLIP
teacher; the others still run (no task with data at all is an error). Dense tasks use the config of the
backbone's size (ViT-S/B/L from its embed dim; a DINOv3-layout backbone or DINOv3 teacher file: the
`*_dinov3_layout.py` configs, the Proteus protocols at 512 crops on DINOv3's evenly spaced blocks, and no paper
figure in any task; a timm student: the `*_timm.py` configs, sized from its feature maps, and no paper figure), the
paper's probes by default (ADE20K: 1x1 conv; NYU: the DPT head on the frozen backbone), `--dense-head full`:
UperNet / DPT fine-tuned, `--dense-head 1x1`: 1x1-conv probes. Dense tasks run the paper's setup: its global batch
(4 GPUs x the config's per-GPU batch), spread over the visible GPUs under torchrun (the largest GPU
count up to them that divides it; on one GPU or CPU, one process with the whole batch, as SyncBN
over 4 GPUs normalises over it too), and the reference's positional embedding
(`--reference-pos-embed`). Dense rows come twice: the final figure and the best evaluation during
training (on the test split). The paper's figure sits on the row of the reference's selection
(ADE20K: final, it kept no best; NYU: best on test, its `save_best='rmse'`), and only when
results.json's `protocol` is the paper's (global batch, iterations, evaluation interval, positional
embedding, fp32); otherwise n/a, and that row's name says why. The summary goes to
<output-dir>/results.md (task, metric, ours, the paper's number for this model size where PROTOCOLS
gives one, else n/a; the images each task left out as unreadable), results.png (one panel per kind
of number, the paper's figures as markers, failed tasks marked) and results.json. Run again on the same
output folder (say `--tasks nyu` alone), the three hold each task's newest outcome: a task run now
replaces its earlier rows (or failure), a task not run keeps them. They merge only for the same backbone
file (results.json records its sha256): another backbone in that folder is an error before any task runs,
as are unreadable --adaptors and --clip-checkpoint files (read here, as the zero-shot task reads them).
While a task runs, its latest log line is printed every 30 s. Exit code 1 if a task that had data failed
in this run, 2 on bad arguments.

`--protocol dinov3` runs DINOv3's own protocols instead (linear_eval's `--protocol dinov3`, kNN, ADE20K and NYU
with the `dinov3_linear.py` configs at DINOv3's global batch 16) and skips the tasks it does not define; the
figures beside ours are the DINOv3 model card's for the released model of the backbone's architecture
(docs/protocols.md E3).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import models
from common.cli import ArgumentParser, evaluation_parser, run
from common.distributed import resolve_device
from common.io import atomic_write_json, atomic_write_text, file_sha256, prepare_output_dir
from fine_grained.datasets import DATASETS
from fine_grained.main import PAPER_PROTOCOL as FINE_GRAINED_PAPER_PROTOCOL
from linear_eval import zeroshot
from models.checkpoints import backbone_name
from models.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SIZES = {384: "small", 768: "base", 1024: "large"}  # embed dim -> the configs' model size
PAPER_FINE_GRAINED_S = {
    "aircraft": 65.5, "caltech101": 95.1, "cars": 77.0, "cifar10": 97.8, "cifar100": 87.3, "dtd": 78.4,
    "flowers102": 99.0, "food101": 87.9, "pets": 95.7, "sun397": 71.7, "voc2007": 87.1, "cub200": 86.7,
}  # fmt: skip
PAPER_GPUS = 4  # the reference's dense runs (its eval/dense_prediction/run.sh: dist_train.sh CONFIG 4)
BEST = "best on test"  # the dense tasks' metrics: "<name> final" and "<name> best on test"


@dataclass(frozen=True)
class DenseHead:
    """One --dense-head of a dense task: its config, its name in the tables, the paper's figures."""

    config: str  # from the repository root; {} = the family's part of the name (Family.dense_configs: vit_small)
    label: str
    paper: dict[str, dict[str, float]]  # model size -> {metric: the paper's figure}; PROTOCOLS D and E


@dataclass(frozen=True)
class Task:
    """One evaluation as evaluate_all runs and reports it. What it reads back is the task's results.json
    (common.results' schema, the same for every task): `metrics` by name, `metric_notes`, `protocol`
    (compared with the settings behind the paper's figures) and `unreadable_images`."""

    module: str  # python -m
    data: str  # evaluate_all's flag of its dataset root
    needed: tuple[str, ...]  # folders that root must hold
    quick: tuple[str, ...]  # --quick's arguments: SMOKE TESTS ONLY, the numbers mean nothing
    inputs: tuple[str, ...] = ()  # further files it needs: evaluate_all's flags, passed on under the same names
    options: tuple[str, ...] = ()  # further flags it may take: passed on under the same names when given
    report: tuple[str, ...] = ()  # the metrics in the table, by name prefix, in this order (empty: all)
    paper: dict[str, dict[str, float]] = field(default_factory=dict)  # model size -> {metric: figure}
    paper_protocol: dict = field(default_factory=dict)  # the `protocol` settings behind those figures
    decimals: int = 2
    unreadable: str = "none"  # the unreadable-images table's text when the task records no split
    heads: dict[str, DenseHead] = field(default_factory=dict)  # dense tasks: --dense-head -> config
    # why it cannot run though its folders and inputs are there (None: it can), from (data root, args)
    unready: Callable[[str, argparse.Namespace], str | None] = lambda root, args: None
    arguments: Callable[[str], list[str]] = lambda root: []  # further arguments, from its data root


@dataclass(frozen=True)
class Published:
    """Another release's own protocols (--protocol): the tasks it defines and how each runs; the other tasks are
    skipped. Its figures are keyed by the released model whose architecture the backbone has
    (Family.release_like): they describe that network, not a size."""

    source: str  # whose figures the table's last column holds
    arguments: dict[str, tuple[str, ...]]  # an image-level task -> the arguments that select the protocol
    heads: dict[str, DenseHead]  # a dense task -> its one config (no --dense-head choice: these are linear probes)


def present_fine_grained(root: str) -> list[str]:
    return [name for name in DATASETS if (Path(root) / name).is_dir()]


def no_fine_grained_dataset(root: str, args: argparse.Namespace) -> str | None:
    return None if present_fine_grained(root) else f"none of the dataset folders ({', '.join(DATASETS)}) is in {root}"


def fine_grained_arguments(root: str) -> list[str]:
    """The datasets present, in the paper's protocol (CLIP mean/std; --extra may override)."""
    return ["--datasets", ",".join(present_fine_grained(root)), "--normalization", "clip"]


def no_clip_adaptor(root: str, args: argparse.Namespace) -> str | None:
    """Zero-shot reads CLIP's side of the adaptors and OpenAI's CLIP file the way the task does: an unreadable
    one is an error here, before any task runs, not a failed row after the others."""
    adaptors = models.load_adaptors(args.adaptors)
    teachers = zeroshot.clip_teachers(adaptors)
    if not teachers:
        return f"{args.adaptors} holds no image-text ({zeroshot.image_text_families()}) teacher's adaptor"
    try:
        tower = zeroshot.text_tower(teachers[0], adaptors.teachers.get(teachers[0], {}))
        tower.load(args.clip_checkpoint, tokenizer=args.tokenizer)
    except UsageError as e:
        raise UsageError(f"--clip-checkpoint: {e}") from None
    return None


ADE_LINEAR = DenseHead("segmentation/configs/linear_{}.py", "linear", {"small": {"mIoU final": 41.8}})
QUICK_DENSE = (
    "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=2", "default_hooks.checkpoint.interval=2",
    "train_dataloader.batch_size=2", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
    "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
    "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
)  # fmt: skip
NO_UNREADABLE = "none: an unreadable image stops mmsegmentation (every file is checked before it starts)"
# The paper's dense figure is of the evaluation the reference published: ADE20K's configs keep no best
# checkpoint (no save_best in eval/dense_prediction/configs/mae/*proteus*.py), so the final one; NYU's
# keep the best RMSE on the test split (dpt/*proteus*.py: save_best='rmse', rule='less').
TASKS = {
    "linear": Task(
        "linear_eval.main", "--data-imagenet", ("train", "val"),
        ("--epochs", "1", "--batch-size", "4", "--num-workers", "0"), report=("top-1",),
    ),
    "knn": Task(
        "linear_eval.knn", "--data-imagenet", ("train", "val"),
        ("--batch-size", "4", "--num-workers", "0", "--nb-knn", "10", "20"), report=("top-1 ",),
    ),
    "zeroshot": Task(
        "linear_eval.zeroshot", "--data-imagenet", ("val",), ("--batch-size", "4", "--num-workers", "0"),
        inputs=("--adaptors", "--clip-checkpoint"), options=("--tokenizer",), unready=no_clip_adaptor,
    ),
    "fine_grained": Task(
        "fine_grained.main", "--data-fine-grained", (),
        ("--max-iter", "20", "--batch-size", "16", "--num-workers", "0"),
        paper={"small": {**{f"{n} {DATASETS[n].metric}": v for n, v in PAPER_FINE_GRAINED_S.items()}, "mean": 85.8}},
        paper_protocol=FINE_GRAINED_PAPER_PROTOCOL, unready=no_fine_grained_dataset, arguments=fine_grained_arguments,
    ),
    "ade20k": Task(
        "segmentation.main", "--data-ade20k", ("images/training", "images/validation"), QUICK_DENSE,
        report=("mIoU final", f"mIoU {BEST}"), unreadable=NO_UNREADABLE,
        heads={
            "linear": ADE_LINEAR,
            "1x1": ADE_LINEAR,  # ADE20K's linear probe is a 1x1 conv
            "full": DenseHead("segmentation/configs/upernet_{}.py", "UperNet",
                              {"small": {"mIoU final": 50.0}, "base": {"mIoU final": 54.4},
                               "large": {"mIoU final": 57.7}}),
        },
    ),
    "nyu": Task(
        "depth.main", "--data-nyu", ("images/train", "images/test"), QUICK_DENSE,
        report=tuple(f"{k} {at}" for k in ("rmse", "abs_rel", "d1") for at in ("final", BEST)), decimals=3,
        unreadable=NO_UNREADABLE,
        heads={  # the paper's "linear" NYU figure is the DPT head on a frozen backbone
            "linear": DenseHead("depth/configs/dpt_probe_{}.py", "DPT probe", {"small": {f"rmse {BEST}": 0.404}}),
            "1x1": DenseHead("depth/configs/linear_{}.py", "1x1 probe", {}),
            "full": DenseHead("depth/configs/dpt_{}.py", "DPT",
                              {"small": {f"rmse {BEST}": 0.350}, "base": {f"rmse {BEST}": 0.303},
                               "large": {f"rmse {BEST}": 0.240}}),
        },
    ),
}  # fmt: skip


# DINOv3's own protocols (PROTOCOLS H). Its figures: MODEL_CARD.md of facebookresearch/dinov3 at 6876159
# ("Results for ViT backbones pretrained (or distilled) on web (LVD-1689M)"): ADE20k mIoU and NYU RMSE of the
# linear probes. Its ADE20K run reports the best of its evaluations every 5000 iterations (eval/segmentation/train.py
# returns global_best_metric_values), its NYU run the final model's. Its ImageNet column is IN-ReaL, which
# linear_eval does not measure: no figure.
DINOV3_RELEASES = ("dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus")
DINOV3 = Published(
    source="DINOv3 model card",
    arguments={"linear": ("--protocol", "dinov3"), "knn": ()},  # DINOv3's kNN is ours (PROTOCOLS H)
    heads={
        "ade20k": DenseHead("segmentation/configs/dinov3_linear.py", "DINOv3 linear", {
            name: {f"mIoU {BEST}": v} for name, v in zip(DINOV3_RELEASES, (47.0, 48.8, 51.8, 54.9, 54.8))}),
        "nyu": DenseHead("depth/configs/dinov3_linear.py", "DINOv3 linear", {
            name: {"rmse final": v} for name, v in zip(DINOV3_RELEASES, (0.403, 0.399, 0.373, 0.352, 0.352))}),
    },
)  # fmt: skip
PUBLISHED = {"dinov3": DINOV3}  # --protocol; "proteus": the paper's, TASKS as they stand


def paper_protocol(config: Path, best_of_n: bool = True) -> dict:
    """The settings behind the published figures of one config, in the keys of results.json's `protocol`: its
    global batch (the config's `global_batch` where it states one, another release's protocol; else the
    reference's 4 GPUs x the config's per-GPU batch, with the reference's positional embedding), its schedule,
    fp32; the evaluation interval only for a best-of-N figure (it sets N)."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(config), import_custom_modules=False)
    published = cfg.get("global_batch")
    setup = {
        "global_batch": published or PAPER_GPUS * cfg.train_dataloader.batch_size,
        "max_iters": cfg.train_cfg.max_iters,
        "val_interval": cfg.train_cfg.val_interval,
        "amp": False,
    }
    if published is None:
        setup["reference_pos_embed"] = True
    if not best_of_n:
        del setup["val_interval"]
    return setup


def dense_head(name: str, head: str, protocol: Published | None) -> DenseHead:
    """The config a dense task runs: the protocol's own, or the paper's of this --dense-head."""
    return protocol.heads[name] if protocol else TASKS[name].heads[head]


def paper_reference(name: str, key: str | None, head: str, *, protocol: Published | None) -> tuple[dict, dict]:
    """The published figures of a task for this backbone (the paper's: by model size and dense head; another
    release's: by the released model of the backbone's architecture), and the protocol behind them."""
    task = TASKS[name]
    if not task.heads:
        return ({}, {}) if protocol else (task.paper.get(key, {}), task.paper_protocol)
    dense = dense_head(name, head, protocol)
    figures = dense.paper.get(key, {})
    if not figures:
        return {}, {}
    if protocol:  # another release's own config
        config = ROOT / dense.config
    else:  # the paper's config of this model size
        config = ROOT / dense.config.format(models.FAMILIES[models.families.DEFAULT_LAYOUT].dense_configs(key))
    return figures, paper_protocol(config, any(k.endswith(BEST) for k in figures))


def not_the_papers(run: dict | None, paper: dict) -> str:
    """Why a run's figure cannot stand next to the paper's ('' when it can)."""
    if run is None:
        return "its results.json does not record the run's protocol"
    return ", ".join(f"{k} {run.get(k)} (paper {v})" for k, v in paper.items() if run.get(k) != v)


@dataclass
class Row:
    task: str
    metric: str
    ours: float
    paper: float | None


def get_args_parser() -> argparse.ArgumentParser:
    parent = evaluation_parser(data_path=None, output_dir=None)
    p = ArgumentParser("Proteus: all evaluations", parents=[parent])
    a = p.add_argument
    a("--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS))
    a("--data-imagenet", help="ImageNet root with train/ and val/ (linear, knn)")
    a("--data-fine-grained", help="root with one folder per dataset; the datasets present are evaluated")
    a("--data-ade20k", help="ADEChallengeData2016 root (images/, annotations/)")
    a("--data-nyu", help="NYU-Depth V2 root (images/, annotations/)")
    a("--adaptors", metavar="FILE", help="the student's adaptors.pth (zeroshot, when it holds a CLIP teacher's)")
    a(
        "--clip-checkpoint",
        "--text-checkpoint",
        dest="clip_checkpoint",
        metavar="FILE",
        help="the whole release file of that image-text teacher (zeroshot): OpenAI's CLIP file, open_clip's SigLIP2",
    )
    a("--tokenizer", metavar="DIR", help="a saved Hugging Face tokenizer of that teacher's text tower (zeroshot)")
    a(
        "--dense-head",
        choices=("linear", "full", "1x1"),
        default="linear",
        help="linear: the paper's probes (ade20k 1x1 conv, nyu DPT head, frozen backbone); full: UperNet (ade20k), "
        "DPT (nyu) fine-tuned; 1x1: 1x1-conv probes (nyu's has no paper figure)",
    )
    a(
        "--protocol",
        choices=("proteus", *PUBLISHED),
        default="proteus",
        help="proteus: the paper's protocols and figures; dinov3: DINOv3's own (ImageNet linear's 13 classifiers, "
        "kNN, ADE20K and NYU linear probes on the last block) beside the DINOv3 model card's figures for the "
        "released model of the backbone's architecture; tasks it does not define are skipped",
    )
    a("--device", help="linear, knn, zeroshot, fine_grained (default: theirs); dense tasks use CUDA when present")
    a(
        "--quick",
        action="store_true",
        help="SMOKE TEST ONLY: 1 epoch, 2 mmseg iterations of batch 2 (no paper figures), 20 L-BFGS steps, k<=20",
    )
    a(
        "--extra",
        action="append",
        default=[],
        metavar="TASK=ARGS",
        help="more arguments for one task (repeatable), e.g. 'linear=--input-size 112', or for a ViT-Ti (width 192, "
        "run with the ViT-S configs) and the default 1x1-conv head: "
        "'ade20k=--cfg-options model.decode_head.in_channels=[192,192,192,192] model.decode_head.channels=768'; "
        "and for the nyu DPT probe: 'nyu=--cfg-options model.decode_head.in_channels=[192,192,192,192] "
        "model.decode_head.embed_dims=192'",
    )
    return p


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {t: [] for t in TASKS}
    for item in items:
        task, sep, rest = item.partition("=")
        if not sep or task not in TASKS:
            raise UsageError(f"--extra {item!r}: expected TASK=ARGS with TASK one of {', '.join(TASKS)}")
        extra[task] += shlex.split(rest)
    return extra


def flag_value(flag: str, args: argparse.Namespace) -> str | None:
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def data_root(name: str, args: argparse.Namespace) -> str | None:
    return flag_value(TASKS[name].data, args)


def missing_data(name: str, args: argparse.Namespace) -> str | None:
    """Why a task cannot run on this machine, or None when its data folders are there."""
    root = data_root(name, args)
    if not root:
        return f"no {TASKS[name].data} given"
    for sub in ("", *TASKS[name].needed):
        if not (Path(root) / sub).is_dir():
            return f"{Path(root) / sub} does not exist"
    for flag in TASKS[name].inputs:
        if not flag_value(flag, args):
            return f"no {flag} given"
    return TASKS[name].unready(root, args)


def command(
    name: str,
    args: argparse.Namespace,
    configs: str,
    *,
    out: Path,
    position_table: bool = True,
    protocol: Published | None = None,
) -> list[str]:
    """`python -m` arguments of one task (without the quick and extra arguments); a dense task's config is its
    --dense-head's with `configs` (Family.dense_configs, e.g. vit_small), or the `protocol`'s own; a backbone
    with a position table (`position_table`) gets the reference's under the paper's protocols."""
    task, root = TASKS[name], data_root(name, args)
    shared = ["--backbone", args.backbone, "--data-path", root, "--output-dir", str(out)]
    if not task.heads:
        device = ["--device", args.device] if args.device else []
        inputs = [x for flag in task.inputs for x in (flag, flag_value(flag, args))]
        inputs += [x for flag in task.options if flag_value(flag, args) for x in (flag, flag_value(flag, args))]
        selected = protocol.arguments[name] if protocol else ()
        return [task.module, *shared, *device, *inputs, *task.arguments(root), *selected]
    config = ROOT / dense_head(name, args.dense_head, protocol).config.format(configs)
    # the published global batch over the visible GPUs (later --cfg-options, --quick's or --extra's, override it)
    batch = paper_protocol(config)["global_batch"]
    nproc = max(n for n in range(1, max(torch.cuda.device_count(), 1) + 1) if batch % n == 0)
    launch = ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else []
    pos_embed = ["--reference-pos-embed"] if position_table and not protocol else []
    return [*launch, task.module, str(config), *shared, *pos_embed,
            "--cfg-options", f"train_dataloader.batch_size={batch // nproc}"]  # fmt: skip


PROGRESS_EVERY = 30.0  # seconds between the running task's progress lines


def last_line(log: Path) -> str:
    """The log's last non-empty line (a carriage-return progress bar counts by its last state)."""
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        tail = f.read().decode(errors="replace")
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_task(task: str, argv: list[str], out: Path) -> str | None:
    """Run one protocol in a subprocess, its output in <out>/log.txt, printing its latest log line every
    PROGRESS_EVERY seconds when it changed; None on success, else why not."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}  # the log follows the task as it runs
    print(f"[{task}] python -m {shlex.join(argv)}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT, env=env)
        shown = ""
        try:
            while True:
                try:
                    rc = proc.wait(timeout=PROGRESS_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    line = last_line(log)
                    if line and line != shown:
                        print(f"[{task}] {time.time() - start:.0f} s | {line}", flush=True)
                        shown = line
        except BaseException:  # Ctrl-C or an error here: the task must not run on alone
            proc.kill()
            proc.wait()
            raise
    if rc == 0 and not (out / "results.json").is_file():
        rc = -1
    if rc == 0:
        print(f"[{task}] done in {time.time() - start:.0f} s", flush=True)
        return None
    tail = log.read_text().strip().splitlines()[-5:]
    print(f"[{task}] FAILED (exit {rc}); last lines of {log}:", *(f"    {line}" for line in tail), sep="\n", flush=True)
    return f"exit {rc}, see {log}"


def rows_of(name: str, results: dict, key: str | None, *, head: str, protocol: Published | None = None) -> list[Row]:
    """The reported numbers of one task's results.json, with the published ones for this backbone (`key`: its size,
    or under another release's `protocol` the released model of its architecture) and head: a published figure
    stands next to ours only when the run's `protocol` is the published one, else the row says why not."""
    task = TASKS[name]
    figures, setup = paper_reference(name, key, head, protocol=protocol)
    why = not_the_papers(results.get("protocol"), setup) if figures else ""
    metrics, notes = results["metrics"], results.get("metric_notes", {})
    names = dict.fromkeys(m for prefix in task.report or ("",) for m in metrics if m.startswith(prefix))
    rows = []
    for metric in names:
        paper = figures.get(metric)
        label = dense_head(name, head, protocol).label if task.heads else ""
        about = ", ".join(filter(None, [label, notes.get(metric)]))
        about = "; ".join(filter(None, [about, f"paper n/a: {why}" if paper is not None and why else ""]))
        rows.append(Row(name, f"{metric} ({about})" if about else metric, metrics[metric], None if why else paper))
    return rows


def fmt(row: Row, value: float | None) -> str:
    return "n/a" if value is None else f"{value:.{TASKS[row.task].decimals}f}"


def unreadable_images(name: str, results: dict) -> tuple[int, str]:
    """How many images a task left out as unreadable (its results.json's `unreadable_images`), and where."""
    counts = results["unreadable_images"]
    where = ", ".join(f"{split} {n}" for split, n in counts.items() if n)
    return sum(counts.values()), where or (f"none in {', '.join(counts)}" if counts else TASKS[name].unreadable)


def markdown(
    backbone: str,
    model: str,
    rows: list[Row],
    *,
    skipped: dict[str, str],
    failed: dict[str, str],
    unreadable: dict[str, tuple[int, str]],
    published: str = "",
) -> str:
    """results.md: the rows beside the published figures (`published` names them; default the paper's for `model`)."""
    title = [f"# Evaluation of `{backbone}` ({model})", ""]
    lines = [*title, f"| task | metric | ours | {published or f'paper ({model})'} |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {r.task} | {r.metric} | {fmt(r, r.ours)} | {fmt(r, r.paper)} |" for r in rows]
    if unreadable:
        lines += ["", "| task | unreadable images left out | where |", "|---|---|---|"]
        lines += [f"| {t} | {n} | {where} |" for t, (n, where) in unreadable.items()]
    lines += [""] + [f"- skipped {t}: {why}" for t, why in skipped.items()]
    lines += [f"- FAILED {t}: {why}" for t, why in failed.items()]
    return "\n".join(lines).rstrip() + "\n"


PANELS = (  # (title, tasks, metric prefixes or None for all): one panel per kind of number
    ("accuracy (%)\nhigher is better", ("linear", "knn", "zeroshot", "fine_grained"), None),
    ("ADE20K mIoU (%)\nhigher is better", ("ade20k",), None),
    ("NYU RMSE (m), abs rel\nlower is better", ("nyu",), ("rmse", "abs_rel")),
    ("NYU d1 (fraction)\nhigher is better", ("nyu",), ("d1",)),
)


def panel_of(task: str, metric: str) -> str:
    """The title of the panel a row (or a failed task, metric "") goes to."""
    for title, tasks, prefixes in PANELS:
        if task in tasks and (prefixes is None or not metric or metric.startswith(prefixes)):
            return title
    raise ValueError(f"no panel for {task} {metric}")  # a row kind PANELS lacks: a bug, not bad input


def chart(rows: list[Row], failed: dict[str, str], title: str):
    """The results figure: one panel per kind of number with ours as labelled bars, the paper's figure
    as a red marker, and each failed task as a FAILED slot in its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, Row | None]]] = {}
    for r in rows:
        panels.setdefault(panel_of(r.task, r.metric), []).append((f"{r.task}: {r.metric}", r))
    for task in failed:
        panels.setdefault(panel_of(task, ""), []).append((f"{task}: FAILED", None))
    panels = {t: panels[t] for t, _, _ in PANELS if t in panels}  # the same order every time
    widths = [max(2, len(entries)) for entries in panels.values()] or [1]
    fig, axes = plt.subplots(
        1, len(widths), figsize=(max(7, 0.7 * sum(widths) + 1.5 * len(widths)), 6), squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    if not panels:
        axes[0][0].text(0.5, 0.5, "no results", ha="center", va="center", transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    for ax, (name, entries) in zip(axes[0], panels.items()):
        x = list(range(len(entries)))
        done = [(i, r) for i, (_, r) in enumerate(entries) if r is not None]
        paper = [(i, r) for i, r in done if r.paper is not None]
        top = max([r.ours for _, r in done] + [r.paper for _, r in paper], default=0.0)
        top = (top if top > 0 else 1.0) * 1.18
        ax.set_ylim(0, top)
        if done:
            ax.bar([i for i, _ in done], [r.ours for _, r in done], width=0.6, color="#9cc3e4", label="ours")
        for i, r in done:  # the value inside its bar, or just above a short one
            inside = r.ours > 0.3 * top
            ax.text(i, r.ours / 2 if inside else r.ours + 0.01 * top, fmt(r, r.ours), rotation=90, fontsize=8,
                    ha="center", va="center" if inside else "bottom")  # fmt: skip
        if paper:
            ax.scatter([i for i, _ in paper], [r.paper for _, r in paper], marker="D", color="tab:red", zorder=3,
                       label="paper")  # fmt: skip
            for i, r in paper:
                ax.annotate(fmt(r, r.paper), (i, r.paper), xytext=(6, 0), textcoords="offset points",
                            color="tab:red", fontsize=7, va="center")  # fmt: skip
        for i, (_, r) in enumerate(entries):
            if r is None:  # a failed task: an empty slot that says so
                ax.text(i, 0.5, "FAILED", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="center", color="tab:red", fontweight="bold")  # fmt: skip
        ax.set_xlim(-0.6, len(entries) - 0.4)
        ax.set_xticks(x, [label for label, _ in entries], rotation=55, ha="right", fontsize=7)
        for tick, (_, r) in zip(ax.get_xticklabels(), entries):
            if r is None:
                tick.set_color("tab:red")
        ax.set_title(name, fontsize=9)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.97, 1))
    return fig


def bar_chart(rows: list[Row], path: Path, title: str, *, failed: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    fig = chart(rows, failed, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


SUMMARY = "results.json"
SUMMARY_OUTCOMES = ("unreadable_images", "unreadable_where", "skipped", "failed")  # task -> ..., besides `rows`


def earlier_summary(out: Path, backbone: str, sha256: str, *, protocol: str = "proteus") -> dict | None:
    """The results.json an earlier run left in `out`, when there is one, to merge this run's tasks into. It must
    be of the same backbone file (the same sha256; a results.json without `backbone_sha256`: the same
    --backbone) and the same --protocol: rows of two models or protocols in one table would read as one's, so
    either is an error here, before any task runs."""
    path = out / SUMMARY
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text())
        rows = [Row(**r) for r in earlier["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"cannot read the earlier results {path} to merge into ({e}); delete it to start over"
        ) from None
    same = earlier.get("backbone_sha256") == sha256 if "backbone_sha256" in earlier else earlier["backbone"] == backbone
    if not same:
        raise UsageError(
            f"{path} holds the results of another backbone ({earlier.get('backbone')}), not of {backbone}: give "
            f"another --output-dir, or delete {path} to start it over"
        )
    if earlier.get("protocol", "proteus") != protocol:
        raise UsageError(
            f"{path} holds results of --protocol {earlier.get('protocol', 'proteus')}, not {protocol}: give another "
            f"--output-dir, or delete {path} to start it over"
        )
    return {**earlier, "rows": rows, **{key: earlier.get(key, {}) for key in SUMMARY_OUTCOMES}}


def merge(earlier: dict, now: dict) -> dict:
    """Each task's newest outcome: this run's for a task it ran (its rows, or its failure), the earlier one for
    a task it did not run (skipped now, or not in --tasks); a task skipped now with no earlier result stays
    skipped. A row belongs to its task, so a task's rows all come from one run."""
    ran = set(now["unreadable_images"]) | set(now["failed"])  # a task that ran records its unreadable count
    done = {r.task for r in earlier["rows"]} | set(earlier["unreadable_images"]) | set(earlier["failed"])
    kept = done - ran
    if kept:
        print(f"kept the earlier results of {', '.join(t for t in TASKS if t in kept)} (same backbone)", flush=True)
    rows = [r for r in earlier["rows"] if r.task in kept] + now["rows"]
    merged = {**now, "rows": sorted(rows, key=lambda r: list(TASKS).index(r.task))}
    for key in SUMMARY_OUTCOMES:
        entries = {t: v for t, v in earlier[key].items() if t not in ran} | now[key]
        merged[key] = {t: entries[t] for t in TASKS if t in entries and (key != "skipped" or t not in kept)}
    return merged


def write_summary(summary: dict, out: Path) -> None:
    """results.md, results.png and results.json of the summary's rows, skipped and failed tasks; results.md printed."""
    rows, failed = summary["rows"], summary["failed"]
    unreadable = {t: (n, summary["unreadable_where"].get(t, "")) for t, n in summary["unreadable_images"].items()}
    md = markdown(
        summary["backbone"],
        summary["model"],
        rows,
        skipped=summary["skipped"],
        failed=failed,
        unreadable=unreadable,
        published=summary.get("published", ""),
    )
    atomic_write_text(md, out / "results.md")
    bar_chart(rows, out / "results.png", f"{backbone_name(summary['backbone'])} ({summary['model']})", failed=failed)
    atomic_write_json({**summary, "rows": [asdict(r) for r in rows]}, out / SUMMARY)
    print(md, end="", flush=True)


def evaluate_all(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
    extra = parse_extra(args.extra)
    try:
        vit = models.load_backbone(args.backbone)
    except Exception as e:  # any unreadable file: one clear line, before any task starts
        raise UsageError(f"cannot read backbone {args.backbone}: {e}") from None
    if args.device:
        resolve_device(args.device)  # a typo fails here, not once per task
    family = models.families.family_of_model(vit)
    protocol = PUBLISHED.get(args.protocol)
    if protocol and args.dense_head != "linear":
        raise UsageError(f"--protocol {args.protocol} runs its linear probes; --dense-head {args.dense_head} is ours")
    undefined = [t for t in tasks if protocol and t not in {**protocol.arguments, **protocol.heads}]
    # every input file read before any task runs
    missing = {t: f"--protocol {args.protocol} defines no {t} protocol" if t in undefined else missing_data(t, args)
               for t in tasks}  # fmt: skip
    if all(missing.values()):
        why = "; ".join(f"{task}: {why}" for task, why in missing.items())
        raise UsageError(f"no task has its data ({why})")
    sha256 = file_sha256(args.backbone)
    earlier = earlier_summary(Path(args.output_dir), args.backbone, sha256, protocol=args.protocol)
    out = prepare_output_dir(args.output_dir)
    embed_dim = vit.embed_dim
    # a model named by a family prefix (timm:<model>) is no ViT size of the paper: no paper figure
    size = None if family.student_prefix else SIZES.get(embed_dim)
    # a family with a student suffix has its own dense configs (`<size><suffix>`) and no paper figure (the
    # paper's students are DINOv2-layout)
    layout = family.student_suffix
    if family.student_prefix:
        model = f"{family.student_prefix}{vit.name}"
    else:
        model = f"ViT-{size[0].upper()}" if size else f"embed dim {embed_dim}"
        model += f" {family.title} layout" if layout else ""
    if size is None and not family.student_prefix and not protocol:
        print(f"note: no configs for embed dim {embed_dim}; dense tasks use the ViT-S ones (adapt with --extra)")
    # the published figures' key: the paper's model size, or the released model of the backbone's architecture
    release = family.release_like(vit) if protocol else None
    if protocol and not any(release in head.paper for head in protocol.heads.values()):
        release = None  # a release the protocol's source publishes no figure for (another family's) is no key
    key = release if protocol else size and size + layout
    published = f"{protocol.source} ({release or 'no released model of this architecture'})" if protocol else ""
    rows: list[Row] = []
    unreadable: dict[str, tuple[int, str]] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for task in tasks:
        why = missing[task]
        if why:
            skipped[task] = why
            print(f"[{task}] skipped: {why}", flush=True)
            continue
        task_out = out / task
        quick = TASKS[task].quick if args.quick else ()
        configs = family.dense_configs(size or "small")
        argv = command(task, args, configs, out=task_out, position_table=family.position_table, protocol=protocol)
        argv += [*quick, *extra[task]]
        error = run_task(task, argv, task_out)
        if error:
            failed[task] = error
            continue
        results = json.loads((task_out / "results.json").read_text())
        rows += rows_of(task, results, key, head=args.dense_head, protocol=protocol)
        unreadable[task] = unreadable_images(task, results)
    now = {"backbone": args.backbone, "backbone_sha256": sha256, "model": model, "rows": rows}
    now |= {"protocol": args.protocol, "published": published}
    now["unreadable_images"] = {task: n for task, (n, _) in unreadable.items()}
    now["unreadable_where"] = {task: where for task, (_, where) in unreadable.items()}
    summary = {**now, "skipped": skipped, "failed": failed}
    write_summary(merge(earlier, summary) if earlier else summary, out)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run(evaluate_all, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
