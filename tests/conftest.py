"""Shared test settings and the fixtures several test files use (built on tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models.dinov3 import DinoV3ViT
from tests.helpers import DEPTH, DIM, make_ade, make_cub, make_nyu, make_splits, tiny_spec, tiny_vit


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops are dominated by OpenMP synchronisation on a busy 2-core machine: run them serially."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny student's backbone.pth (64-dim, 4 blocks, 28 px), as pretraining exports it."""
    path = tmp_path_factory.mktemp("backbone") / "backbone.pth"
    torch.save(models.to_dinov2(tiny_vit(dim=DIM, depth=DEPTH, heads=1)), path)
    return path


@pytest.fixture(scope="module")
def dinov3_export(tmp_path_factory) -> Path:
    """A tiny DINOv3-layout student (64-dim heads, 4 blocks) exported in FAIR's names, as pretraining does."""
    torch.manual_seed(0)
    vit = DinoV3ViT(embed_dim=DIM, depth=DEPTH, num_heads=1, mlp_hidden=4 * DIM)
    path = tmp_path_factory.mktemp("dinov3") / "backbone.pth"
    torch.save(models.to_reference(vit, "dinov3"), path)
    return path


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    return make_splits(tmp_path_factory.mktemp("imagenet"), classes=3, train=7, val=3)  # 21 train: kNN k=20 fits


@pytest.fixture(scope="module")
def fine_grained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fg")
    make_cub(root)
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp("ade"))


@pytest.fixture(scope="module")
def nyu(tmp_path_factory) -> Path:
    return make_nyu(tmp_path_factory.mktemp("nyu"))


@pytest.fixture
def tiny_teacher(monkeypatch):
    """Replace a full-size TEACHERS spec by a tiny one of the same family/format."""

    def patch(name, dim=64, depth=2, heads=1, grid=4):
        spec = tiny_spec(name, dim, depth, heads, img_size=grid * models.TEACHERS[name].patch_size)
        monkeypatch.setitem(models.TEACHERS, name, spec)
        return spec

    return patch
