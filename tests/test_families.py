"""The family contract, for every family of the registry (models.families.FAMILIES): its teachers build, its
release file loads strictly and converts back to the same file, another family's file is refused in one line,
detection is exclusive, and a tiny distillation from it trains, exports and every evaluation loads the export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from common.features import frozen_backbone
from models.errors import UsageError
from models.families import FAMILIES, LAYOUTS, family_of, student_layout
from pretrain import main as pretrain_main
from tests.helpers import make_image_folder, randomize_, tiny_spec

TINY_VIT = dict(depth=1, embed_dim=64, num_heads=1)
# timm teachers of each kind the contract must hold for, at a tiny size
TIMM = {
    "timm:vit_base_patch16_siglip_224": TINY_VIT,  # no CLS token, a MAP head (SigLIP's image tower)
    "timm:vit_small_patch14_reg4_dinov2": TINY_VIT,  # CLS and 4 register tokens
    "timm:convnext_atto": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),  # a CNN: its last map is the grid
}
# released teachers built from a timm model (the siglip2 family's), at a tiny size through their family's spec()
TIMM_RELEASED = {"siglip2_vitb16": TINY_VIT}
# the teachers each family is tested with: a released family's first (the others differ in size only)
EXAMPLES = {name: [next(iter(f.teachers))] for name, f in FAMILIES.items() if f.teachers} | {"timm": list(TIMM)}
assert EXAMPLES["siglip2"] == ["siglip2_vitb16"]
CASES = [(family, name) for family, names in EXAMPLES.items() for name in names]


def test_every_family_has_examples():
    assert set(EXAMPLES) == set(FAMILIES)  # a new family adds its examples here


def tiny_teacher(monkeypatch, name: str, seed: int = 0):
    """Teacher `name` at a tiny size (patched into TEACHERS) and a random network of it."""
    if name in TIMM:
        spec = FAMILIES["timm"].spec(name.removeprefix("timm:"), **TIMM[name])
    elif name in TIMM_RELEASED:
        spec = FAMILIES[models.TEACHERS[name].family].spec(name, **TIMM_RELEASED[name])
    else:
        spec = tiny_spec(name, dim=64, depth=2, heads=1, img_size=2 * models.TEACHERS[name].patch_size)
    monkeypatch.setitem(models.TEACHERS, name, spec)
    torch.manual_seed(seed)
    return name, spec, randomize_(spec.build(), seed).eval()


def test_every_released_teacher_is_its_familys():
    for name, spec in models.TEACHERS.items():
        assert FAMILIES[spec.family].teachers[name] is spec
        assert models.teacher_spec(name) is spec
    with pytest.raises(UsageError, match="unknown teacher 'dinov9'; choose from dinov2_vits14, "):
        models.teacher_spec("dinov9")
    with pytest.raises(UsageError, match="unknown timm model 'vit_nonesuch'"):
        models.teacher_spec("timm:vit_nonesuch")


@pytest.mark.parametrize("family, name", CASES)
def test_a_release_file_loads_strictly_and_converts_back(family, name, monkeypatch, tmp_path):
    name, spec, model = tiny_teacher(monkeypatch, name)
    fam = FAMILIES[family]
    path = tmp_path / "release.pth"
    torch.save(fam.release_file(model), path)
    teacher = models.create_teacher(name, path)
    x = torch.randn(2, 3, 2 * spec.patch_size, 2 * spec.patch_size)
    want, got = model.forward_tokens(x), teacher.backbone.forward_tokens(x)
    torch.testing.assert_close(got.cls, want.cls, rtol=0, atol=0)
    torch.testing.assert_close(got.patches, want.patches, rtol=0, atol=0)
    assert got.grid == (2, 2)
    official, again = fam.to_official(model), fam.to_official(teacher.backbone)
    assert list(official) == list(again)
    assert all(torch.equal(official[k], again[k]) for k in official)
    assert teacher.family == family and (teacher.mean, teacher.std) == (tuple(spec.mean), tuple(spec.std))


@pytest.mark.parametrize("family, name", CASES)
def test_the_backbone_contract(family, name, monkeypatch):
    """forward_tokens and the dense tasks' maps agree: the last map, normed, is the patch tokens on their grid."""
    _, spec, model = tiny_teacher(monkeypatch, name)
    x = torch.randn(2, 3, 2 * spec.patch_size, 3 * spec.patch_size)
    tokens = model.forward_tokens(x)
    assert tokens.grid == (2, 3) and tokens.cls.shape == (2, model.embed_dim) and model.patch_size == spec.patch_size
    (last,) = model.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    assert last.shape == (2, model.embed_dim, 2, 3)
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), tokens.patches)


