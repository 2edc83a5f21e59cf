"""Pretraining's guards on what a user gives it and on where it writes: the command line resolved into a
frozen pretrain.config.Config, numeric flag ranges, --resume with a file that is not a pretraining
checkpoint, a fresh run in an old output dir, temp files of a killed save, and a signal during set-up (a
full disk: test_disk_full.py). Each is one line and loses nothing."""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.error import HTTPError, URLError

import pytest
import torch

import models
from models.errors import UsageError
from pretrain import main as pretrain_main
from pretrain.config import Config, StudentConfig, TeacherConfig
from tests.helpers import ROOT, TINY_RUN, child_env, make_image_folder


def run(data, out, *extra):
    return pretrain_main.main(["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, *extra])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--print-freq", "0", "--print-freq 0: must be a positive number of iterations"),
        ("--mask-probability", "2", "--mask-probability 2.0: must be a fraction of the batch in [0, 1]"),
        ("--epoch-length", "0", "--epoch-length 0: must be a positive number of iterations"),
        ("--epoch-length", "-1", "--epoch-length -1: must be a positive number of iterations"),
        ("--lr", "nan", "--lr nan: must be >= 0 (0: the weights stay as initialised)"),
        ("--drop-path", "1", "--drop-path 1.0: must be in [0, 1)"),
        ("--num-workers", "-2", "--num-workers -2: must be >= 0"),
        ("--clip-grad", "0", "--clip-grad 0.0: must be > 0 (omit the flag for no clipping)"),
        ("--subset-classes", "0", "--subset-classes 0.0: must be a fraction in (0, 1]"),
    ],
)
def test_numeric_flags_out_of_range_are_one_line(tmp_path, capsys, flag, value, message):
    assert run(tmp_path / "nodata", tmp_path / "o", flag, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]


def test_warmup_longer_than_the_run_warns(caplog):
    pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(["--epochs", "3", "--warmup-epochs", "5"]))
    assert "--warmup-epochs 5 is longer than the run (--epochs 3)" in caplog.text


TWO_TEACHERS = ["--teacher", "dinov2_vitb14,clip_vitl14", "--teacher-weights", "1,2", "--teacher-input-size",
                "224,448", "--teacher-checkpoint", "a.pth,", "--device", "cpu"]  # fmt: skip


def resolved(*argv: str) -> Config:
    return pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(argv))


def test_the_resolved_config_is_frozen_and_checks_its_own_values():
    config = resolved()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.teachers[0].weight = 2.0
    with pytest.raises(UsageError, match=r"^--batch-size 0: must be a positive integer$"):
        dataclasses.replace(config, batch_size=0)  # a Config made in code is checked as one from the command line
    with pytest.raises(UsageError, match="--teacher-input-size 0: must be a positive number of pixels"):
        TeacherConfig("dinov2_vitl14", None, 0, 1.0)


def test_per_teacher_flags_become_one_record_per_teacher():
    config = resolved(*TWO_TEACHERS, "--student", "vit_small,vit_small_dinov3")
    assert config.teachers == (
        TeacherConfig("dinov2_vitb14", checkpoint="a.pth", input_size=224, weight=1.0),
        TeacherConfig("clip_vitl14", checkpoint=None, input_size=448, weight=2.0),  # empty entry: downloaded
    )
    assert config.students == (StudentConfig("vit_small", "dinov2"), StudentConfig("vit_small_dinov3", "dinov3"))
    assert (config.teacher_normalization, config.teacher_standardization) == ("teacher", "phi-s")
    assert config.mask_ratio == (0.5, 0.5) and resolved("--mask-ratio", "0.1,0.5").mask_ratio == (0.1, 0.5)


