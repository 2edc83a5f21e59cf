"""Training from WebDataset tar shards (common/shards.py, scripts/make_shards.py): the folder's images, order,
labels and augmented crops under the same sampler keys; corrupt images skipped by shard and key; one-line errors."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader

import models
from common.images import skipped_paths
from common.shards import SHARDS, ShardedImageFolder
from models.errors import MissingFile
from pretrain import main as pretrain_main
from pretrain.data import PositionSampler, SeededDataset, build_dataset
from pretrain.loaders import cpu_stages
from scripts import make_shards
from tests.helpers import TINY_RUN, make_image_folder, tiny_spec


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory):
    """12 JPEGs of 3 classes (one stored as PNG) and their shards, 5 images a shard: 3 shards."""
    root = make_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, per_class=4)
    jpg = root / "train" / "class1" / "2.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()
    out = tmp_path_factory.mktemp("sharded")
    assert make_shards.main(["--data-path", str(root), "--to", str(out), "--shard-size", "5"]) == 0
    return root, out


def test_shards_are_webdataset_tars_of_the_files_as_stored(folder_and_shards):
    root, out = folder_and_shards
    shards = sorted((out / SHARDS).glob("*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    read = list(webdataset.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in read][:5] == ["class0/0", "class0/1", "class0/2", "class0/3", "class1/0"]
    png = next(s for s in read if s["__key__"] == "class1/2")
    assert "jpg" not in png and png["png"] == (root / "train" / "class1" / "2.png").read_bytes()
    assert [int(s["cls"]) for s in read] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(tarfile.open(p).getmembers()[0].mtime == 0 for p in shards)  # the same files on every run


def test_shards_serve_the_folders_crops_under_the_same_sampler_keys(folder_and_shards):
    root, out = folder_and_shards
    stages = cpu_stages(28)
    folder, sharded = (build_dataset(str(p), 28, transform=stages.transform) for p in (root, out))
    assert isinstance(sharded, ShardedImageFolder) and sharded.classes == folder.classes
    assert sharded.targets == folder.targets and sharded.samples[5][0] == "shard-000001.tar:class1/1"

    def keys(ds, epoch, start=0):
        sampler = PositionSampler(RepeatAugSampler(ds, num_replicas=1, rank=0, shuffle=True, selected_round=0), 7, 0)
        sampler.set_epoch(epoch, start)
        return list(sampler)

    assert keys(folder, 1) == keys(sharded, 1)
    resumed = keys(sharded, 1, start=9)
    assert resumed == keys(sharded, 1)[9:] and len(resumed) == 3
    for key in [*keys(sharded, 0)[:2], *resumed]:  # the PNG and a JPEG of each shard among them
        (image, record), label = SeededDataset(sharded)[key]
        (expect, expect_record), expect_label = SeededDataset(folder)[key]
        assert torch.equal(image, expect) and torch.equal(record, expect_record) and label == expect_label


def test_subsets_and_loader_workers_read_the_folders_images(folder_and_shards):
    root, out = folder_and_shards
    folder, sharded = (build_dataset(str(p), 28, subset_classes=0.5, subset_images_per_class=0.5) for p in (root, out))
    relative = [Path(p).relative_to(root / "train").with_suffix("").as_posix() for p, _ in folder.samples]
    assert [name.split(":")[1] for name, _ in sharded.samples] == relative and sharded.targets == folder.targets
    sharded.transform = folder.transform = np.asarray
    loaded = DataLoader(sharded, batch_size=2, num_workers=2, collate_fn=list)  # forked workers open their own shards
    got = [x for batch in loaded for x in batch]
    assert len(got) == len(folder) == 4 and all(np.array_equal(a, b) and s == t for (a, s), (b, t) in zip(got, folder))


def test_a_corrupt_image_in_a_shard_is_named_and_skipped(tmp_path, caplog):
    root = make_image_folder(tmp_path / "imagenet", classes=2, per_class=3)
    (root / "train" / "class0" / "1.jpg").write_bytes(b"\xff\xd8 truncated")
    assert make_shards.main(["--data-path", str(root), "--to", str(tmp_path / "s"), "--shard-size", "2"]) == 0
    ds = build_dataset(str(tmp_path / "s"), 28)
    with caplog.at_level(logging.WARNING):
        _, label = ds[1]
    bad = "shard-000000.tar:class0/1"
    assert f"skipping corrupt image {bad} (cannot identify image file {bad})" in caplog.text
    assert label == 0 and skipped_paths(ds) == ["shard-000000.tar:class0/1"]
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]  # the next readable image served in its place
    last = tmp_path / "s" / SHARDS / "shard-000002.tar"  # class1/1 and class1/2: cut inside the first image
    last.write_bytes(last.read_bytes()[:1600])
    ds = build_dataset(str(tmp_path / "s"), 28)
    with caplog.at_level(logging.WARNING):
        assert ds[4][1] == 0  # both unreadable: the first readable image from the start
    assert "shard-000002.tar:class1/2 (shard truncated" in caplog.text
    assert skipped_paths(ds) == ["shard-000002.tar:class1/1", "shard-000002.tar:class1/2"]
    last.unlink()
    with pytest.raises(MissingFile, match="lists 1 missing shard\\(s\\), the first .*shard-000002.tar"):
        build_dataset(str(tmp_path / "s"), 28)


def test_pretraining_runs_on_shards_and_dali_refuses_them(folder_and_shards, tmp_path, capsys, monkeypatch):
    _, out = folder_and_shards
    monkeypatch.setitem(models.TEACHERS, "dinov2_vits14", tiny_spec("dinov2_vits14"))
    argv = ["--data-path", str(out), "--output-dir", str(tmp_path / "o"), *TINY_RUN, "--epochs", "1"]
    assert pretrain_main.main([*argv, "--epoch-length", "2"]) == 0
    lines = (tmp_path / "o" / "iterations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["loss"] > 0 for line in lines)
    capsys.readouterr()
    assert pretrain_main.main([*argv, "--loader", "dali"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --loader dali reads image files, not the shards in {out}: use --loader cpu"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-train", "no train/ folder in --data-path"),
        ("not-shards", "exists and is not a folder of shards: choose another folder"),
        ("size", "--shard-size 0 and --max-bytes 1e+09 must be positive"),
    ],
)
def test_make_shards_errors_are_one_line(case, message, folder_and_shards, tmp_path, capsys):
    root, _ = folder_and_shards
    argv = ["--data-path", str(tmp_path if case == "no-train" else root), "--to", str(tmp_path / "out")]
    if case == "not-shards":
        (tmp_path / "out" / SHARDS).mkdir(parents=True)
        (tmp_path / "out" / SHARDS / "notes.txt").write_text("mine")
    assert make_shards.main([*argv, "--shard-size", "0" if case == "size" else "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert case != "not-shards" or (tmp_path / "out" / SHARDS / "notes.txt").read_text() == "mine"


def test_make_shards_replaces_its_own_shards(folder_and_shards, tmp_path):
    root, _ = folder_and_shards
    argv = ["--data-path", str(root), "--to", str(tmp_path)]
    assert make_shards.main([*argv, "--shard-size", "5"]) == 0
    assert make_shards.main([*argv, "--shard-size", "12"]) == 0
    assert [p.name for p in (tmp_path / SHARDS).iterdir()] and len(list((tmp_path / SHARDS).glob("*.tar"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHARDS]  # no temp folder left beside it
