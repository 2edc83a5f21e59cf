"""--loader dali: the pipeline definition run on DALI's CPU operators (the GPU runs the same graph with nvJPEG):
crops, order, per-rank shards and resume position against the sampler, RandAugment's table against timm's,
and a tiny pretraining run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import auto_augment as timm_aa
from timm.data.distributed_sampler import RepeatAugSampler

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -r requirements-dali.txt")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from common.images import read_image_folder  # noqa: E402
from pretrain import benchmark  # noqa: E402
from pretrain import main as pretrain_main  # noqa: E402
from pretrain.dali import (  # noqa: E402
    MAGNITUDE,
    MAGNITUDE_BINS,
    TIMM_OPS,
    DaliLoader,
    rand_augment_ops,
    random_erasing,
)
from pretrain.data import PositionSampler, SingleImageDataset  # noqa: E402
from pretrain.engine import cycle_batches  # noqa: E402
from pretrain.loaders import recipe_ranges  # noqa: E402
from tests.helpers import TINY_RUN, make_image_folder  # noqa: E402

SIZE, BATCH, IMAGES = 32, 4, 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 JPEGs of 40x48, one per class: a sample's label is its index, so labels spell out the order read."""
    return make_image_folder(tmp_path_factory.mktemp("dali"), classes=IMAGES, per_class=1)


def loader(folder, *, world: int = 1, rank: int = 0, seed: int = 0, device: str = "cpu") -> DaliLoader:
    dataset = read_image_folder(folder / "train", None)
    assert [t for _, t in dataset.samples] == list(range(IMAGES))
    repeats = 3 if world > 1 else 1
    sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, num_repeats=repeats, selected_round=0)
    sampler = PositionSampler(sampler, seed, rank)
    return DaliLoader(dataset, sampler, batch_size=BATCH, size=SIZE, device=torch.device(device), num_threads=1)


def read(dali: DaliLoader, epoch: int, start: int = 0) -> tuple[torch.Tensor, list[int], list[int]]:
    """One pass from `start` (in samples): the images, their labels, and the indices the sampler gives."""
    dali.sampler.set_epoch(epoch, start)
    order = [index for index, _ in dali.sampler]
    batches = list(dali)
    labels = [int(v) for _, lab in batches for v in lab]
    return torch.cat([im for im, _ in batches]), labels, order