def test_flags_are_the_flat_dict_checkpoints_store():
    """checkpoint.pth's "args" (and what a resume compares) keep the names and values of the command line:
    per-teacher flags as lists in --teacher order, comma strings for --teacher and --student, 'auto' resolved."""
    flags = resolved(*TWO_TEACHERS).flags()
    assert list(flags) == list(vars(pretrain_main.get_args_parser().parse_args([])))  # every flag, in order
    assert flags == {
        "data_path": None, "teacher": "dinov2_vitb14,clip_vitl14", "teacher_checkpoint": "a.pth,",
        "teacher_weights": [1.0, 2.0], "teacher_standardization": "phi-s",
        "teacher_summary_standardization": "phi-s", "teacher_stats_batches": 64,
        "random_teacher": False, "teacher_dtype": "auto", "teacher_input_size": [224, 448],
        "teacher_normalization": "teacher", "student": "vit_base", "student_pretrained": None,
        "student_layout": "dinov2", "input_size": 224,
        "batch_size": 128, "epochs": 300, "warmup_epochs": 5, "epoch_length": None, "lr": 5e-4, "warmup_lr": 1e-6,
        "min_lr": 1e-5, "weight_decay": 0.05, "drop_path": 0.0, "mask_probability": 0.5, "mask_ratio": (0.5, 0.5),
        "lambda_token": None, "lambda_patch": None, "lambda_fea": None, "ema_decay": 0.99996, "clip_grad": None,
        "compile": False, "precision": "bf16", "output_dir": "output/pretrain", "resume": None,
        "save_every_minutes": None, "device": "cpu", "num_workers": 10, "loader": "classic", "seed": 0,
        "print_freq": 50, "pca_every": 10, "subset_images_per_class": 1.0, "subset_classes": 1.0, "single_image": None,
    }  # fmt: skip
    one = resolved("--teacher", "clip_vitl14").flags()  # one teacher: the loss levels as the run uses them
    assert (one["lambda_token"], one["lambda_patch"], one["lambda_fea"]) == (1.0, 0.0, 0.0)
    assert (one["teacher_checkpoint"], one["teacher_input_size"], one["teacher_normalization"]) == (
        None,
        [224],
        "reference",
    )


def test_the_summary_standardization_is_resolved_into_the_config_and_each_target():
    """--teacher-summary-standardization: auto follows --teacher-standardization; none (RADIO's) leaves the
    CLS targets raw while the patches are PHI-S'd. Stored resolved in the flags, it parses back to itself;
    a value outside the kinds is one line, from the command line or in a Config made in code."""
    assert resolved("--teacher", "dinov2_vitb14").teacher_summary_standardization == "none"
    assert resolved(*TWO_TEACHERS, "--teacher-standardization", "zscore").teacher_summary_standardization == "zscore"
    config = resolved(*TWO_TEACHERS, "--teacher-summary-standardization", "none")
    assert (config.teacher_standardization, config.teacher_summary_standardization) == ("phi-s", "none")
    targets = pretrain_main.targets_of(config, 16)
    assert [(t.standardization, t.summary_standardization) for t in targets] == [("phi-s", "none")] * 2
    flags = config.flags()
    assert flags["teacher_summary_standardization"] == "none"
    again = resolved(*TWO_TEACHERS, "--teacher-summary-standardization", flags["teacher_summary_standardization"])
    assert again == config
    with pytest.raises(UsageError, match=r"^--teacher-summary-standardization pca: must be phi-s, zscore, none$"):
        dataclasses.replace(config, teacher_summary_standardization="pca")
    with pytest.raises(UsageError, match=r"^--teacher-standardization auto: must be phi-s, zscore, none$"):
        dataclasses.replace(config, teacher_standardization="auto")


def test_a_bad_summary_standardization_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "nodata", tmp_path / "o", "--teacher-summary-standardization", "raw")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-summary-standardization: invalid choice: 'raw'" in err[0], err


