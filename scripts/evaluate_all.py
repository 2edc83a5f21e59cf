"""Run every downstream protocol on one backbone and put our numbers next to the paper's.

python -m scripts.evaluate_all --backbone out/s/backbone.pth --output-dir out/s/eval \
    --data-imagenet /data/imagenet --data-fine-grained /data/fine_grained \
    --data-ade20k data/ade/ADEChallengeData2016 --data-nyu data/nyu

Each task runs in its own subprocess (`python -m linear_eval.main`, `linear_eval.knn`,
`fine_grained.main`, `segmentation.main CONFIG`, `depth.main CONFIG`) with its output and log in
<output-dir>/<task>/. A task whose dataset folder is missing is skipped with one line; the others
still run (no task with data at all is an error). Dense tasks use the config of the backbone's size
(ViT-S/B/L from its embed dim), the paper's probes by default (ADE20K: 1x1 conv; NYU: the DPT head
on the frozen backbone), `--dense-head full`: UperNet / DPT fine-tuned, `--dense-head 1x1`: 1x1-conv
probes. Dense rows come twice: the final figure and the best evaluation during training (on the
test split, as the reference published; the paper's number sits on that row). The summary goes to
<output-dir>/results.md (task, metric, ours, the paper's number for this model size where PROTOCOLS
gives one, else n/a), results.png and results.json. Exit code 1 if a task that had data failed, 2
on bad arguments.

Single-GPU runs; for multi-GPU protocol runs use each entry point under torchrun (README).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import models
from common.cli import HelpFormatter
from common.distributed import resolve_device
from common.io import prepare_output_dir
from fine_grained.datasets import DATASETS

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("linear", "knn", "fine_grained", "ade20k", "nyu")
SIZES = {384: "small", 768: "base", 1024: "large"}  # embed dim -> the configs' model size
PAPER_FINE_GRAINED_S = {
    "aircraft": 65.5, "caltech101": 95.1, "cars": 77.0, "cifar10": 97.8, "cifar100": 87.3, "dtd": 78.4,
    "flowers102": 99.0, "food101": 87.9, "pets": 95.7, "sun397": 71.7, "voc2007": 87.1, "cub200": 86.7,
    "mean": 85.8,
}  # fmt: skip


@dataclass(frozen=True)
class DenseProtocol:
    config: str  # from the repository root; {} = the model size
    label: str  # its name in the tables
    paper: dict[str, dict[str, float]]  # model size -> {metric: the paper's figure}; PROTOCOLS D and E


ADE_LINEAR = DenseProtocol("segmentation/configs/linear_vit_{}.py", "linear", {"small": {"mIoU": 41.8}})
DENSE = {  # (task, --dense-head) -> protocol
    ("ade20k", "linear"): ADE_LINEAR,
    ("ade20k", "1x1"): ADE_LINEAR,  # ADE20K's linear probe is a 1x1 conv
    ("ade20k", "full"): DenseProtocol(
        "segmentation/configs/upernet_vit_{}.py",
        "UperNet",
        {"small": {"mIoU": 50.0}, "base": {"mIoU": 54.4}, "large": {"mIoU": 57.7}},
    ),
    # the paper's "linear" NYU figure is the DPT head on a frozen backbone
    ("nyu", "linear"): DenseProtocol("depth/configs/dpt_probe_vit_{}.py", "DPT probe", {"small": {"rmse": 0.404}}),
    ("nyu", "1x1"): DenseProtocol("depth/configs/linear_vit_{}.py", "1x1 probe", {}),
    ("nyu", "full"): DenseProtocol(
        "depth/configs/dpt_vit_{}.py",
        "DPT",
        {"small": {"rmse": 0.350}, "base": {"rmse": 0.303}, "large": {"rmse": 0.240}},
    ),
}
DENSE_KEYS = {"ade20k": ("mIoU",), "nyu": ("rmse", "abs_rel", "d1")}
# --quick: SMOKE TESTS ONLY (tiny data, checks the plumbing; the numbers mean nothing)
QUICK_DENSE = [
    "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=2", "default_hooks.checkpoint.interval=2",
    "train_dataloader.batch_size=2", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
    "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
    "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False",
]  # fmt: skip
QUICK = {
    "linear": ["--epochs", "1", "--batch-size", "4", "--num-workers", "0"],
    "knn": ["--batch-size", "4", "--num-workers", "0", "--nb-knn", "10", "20"],
    "fine_grained": ["--max-iter", "20", "--batch-size", "16", "--num-workers", "0"],
    "ade20k": QUICK_DENSE,
    "nyu": QUICK_DENSE,
}


@dataclass
class Row:
    task: str
    metric: str
    ours: float
    paper: float | None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Proteus: all evaluations", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--backbone", required=True, help="anything models.load_backbone reads")
    a("--output-dir", required=True, help="<task>/ outputs and logs, results.md, results.png, results.json")
    a("--tasks", default=",".join(TASKS), help="comma-separated subset of: " + ", ".join(TASKS))
    a("--data-imagenet", help="ImageNet root with train/ and val/ (linear, knn)")
    a("--data-fine-grained", help="root with one folder per dataset; the datasets present are evaluated")
    a("--data-ade20k", help="ADEChallengeData2016 root (images/, annotations/)")
    a("--data-nyu", help="NYU-Depth V2 root (images/, annotations/)")
    a(
        "--dense-head",
        choices=("linear", "full", "1x1"),
        default="linear",
        help="linear: the paper's probes (ade20k 1x1 conv, nyu DPT head, frozen backbone); full: UperNet (ade20k), "
        "DPT (nyu) fine-tuned; 1x1: 1x1-conv probes (nyu's has no paper figure)",
    )
    a("--device", help="linear, knn, fine_grained (default: theirs); dense tasks use CUDA when present")
    a("--quick", action="store_true", help="SMOKE TEST ONLY: 1 epoch, 2 mmseg iterations, 20 L-BFGS steps, k<=20")
    a(
        "--extra",
        action="append",
        default=[],
        metavar="TASK=ARGS",
        help="more arguments for one task, e.g. 'linear=--input-size 112' or "
        "'ade20k=--cfg-options model.decode_head.in_channels=[192,192,192,192]' (repeatable)",
    )
    return p


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {t: [] for t in TASKS}
    for item in items:
        task, sep, rest = item.partition("=")
        if not sep or task not in TASKS:
            raise ValueError(f"--extra {item!r}: expected TASK=ARGS with TASK one of {', '.join(TASKS)}")
        extra[task] += shlex.split(rest)
    return extra


def missing_data(task: str, args: argparse.Namespace) -> str | None:
    """Why a task cannot run on this machine, or None when its data folders are there."""
    flag, root, needed = {
        "linear": ("--data-imagenet", args.data_imagenet, ("train", "val")),
        "knn": ("--data-imagenet", args.data_imagenet, ("train", "val")),
        "fine_grained": ("--data-fine-grained", args.data_fine_grained, ()),
        "ade20k": ("--data-ade20k", args.data_ade20k, ("images/training", "images/validation")),
        "nyu": ("--data-nyu", args.data_nyu, ("images/train", "images/test")),
    }[task]
    if not root:
        return f"no {flag} given"
    for sub in ("", *needed):
        if not (Path(root) / sub).is_dir():
            return f"{Path(root) / sub} does not exist"
    if task == "fine_grained" and not present_fine_grained(root):
        return f"none of the dataset folders ({', '.join(DATASETS)}) is in {root}"
    return None


def present_fine_grained(root: str) -> list[str]:
    return [name for name in DATASETS if (Path(root) / name).is_dir()]


def command(task: str, args: argparse.Namespace, size: str, out: Path) -> list[str]:
    """`python -m` arguments of one task (without the quick and extra arguments)."""
    device = ["--device", args.device] if args.device else []
    if task in ("linear", "knn"):
        module = "linear_eval.main" if task == "linear" else "linear_eval.knn"
        data = ["--data-path", args.data_imagenet]
        return [module, *data, "--backbone", args.backbone, "--output-dir", str(out), *device]
    if task == "fine_grained":
        names = ",".join(present_fine_grained(args.data_fine_grained))
        # the paper's protocol (CLIP mean/std), so the table can stand next to its numbers; --extra may override
        return ["fine_grained.main", "--backbone", args.backbone, "--data-root", args.data_fine_grained,
                "--datasets", names, "--output-dir", str(out), "--normalization", "clip", *device]  # fmt: skip
    config = DENSE[(task, args.dense_head)].config.format(size)
    module, data = ("segmentation.main", args.data_ade20k) if task == "ade20k" else ("depth.main", args.data_nyu)
    return [module, str(ROOT / config), "--backbone", args.backbone, "--data-root", data, "--work-dir", str(out)]


def run_task(task: str, argv: list[str], out: Path) -> str | None:
    """Run one protocol in a subprocess, its output in <out>/log.txt; None on success, else why not."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"[{task}] python -m {shlex.join(argv)}  (log: {log})", flush=True)
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc == 0 and not (out / "results.json").is_file():
        rc = -1
    if rc == 0:
        print(f"[{task}] done in {time.time() - start:.0f} s", flush=True)
        return None
    tail = log.read_text().strip().splitlines()[-5:]
    print(f"[{task}] FAILED (exit {rc}); last lines of {log}:", *(f"    {line}" for line in tail), sep="\n", flush=True)
    return f"exit {rc}, see {log}"


