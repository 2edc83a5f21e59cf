"""linear_eval.zeroshot on a tiny layout: a random tiny CLIP saved in OpenAI's format, the tiny student with
adaptors whose CLIP adaptor is set to predict chosen ln_post features, six classes named by folder. The
expected logits are computed here from the CLIP paper's recipe written out (open_clip's tokenizer and
towers, our own averaging and preprocessing), then compared with what the script reports. Both networks are
scored on CLIP's own crop of each image, the student's copy at its input size and ImageNet mean/std."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

import models
from common.io import file_sha256
from common.results import SCHEMA
from linear_eval import zeroshot
from models.families.clip import ClipZeroShot
from models.vision_transformer import ViT
from tests.helpers import DIM, img, student_adaptors, write_openai_clip

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed")
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES  # noqa: E402

CLASSES = ["golden_retriever", "hot_air_balloon", "red_wine", "school_bus", "sea_lion", "tabby_cat"]  # sorted
INPUT = 28  # the backbone fixture's crop (patch 14)
BICUBIC = transforms.InterpolationMode.BICUBIC
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("clip") / "ViT-T-16.pt"
    return path, write_openai_clip(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """val/<class>/ with two noise images a class and, last in tabby_cat, a file that is no image."""
    root = tmp_path_factory.mktemp("zeroshot_data")
    for c in CLASSES:
        for i in range(2):
            img(root / "val" / c / f"{i}.png", size=32)
    (root / "val" / "tabby_cat" / "broken.png").write_bytes(b"not a png")
    return root


def classifier_by_hand(clip: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """The CLIP paper's zero-shot weights: per class, the 80 prompts' text embeddings L2-normalised, averaged
    and renormalised; [embed dim, classes]."""
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and OPENAI_IMAGENET_TEMPLATES[0]("x") == "a bad photo of a x."
    columns = []
    with torch.no_grad():
        for name in names:
            e = clip.encode_text(open_clip.tokenize([t(name) for t in OPENAI_IMAGENET_TEMPLATES]))
            e = e / e.norm(dim=-1, keepdim=True)
            columns.append(e.mean(0) / e.mean(0).norm())
    return torch.stack(columns, 1)


def batch(root: Path, tf) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable val images in ImageFolder's order through `tf`, and their labels."""
    paths = [(p, c) for c, name in enumerate(CLASSES) for p in sorted((root / "val" / name).iterdir())]
    readable = [(p, c) for p, c in paths if p.name != "broken.png"]
    images = [tf(Image.open(p).convert("RGB")) for p, _ in readable]
    return torch.stack(images), torch.tensor([c for _, c in readable])


def topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item() * 100


def designed_adaptors(backbone: Path, clip, classifier: torch.Tensor, images: torch.Tensor, wanted: torch.Tensor):
    """Adaptors (a CLIP teacher's beside a DINOv2 teacher's) whose CLIP adaptor predicts, for image i, an ln_post
    feature t_i that CLIP's proj maps to 3 x the text embedding of class wanted[i]: its token head is solved
    exactly on these images' student CLS, through the fitted z-score standardisation."""
    adaptors = student_adaptors(DIM, {"clip_tiny": (64, "clip"), "dinov2_vits14": (48, "dinov2")})
    a = adaptors.adaptors["clip_tiny"]
    vit = models.load_backbone(backbone).eval()
    with torch.no_grad():
        out = vit.forward_features(images)
        cls = out["x_norm_clstoken"]
        proj = clip.visual.proj.double()
        t = 3 * classifier.T[wanted].double() @ torch.linalg.pinv(proj)  # t @ proj = 3 x the wanted columns
        u = torch.cat([a.token_head[0](cls).double(), torch.ones(len(cls), 1, dtype=torch.float64)], 1)
        wb = torch.linalg.pinv(u) @ a.cls_std(t).double()  # exact: 12 points, 65 unknowns
        a.token_head[1].weight.copy_(wb[:-1].T)
        a.token_head[1].bias.copy_(wb[-1])
        predicted = a.predict(models.Tokens(cls, out["x_norm_patchtokens"], (2, 2))).cls
    torch.testing.assert_close(predicted.double(), t, rtol=1e-4, atol=1e-4)
    return adaptors, predicted


