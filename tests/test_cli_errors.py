"""The error contract of every entry point (common.cli.run), for mistakes any of them can meet: an output
folder that is a file, a device that does not exist here, a --backbone file that is not there. One
`error:` line and exit code 2, before any work. Old flag spellings still work, each saying so in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import models
from common import cli
from fine_grained import benchmark as fg_benchmark
from fine_grained import main as fg_main
from linear_eval import knn as knn_main
from linear_eval import main as linear_main
from linear_eval import zeroshot
from models.errors import MissingFile, UsageError
from pretrain import benchmark as pretrain_benchmark
from pretrain import demo
from pretrain import main as pretrain_main
from scripts import evaluate_all, fetch_teachers, visualize_pca
from scripts import export as export_script


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=1)
    path = tmp_path_factory.mktemp("bb") / "backbone.pth"
    torch.save(models.to_dinov2(vit), path)
    return path


def entry_points(backbone: Path, tmp: Path) -> dict:
    """name -> (main, argv without the output flag, output flag)."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    for split in ("train", "val"):  # evaluate_all runs nothing without a data folder
        (tmp / split).mkdir(exist_ok=True)
    return {
        "pretrain": (pretrain_main.main, ["--data-path", str(tmp), "--random-teacher", "--student", "vit_tiny",
                                          "--teacher", "dinov2_vits14"], "--output-dir"),
        "linear": (linear_main.main, ["--data-path", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "knn": (knn_main.main, ["--data-path", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "zeroshot": (zeroshot.main, ["--data-path", str(tmp), "--backbone", str(backbone), "--adaptors", str(backbone),
                                     "--clip-checkpoint", str(backbone)], "--output-dir"),
        "fine_grained": (fg_main.main, ["--data-path", str(tmp), "--backbone", str(backbone)], "--output-dir"),
        "visualize_pca": (visualize_pca.main, ["--images", str(images), "--backbone", str(backbone)], "--output-dir"),
        "evaluate_all": (evaluate_all.main, ["--backbone", str(backbone), "--data-imagenet", str(tmp)], "--output-dir"),
    }  # fmt: skip


NAMES = ["pretrain", "linear", "knn", "zeroshot", "fine_grained", "visualize_pca", "evaluate_all"]


def test_a_bug_inside_a_task_keeps_its_traceback(backbone, tmp_path, monkeypatch):
    """A ValueError that is no UsageError (here from the backbone's set-up) propagates out of the entry point:
    the interpreter prints its traceback and exits 1, never one `error:` line and exit 2."""

    def bug(*args, **kwargs):
        raise ValueError("shapes do not match")

    monkeypatch.setattr(knn_main, "frozen_backbone", bug)
    main, argv, flag = entry_points(backbone, tmp_path)["knn"]
    with pytest.raises(ValueError, match="shapes do not match"):
        main([*argv, flag, str(tmp_path / "out"), "--device", "cpu"])


def parsers() -> dict:
    """Every entry point's parser, the dense ones when mmsegmentation is installed."""
    found = {m.__name__: m.get_args_parser() for m in (pretrain_main, pretrain_benchmark, linear_main, knn_main,
             zeroshot, fg_main, fg_benchmark, evaluate_all, visualize_pca, fetch_teachers, export_script)}  # fmt: skip
    try:
        from segmentation import runner
    except ImportError:
        return found
    return found | {f"{task}.main": runner.get_args_parser(task) for task in ("segmentation", "depth")}


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--batch-size"]], ids=["unknown", "no-value"])
def test_a_flag_mistake_is_one_line(argv, capsys):
    for name, parser in parsers().items():
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert err[0].endswith("(--help lists every flag)"), (name, err)
    with pytest.raises(SystemExit):
        pretrain_main.get_args_parser().parse_args(argv)  # it requires no flag, so the mistake itself is named
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_output_folder_that_is_a_file(name, backbone, tmp_path, capsys):
    main, argv, flag = entry_points(backbone, tmp_path)[name]
    if name == "visualize_pca":
        (tmp_path / "images" / "a.jpg").write_bytes(b"")  # listed, never read: the folder check comes first
    taken = tmp_path / "out.txt"
    taken.write_text("not a folder")
    assert main([*argv, flag, str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: output folder {taken} exists and is not a folder"
    assert taken.read_text() == "not a folder"  # nothing overwritten


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", ["gpu", "cuda:0"])
def test_unknown_or_missing_device(name, device, backbone, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    main, argv, flag = entry_points(backbone, tmp_path)[name]
    if name == "visualize_pca":
        (tmp_path / "images" / "a.jpg").write_bytes(b"")
    assert main([*argv, flag, str(tmp_path / "out"), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --device {device}") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "module", [pretrain_main, linear_main, knn_main, zeroshot, fg_main, evaluate_all, visualize_pca, fg_benchmark]
)
def test_help_shows_each_default_once(module):
    parser = module.get_args_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            helped = " ".join(parser._get_formatter()._expand_help(action).split())
            assert helped.count("default") == 1, (action.option_strings, helped)  # said once, never missing


def dense_main(task: str):
    """segmentation.main / depth.main (mmsegmentation installed), else skip."""
    pytest.importorskip("mmseg")
    from segmentation import runner

    return lambda argv: runner.main(task, argv)


def backbone_missing(name: str, tmp: Path, monkeypatch) -> tuple:
    """(main, argv) of an entry point given a weight file that does not exist (--backbone; pretraining's and the
    demo's teacher checkpoint) or, for the benchmark, an input folder that does not, all else in order."""
    gone = str(tmp / "gone.pth")
    out = ["--output-dir", str(tmp / "out")]
    if name in ("segmentation", "depth"):
        config = Path(__file__).resolve().parents[1] / name / "configs" / "linear_vit_small.py"
        return dense_main(name), [str(config), "--backbone", gone, *out]
    if name == "visualize_pca":
        (tmp / "a.jpg").write_bytes(b"")
        return visualize_pca.main, ["--images", str(tmp / "a.jpg"), "--backbone", gone, *out]
    if name == "evaluate_all":
        return evaluate_all.main, ["--backbone", gone, "--data-imagenet", str(tmp), *out]
    if name == "pretrain":
        Image.new("RGB", (32, 32)).save(tmp / "a.jpg")
        teacher = ["--teacher", "dinov2_vits14", "--teacher-checkpoint", gone]
        return pretrain_main.main, ["--single-image", str(tmp / "a.jpg"), *teacher, "--device", "cpu", *out]
    if name == "benchmark":
        return pretrain_benchmark.main, ["--pipeline", "--pipeline-dir", gone, "--device", "cpu"]
    if name == "demo":
        monkeypatch.chdir(tmp)  # demo_output/ goes here
        monkeypatch.delenv("TEACHER", raising=False)
        monkeypatch.setenv("TEACHER_CHECKPOINT", gone)
        return lambda argv: demo.main(), []
    if name == "zeroshot":  # the other files are there: the backbone is read first
        (tmp / "adaptors.pth").write_bytes(b"")
        files = ["--adaptors", str(tmp / "adaptors.pth"), "--clip-checkpoint", str(tmp / "adaptors.pth")]
        return zeroshot.main, ["--data-path", str(tmp), "--backbone", gone, *files, *out]
    main = {"linear": linear_main.main, "knn": knn_main.main, "fine_grained": fg_main.main}[name]
    return main, ["--data-path", str(tmp), "--backbone", gone, *out]


@pytest.mark.parametrize(
    "name",
    ["linear", "knn", "zeroshot", "fine_grained", "segmentation", "depth", "evaluate_all", "visualize_pca", "pretrain",
     "benchmark", "demo"],
)  # fmt: skip
def test_missing_backbone_file_is_one_error_line(name, tmp_path, monkeypatch, capsys):
    """Every entry point answers bad input through common.cli.run: rc 2, one `error:` line."""
    main, argv = backbone_missing(name, tmp_path, monkeypatch)
    assert main(argv) == cli.EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "gone.pth") in err[0], err


def test_the_runner_maps_exits():
    """The contract itself: bad input -> 2 (one line), a full disk -> 1, preemption -> 75, a bug keeps its traceback."""
    from common.io import DiskFullError

    def raising(e: BaseException):
        raise e

    assert cli.run(lambda: 3) == 3 and cli.run(lambda: None) == 0
    assert cli.run(raising, UsageError("x")) == 2 and cli.run(raising, MissingFile("x")) == 2
    assert cli.run(raising, cli.MissingDependency("no sklearn")) == 2
    assert cli.run(raising, DiskFullError(28, "no space")) == 1
    assert cli.run(raising, SystemExit(75)) == 75
    for bug in (RuntimeError("a bug"), ValueError("a bug"), FileNotFoundError("a bug")):
        with pytest.raises(type(bug)):
            cli.run(raising, bug)


def deprecated_cases(backbone: Path, tmp: Path) -> dict:
    """old spelling -> (parser, argv with it, attribute, value it must give)."""
    images = tmp / "images"
    return {
        "--data-root": (fg_main.get_args_parser(), ["--backbone", str(backbone), "--data-root", str(tmp)],
                        "data_path", str(tmp)),
        "--out": (visualize_pca.get_args_parser(), ["--backbone", str(backbone), "--images", str(images),
                                                    "--out", str(tmp / "pca")], "output_dir", str(tmp / "pca")),
        "--cache-features": (linear_main.get_args_parser(), ["--backbone", str(backbone), "--data-path", str(tmp),
                                                             "--cache-features"], "cache_features", True),
    }  # fmt: skip


@pytest.mark.parametrize("old", ["--data-root", "--out", "--cache-features"])
def test_deprecated_flags_still_work_with_one_warning(old, backbone, tmp_path, capsys):
    parser, argv, attr, value = deprecated_cases(backbone, tmp_path)[old]
    args = parser.parse_args(argv)
    assert getattr(args, attr) == value
    new = {"--data-root": "--data-path", "--out": "--output-dir", "--cache-features": "--cache-dir <output-dir>"}[old]
    assert capsys.readouterr().err.splitlines() == [f"warning: {old} is deprecated, use {new}"]
    assert not re.search(rf"{old}(?![\w-])", parser.format_help())  # not advertised


def test_dense_flags_old_and_new(backbone, tmp_path, capsys):
    """--data-root (deprecated) and mmseg's --work-dir (an alias, no warning) land in --data-path/--output-dir;
    a bare --resume (the old switch) is what the default does now, said in one line."""
    pytest.importorskip("mmseg")
    from segmentation import runner

    parser = runner.get_args_parser("segmentation")
    args = parser.parse_args(["cfg.py", "--backbone", "b", "--data-root", "d", "--work-dir", "w", "--resume"])
    assert (args.data_path, args.output_dir, args.resume) == ("d", "w", None)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --data-root is deprecated, use --data-path",
        "warning: --resume without a file is deprecated: the last checkpoint in --output-dir is resumed by default",
    ]
    assert parser.parse_args(["cfg.py", "--backbone", "b", "--resume", "x.pth"]).resume == "x.pth"
    assert "--work-dir" in parser.format_help() and "--data-root" not in parser.format_help()
