"""Images every loader reads the same way: 16-bit PNGs scaled to 8 bits (not clipped to white), modes
without an 8-bit scale refused by path, unreadable images skipped, and one-line errors for datasets
that cannot train (an empty class folder, no readable image)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from common import cli
from common.images import load_rgb, read_image_folder, skipped_paths
from fine_grained.datasets import ImageList
from linear_eval.data import image_folder
from models.errors import MissingFile, UsageError
from pretrain import main as pretrain_main
from pretrain import pca
from pretrain.data import build_dataset
from tests.helpers import TINY_RUN

GRADIENT = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246


def save_16bit(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(GRADIENT).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # what PIL reads a 16-bit greyscale PNG as
    return path


def expected_rgb() -> np.ndarray:
    grey = np.round(GRADIENT / 257).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = save_16bit(tmp_path / "depthlike.png")
    with Image.open(path) as im:
        clipped = np.asarray(im.convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # PIL's own convert: nearly all white
    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, expected_rgb())
    assert rgb.min() == 0 and rgb.max() == round(65246 / 257)


def test_every_loader_reads_16bit_pngs_the_same(tmp_path):
    for split in ("train", "val"):
        save_16bit(tmp_path / split / "a" / "0.png")
        (tmp_path / split / "b").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / "b" / "0.png")
    pretrain_ds = build_dataset(str(tmp_path), 28)
    linear_ds = image_folder(str(tmp_path), "val", None)
    fine_grained_ds = ImageList([(tmp_path / "val" / "a" / "0.png", 0)])
    path, _ = pretrain_ds.samples[0]
    assert path.endswith("a/0.png")
    for img in (pretrain_ds.loader(path), linear_ds[0][0], fine_grained_ds[0][0]):
        assert np.array_equal(np.asarray(img), expected_rgb())
    batch = pca.first_images(linear_ds, 28, n=1)  # the PCA pictures read the same pixels
    white = pca.eval_transform(28, None)(Image.new("RGB", (48, 40), (255, 255, 255)))
    assert batch.shape == (1, 3, 28, 28) and not np.allclose(batch[0].numpy(), white.numpy())


def test_float_image_is_refused_by_path_and_skipped(tmp_path, caplog):
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UsageError, match=r"f\.tif: a float image \(mode F\)"):
        load_rgb(tmp_path / "f.tif")
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
    (tmp_path / "f.tif").rename(tmp_path / "train" / "a" / "f.tif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "b" / "ok.png")
    ds = build_dataset(str(tmp_path), 28)
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]  # the float image is skipped: the next one is served
    assert target == 1 and "skipping corrupt image" in caplog.text and "f.tif" in caplog.text


def test_pca_pictures_skip_a_corrupt_image_among_the_first_four(tmp_path, caplog):
    root = tmp_path / "train"
    for i in range(6):
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "c" / f"{i}.png")
    (root / "c" / "1.png").write_bytes(b"not a png")
    ds = read_image_folder(root, None)
    with caplog.at_level(logging.WARNING):
        batch = pca.first_images(ds, 28)
    assert batch.shape == (4, 3, 28, 28) and "1.png" in caplog.text
    transform = pca.eval_transform(28, None)
    expect = [transform(load_rgb(root / "c" / f"{i}.png")) for i in (0, 2, 3, 4)]
    assert all(np.allclose(b.numpy(), e.numpy()) for b, e in zip(batch, expect))
    for i in range(6):
        (root / "c" / f"{i}.png").write_bytes(b"broken")
    assert pca.first_images(ds, 28) is None


def test_pretraining_on_unreadable_images_is_one_line(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / c / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    rc = pretrain_main.main(["--data-path", str(tmp_path), "--output-dir", str(tmp_path / "o"), *TINY_RUN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no readable image in {tmp_path / 'train'}: all 6 images failed to load")
    assert "a/0.jpg" in err[0]


def run_of_corrupt_files(root, bad=60, good=2):
    """root/a/ holds `bad` unreadable JPEGs, root/b/ `good` readable PNGs: a run longer than any limit."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(bad):
        (root / "a" / f"{i:03d}.jpg").write_bytes(b"\xff\xd8 truncated")
    for i in range(good):
        Image.fromarray(np.full((8, 8, 3), 9 * i, np.uint8)).save(root / "b" / f"{i}.png")
    return root


def targets(ds, workers):
    loader = DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=lambda batch: [t for _, t in batch])
    return [t for batch in loader for t in batch]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_long_run_of_unreadable_images_is_skipped_and_counted(tmp_path, workers):
    """60 unreadable images in a row: each is served by the next readable one and counted, in the main
    process as in a data-loader worker; the start-up check looks past them too."""
    root = run_of_corrupt_files(tmp_path / "train")
    ds = read_image_folder(root, None)
    assert targets(ds, workers) == [1] * 62
    assert skipped_paths(ds) == [str(root / "a" / f"{i:03d}.jpg") for i in range(60)]
    build_dataset(str(tmp_path), 28)  # pretraining's check before training finds the readable images


@pytest.mark.parametrize("workers", [0, 1])
def test_no_readable_image_left_is_one_line_naming_the_folder(tmp_path, capsys, workers):
    """Images that turn unreadable after the start-up check (a lost mount): one line, exit 2, also when the
    error is raised in a data-loader worker and re-raised with its traceback in the main process."""
    root = run_of_corrupt_files(tmp_path / "train", bad=3, good=2)
    ds = read_image_folder(root, None)
    for path, _ in ds.samples:
        Path(path).write_bytes(b"gone")
    assert cli.run(targets, ds, workers) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: no readable image in {root}: all 5 images failed to load (first: {root / 'a' / '000.jpg'}; "
        "the reasons are in the warnings above)"
    ]


def test_a_symlink_cycle_or_a_second_link_is_read_once(tmp_path, caplog):
    """Every image folder listing (pretraining, linear probe, kNN, the PCA pictures' first images) reads each
    real folder once: a link back up the tree is not followed ~40 levels deep, nor a second link to a folder."""
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / c / "0.png")
    (root / "train" / "a" / "up").symlink_to("..", target_is_directory=True)  # a cycle through train/
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "1.png")
    for name in ("x", "y"):  # two ways into one folder outside the tree
        (root / "train" / "b" / name).symlink_to(extra, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        pretrain_ds = build_dataset(str(root), 28)
        linear_ds = image_folder(str(root), "train", None)
    expect = [(str(root / "train" / "a" / "0.png"), 0), (str(root / "train" / "b" / "0.png"), 1),
              (str(root / "train" / "b" / "x" / "1.png"), 1)]  # fmt: skip
    assert pretrain_ds.samples == linear_ds.samples == expect
    assert f"not following {root / 'train' / 'a' / 'up'}: it leads to {root / 'train'}" in caplog.text
    assert f"not following {root / 'train' / 'b' / 'y'}: it leads to {extra}" in caplog.text


def test_an_empty_class_folder_is_named(tmp_path):
    for c in ("cat", "dog", "empty_one"):
        (tmp_path / "train" / c).mkdir(parents=True)
    for c in ("cat", "dog"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / c / "0.png")
    (tmp_path / "train" / "empty_one" / "notes.txt").write_text("no image here")
    with pytest.raises(MissingFile, match=r"1 of the 3 class folders in .* hold no image: .*empty_one"):
        build_dataset(str(tmp_path), 28)
    with pytest.raises(MissingFile, match="empty_one"):
        image_folder(str(tmp_path), "train", None)
