"""scripts.export: a student's folder in timm's Hugging Face layout (safetensors + config.json), its adaptors as
safetensors + JSON, an ONNX graph and a model card; each format gives the training network's numbers, and every
evaluation takes the folder as --backbone. One export per layout (ONNX is slow), shared by its tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch

import models
from models import exports
from scripts import export as export_script
from scripts import model_card
from tests.helpers import ROOT, make_image_folder, randomize_, rel_err, student_adaptors, tiny_spec

LAYOUTS = ["dinov2", "clip", "synclr", "dinov3", "timm"]  # every student layout, and a timm CNN (ResNet-18)
POSITION_TABLE = {"dinov2", "clip", "synclr"}  # timm resamples a position table its own way at other sizes


class Exported(NamedTuple):
    model: torch.nn.Module  # the network the run holds
    adaptors: models.Adaptors
    size: int  # its training resolution
    folder: Path  # what scripts.export wrote


def tiny_student(layout: str) -> tuple[torch.nn.Module, int]:
    if layout == "timm":
        torch.manual_seed(0)
        return models.create_student("timm:resnet18", img_size=64).eval(), 64
    size = 32 if layout == "dinov3" else 28
    # 64 wide, one head: the heads a file implies (64 channels each), as every loader reads them
    return randomize_(models.build_vit(models.LAYOUTS[layout], 64, 1, 1, 128, img_size=size)).eval(), size


def fake_run(folder: Path, model: torch.nn.Module, layout: str, size: int) -> models.Adaptors:
    """A finished run's files as pretraining writes them: backbone.pth in the reference layout, adaptors.pth of a
    teacher of the student's family (its licence travels) and a CLIP one (token-only)."""
    folder.mkdir(parents=True)
    torch.save(models.to_reference(model, layout), folder / "backbone.pth")
    adaptors = student_adaptors(model.summary_dim, {"teacher": (48, layout), "clip_vitb16": (24, "clip")})
    for a in adaptors.adaptors.values():
        randomize_(a)
    student = {"name": layout, "layout": layout, "img_size": size}
    torch.save(adaptors.export(student), folder / "adaptors.pth")
    return models.load_adaptors(folder / "adaptors.pth")


@pytest.fixture(scope="module", params=LAYOUTS)
def exported(request, tmp_path_factory) -> Exported:
    layout = request.param
    model, size = tiny_student(layout)
    run = tmp_path_factory.mktemp(layout) / "run"
    adaptors = fake_run(run, model, layout, size)
    folder = run.parent / "export"
    assert export_script.main(["--run", str(run), "--to", str(folder), "--onnx-adaptors"]) == 0
    return Exported(model, adaptors, size, folder)


def features(model, x):
    with torch.no_grad():
        t = model.forward_tokens(x)
    return t.cls, t.patches


def sizes(exported: Exported, layout: str) -> list[tuple[int, int]]:
    p, s = exported.model.patch_size, exported.size
    return [(s, s)] if layout in POSITION_TABLE else [(s, s), (s + p, s + 2 * p)]


