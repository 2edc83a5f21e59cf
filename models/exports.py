"""The folder a distilled student is handed around in (`python -m scripts.export`), written and read.

Its backbone is in timm's Hugging Face Hub layout where timm has the student's architecture (each family says
which: `Family.timm_architecture`): `model.safetensors` (timm's own state dict) and `config.json` (timm's writer:
`architecture`, `num_features`, `model_args`, `pretrained_cfg` with the run's mean, std, input size and
our evaluations' crop), so `timm.create_model("local-dir:FOLDER", pretrained=True)` builds it offline. A layout
timm has no architecture for keeps the family's reference layout, `backbone.safetensors`, and config.json says
so. `model.onnx` (torch's ONNX exporter) computes the backbone's summary and patch tokens, and optionally every
teacher's adaptor outputs, for any batch and, where the graph allows, any height and width. The adaptors are
`adaptors.safetensors` (tensors `<teacher>/<module>`) and `adaptors.json` (the rest of adaptors.pth), which plain
torch reads (README.md, "Use a distilled student elsewhere"). Only safetensors and JSON: nothing in the folder is
unpickled.

Each weight file carries in its safetensors header (`__metadata__["proteus"]`) the record an export's `_metadata`
holds (models.checkpoints.export_metadata), with timm's model name and arguments for timm's layout, so the
file alone says what it is: `models.load_backbone` reads the folder or its weight file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn

from .checkpoints import EXPORT_METADATA, Normalization, StateDict, load_strict
from .errors import MissingFile, UsageError
from .families import FAMILIES, family_of_model
from .families.base import Family, TimmArchitecture
from .timm_backbone import TimmBackbone

CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"  # the name timm's Hub loader looks for first
REFERENCE_WEIGHTS = "backbone.safetensors"  # not timm's layout: a name timm's loader does not take for its own
ADAPTORS_JSON, ADAPTORS_WEIGHTS = "adaptors.json", "adaptors.safetensors"
FORMAT = "proteus-export"
# our evaluations' geometry (linear_eval.data): the short side resized to 256/224 of the crop, bicubic, centre crop
CROP_PCT, INTERPOLATION = 224 / 256, "bicubic"
PARITY = 1e-5  # the most relative error timm's network may show against ours at the export's resolution
ONNX, ONNX_DATA = "model.onnx", "model.onnx.data"  # the weights beside the graph only past ONNX's 2 GiB file limit
ONNX_PARITY = 1e-4  # the most relative error onnxruntime (CPU) may show against the network


class Artefact(NamedTuple):
    """One file of the folder: its name and what writes its content to a path (the caller makes it atomic)."""

    name: str
    write: Callable[[Path], None]


class BackboneExport(NamedTuple):
    """The backbone's files and what they are."""

    files: tuple[Artefact, ...]
    architecture: str | None  # timm's model name; None: timm has none, the reference layout is kept
    note: str  # what was written, in words
    parity: float | None  # timm's features against the trained network's at the export's resolution (max relative)
    # ... and at (img_size + p) x (img_size + 2p), for a position table, which timm resamples by its own rule there
    elsewhere: float | None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@torch.no_grad()
def feature_error(ours: nn.Module, theirs: nn.Module, images: torch.Tensor) -> float:
    """The larger relative error, summary token or patch tokens, of timm's network against ours on `images`:
    timm's read as every timm model is (models.timm_backbone: `forward_head(pre_logits=True)` and the tokens
    after the prefix)."""
    a = ours.eval().forward_tokens(images)
    b = (theirs if isinstance(theirs, TimmBackbone) else TimmBackbone(theirs)).eval().forward_tokens(images)
    return max(_rel(b.cls, a.cls), _rel(b.patches, a.patches))


def timm_network(model: nn.Module, found: Family, *, img_size: int) -> tuple[nn.Module, TimmArchitecture] | None:
    """timm's own model of our network (of the family `found`) with its weights (loaded strictly), and how timm
    builds it; None where its family has no timm architecture."""
    arch = found.timm_architecture(model, img_size=img_size)
    if arch is None:
        return None
    theirs = timm.create_model(arch.name, pretrained=False, **arch.model_args)
    load_strict(theirs, found.to_timm(model), f"timm's {arch.name}")
    return theirs.eval(), arch