@pytest.mark.parametrize("module", ["engine", "distiller"])
def test_the_engine_reads_the_config_never_the_command_line(module):
    tree = ast.parse((ROOT / "pretrain" / f"{module}.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    assert "args" not in names and "argparse" not in names


@pytest.mark.parametrize("other", ["backbone.pth", "linear probe checkpoint.pth"])
def test_resume_from_another_file_is_one_line(tmp_path, capsys, other):
    """A backbone.pth or linear_eval's checkpoint.pth (its keys, `args` included) is not a pretraining checkpoint."""
    data = make_image_folder(tmp_path / "data")
    path = tmp_path / other.replace(" ", "_")
    if other == "backbone.pth":
        torch.save(models.to_dinov2(models.create_student("vit_tiny", img_size=28)), path)
    else:
        probe = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.1)
        torch.save({"classifiers": probe.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                    "args": {"epochs": 10}}, path)  # fmt: skip
    assert run(data, tmp_path / "o", "--resume", str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path} is not a pretraining checkpoint.pth" in err[0], err


@pytest.mark.parametrize(
    "error, reason, teachers",
    [
        (URLError(socket.gaierror(-2, "Name or service not known")), "[Errno -2] Name or service not known", []),
        (HTTPError("url", 403, "Forbidden", None, None), "HTTP Error 403: Forbidden", []),
        (ConnectionResetError(104, "Connection reset by peer"), "[Errno 104] Connection reset by peer",
         ["--teacher", "dinov2_vits14,clip_vitb16", "--teacher-input-size", "28,32",
          "--teacher-checkpoint", ",clip.pt"]),  # an empty entry downloads that teacher
    ],
    ids=["offline", "http-error", "reset-in-a-list"],
)  # fmt: skip
def test_a_failed_teacher_download_is_one_line_and_leaves_no_file(
    tmp_path, monkeypatch, capsys, error, reason, teachers
):
    """The README's commands without --teacher-checkpoint on a node without network: one line naming the URL, where
    to put the file and the flag; nothing half-written in torch hub's cache. No test downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"the first bytes")  # a downloader that writes in place, then fails
        raise error

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    data = make_image_folder(tmp_path / "data", per_class=2)
    argv = [a for a in TINY_RUN if a != "--random-teacher"] + ["--data-path", str(data), "--output-dir", str(tmp_path)]
    assert pretrain_main.main([*argv, *teachers]) == 2
    url = models.TEACHERS["dinov2_vits14"].url
    dst = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: cannot download {url} ({reason}): without network, fetch it where there is some (python -m "
        f"scripts.fetch_teachers NAME, e.g. on a login node) or put the file at {dst} yourself, or pass the file "
        "with --teacher-checkpoint"
    ]
    assert list(dst.parent.iterdir()) == []


def teacher_file(path, name: str, value: float | None = None) -> str:
    """A tiny official-layout DINOv2 file for `name` (patched by tiny_teacher), one weight set to `value`."""
    sd = models.to_dinov2(models.TEACHERS[name].build())
    if value is not None:
        sd["blocks.0.mlp.fc1.weight"][0] = value
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize(
    "value, teachers, message",
    [
        (float("nan"), 1, "the weights of teacher dinov2_vits14 are not all finite (blocks.0.mlp.fc1.weight)"),
        (3e38, 1, "non-finite loss at epoch 0 iteration 0"),
        (3e38, 2, "the targets of teacher dinov2_vits14 are not finite on the statistics batches"),
    ],
    ids=["nan-weight", "overflowing-targets", "overflowing-targets-statistics"],
)
def test_non_finite_teachers_are_the_non_finite_exit(tiny_teacher, tmp_path, capsys, caplog, value, teachers, message):
    """NaN in a teacher's file, or finite weights whose features overflow: exit 3 in one line, as a non-finite
    loss; the PCA picture (default --pca-every) of NaN features is skipped with a warning, never a crash."""
    tiny_teacher("dinov2_vits14", dim=32, depth=1)
    data = make_image_folder(tmp_path / "data", per_class=2)
    argv = [a for a in TINY_RUN if a != "--random-teacher"] + ["--data-path", str(data), "--output-dir", str(tmp_path)]
    files = [teacher_file(tmp_path / "s.pth", "dinov2_vits14", value)]
    if teachers == 2:
        tiny_teacher("dinov2_vitb14", dim=32, depth=1)
        files.append(teacher_file(tmp_path / "b.pth", "dinov2_vitb14"))
        argv += ["--teacher", "dinov2_vits14,dinov2_vitb14", "--teacher-stats-batches", "1"]
    assert pretrain_main.main([*argv, "--teacher-checkpoint", ",".join(files), "--epoch-length", "1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    if teachers == 1 and value > 0:
        assert "PCA picture: the features are not finite" in caplog.text


def test_fresh_run_starts_its_logs_anew_and_removes_stale_temp_files(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n')  # an old run's, no checkpoint
    (out / "iterations.jsonl").write_text('{"epoch": 2, "iteration": 9}\n')
    stale = out / ".checkpoint.pth.k1ll3d.tmp"  # what kill -9 during a save leaves
    stale.write_bytes(b"half a checkpoint")
    keep = out / ".notes.tmp"  # not one of this run's files
    keep.write_text("mine")
    assert run(data, out, "--epochs", "1", "--epoch-length", "1") == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    iterations = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert [(i["epoch"], i["iteration"]) for i in iterations] == [(0, 0)]
    assert not stale.exists() and keep.exists()


def test_sigterm_during_set_up_says_what_was_interrupted(tmp_path):
    """The run blocks in set-up reading --single-image from a FIFO; SIGTERM then exits 75 with one line.

    The signal is sent the moment the FIFO opens, so it often lands between Python's signal check and the
    read() that follows: before common.distributed re-delivered such a signal, about 1 run in 12 hung there."""
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "pretrain.main", "--single-image", str(fifo), "--output-dir", str(tmp_path / "o"),
           "--epoch-length", "1", *TINY_RUN]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:  # a FIFO opens for writing (non-blocking) only once its reader is there: set-up has begun
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)  # a fresh-clone CI run once needed more than 60 s here
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"no exit 120 s after SIGTERM during set-up; output: {proc.communicate()[0][-3000:]}")
    finally:
        os.close(fd)
    assert proc.returncode == 75, out
    assert "received SIGTERM during set-up (checks, teacher, data, model; nothing trained or written yet)" in out
    assert "Traceback" not in out


def test_a_diverging_update_never_replaces_the_last_good_checkpoint(tmp_path, capsys):
    """--lr 1e30: the step's own loss is finite, the weights it leaves are ~1e27. The loss under the
    updated weights is checked before the epoch's checkpoint, so the good one stays."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "o"
    assert run(data, out, "--epochs", "1", "--epoch-length", "1") == 0
    before = (out / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    assert run(data, out, "--epochs", "2", "--epoch-length", "1", "--lr", "1e30") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the update of epoch 1 iteration 0 made the loss non-finite" in err[0], err
    assert f"the last good checkpoint {out / 'checkpoint.pth'} is untouched" in err[0]
    assert (out / "checkpoint.pth").read_bytes() == before
    saved = models.safe_load(out / "checkpoint.pth")
    assert saved["epoch"] == 0 and all(
        torch.isfinite(v).all() and v.abs().max() < 1e3 for v in saved["student"].values()
    )


def test_ctrl_c_checkpoints_like_sigterm_and_the_rerun_says_where_it_resumes(tmp_path, capsys, monkeypatch):
    """SIGINT mid-epoch 0 (Ctrl-C): the iteration ends, the checkpoint is written, exit 75, no traceback; the
    re-run resumes "at iteration 2 of epoch 0" (not "after epoch -1")."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "o"
    real_iteration = pretrain_main.Output.iteration

    def ctrl_c(self, epoch, iteration, *args, **kwargs):
        real_iteration(self, epoch, iteration, *args, **kwargs)
        if iteration == 0:
            signal.raise_signal(signal.SIGINT)  # to this thread: handled before the next flag read

    monkeypatch.setattr(pretrain_main.Output, "iteration", ctrl_c)
    try:
        assert run(data, out, "--epochs", "1", "--epoch-length", "3", "--pca-every", "0") == 75
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "stopped after iteration 2/3 of epoch 0" in capsys.readouterr().out
    assert models.safe_load(out / "checkpoint.pth")["iteration_in_epoch"] == 2  # the flag is read at the next iteration
    monkeypatch.undo()
    assert run(data, out, "--epochs", "1", "--epoch-length", "3", "--pca-every", "0") == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint.pth'} at iteration 2 of epoch 0" in printed and "epoch -1" not in printed
