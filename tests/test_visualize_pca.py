"""PCA pictures: the shared reduction (pretrain/pca.py) and `python -m scripts.visualize_pca`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import models
from pretrain import pca
from pretrain.pca import foreground_mask, pca_rgb
from scripts import visualize_pca
from tests.helpers import TINY_RUN, make_image_folder


def synthetic_tokens(grid: int = 6, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens of a grid x grid image whose central 2x2 patches (the object) differ from the rest."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(grid, grid, dtype=torch.bool)
    centre[grid // 2 - 1 : grid // 2 + 1, grid // 2 - 1 : grid // 2 + 1] = True
    centre = centre.flatten()
    obj, back = torch.randn(dim, generator=g) * 3, torch.randn(dim, generator=g) * 3
    tokens = torch.where(centre[:, None], obj, back) + 0.1 * torch.randn(grid * grid, dim, generator=g)
    return tokens, centre


@pytest.mark.parametrize("negate", [False, True])
def test_foreground_is_the_minority_side_of_the_first_component(negate):
    tokens, centre = synthetic_tokens()
    fg = foreground_mask(-tokens if negate else tokens)  # the sign of the data must not matter
    assert torch.equal(fg, centre)


def test_pca_rgb_background_black_foreground_coloured():
    tokens, centre = synthetic_tokens()
    rgb = pca_rgb(tokens, (6, 6))
    assert rgb.shape == (3, 6, 6) and rgb.min() >= 0 and rgb.max() <= 1
    flat = rgb.reshape(3, -1)
    assert torch.all(flat[:, ~centre] == 0)
    assert flat[:, centre].max(dim=1).values.tolist() == [1.0, 1.0, 1.0]  # min-max scaled per channel
    assert torch.equal(rgb, pca_rgb(tokens.clone(), (6, 6)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 60), (50, 50)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    backbones = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"bb{seed}.pth"
        torch.save(models.to_dinov2(models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)), path)
        backbones.append(path)
    return images, backbones


def run(images, backbones, out, *extra) -> int:
    argv = ["--images", str(images), "--output-dir", str(out), "--input-size", "56", "--device", "cpu", *extra]
    for b in backbones:
        argv += ["--backbone", str(b)]
    return visualize_pca.main(argv)


def test_one_picture_per_image_input_then_each_backbone(setup, tmp_path):
    images, backbones = setup
    assert run(images, backbones, tmp_path / "a") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["im0.png", "im1.png"]
    pic = np.asarray(Image.open(tmp_path / "a" / "im0.png"))
    # im0 is 60x40: short side 56, the long side keeps the 3:2 aspect ratio (84, a multiple of the patch size)
    top, w, gap = pca.label_height(56), 84, pca.GAP
    assert pic.shape == (top + 56, 3 * w + 2 * gap, 3) and pic.dtype == np.uint8
    panels = [pic[:, i * (w + gap) : i * (w + gap) + w] for i in range(3)]
    assert (pic[:, w : w + gap] == 255).all()  # white between the panels
    expected_input = np.asarray(Image.open(images / "im0.png").convert("RGB").resize((w, 56), Image.BICUBIC))
    np.testing.assert_array_equal(panels[0][top:], expected_input)
    assert not np.array_equal(panels[1][top:], panels[2][top:])  # two different backbones
    # nearest upsampling: every 14x14 patch is one colour
    grid = panels[1][top:].reshape(4, 14, 6, 14, 3)
    assert (grid == grid[:, :1, :, :1]).all()
    # each panel under its name: the input's size, then each backbone's folder and file name
    names = ["input 60x40", *(f"{b.parent.name}/{b.name}" for b in backbones)]
    for panel, name in zip(panels, names):
        np.testing.assert_array_equal(panel[:top], pca.label(name, w, top))
        assert (panel[:top] < 128).any()  # some text is drawn
    assert not np.array_equal(panels[1][:top], panels[2][:top])
    square = np.asarray(Image.open(tmp_path / "a" / "im1.png"))  # 50x50 stays square
    assert square.shape == (top + 56, 3 * 56 + 2 * gap, 3)


def test_input_shape_keeps_the_aspect_ratio():
    assert pca.input_shape(600, 400, 448, multiple=14) == (672, 448)
    assert pca.input_shape(250, 400, 224, multiple=14) == (224, 364)  # 358.4 rounded to a multiple of 14
    assert pca.input_shape(4000, 10, 28, multiple=14) == (11200, 28)
    assert pca.input_shape(100, 100, 224, multiple=112) == (224, 224)  # patch 14 and 16 together


def test_long_names_are_cut_at_the_start():
    short, long = pca.label("a/backbone.pth", 80, 12), pca.label("x" * 60 + "/backbone.pth", 80, 12)
    assert short.shape == long.shape == (12, 80, 3)
    assert (long[:, :2] == 255).all() and (long[:, -2:] == 255).all()  # the text fits in the panel


def test_two_runs_are_byte_identical(setup, tmp_path):
    images, backbones = setup
    assert run(images, backbones[:1], tmp_path / "a") == 0
    assert run(images, backbones[:1], tmp_path / "b") == 0
    for name in ("im0.png", "im1.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_clear_errors(setup, tmp_path, capsys):
    images, backbones = setup
    assert run(tmp_path / "nope", backbones, tmp_path / "o") == 2
    assert "no image or images folder at" in capsys.readouterr().err
    assert run(images, backbones, tmp_path / "o", "--threshold", "2") == 2
    assert "--threshold 2.0" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert run(images, [backbones[0], bad], tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read backbone") and str(bad) in err and len(err.strip().splitlines()) == 1
    assert run(images, backbones, tmp_path / "o", "--input-size", "50") == 2
    assert "not a multiple" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tensorboard_grid_shows_the_inputs_above_their_pca_pictures(setup):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    from pretrain.pca import pca_grid, pca_images

    images, backbones = setup
    net = models.load_backbone(backbones[0]).eval()
    pictures = [Image.open(images / f"im{i}.png").convert("RGB").resize((28, 28)) for i in (0, 1)]
    norm = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    batch = torch.stack([norm(transforms.functional.to_tensor(p)) for p in pictures])
    grid = pca_grid(net, batch)
    assert grid.shape == (3, 56, 56)
    for i, picture in enumerate(pictures):  # the input as read, then its PCA picture under it
        torch.testing.assert_close(grid[:, :28, 28 * i : 28 * (i + 1)], transforms.functional.to_tensor(picture),
                                   atol=1e-6, rtol=0)  # fmt: skip
    torch.testing.assert_close(grid[:, 28:], torch.cat(list(pca_images(net, batch)), dim=2))


def test_pretraining_logs_pca_pictures_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain import main as pretrain_main

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    out = tmp_path / "run"
    argv = ["--data-path", str(data), "--output-dir", str(out), "--epochs", "2", "--pca-every", "1", *TINY_RUN]
    assert pretrain_main.main(argv) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"pca/teacher", "pca/student"}
    student = events.Images("pca/student")
    assert [e.step for e in student] == [0, 1] and len(events.Images("pca/teacher")) == 1
    assert (student[0].height, student[0].width) == (2 * 28, 4 * 28)  # 4 fixed images over their PCA pictures


def test_single_image_and_corrupt_images_skipped(setup, tmp_path, capsys):
    images, backbones = setup
    assert run(images / "im1.png", backbones[:1], tmp_path / "one") == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["im1.png"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "im0.png").write_bytes((images / "im0.png").read_bytes())
    (mixed / "broken.jpg").write_bytes((images / "im0.png").read_bytes()[:40])  # truncated
    assert run(mixed, backbones[:1], tmp_path / "m") == 0
    out = capsys.readouterr()
    assert f"warning: unreadable image {mixed / 'broken.jpg'}" in out.err and "1 pictures" in out.out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["im0.png"]
    assert run(mixed / "broken.jpg", backbones[:1], tmp_path / "b") == 2
    assert capsys.readouterr().err.strip().endswith("error: none of the 1 images is readable")


def test_images_whose_pictures_would_share_a_name_are_refused(setup, tmp_path, capsys):
    """x.png and x.jpg both give x.png: refused in one line naming them, before any picture is drawn."""
    images, backbones = setup
    same = tmp_path / "same"
    same.mkdir()
    for name in ("im0.png", "im0.jpg", "im1.png"):
        Image.open(images / "im0.png").convert("RGB").save(same / name)
    assert run(same, backbones[:1], tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: pictures would overwrite each other in --output-dir (im0.jpg and im0.png -> im0.png): "
        "rename one of each"
    ]
    assert not (tmp_path / "o").exists()


def test_an_extreme_aspect_ratio_is_drawn_bounded(setup, tmp_path, capsys):
    """A 1000x5 image at --input-size 56 would be 11200 px long; its long side is held to 4 x 56, with a note."""
    _, backbones = setup
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 1000, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "strip.png"
    )
    assert run(tmp_path / "in", backbones[:1], tmp_path / "o") == 0
    pic = np.asarray(Image.open(tmp_path / "o" / "strip.png"))
    assert pic.shape == (pca.label_height(1) + 14, 2 * 196 + pca.GAP, 3)  # 196 <= 4 x 56
    assert "strip.png is 1000x5: drawn at 196x14, the long side at most 4 x --input-size" in capsys.readouterr().out
