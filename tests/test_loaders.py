"""--loader: the 'cpu' path (uint8 crops from the workers, normalisation and erasing on the device) gives the
classic path's batches for the same position keys: the same crops, the same erasing boxes, the same pixels."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

from models.errors import UsageError
from pretrain import loaders
from pretrain.config import Config
from pretrain.data import PositionSampler, SeededDataset, build_dataset, derive_seed
from tests.helpers import make_image_folder

SIZE = 32


class Fixed(torch.utils.data.Sampler):
    """The epoch's order, without shuffling: PositionSampler gives each position its key."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))

    def set_epoch(self, epoch: int) -> None:
        pass


def batches(root, loader: str, *, workers: int, epoch: int = 3) -> list:
    stages = loaders.LOADERS[loader](SIZE)
    ds = build_dataset(str(root), SIZE, transform=stages.transform)
    sampler = PositionSampler(Fixed(len(ds)), seed=7, rank=0)
    sampler.set_epoch(epoch)
    loader = DataLoader(SeededDataset(ds), batch_size=8, sampler=sampler, num_workers=workers)
    return [(batch, stages.finish(batch, torch.device("cpu"))) for batch in loader]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos"), classes=2, per_class=12, size=(40, 56))


def test_cpu_loader_batches_are_the_classic_batches(photos):
    """24 JPEGs, the same (seed, rank, epoch, position) keys: the workers hand over uint8 crops (a quarter of the
    bytes) and the device's normalisation + erasing give the classic path's float batch to float tolerance,
    erased boxes and their noise included (on a CPU device the noise is the classic path's own draws)."""
    classic = batches(photos, "classic", workers=0)
    cpu = batches(photos, "cpu", workers=1)  # the seed reaches the record from a worker process too
    erased = 0
    assert len(classic) == len(cpu) == 3
    for (_, want), (((images, records), _), got) in zip(classic, cpu):
        assert images.dtype == torch.uint8 and images.permute(0, 3, 1, 2).shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        erased += int((records[:, :, 3] > 0).sum())
    assert erased >= 3  # p = 0.25 over 24 samples: the comparison covered erased samples


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_finish_erases_the_classic_boxes_with_gpu_noise(photos):
    """On CUDA: the same batches outside the erased boxes; inside them, N(0, 1) noise from the GPU's generator."""
    classic = batches(photos, "classic", workers=0)
    cpu = batches(photos, "cpu", workers=0)
    finish = loaders.cpu_stages(SIZE).finish
    noise = []
    for (_, want), (batch, _) in zip(classic, cpu):
        got = finish(batch, torch.device("cuda")).cpu()
        outside = torch.ones_like(got, dtype=torch.bool)
        for i, rows in enumerate(batch[0][1].tolist()):
            for _, top, left, h, w in (r for r in rows if r[3] > 0):
                outside[i, :, top : top + h, left : left + w] = False
        assert torch.allclose(got[outside], want[outside], atol=1e-5, rtol=0)
        noise.append(got[~outside])
    noise = torch.cat(noise)
    assert noise.numel() > 100 and abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


def test_cpu_loader_records_the_keys_boxes():
    """Each sample's record is (its seed, timm's box for it): RandomErasing seeded the same way erases exactly that
    box, and data.SeededDataset's seed is the one recorded."""
    crop = loaders.cpu_stages(SIZE).transform
    timm_erasing = RandomErasing(0.25, mode="pixel", max_count=1, device="cpu")
    found = 0
    for position in range(40):
        seed = derive_seed(7, 0, 3, position)
        random.seed(seed)
        torch.manual_seed(seed)
        boxes = crop.erasing.boxes(SIZE, SIZE + 8)
        random.seed(seed)
        x = timm_erasing(torch.zeros(3, SIZE, SIZE + 8))
        rows, cols = x.abs().sum(0).nonzero(as_tuple=True)
        if boxes:
            top, left, h, w = boxes[0]
            assert (rows.min(), cols.min(), rows.max() + 1 - top, cols.max() + 1 - left) == (top, left, h, w)
            found += 1
        else:
            assert len(rows) == 0
    assert found >= 5


def test_loader_is_resolved_into_the_config():
    """--loader cpu is the default, classic is kept as an option; another value is one line."""
    from pretrain import main as pretrain_main

    args = pretrain_main.get_args_parser().parse_args(["--teacher", "dinov2_vits14", "--device", "cpu"])
    config = pretrain_main.resolve(args)
    assert config.loader == "cpu"
    assert (
        pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(["--loader", "classic"])).loader == "classic"
    )
    with pytest.raises(UsageError, match="--jpeg-draft decodes the JPEGs of --data-path with --loader cpu, not with"):
        pretrain_main.resolve(pretrain_main.get_args_parser().parse_args(["--loader", "classic", "--jpeg-draft"]))
    with pytest.raises(UsageError, match="--loader gpu: must be cpu, classic"):
        Config(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "loader": "gpu"})


def test_jpeg_draft_crops_the_same_box_from_a_smaller_decode(tmp_path):
    """--jpeg-draft: the recipe's crop box (the same draws), decoded at 1/2..1/8 scale when the box keeps the
    output size there: close to the full decode's crop, and the full decode's crop exactly when it cannot reduce."""
    from PIL import Image

    from common.images import load_rgb

    y, x = np.mgrid[0:360, 0:480]
    smooth = np.stack([x * 255 / 480, y * 255 / 360, 128 + 60 * np.sin(x / 25) * np.cos(y / 30)], -1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth.astype(np.uint8)).save(path, quality=90)
    size = 128  # a 1/2 decode when both sides of the box are >= 256 px: some boxes of a 480 x 360 photo
    crop = loaders.recipe_stages(size, (0.5,) * 3, (0.5,) * 3)[0].transforms[0]
    draft = loaders.DraftRead(crop)
    reduced = exact = 0
    for seed in range(30):
        random.seed(seed)
        _, _, h, w = crop.get_params(Image.new("RGB", (480, 360)), crop.scale, crop.ratio)
        random.seed(seed)
        got = np.asarray(draft(path), dtype=np.float64)
        random.seed(seed)
        want = np.asarray(crop(load_rgb(path)), dtype=np.float64)
        if min(h, w) >= 2 * size:
            reduced += 1
            assert 0 < np.abs(got - want).mean() < 1  # levels of 255 (measured ~0.25): DCT scaling, a shorter resize
        else:
            exact += 1
            assert np.array_equal(got, want)
    assert reduced >= 5 and exact >= 5


def test_recipe_ranges_are_protocol_as_crop_and_erasing():
    """What --loader dali draws its crops and boxes from, read off the recipe's transforms: PROTOCOLS A's
    RandomResizedCrop and RandomErasing ranges."""
    ranges = loaders.recipe_ranges(SIZE)
    assert (ranges.crop_scale, ranges.crop_ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    e = ranges.erasing
    assert (e.probability, e.min_area, e.max_area, e.mode, e.max_count) == (0.25, 0.02, 1 / 3, "pixel", 1)
    assert e.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