def test_student_and_teacher_zero_shot_match_the_recipe(backbone, clip, data, tmp_path, capsys):
    clip_path, ref = clip
    names = [c.replace("_", " ") for c in CLASSES]
    classifier = classifier_by_hand(ref, names)
    student_tf = transforms.Compose([  # CLIP's 32-pixel crop, resized to the student's 28 as pretraining resizes
        transforms.Resize(32, interpolation=BICUBIC), transforms.CenterCrop(32), transforms.ToTensor(),
        transforms.Resize((INPUT, INPUT), interpolation=BICUBIC, antialias=True), transforms.Normalize(*IMAGENET),
    ])  # fmt: skip
    images, labels = batch(data, student_tf)
    wanted = labels.clone()
    wanted[[9, 11]] = torch.tensor([5, 0])  # two images steered to another class: 10 of 12 right
    adaptors, predicted = designed_adaptors(backbone, ref, classifier, images, wanted)
    path = tmp_path / "adaptors.pth"
    torch.save(adaptors.export({"name": "vit_tiny"}), path)
    logits = 100 * torch.nn.functional.normalize(predicted @ ref.visual.proj, dim=-1) @ classifier
    assert topk(logits, labels, 1) == pytest.approx(100 * 10 / 12)  # the design holds
    clip_tf = transforms.Compose([
        transforms.Resize(32, interpolation=BICUBIC), transforms.CenterCrop(32), transforms.ToTensor(),
        transforms.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    ])  # fmt: skip
    with torch.no_grad():
        teacher_logits = 100 * ref.encode_image(batch(data, clip_tf)[0], normalize=True) @ classifier
    expected = {"top-1": topk(logits, labels, 1), "top-5": topk(logits, labels, 5)}
    expected |= {"teacher top-1": topk(teacher_logits, labels, 1), "teacher top-5": topk(teacher_logits, labels, 5)}

    out = tmp_path / "out"
    argv = ["--backbone", str(backbone), "--adaptors", str(path), "--clip-checkpoint", str(clip_path),
            "--data-path", str(data), "--input-size", str(INPUT), "--device", "cpu", "--batch-size", "4",
            "--num-workers", "0"]  # fmt: skip
    assert zeroshot.main([*argv, "--output-dir", str(out)]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert f"warning: unreadable image {data / 'val' / 'tabby_cat' / 'broken.png'}" in printed
    res = json.loads((out / "results.json").read_text())
    assert tuple(res) == SCHEMA and res["task"] == "zeroshot"
    assert res["backbone"] == {"path": str(backbone.resolve()), "sha256": file_sha256(backbone)}
    assert res["metrics"].keys() == expected.keys()
    for metric, value in expected.items():  # the same images right: the counts agree exactly
        assert res["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    assert res["metrics"]["top-1"] != res["metrics"]["teacher top-1"]
    assert "clip_tiny adaptor" in res["metric_notes"]["top-1"] and "ViT-T-16.pt" in res["metric_notes"]["teacher top-1"]
    protocol = res["protocol"]
    assert protocol["class_names"] == zeroshot.FOLDER_NAMES and res["details"]["class_names"] == names
    assert (protocol["teacher"], protocol["input_size"], protocol["teacher_input_size"]) == ("clip_tiny", INPUT, 32)
    assert protocol["preprocessing"] == (
        "CLIP's eval crop: the short side resized (bicubic) to 32, a centre crop 32x32: one crop for the student and "
        "the teacher, the student's copy resized (bicubic, antialiased) to 28x28; normalised with ImageNet mean/std "
        "for the student (as in training), the image tower's own for the teacher"
    )
    assert f"preprocessing: {protocol['preprocessing']}\n" in printed
    assert res["unreadable_images"] == {"val": 1} and res["details"]["images"]["val"]["evaluated"] == 12

    # --no-teacher: the student's figures alone, the same at another batch size
    out2 = tmp_path / "out2"
    assert zeroshot.main([*argv, "--batch-size", "5", "--no-teacher", "--output-dir", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["metrics"] == {k: res["metrics"][k] for k in ("top-1", "top-5")}
    assert res2["protocol"]["teacher_input_size"] is None


def test_student_and_teacher_see_the_same_crop(backbone, data, tmp_path, capsys, monkeypatch):
    """A CLIP whose input size is the student's: the student gets the very pixels CLIP gets (CLIP's resize and
    centre crop), each normalised as that network expects. A CLIP crop the student's patch does not divide
    needs --input-size, one line."""
    clip_path, adaptors = tmp_path / "ViT-T-14.pt", tmp_path / "adaptors.pth"
    write_openai_clip(clip_path, patch=14, image=INPUT)
    torch.save(student_adaptors(DIM, {"clip_tiny": (64, "clip")}).export({"name": "vit_tiny"}), adaptors)
    seen = {"student": [], "teacher": []}
    real_tokens, real_encode = ViT.forward_tokens, ClipZeroShot.encode_image

    def student_tokens(self, x, masks=None):
        seen["student"].append(x)
        return real_tokens(self, x, masks)

    def teacher_encode(self, model, images):
        seen["teacher"].append(images)
        return real_encode(self, model, images)

    monkeypatch.setattr(ViT, "forward_tokens", student_tokens)
    monkeypatch.setattr(ClipZeroShot, "encode_image", teacher_encode)
    argv = ["--backbone", str(backbone), "--adaptors", str(adaptors), "--data-path", str(data), "--device", "cpu",
            "--batch-size", "12", "--num-workers", "0", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert zeroshot.main([*argv, "--clip-checkpoint", str(clip_path)]) == 0, capsys.readouterr()

    def pixels(batches, mean, std):
        return torch.cat(batches) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)

    student = pixels(seen["student"], *IMAGENET)
    assert student.shape == (12, 3, INPUT, INPUT)
    torch.testing.assert_close(student, pixels(seen["teacher"], OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    protocol = json.loads((tmp_path / "out" / "results.json").read_text())["protocol"]
    assert protocol["preprocessing"].startswith(
        "CLIP's eval crop: the short side resized (bicubic) to 28, a centre crop 28x28: one crop for the student and "
        "the teacher; normalised with ImageNet mean/std for the student"
    )
    assert (protocol["input_size"], protocol["teacher_input_size"]) == (INPUT, INPUT)

    other = tmp_path / "ViT-T-16.pt"
    write_openai_clip(other)  # 32 pixels: two and a bit patches of 14
    capsys.readouterr()
    assert zeroshot.main([*argv, "--clip-checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = "the clip_tiny image tower's crop (32 px) is not a multiple of the student's patch size 14"
    assert len(err) == 1 and message in err[0] and "give --input-size" in err[0], err


@pytest.mark.parametrize(
    "teachers,extra,message",
    [
        ({"dinov2_vits14": (48, "dinov2")}, [],
         "holds no image-text (CLIP, SigLIP2) teacher's adaptor (dinov2_vits14 (dinov2))"),
        ({"clip_tiny": (48, "clip")}, [], "clip_tiny adaptor predicts 48-dim features but {clip}'s visual width is 64"),
        ({"clip_a": (64, "clip"), "clip_b": (64, "clip")}, [],
         "several image-text teachers (clip_a, clip_b): choose one"),
        ({"clip_a": (64, "clip"), "dinov2_vits14": (48, "dinov2")}, ["--teacher", "dinov2_vits14"],
         "--teacher dinov2_vits14 is not an image-text teacher"),
    ],
    ids=["no-clip-teacher", "width-mismatch", "ambiguous", "not-clip"],
)  # fmt: skip
def test_bad_adaptors_are_one_error_line(teachers, extra, message, backbone, clip, data, tmp_path, capsys):
    check_one_error_line(
        DIM, teachers, extra, message=message, backbone=backbone, clip=clip, data=data, tmp_path=tmp_path, capsys=capsys
    )


def test_adaptors_of_a_student_of_another_width_are_one_error_line(backbone, clip, data, tmp_path, capsys):
    message = f"is {DIM} wide but {tmp_path / 'adaptors.pth'} adapts a {2 * DIM}-wide student"
    fixtures = dict(backbone=backbone, clip=clip, data=data, tmp_path=tmp_path, capsys=capsys)
    check_one_error_line(2 * DIM, {"clip_tiny": (64, "clip")}, [], message=message, **fixtures)


def check_one_error_line(dim, teachers, extra, *, message, backbone, clip, data, tmp_path, capsys):
    path = tmp_path / "adaptors.pth"
    torch.save(student_adaptors(dim, teachers).export({"name": "vit_tiny"}), path)
    argv = ["--backbone", str(backbone), "--adaptors", str(path), "--clip-checkpoint", str(clip[0]),
            "--data-path", str(data), "--input-size", str(INPUT), "--device", "cpu", "--num-workers", "0",
            "--output-dir", str(tmp_path / "out"), *extra]  # fmt: skip
    assert zeroshot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(clip=clip[0]) in err[0], err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("damage", ["garbage", "short-storage"])
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # OpenAI's CLIP files are TorchScript archives
def test_a_damaged_torchscript_clip_is_one_error_line(damage, backbone, data, tmp_path, capsys):
    """OpenAI's files are TorchScript archives: one whose pickle is garbage, or whose tensor data is cut short,
    is one line and exit 2 (a file cut short is no zip: test_models' unreadable weight files)."""
    path = tmp_path / "ViT-B-16.pt"
    if damage == "garbage":
        records = {"ViT-B-16/constants.pkl": b"\x80\x02).", "ViT-B-16/data.pkl": b"not a pickle"}
        message = f"cannot read TorchScript archive {path}: it is damaged ("
    else:
        torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
        with zipfile.ZipFile(path) as zf:
            records = {n: zf.read(n)[:4] if n.endswith("/data/0") else zf.read(n) for n in zf.namelist()}
        message = f"cannot read TorchScript archive {path}: its storage data/0 holds 4 bytes, not 16"
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in records.items():
            zf.writestr(name, content)
    adaptors = tmp_path / "adaptors.pth"
    torch.save(student_adaptors(DIM, {"clip_tiny": (64, "clip")}).export({"name": "vit_tiny"}), adaptors)
    argv = ["--backbone", str(backbone), "--adaptors", str(adaptors), "--clip-checkpoint", str(path),
            "--data-path", str(data), "--input-size", str(INPUT), "--device", "cpu", "--num-workers", "0",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert zeroshot.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_class_names_and_clip_teachers():
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    assert zeroshot.class_names(wnids) == (list(IMAGENET_CLASSNAMES), zeroshot.IMAGENET_NAMES)
    assert zeroshot.class_names(["sea_lion", "tabby_cat"]) == (["sea lion", "tabby cat"], zeroshot.FOLDER_NAMES)
    assert zeroshot.class_names([*wnids[:-1], "n99999999"])[1] == zeroshot.FOLDER_NAMES
    # without the family in adaptors.pth, a known teacher name says it
    targets = [models.TeacherTarget(n, 8) for n in ("dinov2_vits14", "clip_vitb16", "mine")]
    assert zeroshot.clip_teachers(models.Adaptors(8, targets)) == ["clip_vitb16"]
    assert zeroshot.clip_teachers(models.Adaptors(8, targets, {"mine": {"family": "clip"}})) == ["clip_vitb16", "mine"]