def rows_of(task: str, results: dict, size: str | None, head: str) -> list[Row]:
    """The reported numbers of one task's results.json, with the paper's for this size and head."""
    if task == "linear":
        return [Row(task, f"top-1 ({results['best']['name']})", results["best"]["top1"], None)]
    if task == "knn":
        return [Row(task, f"top-1 k={k}", s["top1"], None) for k, s in results["knn"].items()]
    if task == "fine_grained":
        comparable = size == "small" and results.get("protocol", {}).get("paper_protocol", False)
        paper = PAPER_FINE_GRAINED_S if comparable else {}
        rows = [Row(task, f"{n} {r['metric']}", r["value"], paper.get(n)) for n, r in results["results"].items()]
        all_twelve = len(results["results"]) == len(DATASETS)
        return [*rows, Row(task, "mean", results["mean"], paper.get("mean") if all_twelve else None)]
    protocol = DENSE[(task, head)]
    paper, final, best = protocol.paper.get(size, {}), results["final"], results["best_on_test"]
    rows = []
    for k in DENSE_KEYS[task]:
        rows.append(Row(task, f"{k} ({protocol.label}, final)", final["metrics"][k], None))
        if best:  # the reference published the best evaluation on the test split
            name = f"{k} ({protocol.label}, best on test, iter {best['iter']})"
            rows.append(Row(task, name, best["metrics"][k], paper.get(k)))
    return rows


