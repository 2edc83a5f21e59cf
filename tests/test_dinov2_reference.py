"""Numerics against FAIR's own DINOv2 model code (the `dinov2` package installed by `make setup`).

Same weights, same fp32 input on CPU: our x_norm_clstoken / x_norm_patchtokens / intermediate
layers must match the official implementation to < 1e-4 relative error, at the native 518 grid and
at 224 (where the official pos-embed interpolation, offset 0.1 without antialias, is exercised).
"""

from __future__ import annotations

import dinov2.models.vision_transformer as vit_mod  # installed by `make setup`
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models
from models.errors import UsageError
from tests.helpers import TINY_RUN, make_image_folder, rel_err


@pytest.fixture(scope="module")
def official_and_ours(tmp_path_factory):
    torch.manual_seed(0)
    official = vit_mod.DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=128, depth=3, num_heads=2, init_values=1.0, block_chunks=0
    ).eval()
    with torch.no_grad():  # random, non-trivial weights everywhere (LayerScale, norms, mask token)
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("w") / "dinov2_official_layout.pth"
    torch.save(official.state_dict(), path)
    return official, models.load_backbone(path).eval()


@pytest.mark.parametrize("size", [(518, 518), (224, 224), (224, 308)])
def test_forward_features_match_official(official_and_ours, size):
    official, ours = official_and_ours
    x = torch.randn(2, 3, *size)
    g = torch.Generator().manual_seed(1)
    n = (size[0] // 14) * (size[1] // 14)
    masks = torch.rand(2, n, generator=g) < 0.5
    with torch.no_grad():
        for m in (None, masks):
            want = official.forward_features(x, masks=m)
            got = ours.forward_features(x, masks=m)
            for key in ("x_norm_clstoken", "x_norm_patchtokens"):
                assert rel_err(got[key], want[key]) < 1e-4, (size, key)


def test_intermediate_layers_match_official(official_and_ours):
    official, ours = official_and_ours
    x = torch.randn(1, 3, 224, 266)
    with torch.no_grad():
        want = official.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)
        got = ours.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, norm=True)
    for (gp, gc), (wp, wc) in zip(got, want):
        assert gp.shape == wp.shape and rel_err(gp, wp) < 1e-4 and rel_err(gc, wc) < 1e-4


def test_export_loads_strictly_into_official_model(official_and_ours):
    _, ours = official_and_ours
    fresh = vit_mod.DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=128, depth=3, num_heads=2, init_values=1.0, block_chunks=0
    )
    fresh.load_state_dict(models.to_dinov2(ours), strict=True)
    student = models.create_student("vit_tiny")
    official_tiny = vit_mod.DinoVisionTransformer(
        img_size=224, patch_size=14, embed_dim=192, depth=12, num_heads=3, init_values=1.0, block_chunks=0
    )
    official_tiny.load_state_dict(models.to_dinov2(student), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (
            rel_err(
                student.forward_features(x)["x_norm_clstoken"], official_tiny.forward_features(x)["x_norm_clstoken"]
            )
            < 1e-4
        )


def test_chunked_official_layout_loads(tmp_path, official_and_ours):
    official, ours = official_and_ours
    chunked = vit_mod.DinoVisionTransformer(
        img_size=518, patch_size=14, embed_dim=128, depth=3, num_heads=2, init_values=1.0, block_chunks=1
    )
    sd = {
        k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v
        for k, v in official.state_dict().items()
    }
    chunked.load_state_dict(sd, strict=True)  # the official chunked layout: blocks.0.<i>.
    torch.save(chunked.state_dict(), tmp_path / "chunked.pth")
    again = models.load_backbone(tmp_path / "chunked.pth")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_export_of_a_non_224_run_loads_strictly_at_its_recorded_img_size(tmp_path, capsys):
    """A student trained at --input-size 56 has a 4x4 position table: backbone.pth records img_size 56,
    and the official model built with it (not with 224) takes the file strictly and gives our outputs."""
    from pretrain import main as pretrain_main

    data, out = make_image_folder(tmp_path / "data"), tmp_path / "run"
    argv = ["--data-path", str(data), "--output-dir", str(out), *TINY_RUN, "--input-size", "56"]
    assert pretrain_main.main([*argv, "--epochs", "1", "--epoch-length", "1", "--pca-every", "0"]) == 0
    assert "trained at img_size 56" in capsys.readouterr().out
    exported = torch.load(out / "backbone.pth", weights_only=True)
    imagenet = models.checkpoints.Normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert models.export_metadata(exported) == {"img_size": 56, "patch_size": 14, "normalization": imagenet}
    assert exported["pos_embed"].shape == (1, 17, 192)

    def official(img_size):
        return vit_mod.DinoVisionTransformer(
            img_size=img_size, patch_size=14, embed_dim=192, depth=12, num_heads=3, init_values=1.0, block_chunks=0
        ).eval()

    with pytest.raises(RuntimeError, match="pos_embed"):
        official(224).load_state_dict(exported, strict=True)
    fair = official(models.export_metadata(exported)["img_size"])
    fair.load_state_dict(exported, strict=True)
    ours = models.load_backbone(out / "backbone.pth").eval()
    assert ours.patch_embed.img_size == (56, 56)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        got, want = ours.forward_features(x), fair.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert rel_err(got[key], want[key]) < 1e-4, key


def test_load_backbone_checks_the_recorded_resolution(tmp_path):
    vit = models.ViT(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=1)
    exported = models.to_dinov2(vit)
    imagenet = models.checkpoints.Normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert models.export_metadata(exported) == {"img_size": 28, "patch_size": 14, "normalization": imagenet}
    assert models.export_metadata(vit.state_dict()) == {}  # a file without our record: img_size from pos_embed
    assert models.export_metadata(type("Odd", (dict,), {"_metadata": {"proteus": 5}})()) == {}
    for record, message in (
        ({"img_size": 28, "patch_size": 16}, "records patch size 16"),
        ({"img_size": 56, "patch_size": 14}, "pos_embed"),
    ):
        exported._metadata[models.checkpoints.EXPORT_METADATA] = record
        torch.save(exported, tmp_path / "b.pth")
        with pytest.raises(UsageError, match=message):
            models.load_backbone(tmp_path / "b.pth")
