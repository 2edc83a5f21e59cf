"""DINOv3 teachers and DINOv3-layout students (PROTOCOLS G; issue 14, models level).

The reference here is independent of models/ and of timm: `tests.helpers.FairViT` re-states FAIR's
DinoVisionTransformer with FAIR's parameter names, so an official file (`official_sd`) loads into it
with strict=True. Real widths and head dims, small depths; the 7B only on the meta device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import timm
import torch
from timm.models.eva import checkpoint_filter_fn as timm_eva_filter
from torch import nn

import models
from models import TEACHERS, default_dtype
from models.dinov3 import DinoV3ViT
from models.errors import UsageError
from tests.helpers import (
    fair,
    make_image_folder,
    official_sd,
    official_weights_,
    one_teacher_distiller,
    rel_err,
    swiglu_width,
)


# --- teachers ----------------------------------------------------------------------------------
@pytest.fixture
def shallow(monkeypatch):
    """A DINOv3 teacher spec at its real width, heads and FFN, with fewer blocks."""

    def patch(name: str, depth: int = 4):
        spec = TEACHERS[name]
        spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, depth=depth))
        monkeypatch.setitem(TEACHERS, name, spec)
        kw, config = spec.vit_kwargs, spec.config
        align = config.swiglu_align
        hidden = swiglu_width(config.embed_dim, config.ffn_ratio, align) if align else 4 * config.embed_dim
        return dict(
            dim=config.embed_dim,
            depth=depth,
            heads=config.num_heads,
            hidden=hidden,
            swiglu=bool(align),
            qkv_bias=kw.get("qkv_bias", True),
            local_cls_norm=kw.get("local_cls_norm", False),
        )

    return patch


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus", "dinov3_vitl16_sat"])
def test_teacher_equals_fair_code_at_two_sizes(shallow, tmp_path, name):
    arch = shallow(name)
    sd = official_sd(**arch)
    torch.save(sd, tmp_path / "official.pth")
    frozen = models.create_teacher(name, tmp_path / "official.pth")
    ref = fair(sd, **arch)
    assert frozen.family == "dinov3" and not frozen.training and frozen.dtype == torch.float32
    assert all(not p.requires_grad for p in frozen.parameters())
    assert frozen.patch_size == 16 and frozen.embed_dim == arch["dim"]
    sat = name.endswith("_sat")
    assert frozen.mean == ((0.430, 0.411, 0.296) if sat else (0.485, 0.456, 0.406))
    assert frozen.std == ((0.213, 0.156, 0.143) if sat else (0.229, 0.224, 0.225))
    teacher = frozen.backbone
    assert torch.equal(teacher.rope.periods, sd["rope_embed.periods"])  # the file's, not the formula's
    for h, w in ((224, 224), (192, 320)):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ours, theirs = teacher.forward_features(x), ref.forward_features(x)
            layers = teacher.get_intermediate_layers(x, n=4, return_class_token=True, norm=True)
            ref_layers = ref.get_intermediate_layers(x, n=4)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            assert rel_err(ours[key], theirs[key]) < 1e-4, (key, h, w)
        assert ours["x_norm_patchtokens"].shape == (2, h * w // 256, arch["dim"])
        assert len(layers) == 4
        for (p, c), (rp, rc) in zip(layers, ref_layers):
            assert rel_err(p, rp) < 1e-4 and rel_err(c, rc) < 1e-4


def test_teacher_keeps_every_key_of_the_file(shallow, tmp_path):
    """Everything timm's converter drops is still ours: periods, mask token, local_cls_norm; bias_mask is checked."""
    arch = shallow("dinov3_vitl16_sat", depth=1)
    sd = official_sd(**arch)
    torch.save(sd, tmp_path / "f.pth")
    teacher = models.create_teacher("dinov3_vitl16_sat", tmp_path / "f.pth")
    back = models.to_reference(teacher.backbone, "dinov3")
    assert set(back) == set(sd)
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):  # the k third is masked to zero in FAIR's forward: exported as 0
            d = arch["dim"]
            assert torch.equal(back[k][:d], v[:d]) and torch.equal(back[k][2 * d :], v[2 * d :])
            assert torch.count_nonzero(back[k][d : 2 * d]) == 0
        else:
            assert torch.equal(back[k], v), k


@pytest.fixture
def small_file(shallow, tmp_path):
    arch = shallow("dinov3_vits16", depth=2)

    def write(sd, fname="f.pth"):
        torch.save(sd, tmp_path / fname)
        return tmp_path / fname

    return official_sd(**arch), write