def check_crops(images: torch.Tensor, labels: list[int], order: list[int]) -> None:
    """Normalised crops of the images the sampler named, in its order."""
    assert images.shape == (IMAGES, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels == order and sorted(labels) == list(range(IMAGES))
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    pixels = images.cpu() * std + mean  # back to [0, 1]: everywhere but in erased boxes (N(0, 1) noise)
    inside = ((pixels >= -1e-4) & (pixels <= 1 + 1e-4)).float().mean()
    assert images.isfinite().all() and inside > 0.9
    assert pixels.std() > 0.1  # not a constant image


def test_crops_are_normalised_and_read_in_the_samplers_order(folder):
    dali = loader(folder)
    images, labels, order = read(dali, 0)
    check_crops(images, labels, order)
    again, _, _ = read(dali, 0)
    assert torch.equal(images, again)  # a pass is a function of (seed, rank, epoch, start)
    other, _, _ = read(dali, 1)
    assert not torch.equal(images, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_pipeline_decodes_with_nvjpeg_in_the_samplers_order(folder):
    images, labels, order = read(loader(folder, device="cuda"), 0)
    assert images.device.type == "cuda"
    check_crops(images, labels, order)


def test_each_rank_reads_its_shard_of_the_repeated_augmentation_sampler(folder):
    shards = []
    for rank in (0, 1):
        _, labels, order = read(loader(folder, world=2, rank=rank), 0)
        assert labels == order[: len(order) // BATCH * BATCH]
        shards.append(labels)
    assert shards[0] != shards[1]


def test_resume_continues_at_the_next_sample(folder):
    dali = loader(folder)
    _, full, _ = read(dali, 2)
    # the engine's path: a run stopped after 1 of the epoch's 3 batches reads batches 1..2, nothing else
    resumed = list(cycle_batches(dali, dali.sampler, 2, num_epochs=5, n=3, start=1))
    assert [int(v) for _, lab in resumed for v in lab] == full[BATCH:]


def test_single_image_is_every_sample(folder, tmp_path):
    dataset = SingleImageDataset(next((folder / "train").rglob("*.jpg")), None, length=IMAGES)
    sampler = PositionSampler(RepeatAugSampler(dataset, num_replicas=1, rank=0, selected_round=0), 0, 0)
    dali = DaliLoader(dataset, sampler, batch_size=BATCH, size=SIZE, device=torch.device("cpu"), num_threads=1)
    images, labels = next(iter(dali))
    assert images.shape == (BATCH, 3, SIZE, SIZE) and labels.tolist() == [0] * BATCH
    assert not torch.equal(images[0], images[1])  # each sample its own augmentation of the one photograph


def test_random_erasing_puts_noise_boxes_in_a_quarter_of_the_images():
    n = 64

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=3)
    def erase_zeros():
        zeros = fn.external_source(source=lambda: [np.zeros((3, SIZE, SIZE), np.float32)] * n, layout="CHW")
        return random_erasing(zeros, SIZE, recipe_ranges(SIZE).erasing)

    pipe = erase_zeros()
    pipe.build()
    (out,) = pipe.run()
    images = np.stack([np.array(out[i]) for i in range(n)])
    erased = [x for x in images if x.any()]
    assert 5 <= len(erased) <= 30  # p 0.25 of 64: 16 +- 3.5
    for x in erased:
        box = x != 0
        assert (box == box[0]).all()  # the same box in every channel
        rows, cols = np.flatnonzero(box[0].any(1)), np.flatnonzero(box[0].any(0))
        assert box[0].sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert 0.01 < box[0].mean() < 0.4  # 2-33% of the image, up to rounding and clamping
    noise = np.concatenate([x[x != 0] for x in erased])
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # N(0, 1) per pixel and channel
    for other in ({"mode": "rand"}, {"max_count": 2}):  # settings the graph cannot draw: refused, not ignored
        with pytest.raises(ValueError, match="one pixel-mode box"):
            random_erasing(None, SIZE, recipe_ranges(SIZE).erasing._replace(**other))


def magnitude(op) -> float:
    return float(np.linspace(*op.mag_range, MAGNITUDE_BINS, dtype=np.float32)[MAGNITUDE])


def test_rand_augment_is_timms_increasing_table_at_m9():
    assert list(TIMM_OPS) == timm_aa._RAND_INCREASING_TRANSFORMS
    ops = rand_augment_ops()
    assert len(ops) == 2 * len(TIMM_OPS) and all(op.mag_range is None for op in ops[len(TIMM_OPS) :])
    smooth = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's ImageFilter.SMOOTH
    for name, op in TIMM_OPS.items():
        level = timm_aa.LEVEL_TO_ARG[name]
        if level is None:  # AutoContrast, Equalize, Invert
            assert op.mag_range is None, name
            continue
        timm = level(9, {})[0]
        m = magnitude(op)
        if name == "PosterizeIncreasing":  # the bits kept -> the same mask
            assert op.mag_to_param(m) == 0xFF ^ (2 ** (8 - timm) - 1)
        elif name == "SolarizeIncreasing":  # the pixel values left as they are
            assert sum(v < m for v in range(256)) == sum(v < timm for v in range(256))
        elif name == "SharpnessIncreasing":  # PIL's blend with the smoothed image, as one kernel
            f = 1 + abs(timm - 1)
            identity = np.zeros((3, 3), np.float32)
            identity[1, 1] = 1
            np.testing.assert_allclose(op.mag_to_param(m), (1 - f) * smooth + f * identity, atol=1e-6)
        elif name.endswith("Increasing"):  # enhance factors 1 +- 0.81
            assert float(op.mag_to_param(m)) == pytest.approx(1 + abs(timm - 1), rel=1e-6)
        else:  # angles, shears and translations (a fraction of the side; [x, y] pairs), SolarizeAdd's shift
            assert np.abs(op.mag_to_param(m)).max() == pytest.approx(abs(timm), rel=1e-6), name
            assert op.randomly_negate == (name != "SolarizeAdd"), name


def test_dali_is_looked_for_without_importing_it():
    assert pretrain_main.installed("nvidia.dali")
    assert not pretrain_main.installed("nvidia.no_such_module") and not pretrain_main.installed("no_such_package.sub")


def test_pretraining_runs_on_the_dali_loader(folder, tmp_path):
    out = tmp_path / "run"
    argv = [*TINY_RUN, "--data-path", str(folder), "--output-dir", str(out), "--epochs", "1", "--epoch-length", "2"]
    argv += ["--loader", "dali", "--teacher-stats-batches", "1", "--pca-every", "0"]
    assert pretrain_main.main(argv) == 0
    lines = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(v) for line in lines for k, v in line.items() if "loss" in k)
    assert (out / "backbone.pth").is_file()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["args"]["loader"] == "dali"


def test_pipeline_benchmark_times_the_dali_loader(capsys):
    """On the CPU loaders' generated JPEGs, --large-share of them large photos."""
    argv = ["--pipeline", "--loaders", "dali", "--device", "cpu", "--images", "4", "--large-share", "0.25"]
    assert benchmark.main([*argv, "--input-size", "32", "--pipeline-batch", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 JPEGs" in out and "(1 over 1 Mpixel)" in out and re.search(r"^threads 1: [0-9.]+ img/s", out, re.M)