def test_timm_builds_the_student_from_the_folder(exported, request):
    """Both of timm's offline routes (local-dir, and pretrained_cfg_overlay's file) give the training network's
    features to 1e-5; at a second resolution too where no position table is resampled."""
    layout = request.node.callspec.params["exported"]
    config = json.loads((exported.folder / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert config["num_features"] == exported.model.summary_dim
    assert cfg["input_size"] == [3, exported.size, exported.size] and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.875 and cfg["mean"] == list(models.families.base.STUDENT_INPUTS.mean)
    local = timm.create_model(f"local-dir:{exported.folder}", pretrained=True).eval()
    overlay = dict(file=str(exported.folder / "model.safetensors"))
    args = config["model_args"]
    by_file = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **args)
    assert local.pretrained_cfg["mean"] == cfg["mean"]
    for h, w in sizes(exported, layout):
        x = torch.randn(2, 3, h, w)
        want = features(exported.model, x)
        for theirs in (local, by_file):
            got = features(models.TimmBackbone(theirs.eval()), x)
            assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-5, (h, w)


def test_an_export_at_another_resolution_is_the_student_there_in_timm(exported, request, tmp_path, capsys):
    """--img-size N: timm's model from the folder gives the training network's features at N to 1e-5 for every
    layout (a position table resampled there by DINOv2's rule, which timm then uses as is), and so does
    load_backbone; config.json and the card say N and the training size. A size off the patch grid is one line."""
    run, folder = exported.folder.parent / "run", tmp_path / "export"
    size, layout = 2 * exported.size, request.node.callspec.params["exported"]
    onnx = [] if layout == "dinov2" else ["--no-onnx"]  # one layout's graph: the same code for every network
    assert export_script.main(["--run", str(run), "--to", str(folder), "--img-size", str(size), *onnx]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    record = config["proteus-export"]
    assert record["img_size"] == size and record["trained_img_size"] == exported.size
    x = torch.randn(2, 3, size, size)
    want = features(exported.model, x)
    theirs = models.TimmBackbone(timm.create_model(f"local-dir:{folder}", pretrained=True).eval())
    assert max(rel_err(a, b) for a, b in zip(features(theirs, x), want)) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(features(models.load_backbone(folder).eval(), x), want)) < 1e-6
    card = (folder / "README.md").read_text()
    assert f"| resolution | {size} px (trained at {exported.size} px; exported with --img-size {size}) |" in card
    assert ("by its own rule, not the student's" in card) == (layout in POSITION_TABLE)  # against the student
    if not onnx:  # the trained student's graph: its features at every size, not those of the table set to `size`
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        p = exported.model.patch_size
        for h, w in ((size, size), (exported.size + p, exported.size + 3 * p)):
            x = torch.randn(2, 3, h, w)
            got = session.run(["summary", "patches"], {"images": x.numpy()})
            assert max(rel_err(torch.from_numpy(a), b) for a, b in zip(got, features(exported.model, x))) < 1e-4
    odd = str(exported.size + 1)
    assert export_script.main(["--run", str(run), "--to", str(tmp_path / "odd"), "--img-size", odd, "--no-onnx"]) == 2
    assert f"--img-size {odd} is not a positive multiple of the patch size" in capsys.readouterr().err


def test_a_timm_vit_student_is_set_to_another_resolution_as_timm_sets_it(tmp_path):
    """A timm ViT student at --img-size: its table resampled by timm's set_input_size, its own rule, so the folder
    (timm's, and load_backbone's) gives its features there; a model that takes one size only is one line."""
    torch.manual_seed(0)
    model = models.create_student("timm:vit_tiny_patch16_224", img_size=32).eval()
    fake_run(tmp_path / "run", model, "timm", 32)
    folder = tmp_path / "export"
    argv = ["--run", str(tmp_path / "run"), "--to", str(folder), "--img-size", "64", "--no-onnx"]
    assert export_script.main(argv) == 0
    x = torch.randn(2, 3, 64, 64)
    want = features(model, x)
    theirs = models.TimmBackbone(timm.create_model(f"local-dir:{folder}", pretrained=True).eval())
    assert max(rel_err(a, b) for a, b in zip(features(theirs, x), want)) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(features(models.load_backbone(folder).eval(), x), want)) < 1e-6
    fixed = models.create_student("timm:vit_tiny_patch16_224", img_size=32)
    fixed.model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=1)  # one size only
    with pytest.raises(models.UsageError, match="timm's vit_tiny_patch16_224 takes no 64 px inputs"):
        models.FAMILIES["timm"].at_resolution(fixed, 64)