def _one_line_error(path, match):
    with pytest.raises(UsageError, match=match) as e:
        models.create_teacher("dinov3_vits16", path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key", ["rope_embed.periods", "blocks.1.attn.qkv.bias_mask", "mask_token", "storage_tokens", "blocks.0.ls2.gamma"]
)
def test_teacher_missing_key_is_named(small_file, key):
    sd, write = small_file
    del sd[key]
    _one_line_error(write(sd), rf"missing keys: .*{re.escape(key)}")


def test_teacher_unexpected_and_misshaped_keys_are_named(small_file, shallow):
    sd, write = small_file
    sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = torch.ones(384), torch.zeros(384)
    _one_line_error(write(sd), r"unexpected keys: local_cls_norm\.bias, local_cls_norm\.weight")
    other = official_sd(768, 2, 12, 3072)  # a ViT-B/16 file for the ViT-S/16 teacher
    _one_line_error(write(other), r"shape mismatch.*blocks\.0\.attn\.qkv\.weight \(2304, 768\) vs \(1152, 384\)")


def test_teacher_wrong_family_or_random_file(small_file):
    sd, write = small_file
    dinov2 = {
        "cls_token": torch.zeros(1, 1, 384),
        "pos_embed": torch.zeros(1, 197, 384),
        "mask_token": torch.zeros(1, 384),
    }
    _one_line_error(write(dinov2), r"not an official DINOv3 checkpoint .*DINOv2-style ViT")
    _one_line_error(
        write({"foo": torch.zeros(3), "bar": torch.ones(2)}), r"not an official DINOv3 checkpoint .*bar, foo"
    )
    _one_line_error(write([torch.zeros(1)]), r"holds a list, not a state dict")


def test_teacher_bias_mask_must_mask_k(small_file):
    sd, write = small_file
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 384)  # FAIR would then add the k bias
    _one_line_error(write(sd), r"blocks\.1\.attn\.qkv\.bias_mask is not DINOv3's masked-k pattern")
    sd["blocks.1.attn.qkv.bias_mask"] = torch.full((3 * 384,), math.nan)  # never initialised
    _one_line_error(write(sd), r"bias_mask is not DINOv3's masked-k pattern")


def test_teacher_names_and_urls():
    names = [n for n in TEACHERS if n.startswith("dinov3_")]
    assert names == [
        "dinov3_vits16",
        "dinov3_vits16plus",
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_vitl16plus",
        "dinov3_vith16plus",
        "dinov3_vit7b16",
        "dinov3_vitl16_sat",
        "dinov3_vit7b16_sat",
    ]
    base = "https://dl.fbaipublicfiles.com/dinov3/"
    assert (
        TEACHERS["dinov3_vits16plus"].url == base + "dinov3_vits16plus/dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"
    )
    assert TEACHERS["dinov3_vitl16_sat"].url == base + "dinov3_vitl16/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    assert TEACHERS["dinov3_vit7b16_sat"].url == base + "dinov3_vit7b16/dinov3_vit7b16_pretrain_sat493m-a6675841.pth"
    with torch.device("meta"):
        for name, dim, hidden in (("dinov3_vits16plus", 384, 1536), ("dinov3_vith16plus", 1280, 5120)):
            m = TEACHERS[name].build()
            assert m.blocks[0].mlp.fc1_g.weight.shape == (hidden, dim) == m.blocks[0].mlp.fc1_x.weight.shape


def test_7b_teacher_on_the_meta_device():
    with torch.device("meta"):
        m = TEACHERS["dinov3_vit7b16"].build()
    params = list(m.parameters())
    assert all(p.is_meta for p in params)
    assert sum(b.numel() for b in m.buffers() if not b.is_meta) <= 32  # at most the RoPE periods (timm 1.0.21)
    assert 6.6e9 < sum(p.numel() for p in params) < 6.8e9  # 6,716,043,264
    assert len(m.blocks) == 40 and m.embed_dim == 4096 and m.blocks[0].attn.num_heads == 32
    assert m.rope.periods.shape == (32,)  # head dim 128
    blk = m.blocks[0]
    assert blk.mlp.fc1_g.weight.shape == (8192, 4096) and blk.mlp.fc2.weight.shape == (4096, 8192)
    assert blk.attn.q_bias is None and m.local_cls_norm is not None
    official = models.dinov3.to_official(m.state_dict())  # FAIR's names (to_reference would copy to the CPU)
    assert "blocks.0.attn.qkv.bias" not in official and "blocks.0.attn.qkv.bias_mask" not in official
    assert {"local_cls_norm.weight", "blocks.39.mlp.w3.weight", "rope_embed.periods"} <= set(official)
    assert default_dtype("dinov3_vit7b16") == torch.bfloat16 == default_dtype("dinov3_vit7b16_sat")
    assert default_dtype("dinov3_vits16") == torch.float32 == default_dtype("dinov3_vith16plus")
    assert default_dtype("dinov2_vitg14") == torch.float32  # 1.1B: fp32, as the reference ran it