def fmt(row: Row, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if row.task == "nyu" else f"{value:.2f}"


def markdown(backbone: str, model: str, rows: list[Row], skipped: dict[str, str], failed: dict[str, str]) -> str:
    lines = [f"# Evaluation of `{backbone}` ({model})", "", f"| task | metric | ours | paper ({model}) |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {r.task} | {r.metric} | {fmt(r, r.ours)} | {fmt(r, r.paper)} |" for r in rows]
    lines += [""] + [f"- skipped {t}: {why}" for t, why in skipped.items()]
    lines += [f"- FAILED {t}: {why}" for t, why in failed.items()]
    return "\n".join(lines).rstrip() + "\n"


def bar_chart(rows: list[Row], path: Path, title: str) -> None:
    """One panel per task (metrics differ in scale): our bars, and the paper's where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows)) or ["no results"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 4 * len(tasks)), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sel = [r for r in rows if r.task == task]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r.ours for r in sel], width=0.4, label="ours")
        ax.bar([i + 0.2 for i in x], [r.paper or 0 for r in sel], width=0.4, label="paper")
        ax.set_xticks(list(x), [r.metric for r in sel], rotation=60, ha="right", fontsize=7)
        ax.set_title(task)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
        extra = parse_extra(args.extra)
        try:
            embed_dim = models.load_backbone(args.backbone).embed_dim
        except Exception as e:  # any unreadable file: one clear line, before any task starts
            raise ValueError(f"cannot read backbone {args.backbone}: {e}") from None
        if args.device:
            resolve_device(args.device)  # a typo fails here, not once per task
        if all(missing_data(task, args) for task in tasks):
            why = "; ".join(f"{task}: {missing_data(task, args)}" for task in tasks)
            raise ValueError(f"no task has its data ({why})")
        out = prepare_output_dir(args.output_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = SIZES.get(embed_dim)
    model = f"ViT-{size[0].upper()}" if size else f"embed dim {embed_dim}"
    if size is None:
        print(f"note: no configs for embed dim {embed_dim}; dense tasks use the ViT-S ones (adapt with --extra)")
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for task in tasks:
        why = missing_data(task, args)
        if why:
            skipped[task] = why
            print(f"[{task}] skipped: {why}", flush=True)
            continue
        task_out = out / task
        argv = [*command(task, args, size or "small", task_out), *(QUICK[task] if args.quick else []), *extra[task]]
        error = run_task(task, argv, task_out)
        if error:
            failed[task] = error
            continue
        results = json.loads((task_out / "results.json").read_text())
        rows += rows_of(task, results, size, args.dense_head)
    (out / "results.md").write_text(markdown(args.backbone, model, rows, skipped, failed))
    bar_chart(rows, out / "results.png", f"{Path(args.backbone).name} ({model})")
    summary = {"backbone": args.backbone, "model": model, "rows": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps({**summary, "skipped": skipped, "failed": failed}, indent=2) + "\n")
    print((out / "results.md").read_text(), end="", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