def test_onnx_gives_the_networks_and_the_adaptors_outputs(exported, request):
    """onnxruntime (CPU) against the network and its adaptors to 1e-4, at two batch sizes and resolutions: every
    layout's graph takes any height and width (a position table resampled by DINOv2's formula in the graph)."""
    import onnxruntime

    layout = request.node.callspec.params["exported"]
    session = onnxruntime.InferenceSession(str(exported.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for batch, (h, w) in zip((2, 3), sizes(exported, "any")):
        x = torch.randn(batch, 3, h, w)
        got = dict(zip(names, session.run(None, {"images": x.numpy()})))
        with torch.no_grad():
            predicted = exported.adaptors(exported.model, x)
        want = dict(zip(("summary", "patches"), features(exported.model, x)))
        for teacher, p in predicted.items():  # a CLIP teacher's adaptor is token-only
            want.update({f"{teacher}.{k}": v for k, v in (("summary", p.cls), ("patches", p.patches)) if v is not None})
        assert names == list(want) and len(names) == (4 if layout == "clip" else 5)
        assert all(rel_err(torch.from_numpy(got[n]), want[n]) < 1e-4 for n in names), (batch, h, w)


def test_the_folder_is_a_backbone_and_its_adaptors_are_the_runs(exported):
    """models.load_backbone reads the folder (or its weight file) as the same network, with its inputs'
    normalisation; models.load_adaptors reads the safetensors + JSON as adaptors.pth; only safetensors and JSON."""
    x = torch.randn(2, 3, exported.size, exported.size)
    want = features(exported.model, x)
    weights = exports.exported_folder(exported.folder).weights
    for path in (exported.folder, weights):
        back = models.load_backbone(path).eval()
        assert all(torch.equal(a, b) for a, b in zip(features(back, x), want))
        assert back.normalization == models.families.base.STUDENT_INPUTS
    adaptors = models.load_adaptors(exported.folder)
    ours, theirs = adaptors.state_dict(), exported.adaptors.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert adaptors.teachers["teacher"]["family"] == exported.adaptors.teachers["teacher"]["family"]
    assert {p.suffix for p in exported.folder.iterdir()} == {".json", ".safetensors", ".onnx", ".md"}


def test_the_model_card_says_what_the_student_is(exported, request):
    layout = request.node.callspec.params["exported"]
    card = (exported.folder / "README.md").read_text()
    assert "`teacher` | " + layout in card and "`clip_vitb16` | clip" in card
    assert ("DINOv3 License" in card) == (layout == "dinov3")  # a DINOv3 teacher's derivative carries it
    assert ("local-dir" in card) and "model.onnx" in card and "def adapt(" in card
    assert ("by its own rule, not the student's" in card) == (layout in POSITION_TABLE)


# ADE20K's linear probe on the CNN's folder, at 56 px (a ViT's: test_evaluate_all's every-task run on a folder)
ADE_AT_56 = (
    *(f"{name}_dataloader.dataset.pipeline.{i}.scale=(224,56)" for name, i in (("train", 2), ("val", 1), ("test", 1))),
    "train_dataloader.dataset.pipeline.3.crop_size=(56,56)", "model.data_preprocessor.size=(56,56)",
    "model.test_cfg.crop_size=(56,56)", "model.test_cfg.stride=(37,37)",
)  # fmt: skip


@pytest.mark.parametrize("exported", ["timm"], indirect=True)  # a ViT's folder: test_evaluate_all's all-task run
def test_a_dense_task_takes_the_folder_as_backbone(exported, ade, tmp_path):
    """mmseg's backbones read the folder itself: ADE20K's linear probe on a ResNet-18's, 2 iterations on CPU;
    results.json names the folder and its digest (config.json and the weights)."""
    pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
    from common.io import file_sha256
    from scripts.evaluate_all import QUICK_DENSE
    from segmentation import runner

    work = tmp_path / "work"
    config = ROOT / "segmentation/configs/linear_timm.py"
    argv = [str(config), "--backbone", str(exported.folder), "--data-path", str(ade), "--output-dir", str(work),
            *QUICK_DENSE, *ADE_AT_56]  # fmt: skip
    assert runner.main("segmentation", argv) == 0
    results = json.loads((work / "results.json").read_text())
    assert results["backbone"] == {"path": str(exported.folder.resolve()), "sha256": file_sha256(exported.folder)}
    assert results["details"]["final"]["iter"] == 2 and "mIoU" in results["details"]["final"]["metrics"]


# --- a real run, end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_export(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny distillation (DINOv2 teacher, ViT-Tiny student at 28 px) and its export."""
    from pretrain import main as pretrain_main

    tmp = tmp_path_factory.mktemp("run")
    data = make_image_folder(tmp / "data", classes=2, per_class=2, size=(28, 28))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.TEACHERS, "dinov2_vits14", tiny_spec("dinov2_vits14", dim=64, depth=1, img_size=28))
        argv = ["--teacher", "dinov2_vits14", "--random-teacher", "--student", "vit_tiny", "--input-size", "28",
                "--data-path", str(data), "--output-dir", str(tmp / "run"), "--batch-size", "2", "--epochs", "1",
                "--epoch-length", "2", "--num-workers", "0", "--pca-every", "0", "--device", "cpu"]  # fmt: skip
        assert pretrain_main.main(argv) == 0
    (tmp / "run" / "eval").mkdir()
    (tmp / "run" / "eval" / "results.json").write_text(json.dumps({"rows": []}))
    (tmp / "run" / "eval" / "results.md").write_text("| task | metric | ours |\n|---|---|---|\n| knn | top-1 | 1.0 |\n")
    assert export_script.main(["--run", str(tmp / "run"), "--to", str(tmp / "export")]) == 0
    return tmp / "run", tmp / "export"


def test_a_runs_export_gives_its_checkpoints_features(run_export):
    """timm, onnxruntime and load_backbone of the folder against the training checkpoint's student; the card
    holds the recipe, the epochs and the evaluate_all table beside the run."""
    import onnxruntime

    run, folder = run_export
    trained = models.load_backbone(run / "checkpoint.pth").eval()
    x = torch.randn(2, 3, 28, 28)
    want = features(trained, x)
    theirs = models.TimmBackbone(timm.create_model(f"local-dir:{folder}", pretrained=True).eval())
    assert max(rel_err(a, b) for a, b in zip(features(theirs, x), want)) < 1e-5
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["summary", "patches"]  # no --onnx-adaptors
    for images in (x, torch.randn(3, 3, 42, 56)):
        got = session.run(None, {"images": images.numpy()})
        assert max(rel_err(torch.from_numpy(a), b) for a, b in zip(got, features(trained, images))) < 1e-4
    heads = models.safe_load(run / "checkpoint.pth")["heads"]  # one teacher's heads, under their own names
    exported = models.load_adaptors(folder).adaptors["dinov2_vits14"].state_dict()
    assert len(exported) > 4 and all(torch.equal(v, heads[k]) for k, v in exported.items())
    assert all(torch.equal(a, b) for a, b in zip(features(models.load_backbone(folder), x), want))
    card = (folder / "README.md").read_text()
    assert "# `vit_tiny` distilled from dinov2_vits14" in card and "epochs trained: 1." in card
    assert "| lambda_patch | `1.0` |" in card and "| knn | top-1 | 1.0 |" in card and "License" not in card


def readme_snippets() -> dict[str, str]:
    """The python blocks of README.md's "Use a distilled student elsewhere", by the library they use."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use a distilled student elsewhere", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {("onnx" if "onnxruntime" in b else "adaptors" if "adaptors.json" in b else "timm"): b for b in blocks}


def test_the_readmes_timm_and_onnx_snippets_run_and_are_the_cards(run_export):
    """README.md's snippets, run on an export, give what our package gives; the model card shows the same ones."""
    _, folder = run_export
    snippets = readme_snippets()
    assert snippets == model_card.SNIPPETS
    ours = models.load_backbone(folder).eval()
    scope = {}
    exec(snippets["timm"].replace("path/to/export", str(folder)), scope)
    assert scope["config"]["input_size"] == (3, 28, 28) and tuple(scope["config"]["mean"]) == ours.normalization.mean
    assert rel_err(scope["summary"], features(ours, scope["images"])[0]) < 1e-5
    scope = {}
    exec(snippets["onnx"].replace("path/to/export", str(folder)), scope)
    want = features(ours, torch.from_numpy(scope["images"]))
    assert scope["patches"].shape == (2, 4, 192)
    assert max(rel_err(torch.from_numpy(scope[k]), w) for k, w in zip(("summary", "patches"), want)) < 1e-4


def test_the_readmes_adaptor_snippet_is_the_adaptors(exported):
    """With torch and safetensors alone, each teacher's predictions are models.load_adaptors'."""
    scope = {}
    exec(readme_snippets()["adaptors"].replace("path/to/export", str(exported.folder)), scope)
    x = torch.randn(2, 3, exported.size, exported.size)
    summary, patches = features(exported.model, x)
    with torch.no_grad():
        predicted = exported.adaptors(exported.model, x)
    for teacher in ("teacher", "clip_vitb16"):
        cls, tokens = scope["adapt"](teacher, summary, patches)
        torch.testing.assert_close(cls, predicted[teacher].cls, rtol=1e-5, atol=1e-5)
        assert (tokens is None) == (predicted[teacher].patches is None)
        if tokens is not None:
            torch.testing.assert_close(tokens, predicted[teacher].patches, rtol=1e-5, atol=1e-5)


def test_an_export_refuses_what_it_cannot_write(run_export, tmp_path, capsys):
    run, folder = run_export
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert export_script.main(["--run", str(run), "--to", str(tmp_path / "other"), "--no-onnx"]) == 2
    assert "exists and is not an export" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert export_script.main(["--run", str(run.parent), "--to", str(tmp_path / "x"), "--no-onnx"]) == 2
    assert f"holds students' folders: export one of {run.name}" in capsys.readouterr().err
    assert export_script.main(["--run", str(tmp_path / "other"), "--to", str(tmp_path / "x"), "--no-onnx"]) == 2
    assert "holds no backbone.pth" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(models.UsageError, match="not a backbone exported by scripts.export"):
        models.load_backbone(tmp_path / "other")


def test_an_earlier_export_is_replaced_whole(run_export, tmp_path):
    """A second export to the same folder replaces the first (here by the EMA weights, without ONNX)."""
    run, _ = run_export
    target = tmp_path / "export"
    assert export_script.main(["--run", str(run), "--to", str(target)]) == 0
    assert export_script.main(["--run", str(run), "--to", str(target), "--ema", "--no-onnx"]) == 0
    assert not (target / "model.onnx").exists() and [p.name for p in tmp_path.iterdir()] == ["export"]
    ema = models.load_backbone(run / "backbone_ema.pth").state_dict()
    got = {k: v for k, v in models.load_backbone(target).state_dict().items() if k != "mask_token"}  # pretraining's
    assert all(torch.equal(v, ema[k]) for k, v in got.items())
    assert not all(torch.equal(v, models.load_backbone(run / "backbone.pth").state_dict()[k]) for k, v in got.items())


def test_a_layout_timm_has_no_architecture_for_keeps_its_reference_layout(tmp_path, monkeypatch):
    """backbone.safetensors in the family's reference layout, config.json saying why; still our backbone."""
    monkeypatch.setattr(type(models.FAMILIES["clip"]), "timm_architecture", lambda self, model, *, img_size: None)
    model, size = tiny_student("clip")
    fake_run(tmp_path / "run", model, "clip", size)
    assert export_script.main(["--run", str(tmp_path / "run"), "--to", str(tmp_path / "export"), "--no-onnx"]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "architecture" not in config and config["proteus-export"]["timm"] is None
    assert "timm has no architecture for the CLIP layout" in config["proteus-export"]["note"]
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert not (tmp_path / "export" / "model.safetensors").exists()
    x = torch.randn(2, 3, size, size)
    back = models.load_backbone(tmp_path / "export").eval()
    assert all(torch.equal(a, b) for a, b in zip(features(back, x), features(model, x)))
    card = (tmp_path / "export" / "README.md").read_text()
    assert "timm has no architecture for the CLIP layout" in card


def test_dinov2_registers_are_timms_reg_tokens(tmp_path):
    """A DINOv2 ViT with registers (an official _reg file) is timm's reg4 DINOv2 at every size: the CLS carries its
    position. Its ONNX graph takes any size too (its antialiased resampling as a matrix per axis)."""
    model = randomize_(models.build_vit(models.LAYOUTS["dinov2"], 64, 1, 1, 128, img_size=28, num_register_tokens=4))
    found = exports.export_backbone(model.eval(), img_size=28, normalization=models.families.base.STUDENT_INPUTS)
    assert found.architecture == "vit_small_patch14_reg4_dinov2" and found.parity < 1e-5
    assert found.elsewhere < 1e-5  # timm resamples a _reg table as DINOv2 does: the same features at other sizes
    graph = exports.export_onnx(model, tmp_path / "model.onnx", img_size=28)
    assert graph.dynamic_size and graph.checked == ((2, 28, 28), (3, 42, 56)) and graph.error < 1e-4


def test_a_network_that_takes_one_size_has_a_graph_of_that_size(tmp_path):
    """A timm ViT built without dynamic_img_size takes its own size only: the graph is re-exported for it, any
    batch, and says so."""
    student = models.create_student("timm:vit_tiny_patch16_224", img_size=32)
    student.model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, depth=1)
    graph = exports.export_onnx(student.eval(), tmp_path / "model.onnx", img_size=32)
    assert not graph.dynamic_size and graph.checked == ((2, 32, 32), (3, 32, 32)) and graph.error < 1e-4


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("grid", [(6, 6), (3, 5), (7, 4), (1, 1), (13, 9)])  # from a 6x6 table
def test_the_exported_graphs_position_table_is_dinov2s(grid, registers, monkeypatch):
    """The per-axis bicubic matrices an exported graph resamples a position table with give DINOv2's
    F.interpolate: scale_factor=(n + 0.1) / m for the plain ViTs, antialiased to size for those with registers
    (and the table itself at its own grid)."""
    from models import vision_transformer

    vit = models.build_vit(models.LAYOUTS["dinov2"], 64, 1, 1, 128, img_size=84, num_register_tokens=registers)
    model = randomize_(vit)
    want = model.interpolate_pos_encoding(*grid)
    monkeypatch.setattr(vision_transformer, "_exporting", lambda: True)
    got = model.interpolate_pos_encoding(*grid)
    assert got.shape == want.shape and rel_err(got, want) < 1e-6