def test_bf16_teacher(shallow, tmp_path, monkeypatch):
    arch = shallow("dinov3_vits16plus", depth=2)
    sd = official_sd(**arch)
    torch.save(sd, tmp_path / "f.pth")
    fp32 = models.create_teacher("dinov3_vits16plus", tmp_path / "f.pth")
    monkeypatch.setattr(models.teachers, "BF16_ABOVE", 1e6)  # as the 7B: bf16 by default
    bf16 = models.create_teacher("dinov3_vits16plus", tmp_path / "f.pth")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert models.create_teacher("dinov3_vits16plus", tmp_path / "f.pth", dtype=torch.float32).dtype == torch.float32
    fp32, bf16 = fp32.backbone, bf16.backbone
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(not p.requires_grad for p in bf16.parameters()) and not bf16.training
    assert bf16.rope.periods.dtype == torch.float32 and torch.equal(bf16.rope.periods, sd["rope_embed.periods"])
    x = torch.randn(2, 3, 224, 224)  # float32 crops
    with torch.no_grad():
        a, b = fp32.forward_features(x), bf16.forward_features(x)
    assert b["x_norm_patchtokens"].dtype == torch.bfloat16
    assert rel_err(b["x_norm_clstoken"], a["x_norm_clstoken"]) < 3e-2
    assert rel_err(b["x_norm_patchtokens"], a["x_norm_patchtokens"]) < 3e-2
    cast = fp32.to(torch.bfloat16)  # casting keeps the file's periods in float32 (timm would recompute them)
    assert cast.rope.periods.dtype == torch.float32 and torch.equal(cast.rope.periods, sd["rope_embed.periods"])
    assert "rope.periods" in cast.state_dict()
    spec = TEACHERS["dinov2_vits14"]
    monkeypatch.setitem(
        TEACHERS, "dinov2_vits14", dataclasses.replace(spec, config=dataclasses.replace(spec.config, depth=1))
    )
    dinov2 = models.create_teacher("dinov2_vits14", pretrained=False).backbone  # the DINOv2 ViT takes float32 crops too
    assert dinov2.cls_token.dtype == torch.bfloat16
    with torch.no_grad():
        assert dinov2.forward_features(torch.randn(1, 3, 56, 56))["x_norm_clstoken"].dtype == torch.bfloat16


# --- students ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dim,depth,heads", [("vit_tiny", 192, 12, 3), ("vit_large", 1024, 24, 16)])
def test_student_architecture(name, dim, depth, heads):
    with torch.device("meta"):
        m = models.create_student(name, layout="dinov3")
        n = models.create_student(name + "_dinov3")
    assert type(m) is type(n) is DinoV3ViT
    assert m.embed_dim == dim and len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.patch_embed.proj.kernel_size == (16, 16) and m.patch_embed.proj.bias is not None
    assert m.reg_token.shape == (1, 4, dim) and m.mask_token.shape == (1, dim) and m.pos_embed is None
    assert m.rope.periods.shape == (16,) and m.local_cls_norm is None
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(norms) == 1 + 2 * depth and all(x.eps == 1e-5 for x in norms)
    blk = m.blocks[0]
    assert blk.mlp.fc1.weight.shape == (4 * dim, dim) and isinstance(blk.mlp.act, nn.GELU)
    assert blk.attn.q_bias is not None and blk.attn.k_bias is not None  # k bias: a zero buffer


def test_student_names_and_errors():
    with pytest.raises(UsageError, match="'vit_small_dinov3' is in the dinov3 layout, not clip"):
        models.create_student("vit_small_dinov3", layout="clip")
    with pytest.raises(UsageError, match=r"unknown student 'vit_huge_dinov3'.*vit_large_dinov3"):
        models.create_student("vit_huge_dinov3")
    m = models.create_student("vit_small_dinov3", drop_path_rate=0.1)
    assert isinstance(m, DinoV3ViT) and m.embed_dim == 384


