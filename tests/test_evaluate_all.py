"""`python -m scripts.evaluate_all` on tiny generated datasets: every task runs in its subprocess,
results.md agrees with each task's results.json, missing data is skipped, a failing task fails the run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from common.io import file_sha256
from common.results import SCHEMA
from scripts import evaluate_all
from tests.helpers import DENSE_HEADS, DIM, make_ade, make_nyu, make_splits, student_adaptors, write_openai_clip

try:  # the dense tasks
    import mmseg
except ImportError:
    mmseg = None

SMALL = "--input-size 28"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dense_extra(config: str) -> str:
    return " ".join(["--cfg-options", "model.backbone.out_indices=[0,1,2,3]", *DENSE_HEADS[config]])


@pytest.fixture(scope="module")
def zeroshot_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP in OpenAI's format, and the backbone's adaptors with and without a CLIP teacher's."""
    root = tmp_path_factory.mktemp("zeroshot")
    files = {"clip": root / "ViT-T-16.pt"}
    write_openai_clip(files["clip"])
    for name, teachers in (("with clip", {"clip_tiny": (64, "clip"), "dinov2_vits14": (48, "dinov2")}),
                           ("without clip", {"dinov2_vits14": (48, "dinov2")})):  # fmt: skip
        files[name] = root / f"{name.replace(' ', '_')}.pth"
        torch.save(student_adaptors(DIM, teachers).export({"name": "vit_tiny"}), files[name])
    return files


@pytest.fixture(scope="module")
def exported(backbone, zeroshot_inputs, tmp_path_factory) -> Path:
    """The backbone and its adaptors with a CLIP teacher's as a scripts.export folder (no ONNX: not read here)."""
    from scripts import export

    run = tmp_path_factory.mktemp("exported") / "run"
    run.mkdir()
    shutil.copy(backbone, run / "backbone.pth")
    shutil.copy(zeroshot_inputs["with clip"], run / "adaptors.pth")
    assert export.main(["--run", str(run), "--to", str(run.parent / "folder"), "--no-onnx"]) == 0
    return run.parent / "folder"


