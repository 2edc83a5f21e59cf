"""The README.md of an exported student (scripts.export): what it is, how it was made, how to use it, how it
scored, and what its teachers' licences ask. Its snippets are README.md's ("Use a distilled student elsewhere"),
which a test runs."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

import models
from models import exports
from models.families import family_of_model

RECIPE = (
    "data_path", "teacher", "teacher_weights", "teacher_input_size", "teacher_standardization",
    "teacher_summary_standardization", "teacher_normalization", "student", "student_layout", "input_size",
    "batch_size", "epochs", "epoch_length", "warmup_epochs", "lr", "min_lr", "weight_decay", "drop_path",
    "mask_probability", "mask_ratio", "lambda_token", "lambda_patch", "lambda_fea", "ema_decay", "precision", "seed",
)  # fmt: skip

TIMM = """\
import timm, torch

folder = "path/to/export"
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # offline: the folder's files only
config = timm.data.resolve_data_config({}, model=model)  # the student's mean, std, input size, crop
transform = timm.data.create_transform(**config)  # for PIL images
with torch.no_grad():
    images = torch.randn(1, *config["input_size"])  # or transform(photo).unsqueeze(0)
    tokens = model.forward_features(images)
    summary = model.forward_head(tokens, pre_logits=True)  # the summary token the student was distilled on
"""

ONNX = """\
import json, numpy as np, onnxruntime

folder = "path/to/export"
session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
inputs = json.load(open(f"{folder}/config.json"))["pretrained_cfg"]  # mean, std, input_size (the export's)
images = np.random.randn(2, *inputs["input_size"]).astype(np.float32)  # normalised with that mean and std
outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": images})))
summary, patches = outputs["summary"], outputs["patches"]  # [B, D], [B, H/p * W/p, D] row-major
"""

ADAPTORS = """\
import json, torch
from safetensors.torch import load_file

folder = "path/to/export"
meta = json.load(open(f"{folder}/adaptors.json"))
tensors = load_file(f"{folder}/adaptors.safetensors")


def head(name, x):  # LayerNorm (eps 1e-5), then Linear
    w = lambda k: tensors[f"{name}.{k}"]  # noqa: E731
    x = torch.nn.functional.layer_norm(x, w("0.weight").shape, w("0.weight"), w("0.bias"), eps=1e-5)
    return x @ w("1.weight").T + w("1.bias")


def to_teacher(name, y):  # the heads predict standardised targets: back to the teacher's own space
    if f"{name}.mean" not in tensors:  # standardization "none"
        return y
    y = y * tensors[f"{name}.scale"]
    if f"{name}.rotation" in tensors:  # PHI-S
        y = y @ tensors[f"{name}.rotation"]
    return y + tensors[f"{name}.mean"]


def adapt(teacher, summary, patches):
    \"\"\"The student's summary [B, D] and patch tokens [B, N, D] -> the teacher's (None: no head for it).\"\"\"
    heads = meta["teachers"][teacher]["heads"]
    cls = to_teacher(f"{teacher}/cls_std", head(f"{teacher}/token_head", summary)) if "token_head" in heads else None
    patch_head = next((h for h in ("fea_head", "patch_head") if h in heads), None)
    tokens = to_teacher(f"{teacher}/patch_std", head(f"{teacher}/{patch_head}", patches)) if patch_head else None
    return cls, tokens
"""
SNIPPETS = {"timm": TIMM, "onnx": ONNX, "adaptors": ADAPTORS}


def _table(rows: list[tuple[str, object]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def read_checkpoint(run: Path) -> dict:
    """The run's checkpoint.pth (its flags and student name; memory-mapped: the optimiser is never read), or {}."""
    path = run / "checkpoint.pth"
    if not path.is_file():
        return {}
    ckpt = models.safe_load(path, mmap=True)
    return ckpt if isinstance(ckpt, dict) else {}


def _epochs(run: Path) -> int | None:
    log = run / "log.txt"
    return len(log.read_text().splitlines()) if log.is_file() else None


def _evaluations(run: Path) -> str | None:
    """results.md of an evaluate_all run beside the student (in a folder of the run's, or the run's own)."""
    for summary in sorted([run / "results.json", *run.glob("*/results.json")]):
        try:
            data = json.loads(summary.read_text()) if summary.is_file() else None
        except ValueError:
            continue
        if isinstance(data, dict) and "rows" in data and (summary.parent / "results.md").is_file():
            return (summary.parent / "results.md").read_text().strip()
    return None


