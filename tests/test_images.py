"""Images every loader reads the same way: 16-bit PNGs scaled to 8 bits (not clipped to white), modes
without an 8-bit scale refused by path, unreadable images skipped, and one-line errors for datasets
that cannot train (an empty class folder, no readable image)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from common.images import load_rgb, read_image_folder
from fine_grained.datasets import ImageList
from linear_eval.data import image_folder
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
    with pytest.raises(ValueError, match=r"f\.tif: a float image \(mode F\)"):
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
    assert err[0].startswith("error: none of the first 6 images of ") and "0.jpg" in err[0]


def test_an_empty_class_folder_is_named(tmp_path):
    for c in ("cat", "dog", "empty_one"):
        (tmp_path / "train" / c).mkdir(parents=True)
    for c in ("cat", "dog"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / c / "0.png")
    (tmp_path / "train" / "empty_one" / "notes.txt").write_text("no image here")
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 class folders in .* hold no image: .*empty_one"):
        build_dataset(str(tmp_path), 28)
    with pytest.raises(FileNotFoundError, match="empty_one"):
        image_folder(str(tmp_path), "train", None)