def test_student_init_is_fairs():
    torch.manual_seed(0)
    m = models.create_student("vit_small_dinov3")
    assert 0.012 < m.cls_token.std().item() < 0.03 and 0.015 < m.reg_token.std().item() < 0.025
    assert torch.count_nonzero(m.mask_token) == 0
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert len(linears) == 12 * 4
    for lin in linears:  # trunc-normal 0.02 everywhere (no depth rescaling of proj / fc2, unlike timm's Eva)
        assert 0.019 < lin.weight.std().item() < 0.021 and (lin.bias is None or torch.count_nonzero(lin.bias) == 0)
    for blk in m.blocks:
        assert torch.count_nonzero(blk.attn.q_bias) == 0 == torch.count_nonzero(blk.attn.v_bias)
        assert torch.all(blk.gamma_1 == 1e-5) and torch.all(blk.gamma_2 == 1e-5)
    bound = (3 * 16 * 16) ** -0.5
    w = m.patch_embed.proj.weight
    assert w.abs().max().item() <= bound and abs(w.std().item() - bound / 3**0.5) < 0.03 * bound
    assert m.patch_embed.proj.bias.abs().max().item() <= bound and m.patch_embed.proj.bias.std() > 0.3 * bound
    torch.testing.assert_close(m.rope.periods, 100.0 ** (torch.arange(16) / 16), rtol=0, atol=0)