def _student(model: nn.Module, source: Path, name: str, *, resolution: tuple[int, int]) -> list[tuple[str, object]]:
    params = sum(p.numel() for p in model.parameters())
    found, norm = family_of_model(model), model.normalization
    size, trained = resolution
    at = f"{size} px" + ("" if size == trained else f" (trained at {trained} px; exported with --img-size {size})")
    return [
        ("student", f"`{name}` ({found.title} layout)"),
        ("width x blocks", f"{model.embed_dim} x {len(getattr(model, 'blocks', [])) or 'n/a'}"),
        ("parameters", f"{params / 1e6:.2f} M"),
        ("token stride (patch)", model.patch_size),
        ("resolution", at),
        ("inputs", f"mean {list(norm.mean)}, std {list(norm.std)}"),
        ("weights", f"{source.parent.name}/{source.name}"),
    ]


def _teachers(adaptors, ckpt: dict) -> tuple[str, list[str]]:
    """The teachers' table and the families they come from."""
    if adaptors is None:
        names = str(ckpt.get("args", {}).get("teacher", "unknown")).split(",")
        return "teachers: " + ", ".join(f"`{n}`" for n in names), []
    lines = ["| teacher | family | width | input size | loss weight | standardisation (patches, summary) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    families = []
    for name, a in adaptors.adaptors.items():
        about, t = adaptors.teachers.get(name, {}), a.target
        families.append(about.get("family", ""))
        lines.append(f"| `{name}` | {about.get('family', '?')} | {t.dim} | {about.get('input_size', '?')} | "
                     f"{t.weight} | {t.standardization}, {t.summary_standardization} |")  # fmt: skip
    return "\n".join(lines), families


def _usage(backbone: exports.BackboneExport, onnx: exports.OnnxExport | None, adaptors) -> list[str]:
    out = ["## Use", ""]
    if backbone.architecture:
        what = f"timm's `{backbone.architecture}` with this folder's weights (features equal to the student's"
        out += [f"{what} to {backbone.parity:.0e} relative at its resolution):", "", "```python", TIMM.rstrip(), "```"]
        if backbone.elsewhere is not None and backbone.elsewhere > exports.PARITY:
            out += [
                "At other resolutions timm resamples this folder's position table by its own rule, not the "
                f"student's ({backbone.elsewhere:.0e} relative at a second size on random images): `model.onnx` "
                "keeps the student's features at every size, and `python -m scripts.export --img-size N` gives a "
                "folder whose timm model is the student's at N px."
            ]
        out += [""]
    else:
        out += [f"{backbone.note}; `models.load_backbone(folder)` of the Proteus repository reads it.", ""]
    if onnx is not None:
        size = (
            "any height and width (multiples of the token stride)" if onnx.dynamic_size else f"{onnx.checked[0][1]} px"
        )
        out += [f"`model.onnx`: outputs {', '.join(f'`{n}`' for n in onnx.outputs)}; any batch, {size}; checked in "
                f"onnxruntime to {onnx.error:.0e} relative.", "", "```python", ONNX.rstrip(), "```", ""]  # fmt: skip
    if adaptors is not None:
        out += ["The adaptors (`adaptors.safetensors`, `adaptors.json`) map the student's tokens to each teacher's, "
                "with torch alone:", "", "```python", ADAPTORS.rstrip(), "```", ""]  # fmt: skip
    return out


def card(model: nn.Module, source: Path, *, backbone, onnx, adaptors, resolution: tuple[int, int]) -> str:
    """The model card of the student `model` read from `source` (a run's backbone file), exported at
    `resolution` = (the export's size, the training one)."""
    ckpt = read_checkpoint(source.parent)
    args = ckpt.get("args", {})
    teachers, families = _teachers(adaptors, ckpt)
    student = ckpt.get("student_name", source.parent.name)
    title = ", ".join(adaptors.adaptors) if adaptors is not None else args.get("teacher", "its teachers")
    about = "A student distilled with Proteus (feature distillation from vision foundation models, without labels)."
    rows = _student(model, source, student, resolution=resolution)
    out = [f"# `{student}` distilled from {title}", "", about, "", _table(rows), ""]
    out += ["## Teachers", "", teachers, ""]
    epochs = _epochs(source.parent)
    if args:
        recipe = [(k, f"`{args[k]}`") for k in RECIPE if k in args]
        out += ["## Recipe", "", f"Data: `{args.get('data_path')}`; epochs trained: {epochs}.", "", _table(recipe), ""]
    out += _usage(backbone, onnx, adaptors)
    evaluations = _evaluations(source.parent)
    out += ["## Evaluations", "", evaluations or "No `evaluate_all` results beside the run.", ""]
    notes = {models.FAMILIES[f].licence for f in families if f in models.FAMILIES and models.FAMILIES[f].licence}
    if notes:
        out += ["## Licence", "", *sorted(notes), ""]
    return "\n".join(out)