def _header(record: dict) -> dict[str, str]:
    return {"format": "pt", EXPORT_METADATA: json.dumps(record)}


def _save_tensors(tensors: StateDict, record: dict | None) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    # own copies: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(contiguous, str(path), metadata=_header(record) if record else {"format": "pt"})


def _save_json(obj: dict) -> Callable[[Path], None]:
    return lambda path: Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def export_backbone(
    model: nn.Module,
    *,
    img_size: int,
    normalization: Normalization,
    reference: nn.Module | None = None,
    about: dict | None = None,
) -> BackboneExport:
    """The backbone's files: timm's layout (checked at `img_size`, the resolution `model`'s position table is at:
    Family.at_resolution) or, where timm has no architecture for its family, the reference layout. timm's
    features are compared with `reference`'s, the trained network that `model` is set from (default: `model`).
    `about` goes into config.json's record as is (the student's name, the file it came from)."""
    found = family_of_model(model)
    model = model.eval()
    truth = model if reference is None else reference.eval()
    record = {
        "img_size": int(img_size),
        "patch_size": int(model.patch_size),
        "family": found.name,
        "mean": list(normalization.mean),
        "std": list(normalization.std),
    }
    if isinstance(model, TimmBackbone):
        record["model"] = model.name
    built = timm_network(model, found, img_size=img_size)
    if built is None:
        weights = dict(found.to_official(model))
        why = f"timm has no architecture for the {found.title} layout: the backbone is in its reference layout"
        config = {
            "pretrained_cfg": _inputs(img_size, normalization),
            FORMAT: {**record, **(about or {}), "weights": REFERENCE_WEIGHTS, "timm": None, "note": why},
        }
        files = (Artefact(REFERENCE_WEIGHTS, _save_tensors(weights, record)), Artefact(CONFIG, _save_json(config)))
        return BackboneExport(files, None, why, None, None)
    theirs, arch = built
    patch, seed = int(model.patch_size), torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, img_size, img_size, generator=seed)
    parity = feature_error(truth, theirs, images)
    if not parity <= PARITY:
        raise AssertionError(f"timm's {arch.name} gives other features than the network ({parity:.1e} relative)")
    elsewhere = None
    if found.position_table:  # a table timm resamples by its own rule there; RoPE and timm's own models do not
        other = torch.randn(2, 3, img_size + patch, img_size + 2 * patch, generator=seed)
        elsewhere = feature_error(truth, theirs, other)
    record.update(architecture=arch.name, model_args=arch.model_args)
    theirs.pretrained_cfg = _pretrained_cfg(theirs, img_size=img_size, normalization=normalization)
    note = f"timm's {arch.name} (timm.create_model('local-dir:<folder>', pretrained=True))"
    config = {FORMAT: {**record, **(about or {}), "weights": TIMM_WEIGHTS, "timm": arch.name}}
    files = (
        Artefact(TIMM_WEIGHTS, _save_tensors(theirs.state_dict(), record)),
        Artefact(CONFIG, lambda path: _timm_config(theirs, path, arch=arch, config=config)),
    )
    return BackboneExport(files, arch.name, note, parity, elsewhere)


def _inputs(img_size: int, normalization: Normalization) -> dict:
    """The inputs the student was trained on and evaluated with, in timm's pretrained_cfg terms."""
    return dict(
        input_size=(3, int(img_size), int(img_size)),
        interpolation=INTERPOLATION,
        crop_pct=CROP_PCT,
        crop_mode="center",
        mean=tuple(normalization.mean),
        std=tuple(normalization.std),
        num_classes=0,
    )


def _pretrained_cfg(model: nn.Module, *, img_size: int, normalization: Normalization) -> dict:
    """timm's pretrained_cfg of the model, less what names a release of timm's (its tag, licence, paper, source),
    with the student's inputs."""
    drop = ("tag", "license", "paper_ids", "paper_name", "notes", "origin_url", "hf_hub_id", "url", "file", "source")
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in drop}
    return {**cfg, **_inputs(img_size, normalization)}


def _timm_config(model: nn.Module, path: Path, *, arch: TimmArchitecture, config: dict) -> None:
    """config.json by timm's own writer (what its Hub and local-dir loaders read back), with our record beside."""
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(model, str(path), model_config=dict(config), model_args=dict(arch.model_args))