@pytest.mark.parametrize("family, name", CASES)
def test_detection_is_exclusive(family, name, monkeypatch):
    _, _, model = tiny_teacher(monkeypatch, name)
    for sd in (model.state_dict(), FAMILIES[family].to_official(model)):
        owners = [f.name for f in FAMILIES.values() if f.detects and f.owns(sd)]
        if FAMILIES[family].detects:
            assert owners == [family] and family_of(sd) is FAMILIES[family]
        else:  # recognised by the name the user gives only
            assert family not in owners and len(owners) <= 1


@pytest.mark.parametrize("family, name", CASES)
def test_another_familys_file_is_refused_in_one_line(family, name, monkeypatch, tmp_path):
    other = next(f for f in EXAMPLES if f != family)
    _, _, model = tiny_teacher(monkeypatch, EXAMPLES[other][0])
    name, _, _ = tiny_teacher(monkeypatch, name)
    path = tmp_path / "other.pth"
    torch.save(FAMILIES[other].release_file(model), path)
    with pytest.raises(UsageError) as e:
        models.create_teacher(name, path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("family, name", CASES)
def test_a_tiny_distillation_from_it_trains_exports_and_loads_downstream(family, name, monkeypatch, tmp_path):
    name, spec, model = tiny_teacher(monkeypatch, name)
    path = tmp_path / "teacher.pth"
    torch.save(FAMILIES[family].release_file(model), path)
    layout = student_layout(name)
    student_patch = LAYOUTS[layout].patch_size
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2, size=(40, 40))
    out = tmp_path / "run"
    argv = ["--teacher", name, "--teacher-checkpoint", str(path), "--student", "vit_tiny", "--data-path", str(data),
            "--output-dir", str(out), "--input-size", str(2 * student_patch), "--teacher-input-size",
            str(2 * spec.patch_size), "--batch-size", "2", "--epochs", "1", "--epoch-length", "1", "--num-workers",
            "0", "--pca-every", "0", "--device", "cpu"]  # fmt: skip
    assert pretrain_main.main(argv) == 0
    backbone = frozen_backbone(str(out / "backbone.pth"), torch.device("cpu"), 2 * student_patch)
    assert models.layout_of(backbone.state_dict()) == layout
    tokens = backbone.forward_tokens(torch.zeros(1, 3, 2 * student_patch, 2 * student_patch))
    assert tokens.grid == (2, 2) and tokens.cls.shape == (1, 192)
    adaptors = models.load_adaptors(out / "adaptors.pth")
    assert adaptors.teachers[name]["family"] == family
    assert dataclasses.asdict(adaptors.adaptors[name].target)["dim"] == spec.embed_dim
    mmseg_ext = pytest.importorskip("segmentation.mmseg_ext", reason="mmsegmentation not installed: `make mmseg`")
    dense = mmseg_ext.ProteusViT(checkpoint=str(out / "backbone.pth"), out_indices=(5, 11))  # the dense tasks' reader
    maps = dense(torch.zeros(1, 3, 2 * student_patch, 2 * student_patch))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 2, 2)] * 2


def test_a_timm_file_may_hold_its_classifier_and_must_hold_the_rest(monkeypatch, tmp_path):
    """timm's own file of the whole model (a Hub model.safetensors) loads; a missing weight is one line naming it."""
    from safetensors.torch import save_file

    name, spec, model = tiny_teacher(monkeypatch, "timm:convnext_atto")
    whole = spec.create(num_classes=10)
    whole.load_state_dict(model.model.state_dict(), strict=False)  # the same network with a 10-class head
    save_file(whole.state_dict(), tmp_path / "model.safetensors")
    teacher = models.create_teacher(name, tmp_path / "model.safetensors", dtype=torch.float32)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(teacher.backbone.forward_tokens(x).cls, model.forward_tokens(x).cls, rtol=0, atol=0)
    assert (teacher.mean, teacher.std) == (tuple(spec.mean), tuple(spec.std))  # the model's pretrained_cfg
    partial = {k: v for k, v in whole.state_dict().items() if k != "stem.0.weight"}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(UsageError, match=r"missing keys: stem\.0\.weight"):
        models.create_teacher(name, tmp_path / "partial.pth")
    with pytest.raises(UsageError, match="teacher timm:convnext_atto is read from a file: give it with --teacher"):
        models.create_teacher(name)


