"""`make demo`: the real teacher whenever it can (TEACHER_CHECKPOINT, else torch hub's cache, else a download),
a random one only after a failed download, saying why; its inputs are checked before the previous run's files
are replaced; it ends with the PCA pictures. No test downloads: torch hub's download function fails as
without network."""

from __future__ import annotations

import http.client
import json
import socket
import sys
from urllib.error import HTTPError, URLError

import pytest
import torch
from PIL import Image

import models
from pretrain import demo
from pretrain import main as pretrain_main
from pretrain.pca import GAP
from tests.helpers import TINY_RUN, make_image_folder

URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
NO_NETWORK = URLError(socket.gaierror(-2, "Name or service not known"))


@pytest.fixture(autouse=True)
def downloads(tmp_path, monkeypatch):
    """The URLs the demo tried to download: torch hub's cache is an empty folder, and its download function
    fails as it does without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def offline(url, dst, *args, **kwargs):
        tried.append(url)
        raise NO_NETWORK

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tried


@pytest.fixture
def tiny_demo(tmp_path, monkeypatch):
    """The demo in tmp_path with a one-iteration run at 28 px and PCA pictures at 28 px."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEACHER", raising=False)
    monkeypatch.delenv("TEACHER_CHECKPOINT", raising=False)
    train = [a for a in TINY_RUN if a not in ("--teacher", "dinov2_vits14", "--random-teacher")]
    monkeypatch.setattr(demo, "TRAINING", [*train, "--epochs", "1", "--epoch-length", "1", "--warmup-epochs", "0"])
    monkeypatch.setattr(demo, "PCA_SIZE", 28)
    return tmp_path / demo.OUT


def panels(out) -> int:
    """How many panels (input + one per backbone) the PCA picture of the square astronaut photo holds."""
    width = Image.open(out / "pca" / "astronaut.png").width
    assert (width + GAP) % (28 + GAP) == 0, width
    return (width + GAP) // (28 + GAP)


def test_without_network_the_teacher_is_random_and_one_line_says_why(tiny_demo, downloads, capsys):
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert downloads == [URL]
    why = [line for line in out.splitlines() if "RANDOM" in line]
    assert f"downloading {URL} -> {tiny_demo.parent / 'torch' / 'hub' / 'checkpoints'}" in out
    assert why == [
        f"WARNING: no TEACHER_CHECKPOINT and the download of {URL} failed ([Errno -2] Name or service not known): "
        "using a RANDOM dinov2_vits14; the student learns nothing meaningful"
    ]
    assert "teacher: " not in out
    assert out.strip().endswith(
        f"PCA pictures (input | dinov2_vits14_to_vit_tiny/backbone.pth), one per photo: {demo.OUT / 'pca'}"
    )
    assert sorted(p.stem for p in (tiny_demo / "pca").iterdir()) == sorted(demo.PHOTOS)
    assert panels(tiny_demo) == 2  # input | student: no random teacher drawn


@pytest.mark.parametrize(
    "error, reason",
    [
        (NO_NETWORK, "[Errno -2] Name or service not known"),
        (HTTPError(URL, 403, "Forbidden", None, None), "HTTP Error 403: Forbidden"),
        (TimeoutError("timed out"), "timed out"),
        (http.client.IncompleteRead(b"partial"), "IncompleteRead(7 bytes read)"),
    ],
)
def test_a_failed_download_is_one_line_with_its_reason(tmp_path, monkeypatch, capsys, error, reason):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(error))
    assert demo.official_teacher("dinov2_vits14") is None
    dst = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    assert not dst.parent.exists() or not any(dst.parent.iterdir())  # nothing half-written left in the cache
    assert capsys.readouterr().out == (
        f"downloading {URL} -> {dst}\n"  # the attempt: where from, where to
        f"WARNING: no TEACHER_CHECKPOINT and the download of {URL} failed ({reason}): using a RANDOM dinov2_vits14; "
        "the student learns nothing meaningful\n"
    )