# --- ONNX ---------------------------------------------------------------------------------------------
class OnnxGraph(nn.Module):
    """What model.onnx computes from `images` [B, 3, H, W], normalised as the student's inputs were: `summary`
    [B, D] and `patches` [B, H/p * W/p, D] (row-major on the patch grid), and with adaptors each teacher's
    predicted `<teacher>.summary` and `<teacher>.patches` in the teacher's own space (a level it has no head for
    is left out)."""

    def __init__(self, backbone: nn.Module, adaptors: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.adaptors = backbone.eval(), adaptors.eval() if adaptors is not None else None
        self.names = ["summary", "patches"]
        for name, a in self.adaptors.adaptors.items() if adaptors is not None else ():
            has = (a.token_head is not None, a.fea_head is not None or a.patch_head is not None)
            self.names += [f"{name}.{level}" for level, kept in zip(("summary", "patches"), has) if kept]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.backbone.forward_tokens(images)
        out = [tokens.cls, tokens.patches]
        for a in self.adaptors.adaptors.values() if self.adaptors is not None else ():
            predicted = a.predict(tokens)
            out += [t for t in (predicted.cls, predicted.patches) if t is not None]
        return tuple(out)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """These loggers at WARNING and above while the body runs."""
    before = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


class OnnxExport(NamedTuple):
    """model.onnx as written and checked."""

    outputs: tuple[str, ...]
    dynamic_size: bool  # any height and width (multiples of the patch size); else only the export's resolution
    checked: tuple[tuple[int, int, int], ...]  # (batch, height, width) onnxruntime was compared at
    error: float  # the largest relative error of any output there


def onnx_inputs(patch: int, img_size: int, dynamic_size: bool) -> tuple[tuple[int, int, int], ...]:
    """The inputs a graph is checked at: two batch sizes, and two resolutions where it takes any."""
    return (
        (2, img_size, img_size),
        (3, img_size + patch, img_size + 2 * patch) if dynamic_size else (3, img_size, img_size),
    )


@torch.no_grad()
def onnx_error(graph: OnnxGraph, path: Path, inputs: tuple[tuple[int, int, int], ...]) -> float:
    """The largest relative error of onnxruntime's outputs (CPU) against the network's on random images; inf
    where the graph cannot run at one of the sizes (a size the exporter fixed)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, (batch, h, w) in enumerate(inputs):
        images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(i))
        try:
            got = session.run(None, {"images": images.numpy()})
        except (
            Fail,
            InvalidArgument,
            RuntimeException,
        ):  # onnxruntime's: a reshape the exporter specialised to the example's size
            return math.inf
        worst = max([worst, *(_rel(torch.from_numpy(a), b) for a, b in zip(got, graph(images), strict=True))])
    return worst


def export_onnx(
    model: nn.Module, path: str | os.PathLike, *, img_size: int, adaptors: nn.Module | None = None
) -> OnnxExport:
    """model.onnx at `path` (torch's exporter, its default opset), for any batch and, where the exported graph
    computes every size right, any height and width; else at `img_size` only (a network whose
    forward takes one size: a timm model built without dynamic_img_size).
    Checked against the network in onnxruntime before it is returned."""
    graph = OnnxGraph(model, adaptors)
    path, patch = Path(path), int(model.patch_size)
    example = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    large = sum(t.numel() * t.element_size() for t in graph.state_dict().values()) > 2**31 - 2**26
    for dynamic_size in (True, False):
        batch = torch.export.Dim("batch", min=1)
        size = {0: batch}
        if dynamic_size:
            size.update({2: patch * torch.export.Dim("rows", min=1), 3: patch * torch.export.Dim("cols", min=1)})
        with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):  # the exporter's notes on its internals
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(path), dynamo=True, external_data=large, input_names=["images"],
                              output_names=graph.names, dynamic_shapes={"images": size})  # fmt: skip
        inputs = onnx_inputs(patch, img_size, dynamic_size)
        error = onnx_error(graph, path, inputs)
        if error <= ONNX_PARITY:
            return OnnxExport(tuple(graph.names), dynamic_size, inputs, error)
    raise AssertionError(f"onnxruntime's outputs of {path} differ from the network's ({error:.1e} relative)")


# --- reading ----------------------------------------------------------------------------------------
class ExportedFolder(NamedTuple):
    """An exported folder as load_backbone reads it."""

    weights: Path  # its backbone's weight file (its header's record holds the mean and std config.json shows)


def _config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise UsageError(f"{folder} is a folder without {CONFIG}: not a backbone exported by scripts.export")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e})") from None
    record = config.get(FORMAT) if isinstance(config, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("weights"), str):
        raise UsageError(f"{path} holds no '{FORMAT}' record: not a backbone exported by scripts.export")
    return config


def exported_folder(path: str | os.PathLike) -> ExportedFolder | None:
    """The export a --backbone folder holds; None for a path that is no folder."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    config = _config(folder)
    weights = folder / Path(config[FORMAT]["weights"]).name
    if not weights.is_file():
        raise MissingFile(f"{folder} lacks {weights.name}, which its {CONFIG} names")
    return ExportedFolder(weights)


def backbone_files(path: str | os.PathLike) -> tuple[Path, ...]:
    """The files a --backbone names: an exported folder's config.json and weight file, else the file itself
    (what identifies a backbone in results and feature caches)."""
    found = exported_folder(path)
    return (Path(path),) if found is None else (Path(path) / CONFIG, found.weights)


def timm_export_family(trained: dict) -> Family:
    """The family of a timm-layout export, from its record (whose from_timm reads the weights back)."""
    found = FAMILIES.get(trained.get("family", ""))
    if found is None or not isinstance(trained.get("model_args"), dict):
        raise UsageError(f"a timm-layout export of unknown family {trained.get('family')!r}")
    return found


# --- adaptors -----------------------------------------------------------------------------------------
ADAPTOR_LAYOUT = {
    "tensors": "adaptors.safetensors holds <teacher>/<module>.<tensor>, <module> one of the heads or cls_std/patch_std",
    "head": "<head>.0 is LayerNorm(student width, eps=1e-5), <head>.1 is Linear(student width, teacher dim)",
    "token_head": "reads the student's summary token; predicts the teacher's summary (CLS) token",
    "fea_head": "reads every patch token; predicts the teacher's patch tokens (patch_head where there is no fea_head)",
    "standardization": (
        "the heads predict standardised targets; back to the teacher's space: none: y; zscore: y * scale + mean; "
        "phi-s: (y * scale) @ rotation + mean (cls_std for the summary, patch_std for the patches)"
    ),
}


def adaptor_files(data: dict) -> tuple[Artefact, ...]:
    """adaptors.pth's content (Adaptors.export) as adaptors.safetensors (every tensor) and adaptors.json (the rest:
    the student, each teacher's name, width, loss weights, standardisations, family, patch size, input size,
    mean and std, which heads it has)."""
    tensors, teachers = {}, {}
    for name, entry in data["teachers"].items():
        if "/" in name:
            raise UsageError(f"teacher name {name!r} has a '/', which adaptors.safetensors' key names reserve")
        state = entry["state_dict"]
        tensors.update({f"{name}/{k}": v for k, v in state.items()})
        heads = sorted({k.split(".")[0] for k in state if k.split(".")[0].endswith("_head")})
        teachers[name] = {**{k: v for k, v in entry.items() if k != "state_dict"}, "heads": heads}
    meta = {"format": data["format"], "student": data["student"], "teachers": teachers, "layout": ADAPTOR_LAYOUT}
    return Artefact(ADAPTORS_WEIGHTS, _save_tensors(tensors, None)), Artefact(ADAPTORS_JSON, _save_json(meta))


def read_adaptor_files(path: str | os.PathLike) -> dict:
    """adaptors.json + adaptors.safetensors (a folder, or either file) -> adaptors.pth's content."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta_path, weights_path = folder / ADAPTORS_JSON, folder / ADAPTORS_WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise MissingFile(f"adaptors file not found: {p}")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights_path), device="cpu")
    except (ValueError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise UsageError(f"cannot read the adaptors in {folder}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("teachers"), dict):
        raise UsageError(f"{meta_path} is not an adaptors.json written by scripts.export")
    teachers = {}
    for name, entry in meta["teachers"].items():
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        teachers[name] = {**{k: v for k, v in entry.items() if k != "heads"}, "state_dict": state}
    return {"format": meta.get("format"), "student": meta.get("student", {}), "teachers": teachers}