def test_student_rope_rescale_only_in_training():
    torch.manual_seed(0)
    m = official_weights_(models.create_student("vit_tiny_dinov3"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        m.train()
        c, d = m(x), m(x)
    assert torch.equal(a, b)  # eval: no coordinate augmentation
    assert not torch.allclose(c, d)  # training: FAIR's rescale_coords 2


def test_student_rope_is_drawn_per_block_as_fairs(monkeypatch):
    """FAIR's block loop recomputes the RoPE before every block, so in training each block rescales its
    coordinates by its own draw: from one seed, our student gives the tokens of FAIR's code (tests.helpers.
    FairViT), forward_features and get_intermediate_layers alike, and leaves the generator where FAIR's does."""
    torch.manual_seed(0)
    m = official_weights_(models.create_student("vit_tiny_dinov3")).train()
    ref = fair(models.to_reference(m, "dinov3"), 192, 12, 3, 768, rescale_coords=2.0).train()
    computed = []
    sincos = m.rope._get_pos_embed_from_coords
    monkeypatch.setattr(m.rope, "_get_pos_embed_from_coords", lambda coords: computed.append(1) or sincos(coords))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        ours, ours_next = m.forward_features(x), torch.rand(4)
        assert len(computed) == 12  # one RoPE per block
        layers = m.get_intermediate_layers(x, n=2, return_class_token=True)
        ours_last = torch.rand(4)
        torch.manual_seed(1)
        theirs, theirs_next = ref.forward_features(x), torch.rand(4)
        ref_layers = ref.get_intermediate_layers(x, n=2)
        theirs_last = torch.rand(4)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        assert rel_err(ours[key], theirs[key]) < 1e-5, key
    for (p, c), (rp, rc) in zip(layers, ref_layers):
        assert rel_err(p, rp) < 1e-5 and rel_err(c, rc) < 1e-5
    assert torch.equal(ours_next, theirs_next) and torch.equal(ours_last, theirs_last)  # the same draws, no others
    with torch.no_grad():
        torch.manual_seed(1)
        eval_tokens = m.eval().forward_features(x)["x_norm_patchtokens"]
    assert rel_err(eval_tokens, ours["x_norm_patchtokens"]) > 1e-2  # the draws matter


def test_drop_path_ramps_downstream_and_is_fairs_uniform_rate_in_pretraining(tmp_path):
    """One dense config regularises every layout alike: a DINOv3 backbone built for fine-tuning (an official
    file, or a student) has the linear ramp 0 -> rate of our other ViTs. A DINOv3-layout student built for
    pretraining keeps FAIR's pretraining setting, the rate in every block (DinoVisionTransformer's blocks all
    take drop_path_rate)."""

    def rates(model: nn.Module) -> list[float]:
        return [getattr(getattr(blk, f"drop_path{i}"), "drop_prob", 0.0) for blk in model.blocks for i in (1, 2)]

    def twice(values: list[float]) -> list[float]:
        return [v for v in values for _ in range(2)]

    torch.save(official_sd(dim=64, depth=4, heads=1, hidden=128), tmp_path / "official.pth")
    loaded = models.load_backbone(tmp_path / "official.pth", drop_path_rate=0.1)
    assert rates(loaded) == pytest.approx(twice(torch.linspace(0, 0.1, 4).tolist()))
    with torch.device("meta"):
        dense = models.create_student("vit_small_dinov3", drop_path_rate=0.1)
        dinov2 = models.create_student("vit_small", drop_path_rate=0.1)
        pretraining = models.create_student("vit_small_dinov3", drop_path_rate=0.1, pretraining=True)
        dinov2_pretraining = models.create_student("vit_small", drop_path_rate=0.1, pretraining=True)
    ramp = twice(torch.linspace(0, 0.1, 12).tolist())
    assert rates(dense) == pytest.approx(ramp) and rates(dinov2) == rates(dinov2_pretraining) == rates(dense)
    assert rates(pretraining) == [0.1] * 24


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return official_weights_(models.create_student("vit_small_dinov3")).eval()


def test_export_loads_into_fair_and_timm(student):
    export = models.to_reference(student, "dinov3")
    ref = fair(export, 384, 12, 6, 1536)  # strict=True into FAIR's layout at ViT-S/16's arguments
    tm = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(timm_eva_filter(export, tm), strict=True)
    x = torch.randn(2, 3, 224, 224)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2, 196, generator=g) < 0.5
    with torch.no_grad():
        ours, theirs, t = student.forward_features(x), ref.forward_features(x), tm.forward_features(x)
        masked, ref_masked = student.forward_features(x, masks=masks), ref.forward_features(x, masks=masks)
        layers = student.get_intermediate_layers(x, n=4, return_class_token=True)
        ref_layers = ref.get_intermediate_layers(x, n=4)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        assert rel_err(ours[key], theirs[key]) < 1e-4, key
        assert rel_err(masked[key], ref_masked[key]) < 1e-4, key
    assert rel_err(masked["x_norm_patchtokens"], ours["x_norm_patchtokens"]) > 1e-2  # the mask token matters
    assert rel_err(t[:, 0], ours["x_norm_clstoken"]) < 1e-4 and rel_err(t[:, 5:], ours["x_norm_patchtokens"]) < 1e-4
    for (p, c), (rp, rc) in zip(layers, ref_layers):
        assert rel_err(p, rp) < 1e-4 and rel_err(c, rc) < 1e-4


def test_get_intermediate_layers_api(student):
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = student.forward_features(x)
        ((p, c, e),) = student.get_intermediate_layers(
            x, n=[11], reshape=True, return_class_token=True, return_extra_tokens=True
        )
        raw = student.get_intermediate_layers(x, n=1, norm=False)[0]
    assert p.shape == (1, 384, 6, 8)
    torch.testing.assert_close(p.flatten(2).transpose(1, 2), out["x_norm_patchtokens"])
    torch.testing.assert_close(c, out["x_norm_clstoken"])
    torch.testing.assert_close(e, out["x_storage_tokens"])
    torch.testing.assert_close(raw, out["x_prenorm"][:, 5:])
    with pytest.raises(UsageError, match="out of range"):
        student.get_intermediate_layers(x, n=[12])
    with pytest.raises(UsageError, match="not a multiple of the patch size 16"):
        student.forward_features(torch.randn(1, 3, 56, 64))


def test_load_backbone_reads_exports_checkpoints_and_official_files(student, tmp_path):
    x = torch.randn(1, 3, 160, 128)
    with torch.no_grad():
        expected = student.forward_features(x)["x_norm_patchtokens"]
    files = {
        "backbone.pth": models.to_reference(student, "dinov3"),
        "checkpoint.pth": {"student": student.state_dict(), "args": {}},
        "dinov3_train.pth": {
            "teacher": {f"backbone.{k}": v for k, v in models.to_reference(student, "dinov3").items()}
        },
    }
    for fname, obj in files.items():
        torch.save(obj, tmp_path / fname)
        loaded = models.load_backbone(tmp_path / fname).eval()
        assert isinstance(loaded, DinoV3ViT) and loaded.patch_size == 16 and loaded.blocks[0].attn.num_heads == 6
        with torch.no_grad():
            assert rel_err(loaded.forward_features(x)["x_norm_patchtokens"], expected) < 1e-6, fname
    # an official file of another family member: S+ (SwiGLU) with local_cls_norm, and 128-dim heads without q/v bias
    for arch in (
        dict(dim=384, depth=2, heads=6, hidden=1536, swiglu=True, local_cls_norm=True),
        dict(dim=256, depth=1, heads=2, hidden=512, swiglu=True, qkv_bias=False),
    ):
        sd = official_sd(**arch)
        torch.save(sd, tmp_path / "official.pth")
        loaded = models.load_backbone(tmp_path / "official.pth", drop_path_rate=0.1).eval()
        assert loaded.blocks[0].attn.num_heads == arch["heads"]
        last = 0.1 if arch["depth"] > 1 else 0.0  # the ramp's end; linspace(0, 0.1, 1) is [0.0]
        assert getattr(loaded.blocks[-1].drop_path1, "drop_prob", 0.0) == pytest.approx(last)
        with torch.no_grad():
            ours = loaded.forward_features(x)["x_norm_patchtokens"]
        assert rel_err(ours, fair(sd, **arch).forward_features(x)["x_norm_patchtokens"]) < 1e-4
    del sd["blocks.0.norm1.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(UsageError, match=r"missing keys: blocks\.0\.norm1\.bias"):
        models.load_backbone(tmp_path / "broken.pth")


def test_distiller_trains_a_dinov3_student_from_a_dinov3_teacher(shallow, tmp_path):
    arch = shallow("dinov3_vits16", depth=1)
    torch.save(official_sd(**arch), tmp_path / "f.pth")
    teacher = models.create_teacher("dinov3_vits16", tmp_path / "f.pth")
    torch.manual_seed(0)
    student = models.create_student("vit_tiny_dinov3").train()
    distiller = one_teacher_distiller(student, teacher.embed_dim)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, :8] = True
    losses = distiller(images, masks, {"teacher": teacher.targets(images)})
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and all(v > 0 for v in losses.values())
    assert student.mask_token.grad is not None and torch.count_nonzero(student.mask_token.grad) > 0
    assert student.blocks[0].attn.k_bias.requires_grad is False  # the masked k bias never trains


def test_pretraining_from_an_official_dinov3_file_resumes_and_exports(shallow, tmp_path, capsys):
    """pretrain.main: an official-format DINOv3 S/16 file (one block) into vit_tiny in the DINOv3 layout (the
    teacher's family): resumes, exports a backbone.pth that load_backbone reads back, and trains with the teacher
    at a larger --teacher-input-size (its 3x3 patch map resampled to the student's 2x2 grid)."""
    from pretrain import main as pretrain_main

    arch = shallow("dinov3_vits16", depth=1)
    torch.save(official_sd(**arch), tmp_path / "dinov3_vits16.pth")
    data = make_image_folder(tmp_path / "data")
    base = [
        *("--data-path", str(data), "--teacher", "dinov3_vits16", "--teacher-checkpoint"),
        *(str(tmp_path / "dinov3_vits16.pth"), "--student", "vit_tiny", "--input-size", "32", "--batch-size", "4"),
        *("--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--epoch-length", "2", "--pca-every", "0"),
    ]
    out = tmp_path / "run"
    assert pretrain_main.main([*base, "--output-dir", str(out), "--epochs", "1"]) == 0
    assert pretrain_main.main([*base, "--output-dir", str(out), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "dinov3 layout" in printed and "resampled" not in printed
    lines = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in lines] == [0, 1, 2, 3] and all(e["loss_patch"] > 0 for e in lines)
    ckpt = models.safe_load(out / "checkpoint.pth")
    exported = torch.load(out / "backbone.pth", weights_only=True)
    assert {"storage_tokens", "rope_embed.periods", "blocks.11.attn.qkv.bias_mask"} <= set(exported)
    student = models.load_backbone(out / "backbone.pth")
    assert isinstance(student, DinoV3ViT) and student.embed_dim == 192 and student.patch_size == 16
    assert torch.equal(student.state_dict()["blocks.0.attn.qkv.weight"], ckpt["student"]["blocks.0.attn.qkv.weight"])

    larger = tmp_path / "larger"
    assert pretrain_main.main([*base, "--output-dir", str(larger), "--epochs", "1", "--teacher-input-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "the teacher's 3x3 patch tokens (dinov3_vits16 at 48 px) are resampled to the student's 2x2 grid" in printed
    lines = [json.loads(line) for line in (larger / "iterations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(e["loss"]) for e in lines)