def table(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """{(task, metric): (ours, paper)} from results.md."""
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", path.read_text(), re.M)
    return {(t, m.strip()): (o.strip(), p.strip()) for t, m, o, p in rows if t != "task"}


@pytest.mark.skipif(mmseg is None, reason="mmsegmentation not installed: `make mmseg`")
def test_all_tasks_on_tiny_data(exported, imagenet, fine_grained, ade, nyu, zeroshot_inputs, tmp_path, capsys):
    """Every task on a scripts.export folder (backbone and adaptors: what a user is handed)."""
    out, backbone = tmp_path / "eval", exported
    argv = ["--backbone", str(backbone), "--output-dir", str(out), "--quick", "--device", "cpu",
            "--data-imagenet", str(imagenet), "--data-fine-grained", str(fine_grained),
            "--data-ade20k", str(ade), "--data-nyu", str(nyu),
            "--adaptors", str(exported), "--clip-checkpoint", str(zeroshot_inputs["clip"]),
            "--extra", f"linear={SMALL}", "--extra", f"knn={SMALL}", "--extra", f"zeroshot={SMALL}",
            "--extra", f"fine_grained={SMALL}",
            "--extra", "ade20k=" + dense_extra("segmentation/configs/linear_vit_small.py"),
            "--extra", "nyu=" + dense_extra("depth/configs/dpt_probe_vit_small.py")]  # fmt: skip
    assert evaluate_all.main(argv) == 0, capsys.readouterr().out
    rows = table(out / "results.md")
    results = {task: json.loads((out / task / "results.json").read_text()) for task in evaluate_all.TASKS}
    for task, res in results.items():  # one schema for every task
        assert tuple(res) == SCHEMA, task
        assert res["backbone"] == {"path": str(backbone.resolve()), "sha256": file_sha256(backbone)}
        assert res["timings"]["total"] > 0 and all(isinstance(v, float) for v in res["metrics"].values())
    tasks = ["linear", "knn", "zeroshot", "fine_grained", "segmentation", "depth"]
    assert [res["task"] for res in results.values()] == tasks
    linear = results["linear"]
    best = linear["details"]["best"]
    assert linear["metrics"]["top-1"] == best["top1"] and linear["metric_notes"]["top-1"] == best["name"]
    assert rows[("linear", f"top-1 ({best['name']})")] == (f"{best['top1']:.2f}", "n/a")
    knn = results["knn"]["metrics"]
    assert [m for t, m in rows if t == "knn"] == ["top-1 k=10", "top-1 k=20"]
    assert rows[("knn", "top-1 k=20")] == (f"{knn['top-1 k=20']:.2f}", "n/a")
    zs, note = results["zeroshot"]["metrics"], results["zeroshot"]["metric_notes"]
    assert list(zs) == ["top-1", "teacher top-1"]  # 3 classes: no top-5
    for metric in zs:
        assert rows[("zeroshot", f"{metric} ({note[metric]})")] == (f"{zs[metric]:.2f}", "n/a")
    fg = results["fine_grained"]
    assert list(fg["metrics"]) == ["cub200 acc", "mean (1 of 12)"] and fg["protocol"]["normalization"] == "clip"
    assert rows[("fine_grained", "cub200 acc")] == (f"{fg['metrics']['cub200 acc']:.2f}", "n/a")
    assert rows[("fine_grained", "mean (1 of 12)")] == (f"{fg['metrics']['mean (1 of 12)']:.2f}", "n/a")
    # dense: the final figure and the best evaluation during training (--quick: one, at iteration 2)
    seg = results["ade20k"]
    assert seg["protocol"]["config"].endswith("segmentation/configs/linear_vit_small.py")
    # --quick's batch 2 overrode the paper's global batch 32 that evaluate_all set; the pos-embed is the paper's
    quick = {"world_size": 1, "batch_per_gpu": 2, "global_batch": 2, "max_iters": 2, "val_interval": 2}
    name = {"name": "Proteus ADE20K linear probe", "config": seg["protocol"]["config"]}  # whose protocol: ours
    assert seg["protocol"] == {**name, **quick, "reference_pos_embed": True, "amp": False}
    assert rows[("ade20k", "mIoU final (linear)")] == (f"{seg['metrics']['mIoU final']:.2f}", "n/a")
    best = seg["metrics"]["mIoU best on test"]
    assert rows[("ade20k", "mIoU best on test (linear, iter 2)")] == (f"{best:.2f}", "n/a")  # no paper for dim 64
    depth = results["nyu"]
    assert depth["protocol"]["config"].endswith("depth/configs/dpt_probe_vit_small.py")  # the paper's NYU "linear"
    for k in ("rmse", "abs_rel", "d1"):
        assert rows[("nyu", f"{k} final (DPT probe)")] == (f"{depth['metrics'][f'{k} final']:.3f}", "n/a")
        best = depth["metrics"][f"{k} best on test"]
        assert rows[("nyu", f"{k} best on test (DPT probe, iter 2)")] == (f"{best:.3f}", "n/a")
    assert len(rows) == 1 + 2 + 2 + 2 + 2 + 6
    unreadable = re.findall(r"^\| (\w+) \| (\d+) \| ([^|]+) \|$", (out / "results.md").read_text(), re.M)
    assert [(t, n) for t, n, _ in unreadable] == [(t, "0") for t in evaluate_all.TASKS]
    assert unreadable[1][2].strip() == "none in train, val"  # knn: from its results.json
    summary = json.loads((out / "results.json").read_text())
    assert summary["unreadable_images"] == dict.fromkeys(evaluate_all.TASKS, 0)
    png = out / "results.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        assert im.width >= 1000 and 300 <= im.height <= 1000  # four panels side by side


def test_missing_data_is_skipped_and_a_failing_task_fails_the_run(backbone, imagenet, tmp_path, capsys):
    out = tmp_path / "eval"
    base = ["--backbone", str(backbone), "--output-dir", str(out), "--quick", "--device", "cpu"]
    nowhere = str(tmp_path / "nowhere")
    # no task has data: one line with every reason, nothing written
    assert evaluate_all.main([*base, "--data-fine-grained", nowhere, "--data-nyu", str(imagenet)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no task has its data (linear: no --data-imagenet given")
    assert f"fine_grained: {nowhere} does not exist" in err[0]
    assert f"nyu: {imagenet / 'images/train'} does not exist" in err[0]
    assert not out.exists()
    # nyu skipped, knn with an impossible k fails (its own one-line error), linear still runs and is reported
    argv = [*base, "--tasks", "knn,linear,nyu", "--data-imagenet", str(imagenet), "--data-nyu", str(imagenet),
            "--extra", f"linear={SMALL}", "--extra", f"knn={SMALL} --nb-knn 0"]  # fmt: skip
    assert evaluate_all.main(argv) == 1
    printed = capsys.readouterr().out
    assert f"[nyu] skipped: {imagenet / 'images/train'} does not exist" in printed
    assert "[knn] FAILED (exit 2)" in printed and "--nb-knn values must be positive" in printed
    md = (out / "results.md").read_text()
    assert "- FAILED knn: exit 2" in md and md.count("- skipped") == 1
    assert [t for t, _ in table(out / "results.md")] == ["linear"]
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_zeroshot_only_with_adaptors_of_a_clip_teacher(backbone, imagenet, zeroshot_inputs, tmp_path, capsys):
    """The zero-shot row needs --adaptors and --clip-checkpoint, and adaptors holding a CLIP teacher's; else it
    is skipped saying why (alone here, so no task has its data: one error line). Given them, it runs."""
    out = tmp_path / "eval"
    base = ["--backbone", str(backbone), "--output-dir", str(out), "--quick", "--device", "cpu", "--tasks", "zeroshot",
            "--data-imagenet", str(imagenet), "--extra", f"zeroshot={SMALL}"]  # fmt: skip
    clip, with_clip, without = (str(zeroshot_inputs[k]) for k in ("clip", "with clip", "without clip"))
    for given, why in (
        ([], "no --adaptors given"),
        (["--adaptors", with_clip], "no --clip-checkpoint given"),
        (
            ["--adaptors", without, "--clip-checkpoint", clip],
            f"{without} holds no image-text (CLIP, SigLIP2) teacher's adaptor",
        ),
    ):
        assert evaluate_all.main([*base, *given]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: no task has its data (zeroshot: {why})"]
    assert evaluate_all.main([*base, "--adaptors", str(backbone), "--clip-checkpoint", clip]) == 2  # not adaptors
    assert "is not an adaptors.pth" in capsys.readouterr().err and not out.exists()

    assert evaluate_all.main([*base, "--adaptors", with_clip, "--clip-checkpoint", clip]) == 0, capsys.readouterr()
    assert f"--adaptors {with_clip} --clip-checkpoint {clip}" in capsys.readouterr().out
    results = json.loads((out / "zeroshot" / "results.json").read_text())
    assert results["protocol"]["teacher"] == "clip_tiny"
    rows = table(out / "results.md")
    assert [m.split(" (")[0] for t, m in rows] == ["top-1", "teacher top-1"]
    assert rows[("zeroshot", "teacher top-1 (the teacher's own image tower (ViT-T-16.pt))")][0] == (
        f"{results['metrics']['teacher top-1']:.2f}"
    )


def test_quick_knn_on_a_folder_smaller_than_its_k(backbone, tmp_path, capsys):
    """--quick asks kNN for k 10 and 20; on 6 train images both become k=6, said in one warning line."""
    tiny = make_splits(tmp_path / "tiny", classes=2, train=3, val=2)
    out = tmp_path / "eval"
    argv = ["--backbone", str(backbone), "--output-dir", str(out), "--quick", "--device", "cpu", "--tasks", "knn",
            "--data-imagenet", str(tiny), "--extra", f"knn={SMALL}"]  # fmt: skip
    assert evaluate_all.main(argv) == 0, capsys.readouterr().out
    log = (out / "knn" / "log.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith("warning")] == [
        "warning: --nb-knn 10, 20 exceeds the 6 readable train images; using k=6 instead"
    ]
    assert [m for t, m in table(out / "results.md")] == ["top-1 k=6"]


FAKE_TASK = """
import sys, time
from pathlib import Path
for step in (1, 2):
    sys.stdout.write(f"\\rfeatures [{step}/2]")  # a progress bar: no newline, no flush
    time.sleep(1.5)
Path(sys.argv[1], "results.json").write_text("{}")
"""


def test_the_running_task_shows_its_progress(tmp_path, monkeypatch, capsys):
    """Every PROGRESS_EVERY seconds the task's latest log line is printed (once per change), as it runs."""
    (tmp_path / "fake_task.py").write_text(FAKE_TASK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # evaluate_all sets it for its tasks
    monkeypatch.setattr(evaluate_all, "PROGRESS_EVERY", 0.3)
    out = tmp_path / "out"
    assert evaluate_all.run_task("knn", ["fake_task", str(out)], out) is None
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[1] for line in printed if " | " in line] == ["features [1/2]", "features [2/2]"]
    assert all(line.startswith("[knn] ") for line in printed) and printed[-1].startswith("[knn] done in")


def test_bad_arguments(backbone, tmp_path, capsys):
    base = ["--output-dir", str(tmp_path / "o")]
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    assert evaluate_all.main([*base, "--backbone", str(bad)]) == 2
    assert "cannot read backbone" in capsys.readouterr().err
    assert evaluate_all.main([*base, "--backbone", str(backbone), "--tasks", "linear,imagenet"]) == 2
    assert "unknown task(s) imagenet" in capsys.readouterr().err
    assert evaluate_all.main([*base, "--backbone", str(backbone), "--extra", "segm=--x"]) == 2
    assert "expected TASK=ARGS" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


PAPER_RUN = {"world_size": 4, "global_batch": 32, "max_iters": 60000, "val_interval": 2000,
             "reference_pos_embed": True, "amp": False}  # fmt: skip


def _dense(final: dict, best: dict | None, it: int = 12000, **protocol) -> dict:
    """A dense task's results.json (the parts evaluate_all reads)."""
    run = {**PAPER_RUN, "batch_per_gpu": PAPER_RUN["global_batch"] // PAPER_RUN["world_size"], **protocol}
    metrics = {f"{k} final": v for k, v in final.items()} | {f"{k} best on test": v for k, v in (best or {}).items()}
    notes = {f"{k} best on test": f"iter {it}" for k in best or {}}
    return {"metrics": metrics, "metric_notes": notes, "protocol": run}


def test_paper_numbers_follow_size_head_and_the_published_selection():
    """The paper's figure sits on the row of the evaluation the reference published: ADE20K's final one
    (its configs keep no best checkpoint), NYU's best on test (save_best='rmse'). NYU's paper "linear"
    figure belongs to the DPT probe, the 1x1 probe has none."""
    seg = _dense({"mIoU": 40.0}, {"mIoU": 41.0})
    rows = evaluate_all.rows_of("ade20k", seg, "small", head="linear")
    assert [(r.metric, r.ours, r.paper) for r in rows] == [
        ("mIoU final (linear)", 40.0, 41.8),
        ("mIoU best on test (linear, iter 12000)", 41.0, None),
    ]
    large = _dense({"mIoU": 40.0}, None, global_batch=8, max_iters=160000, val_interval=16000)
    assert [(r.metric, r.paper) for r in evaluate_all.rows_of("ade20k", large, "large", head="full")] == [
        ("mIoU final (UperNet)", 57.7)
    ]
    assert evaluate_all.rows_of("ade20k", seg, "base", head="linear")[0].paper is None  # no paper figure for B
    nyu_run = dict(global_batch=16, max_iters=25000, val_interval=1000)
    nyu = _dense({"rmse": 0.45, "abs_rel": 0.1, "d1": 0.9}, {"rmse": 0.4, "abs_rel": 0.1, "d1": 0.9}, **nyu_run)
    nyu_rows = evaluate_all.rows_of("nyu", nyu, "base", head="full")
    assert [r.paper for r in nyu_rows] == [None, 0.303, None, None, None, None]
    assert nyu_rows[1].metric == "rmse best on test (DPT, iter 12000)" and nyu_rows[1].ours == 0.4
    probe = evaluate_all.rows_of("nyu", nyu, "small", head="linear")
    assert probe[1].metric == "rmse best on test (DPT probe, iter 12000)" and probe[1].paper == 0.404
    one_by_one = evaluate_all.rows_of("nyu", nyu, "small", head="1x1")
    assert one_by_one[1].metric.startswith("rmse best on test (1x1 probe, ") and all(
        r.paper is None for r in one_by_one
    )
    args = evaluate_all.get_args_parser().parse_args(["--backbone", "b", "--output-dir", "o", "--data-nyu", "n"])
    for head, config in (
        ("linear", "dpt_probe_vit_base.py"),
        ("full", "dpt_vit_base.py"),
        ("1x1", "linear_vit_base.py"),
    ):
        args.dense_head = head
        argv = evaluate_all.command("nyu", args, "vit_base", out=Path("o"))
        assert argv[:2] == ["depth.main", str(evaluate_all.ROOT / "depth/configs" / config)], argv
        assert Path(argv[1]).is_file()
    paper = {"protocol": {"normalization": "clip", "caltech_split": "reference"}}
    names = [f"{n} {spec.metric}" for n, spec in evaluate_all.DATASETS.items()]
    full = {"metrics": {**dict.fromkeys(names, 80.0), "mean": 80.0}, **paper}
    rows = evaluate_all.rows_of("fine_grained", full, "small", head="linear")
    assert rows[-1].paper == 85.8 and rows[0].paper == 65.5
    part = {"metrics": {"cub200 acc": 80.0, "mean (1 of 12)": 80.0}, **paper}  # a mean of 1 is not the paper's
    assert [r.paper for r in evaluate_all.rows_of("fine_grained", part, "small", head="linear")] == [86.7, None]
    # ImageNet-normalised inputs are not the paper's protocol: no paper column, and the rows say why
    ours = {**full, "protocol": {"normalization": "imagenet", "caltech_split": "reference"}}
    rows = evaluate_all.rows_of("fine_grained", ours, "small", head="linear")
    assert {r.paper for r in rows} == {None}
    assert rows[0].metric == f"{names[0]} (paper n/a: normalization imagenet (paper clip))"


@pytest.mark.parametrize(
    "run,why",
    [
        (dict(world_size=1, batch_per_gpu=8, global_batch=8), "global_batch 8 (paper 32)"),  # one GPU, per-GPU batch
        (dict(reference_pos_embed=False), "reference_pos_embed False (paper True)"),
        (dict(max_iters=2, global_batch=2, amp=True), "global_batch 2 (paper 32), max_iters 2 (paper 60000), amp True"),
    ],
)
def test_dense_paper_figure_only_for_the_papers_protocol(run, why):
    """A run whose batch, schedule, positional embedding or precision is not the paper's gets n/a, and
    the row's name says why; ADE20K's best-of-N does not depend on the evaluation interval, NYU's does."""
    rows = evaluate_all.rows_of("ade20k", _dense({"mIoU": 40.0}, {"mIoU": 41.0}, **run), "small", head="linear")
    assert rows[0].paper is None and rows[0].metric.startswith(f"mIoU final (linear; paper n/a: {why}")
    assert rows[1].metric == "mIoU best on test (linear, iter 12000)"  # no paper figure there to explain
    old = _dense({"mIoU": 40.0}, None)
    del old["protocol"]  # a results.json that does not record it
    assert (
        "paper n/a: its results.json does not record"
        in evaluate_all.rows_of("ade20k", old, "small", head="linear")[0].metric
    )
    assert evaluate_all.rows_of("ade20k", _dense({"mIoU": 40.0}, None, val_interval=500), "small", head="linear")[
        0
    ].paper
    nyu = dict(global_batch=16, max_iters=25000, val_interval=500)  # best of 50 evaluations, not the paper's 25
    rows = evaluate_all.rows_of("nyu", _dense({"rmse": 0.45, "abs_rel": 0.1, "d1": 0.9}, {"rmse": 0.4, "abs_rel": 0.1,
                                "d1": 0.9}, **nyu), "small", head="linear")  # fmt: skip
    assert rows[1].paper is None and rows[1].metric.endswith("paper n/a: val_interval 500 (paper 1000))")


@pytest.mark.parametrize(
    "task,head,size,gpus,nproc,batch",
    [
        ("ade20k", "linear", "small", 0, 1, 32),  # CPU: one process with the paper's global batch 4 x 8
        ("ade20k", "full", "base", 1, 1, 16),  # one GPU: 4 x 4 in one process
        ("ade20k", "full", "large", 3, 2, 4),  # 3 GPUs: the paper's 4 x 2 over the 2 that divide it
        ("ade20k", "full", "small", 8, 8, 4),
        ("nyu", "linear", "small", 4, 4, 4),  # the reference's own split: 4 GPUs x 4
    ],
)
def test_dense_tasks_run_the_papers_global_batch(monkeypatch, task, head, size, gpus, nproc, batch):
    """Before, each dense task ran as one process with the config's per-GPU batch: a quarter of the
    paper's global batch. Now the paper's global batch, spread over the visible GPUs under torchrun,
    with the reference's positional embedding; --quick and --extra still override the batch."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    argv = ["--backbone", "b", "--output-dir", "o", "--data-ade20k", "a", "--data-nyu", "n", "--dense-head", head]
    argv = evaluate_all.command(task, evaluate_all.get_args_parser().parse_args(argv), f"vit_{size}", out=Path("o"))
    launch = ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] if nproc > 1 else []
    assert argv[: len(launch) + 1] == [*launch, "segmentation.main" if task == "ade20k" else "depth.main"]
    assert "--reference-pos-embed" in argv
    assert argv[-2:] == ["--cfg-options", f"train_dataloader.batch_size={batch}"]
    assert nproc * batch == evaluate_all.paper_protocol(Path(argv[len(launch) + 1]))["global_batch"]


# --- the examples in the help texts --------------------------------------------------------------
def entry_point_parsers() -> dict:
    """Every `python -m` entry point's argument parser."""
    from fine_grained import main as fg_main
    from linear_eval import knn as knn_main
    from linear_eval import main as linear_main
    from pretrain import benchmark as pretrain_benchmark
    from pretrain import main as pretrain_main
    from scripts import visualize_pca

    parsers = {m.__name__: m.get_args_parser() for m in (pretrain_main, pretrain_benchmark, linear_main, knn_main,
                                                          fg_main, evaluate_all, visualize_pca)}  # fmt: skip
    if mmseg is not None:  # the dense parsers need mmengine
        from segmentation import runner

        parsers |= {f"{task}.main": runner.get_args_parser(task) for task in ("segmentation", "depth")}
    return parsers


def help_examples() -> set[str]:
    """Each quoted string after an "e.g." in any help text, description or epilog of an entry point."""
    found = set()
    for parser in entry_point_parsers().values():
        texts = [parser.description, parser.epilog, *(a.help for a in parser._actions)]
        for text in filter(None, texts):
            for tail in text.split("e.g.")[1:]:
                found |= set(re.findall(r"'([^']+)'", tail))
    return found


def parses_with(example: str) -> None:
    """The example's arguments are accepted by its task's own parser and set what they name."""
    task, _, extra = example.partition("=")
    parser = entry_point_parsers()[f"{task}.main"]  # fine_grained.main
    args = parser.parse_args(["--backbone", "b.pth", "--data-path", "d", "--output-dir", "o", *extra.split()])
    flag, value = extra.split()
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == value


def run_linear_example(example: str, backbone, imagenet, tmp_path, capsys) -> None:
    """evaluate_all --quick with the example on the tiny ImageNet: the linear probe ran at that input size."""
    out = tmp_path / "linear_example"
    argv = ["--backbone", str(backbone), "--output-dir", str(out), "--quick", "--device", "cpu", "--tasks", "linear",
            "--data-imagenet", str(imagenet), "--extra", example]  # fmt: skip
    rc, printed = evaluate_all.main(argv), capsys.readouterr().out
    assert rc == 0, printed
    assert f"{example.partition('=')[2]}  (log: " in printed  # the task ran with the example's arguments
    assert (out / "linear" / "results.json").is_file()


DENSE_EXAMPLES = {  # task: (data flag, data maker, entry point, output channels)
    "ade20k": ("--data-ade20k", make_ade, "segmentation", 150),
    "nyu": ("--data-nyu", make_nyu, "depth", 1),
}


def dry_run_dense_example(example: str, tmp_path) -> None:
    """The example's overrides on the config evaluate_all picks for a ViT-Ti: the model builds and runs a
    forward pass (a wrong head width fails in mmseg's constructor or forward)."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from segmentation import runner

    register_all_modules()  # mmseg's default scope, also when this test runs alone
    task = example.partition("=")[0]
    flag, make_data, entry, channels = DENSE_EXAMPLES[task]
    torch.manual_seed(0)
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=192, depth=12, num_heads=3)
    path = tmp_path / f"vit_ti_{task}" / "backbone.pth"
    path.parent.mkdir()
    torch.save(models.to_dinov2(vit), path)
    data = make_data(tmp_path / f"data_{task}")
    out = tmp_path / f"o_{task}"
    args = evaluate_all.get_args_parser().parse_args(
        ["--backbone", str(path), "--output-dir", str(out), flag, str(data), "--extra", example]
    )
    assert evaluate_all.SIZES.get(192) is None  # so evaluate_all takes the ViT-S configs
    extra = evaluate_all.parse_extra(args.extra)[task]
    argv = [*evaluate_all.command(task, args, "vit_small", out=out), *extra]
    assert argv[0] == f"{entry}.main"
    cfg = runner.build_config(runner.get_args_parser(entry).parse_args(argv[1:]), entry)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 56, 56), mode="tensor")
    assert out.shape[:2] == (1, channels)


def test_every_help_example_runs(backbone, imagenet, tmp_path, capsys):
    """A wrong example in a --help text fails here: each one is run (or, for a dense task, built and run
    forward once); an example without a check here fails too."""
    checks = {
        "linear=--input-size 112": lambda ex: run_linear_example(ex, backbone, imagenet, tmp_path, capsys),
        "ade20k=--cfg-options model.decode_head.in_channels=[192,192,192,192] model.decode_head.channels=768": (
            lambda ex: dry_run_dense_example(ex, tmp_path)
        ),
        "nyu=--cfg-options model.decode_head.in_channels=[192,192,192,192] model.decode_head.embed_dims=192": (
            lambda ex: dry_run_dense_example(ex, tmp_path)
        ),
        "fine_grained=--normalization imagenet": parses_with,
    }
    found = help_examples()
    assert found <= set(checks), f"help examples without a check in this test: {found - set(checks)}"
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())  # examples span lines
    in_readme = set(re.findall(r"--extra '([^']+)'", readme))
    assert in_readme and in_readme <= set(checks), f"README --extra examples without a check: {in_readme - set(checks)}"
    assert "linear=--input-size 112" in found
    for example in sorted(found):
        if example.startswith(("ade20k=", "nyu=")) and mmseg is None:
            continue  # mmsegmentation not installed
        checks[example](example)


# --- results.png and the unreadable-image counts ---------------------------------------------------
def test_chart_one_panel_per_kind_values_on_bars_paper_as_marker_failed_shown():
    R = evaluate_all.Row
    rows = [R("linear", "top-1 (x)", 79.1, None), R("fine_grained", "cub200 acc", 82.0, 86.7),
            R("ade20k", "mIoU (linear, best on test, iter 2)", 41.0, 41.8),
            R("nyu", "rmse (DPT probe, final)", 0.41, None), R("nyu", "abs_rel (DPT probe, final)", 0.12, None),
            R("nyu", "d1 (DPT probe, final)", 0.87, None)]  # fmt: skip
    fig = evaluate_all.chart(rows, {"knn": "exit 2, see log"}, "run7/backbone.pth (ViT-S)")
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == [t for t, _, _ in evaluate_all.PANELS]
    assert "lower is better" in [t for t in axes if t.startswith("NYU RMSE")][0]
    assert fig._suptitle.get_text() == "run7/backbone.pth (ViT-S)"
    acc = axes[evaluate_all.PANELS[0][0]]
    assert [t.get_text() for t in acc.get_xticklabels()] == [
        "linear: top-1 (x)",
        "fine_grained: cub200 acc",
        "knn: FAILED",
    ]
    assert [b.get_height() for b in acc.patches] == [79.1, 82.0]  # ours only: the paper is no bar
    texts = [t.get_text() for t in acc.texts]
    assert {"79.10", "82.00", "86.70", "FAILED"} <= set(texts)
    (marker,) = acc.collections  # the paper's figure, at its slot
    assert marker.get_offsets().tolist() == [[1.0, 86.7]]
    nyu = axes[evaluate_all.PANELS[2][0]]
    assert [b.get_height() for b in nyu.patches] == [0.41, 0.12] and {"0.410", "0.120"} <= {
        t.get_text() for t in nyu.texts
    }
    assert not nyu.collections  # no paper figure for the final rows
    # everything failed: a panel that says so, still a picture
    fig = evaluate_all.chart([], {"linear": "exit 1", "nyu": "exit 1"}, "t")
    assert [[t.get_text() for t in ax.texts] for ax in fig.axes] == [["FAILED"], ["FAILED"]]
    assert models.checkpoints.backbone_name("out/run7/backbone.pth") == "run7/backbone.pth"
    assert models.checkpoints.backbone_name("backbone.pth") == "backbone.pth"


def test_unreadable_images_per_task_in_results_md():
    """The table reads every task's `unreadable_images` the same way (common.results' schema)."""
    counts = lambda **n: {"unreadable_images": {k.replace("_", " "): v for k, v in n.items()}}  # noqa: E731
    assert evaluate_all.unreadable_images("knn", counts(train=1, val=0)) == (1, "train 1")
    assert evaluate_all.unreadable_images("linear", counts(holdout=0, val=2)) == (2, "val 2")
    fg = counts(cub200_train=2, cub200_test=0, dtd_test=1)
    assert evaluate_all.unreadable_images("fine_grained", fg) == (3, "cub200 train 2, dtd test 1")
    none = counts(cub200_train=0, cub200_test=0)
    assert evaluate_all.unreadable_images("fine_grained", none) == (0, "none in cub200 train, cub200 test")
    assert evaluate_all.unreadable_images("ade20k", counts()) == (0, evaluate_all.NO_UNREADABLE)
    md = evaluate_all.markdown("b.pth", "ViT-S", [], skipped={}, failed={}, unreadable={"knn": (1, "train 1")})
    assert "| knn | 1 | train 1 |" in md.splitlines()


# --- an output folder run again: merged per task, inputs checked first ----------------------------
def fake_tasks(monkeypatch, values: dict[str, float]) -> list[str]:
    """run_task replaced by one that writes a task's results.json at once with `values[task]` as its metric;
    returns the list of tasks it ran."""
    ran = []

    def run_task(task: str, argv: list[str], out: Path) -> None:
        ran.append(task)
        out.mkdir(parents=True, exist_ok=True)
        metric = {"linear": "top-1", "knn": "top-1 k=10"}[task]
        (out / "results.json").write_text(json.dumps({"metrics": {metric: values[task]}, "unreadable_images": {}}))

    monkeypatch.setattr(evaluate_all, "run_task", run_task)
    return ran


def test_a_second_run_merges_its_tasks_with_the_earlier_rows(backbone, imagenet, tmp_path, monkeypatch, capsys):
    """`--tasks knn` on a folder that holds linear and knn: knn's rows are replaced, linear's kept (newest per
    task); the same folder given another backbone is refused before any task runs, the results untouched."""
    values = {"linear": 50.0, "knn": 40.0}
    ran = fake_tasks(monkeypatch, values)
    out = tmp_path / "eval"
    base = ["--backbone", str(backbone), "--output-dir", str(out), "--data-imagenet", str(imagenet)]
    assert evaluate_all.main([*base, "--tasks", "linear,knn"]) == 0
    values["knn"] = 42.0
    assert evaluate_all.main([*base, "--tasks", "knn"]) == 0
    assert "kept the earlier results of linear (same backbone)" in capsys.readouterr().out
    expect = {("linear", "top-1"): ("50.00", "n/a"), ("knn", "top-1 k=10"): ("42.00", "n/a")}
    assert table(out / "results.md") == expect
    summary = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["ours"]) for r in summary["rows"]] == [("linear", 50.0), ("knn", 42.0)]
    assert summary["unreadable_images"] == {"linear": 0, "knn": 0} and summary["backbone_sha256"] == file_sha256(
        backbone
    )
    # every task asked for, only ImageNet given: the others are skipped, linear and knn run again
    assert evaluate_all.main(base) == 0 and ran == ["linear", "knn", "knn", "linear", "knn"]
    assert (
        table(out / "results.md") == expect and "- skipped nyu: no --data-nyu given" in (out / "results.md").read_text()
    )

    other = tmp_path / "other.pth"
    weights = models.load_backbone(backbone).state_dict()
    torch.save({k: v + 1 if k == "cls_token" else v for k, v in weights.items()}, other)  # another model
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.md", "results.png")}
    assert evaluate_all.main([*base[2:], "--backbone", str(other), "--tasks", "knn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {out / 'results.json'} holds the results of another backbone ({backbone}), not of {other}: give "
        f"another --output-dir, or delete {out / 'results.json'} to start it over"
    ]
    assert {name: (out / name).read_bytes() for name in before} == before and len(ran) == 5


def test_a_bad_clip_checkpoint_is_refused_before_any_task(backbone, imagenet, zeroshot_inputs, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    """--clip-checkpoint is read up front like --adaptors, not by the zero-shot task after the others ran."""
    ran = fake_tasks(monkeypatch, {"linear": 50.0})
    junk = tmp_path / "ViT-B-16.pt"
    junk.write_bytes(b"PK\x03\x04 not a whole archive")
    base = ["--backbone", str(backbone), "--output-dir", str(tmp_path / "o"), "--data-imagenet", str(imagenet),
            "--tasks", "linear,zeroshot", "--adaptors", str(zeroshot_inputs["with clip"])]  # fmt: skip
    for clip, why in ((tmp_path / "missing.pt", "checkpoint file not found"), (junk, "cannot read checkpoint")):
        assert evaluate_all.main([*base, "--clip-checkpoint", str(clip)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --clip-checkpoint: {why}") and str(clip) in err[0]
    assert ran == [] and not (tmp_path / "o").exists()


# --- --protocol dinov3 -----------------------------------------------------------------------------
def test_release_like_names_the_released_model_of_a_backbones_architecture():
    """DINOv3's figures describe its released networks: a DINOv3-layout ViT-S student has dinov3_vits16's
    architecture, a ViT-S+ is told apart from it by its SwiGLU FFN, and a tiny one matches no release."""
    family = models.FAMILIES["dinov3"]
    with torch.device("meta"):
        small = family.create_student("vit_small")
        plus = family.teachers["dinov3_vits16plus"].build()
        tiny = family.create_student("vit_tiny")
    assert [family.release_like(m) for m in (small, plus, tiny)] == ["dinov3_vits16", "dinov3_vits16plus", None]
    assert models.FAMILIES["timm"].release_like(small) is None  # a family without released teachers


@pytest.mark.parametrize("gpus,nproc,batch", [(0, 1, 16), (8, 8, 2), (3, 2, 8)])
def test_dinov3_protocol_runs_dinov3s_configs_at_their_global_batch(monkeypatch, gpus, nproc, batch):
    """--protocol dinov3: linear with linear_eval's `--protocol dinov3`, kNN as ours, ADE20K and NYU with DINOv3's
    linear configs at DINOv3's global batch 16 (its 8 GPUs x 2) over the visible GPUs, no reference position table."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    base = ["--backbone", "b", "--output-dir", "o", "--data-imagenet", "i", "--data-ade20k", "a", "--data-nyu", "n"]
    args = evaluate_all.get_args_parser().parse_args([*base, "--protocol", "dinov3"])
    dinov3 = evaluate_all.DINOV3
    assert evaluate_all.command("linear", args, "vit_small", out=Path("o"), protocol=dinov3)[-2:] == [
        "--protocol",
        "dinov3",
    ]
    assert "--protocol" not in evaluate_all.command("knn", args, "vit_small", out=Path("o"), protocol=dinov3)
    for task, module, config in (
        ("ade20k", "segmentation.main", "segmentation/configs/dinov3_linear.py"),
        ("nyu", "depth.main", "depth/configs/dinov3_linear.py"),
    ):
        argv = evaluate_all.command(task, args, "vit_small", out=Path("o"), protocol=dinov3)
        launch = 4 if nproc > 1 else 0
        assert argv[launch : launch + 2] == [module, str(evaluate_all.ROOT / config)]
        assert "--reference-pos-embed" not in argv
        assert argv[-1] == f"train_dataloader.batch_size={batch}"
        assert evaluate_all.paper_protocol(evaluate_all.ROOT / config)["global_batch"] == 16 == nproc * batch


def test_dinov3_model_card_figures_only_for_its_release_and_protocol():
    """The model card's ADE20K mIoU (DINOv3's best evaluation) and NYU RMSE (its final model) stand beside a
    backbone of a released model's architecture run with DINOv3's protocol; another architecture gets none,
    another batch n/a with the reason."""
    ade = {"global_batch": 16, "max_iters": 40000, "val_interval": 5000, "amp": False}
    seg = {"metrics": {"mIoU final": 40.0, "mIoU best on test": 41.0}, "protocol": ade}
    rows = evaluate_all.rows_of("ade20k", seg, "dinov3_vits16", head="linear", protocol=evaluate_all.DINOV3)
    assert [(r.metric, r.paper) for r in rows] == [("mIoU final (DINOv3 linear)", None), ("mIoU best on test "
                                                   "(DINOv3 linear)", 47.0)]  # fmt: skip
    assert evaluate_all.rows_of("ade20k", seg, None, head="linear", protocol=evaluate_all.DINOV3)[1].paper is None
    half = {**seg, "protocol": {**ade, "global_batch": 8}}
    row = evaluate_all.rows_of("ade20k", half, "dinov3_vitl16", head="linear", protocol=evaluate_all.DINOV3)[1]
    assert row.paper is None and row.metric.endswith("paper n/a: global_batch 8 (paper 16))")
    nyu = {"metrics": {"rmse final": 0.4}, "protocol": {**ade, "max_iters": 38400, "val_interval": 1600}}
    row = evaluate_all.rows_of("nyu", nyu, "dinov3_vitb16", head="linear", protocol=evaluate_all.DINOV3)[0]
    assert (row.metric, row.paper) == ("rmse final (DINOv3 linear)", 0.373)
    top1 = {"metrics": {"top-1": 80.0}, "protocol": {}}  # the card's ImageNet column is IN-ReaL: not ours
    assert (
        evaluate_all.rows_of("linear", top1, "dinov3_vits16", head="linear", protocol=evaluate_all.DINOV3)[0].paper
        is None
    )


def test_dinov3_protocol_skips_the_tasks_it_does_not_define(dinov3_export, imagenet, tmp_path, monkeypatch, capsys):
    """Tasks DINOv3 defines no protocol for are skipped with that reason; results.md names the figures' source;
    the same folder under the paper's protocol is refused, as is a fine-tuned --dense-head."""
    ran = []

    def run_task(task: str, argv: list[str], out: Path) -> None:
        ran.append((task, argv))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"metrics": {"top-1": 50.0}, "unreadable_images": {}}))

    monkeypatch.setattr(evaluate_all, "run_task", run_task)
    out = tmp_path / "eval"
    base = ["--backbone", str(dinov3_export), "--output-dir", str(out), "--data-imagenet", str(imagenet)]
    assert evaluate_all.main([*base, "--protocol", "dinov3", "--tasks", "linear,fine_grained"]) == 0
    assert [t for t, _ in ran] == ["linear"] and ran[0][1][-2:] == ["--protocol", "dinov3"]
    md = (out / "results.md").read_text()
    assert "| task | metric | ours | DINOv3 model card (no released model of this architecture) |" in md
    assert "- skipped fine_grained: --protocol dinov3 defines no fine_grained protocol" in md
    assert json.loads((out / "results.json").read_text())["protocol"] == "dinov3"
    capsys.readouterr()
    assert evaluate_all.main([*base, "--tasks", "linear"]) == 2
    assert "holds results of --protocol dinov3, not proteus" in capsys.readouterr().err
    assert evaluate_all.main([*base, "--protocol", "dinov3", "--dense-head", "full"]) == 2
    assert "error: --protocol dinov3 runs its linear probes; --dense-head full is ours" in capsys.readouterr().err
    assert len(ran) == 1
