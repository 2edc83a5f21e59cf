"""Reading and writing weights: safe loading, official layouts, atomic saves, load_backbone.

Every file a user hands us is read with `torch.load(weights_only=True)`; the only extra global
allowed is `argparse.Namespace`, which the reference release pickles into its checkpoints.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .architectures import vit_from_state_dict
from .vision_transformer import ViT

StateDict = dict[str, torch.Tensor]


def safe_load(path: str | os.PathLike) -> object:
    """torch.load with weights_only=True and a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"cannot read checkpoint {path}: {_load_error(e)}") from None


def _load_error(e: Exception) -> str:
    """torch's weights_only message advises weights_only=False: wrong for a corrupt file, unsafe for any."""
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|\Z)", text, re.S)
    if m and "Unsupported global" in m.group(1):
        name = re.search(r"GLOBAL (\S+)", m.group(1))
        return f"it pickles Python objects ({name.group(1) if name else 'unknown'}), which are never unpickled here"
    if m or "Weights only load failed" in text:
        return "the file is corrupt or not a torch checkpoint"
    return text.splitlines()[0] if text else type(e).__name__


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create an output folder up front, so a bad path is one clear error before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"output folder {path} is not writable")
    return path


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; others on the cluster must read checkpoints
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_strict(model: nn.Module, state_dict: StateDict, source: str, optional: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict=True) with an error that names the missing/unexpected/mis-shaped keys.

    Keys in `optional` (e.g. a mask token a teacher file does not carry) may be absent.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict and k not in optional)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {_few(shapes)}")
    if problems:
        raise ValueError(f"weights in {source} do not match the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


def _few(items: list[str], n: int = 8) -> str:
    items = sorted(items, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --- layouts -----------------------------------------------------------------------------------
_SWIGLU_TO_OURS = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))


def from_dinov2(state_dict: StateDict) -> StateDict:
    """Official DINOv2 layout -> ours: unchunk `blocks.c.i.` and rename SwiGLU w12/w3."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block_chunks > 0 layout
        for a, b in _SWIGLU_TO_OURS:
            k = k.replace(a, b)
        out[k] = v
    return out


def to_dinov2(model: ViT) -> StateDict:
    """Our ViT -> the official DINOv2 key layout (loads strictly into DinoVisionTransformer)."""
    swiglu = model.blocks[0].mlp.__class__.__name__ == "GluMlp"
    out = {}
    for k, v in model.state_dict().items():
        if swiglu:
            for b, a in _SWIGLU_TO_OURS:
                k = k.replace(a, b)
        out[k] = v.detach().clone().cpu()
    return out


def strip_prefix(state_dict: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Keep the keys under the first prefix that any key carries, with that prefix removed."""
    for p in prefixes:
        if any(k.startswith(p) for k in state_dict):
            return {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
    return dict(state_dict)


# --- students ----------------------------------------------------------------------------------
def backbone_state_dict(ckpt: object, path: str | os.PathLike) -> StateDict:
    """Find the student backbone in any checkpoint format we accept, in our key layout.

    - ours: `checkpoint.pth` {"student": ...} or the exported flat `backbone.pth`
    - the reference release's `checkpoint.pth` {"model": {"student.backbone.*", ...}, "args": Namespace}
    - an official DINOv2 flat state dict
    - DINOv2 training checkpoints {"teacher": {"backbone.*", heads}} (the weights DINOv2 evaluates), and
      the common {"state_dict": ...} / {"model": ...} wrappers, with module./backbone. prefixes
    """
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if isinstance(ckpt.get("student"), dict):
        sd = ckpt["student"]
    elif isinstance(ckpt.get("model"), dict) and any(k.startswith("student.backbone.") for k in ckpt["model"]):
        sd = strip_prefix(ckpt["model"], ("student.backbone.",))
    elif wrapper := next((k for k in ("teacher", "model", "state_dict") if isinstance(ckpt.get(k), dict)), None):
        sd = strip_prefix(ckpt[wrapper], ("module.backbone.", "backbone.", "module."))
    else:
        sd = strip_prefix(ckpt, ("module.backbone.", "backbone.", "module."))
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(
            f"{path} holds no ViT backbone (looked for cls_token and patch_embed.proj.weight; "
            f"top-level keys: {_few(sorted(map(str, ckpt)))})"
        )
    return from_dinov2(sd)


def load_backbone(path: str | os.PathLike, **kwargs) -> ViT:
    """Rebuild a student/DINOv2 backbone from a file, inferring its architecture from the weights."""
    sd = backbone_state_dict(safe_load(path), path)
    model = vit_from_state_dict(sd, **kwargs)
    load_strict(model, sd, str(path), optional=("mask_token",))
    return model