@pytest.mark.parametrize("where", ["torch hub's cache", "TEACHER_CHECKPOINT"])
def test_the_official_file_is_used_without_downloading(tiny_demo, tmp_path, monkeypatch, downloads, capsys, where):
    """The official ViT-S/14 file in torch hub's cache, or a TEACHER_CHECKPOINT given as is (the cache empty)."""
    if where == "TEACHER_CHECKPOINT":
        official = tmp_path / "weights" / "dinov2_vits14_pretrain.pth"
        monkeypatch.setenv("TEACHER_CHECKPOINT", str(official))
    else:
        official = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    official.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.to_dinov2(models.TEACHERS["dinov2_vits14"].build()), official)  # the official ViT-S/14 layout
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert downloads == [] and "RANDOM" not in out
    assert f"teacher: dinov2_vits14 from {official}\n" in out
    run = tiny_demo / "dinov2_vits14_to_vit_tiny"
    args = models.safe_load(run / "checkpoint.pth")["args"]
    assert (args["teacher_checkpoint"], args["random_teacher"]) == (str(official), False)
    names = f"{official.parent.name}/dinov2_vits14_pretrain.pth | dinov2_vits14_to_vit_tiny/backbone.pth"
    assert out.strip().endswith(f"PCA pictures (input | {names}), one per photo: {demo.OUT / 'pca'}")
    assert panels(tiny_demo) == 3  # input | teacher | student


OLD = {"checkpoint.pth": b"the last run's checkpoint", "log.txt": b'{"epoch": 4}\n', "backbone.pth": b"old backbone"}


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A previous demo run's files in demo_output/ of the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TEACHER", raising=False)
    monkeypatch.delenv("TEACHER_CHECKPOINT", raising=False)
    out = tmp_path / demo.OUT / "dinov2_vits14_to_vit_tiny"
    out.mkdir(parents=True)
    for name, content in OLD.items():
        (out / name).write_bytes(content)
    return out


def wrong_teacher_file(path):
    torch.save(models.to_dinov2(models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=1)), path)
    return str(path)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TEACHER_CHECKPOINT": "missing.pth"}, "teacher checkpoint not found: missing.pth"),
        ({"TEACHER_CHECKPOINT": wrong_teacher_file}, "do not match the model"),
        ({"TEACHER": "dinov2_vitz14"}, "unknown TEACHER 'dinov2_vitz14'"),
        ({"skimage": None}, "cannot write the demo's photos"),
    ],
)
def test_bad_input_leaves_the_last_run_untouched(old_run, tmp_path, monkeypatch, capsys, downloads, env, message):
    for name, value in env.items():
        if name == "skimage":
            monkeypatch.setitem(sys.modules, "skimage.data", None)  # scikit-image missing
        else:
            monkeypatch.setenv(name, value(tmp_path / "wrong.pth") if callable(value) else value)
    assert demo.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in old_run.iterdir()} == OLD
    assert downloads == []  # a TEACHER_CHECKPOINT is used as given; bad names and photos stop before any download


def test_fresh_run_replaces_a_finished_run_only_after_its_checks(tmp_path, capsys):
    """What the demo relies on: pretrain.main(fresh=True) in a finished run's folder trains anew from epoch 0."""
    data, out = make_image_folder(tmp_path / "data"), tmp_path / "run"
    argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--epochs", "2", "--epoch-length", "1"]
    assert pretrain_main.main([*argv, "--pca-every", "0"]) == 0
    before = (out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_bytes()
    assert pretrain_main.main([*argv, "--student", "vit_huge"], fresh=True) == 2
    assert ((out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_bytes()) == before
    assert pretrain_main.main([*argv, "--epochs", "1", "--pca-every", "0"], fresh=True) == 0
    assert "resumed" not in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    assert models.safe_load(out / "checkpoint.pth")["epoch"] == 0