def test_a_timm_teacher_joins_a_multi_teacher_recipe(monkeypatch, tmp_path, capsys):
    """PHI-S statistics, one adaptor each, the ConvNeXt's 2x2 map resampled to the student's 4x4 grid."""
    files = []
    for name in ("dinov2_vits14", "timm:convnext_atto"):
        name, _, model = tiny_teacher(monkeypatch, name)
        files.append(tmp_path / f"{len(files)}.pth")
        torch.save(FAMILIES[models.teacher_spec(name).family].release_file(model), files[-1])
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2, size=(64, 64))
    out = tmp_path / "run"
    argv = ["--teacher", "dinov2_vits14,timm:convnext_atto", "--teacher-checkpoint", ",".join(map(str, files)),
            "--teacher-input-size", "56,64", "--student", "vit_tiny", "--input-size", "56", "--data-path", str(data),
            "--output-dir", str(out), "--batch-size", "2", "--epochs", "1", "--epoch-length", "1", "--num-workers",
            "0", "--pca-every", "0", "--device", "cpu", "--teacher-stats-batches", "1"]  # fmt: skip
    assert pretrain_main.main(argv) == 0
    assert "timm:convnext_atto at 64 px) are resampled to the student's 4x4 grid" in capsys.readouterr().out
    adaptors = models.load_adaptors(out / "adaptors.pth")
    assert set(adaptors.adaptors) == {"dinov2_vits14", "timm:convnext_atto"}
    convnext = adaptors.adaptors["timm:convnext_atto"]
    assert convnext.target.standardization == "phi-s" and convnext.cls_std.fitted and convnext.patch_std.fitted
    assert adaptors.teachers["timm:convnext_atto"]["family"] == "timm"


def test_siglip2_teachers_are_timms_models_at_open_clips_releases():
    """Each released SigLIP2 spec is what its timm model says (width, patch, resolution, mean/std 0.5), its URL
    open_clip's Hub file of the matching config, and the two files it is read from give the same network."""
    import open_clip

    fam = FAMILIES["siglip2"]
    sizes = {"siglip2_vitb16": 224, "siglip2_vitl16": 256, "siglip2_so400m14": 224, "siglip2_vitg16": 256}
    assert {n: s.img_size for n, s in fam.teachers.items()} == sizes
    for name, spec in fam.teachers.items():
        assert fam.spec(name) == spec and spec.mean == spec.std == (0.5, 0.5, 0.5)
        config = spec.url.split("/")[4]
        vision = open_clip.get_model_config(config)["vision_cfg"]
        assert spec.model_name.split(".")[0] == vision["timm_model_name"] and vision["image_size"] == spec.img_size
        assert spec.url == f"https://huggingface.co/timm/{config}/resolve/main/open_clip_model.safetensors"
    assert len({models.teachers.cache_name(s.url) for s in fam.teachers.values()}) == len(fam.teachers)


def test_a_siglip2_teacher_reads_open_clips_whole_file_and_timms(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    name, spec, model = tiny_teacher(monkeypatch, "siglip2_vitb16")
    whole = {**FAMILIES["siglip2"].release_file(model), "logit_scale": torch.zeros(()), "logit_bias": torch.zeros(())}
    whole["text.token_embedding.weight"] = torch.zeros(10, 8)  # open_clip's text tower: zero-shot's, not ours
    save_file(whole, tmp_path / "open_clip_model.safetensors")
    save_file(FAMILIES["siglip2"].to_official(model), tmp_path / "model.safetensors")
    x = torch.randn(1, 3, 32, 32)
    for file in ("open_clip_model.safetensors", "model.safetensors"):
        teacher = models.create_teacher(name, tmp_path / file, dtype=torch.float32)
        torch.testing.assert_close(teacher.backbone.forward_tokens(x).cls, model.forward_tokens(x).cls, rtol=0, atol=0)
