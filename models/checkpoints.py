"""Reading weight files safely: safe loading, TorchScript archives as data, strict loading with errors that name
the keys, and the record an export keeps of its training resolution. What a file means is its family's
business (models.families); building a backbone from one is models.backbones'.

Every file a user hands us is read with `torch.load(weights_only=True)`; the only extra global
allowed is `argparse.Namespace`, which the reference release pickles into its checkpoints. OpenAI's
TorchScript archives are read as data (`torchscript_state_dict`): their code is never run.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .errors import MissingFile, UsageError

StateDict = dict[str, torch.Tensor]

# Our entry in a state dict's `_metadata` (the table torch keeps beside the weights, keyed by module
# name, for per-module versions): an exported backbone records the resolution it was trained at there,
# because a key of its own would break a strict load into the reference's model.
EXPORT_METADATA = "proteus"


def safe_load(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """torch.load with weights_only=True (memory-mapped with `mmap`: tensors read only when used), or a safetensors
    file (timm's and the Hugging Face Hub's format), with a clear error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"checkpoint file not found: {path}")
    if is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                header = f.metadata() or {}
            return with_header_record(tensors, header, path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read checkpoint {path}: it is a damaged safetensors file ({e})") from None
    if is_torchscript_archive(path):  # torch.load refuses it too, after a warning that names torch.jit.load
        raise UsageError(f"cannot read checkpoint {path}: {_TORCHSCRIPT}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise UsageError(f"cannot read checkpoint {path}: {_describe(path, e)}") from None


def with_header_record(tensors: dict, header: dict, path: Path) -> dict:
    """A safetensors file's tensors, carrying in `_metadata` (export_metadata) the record an export writes into the
    file's `header` (`__metadata__["proteus"]`, JSON), as torch.save's exports carry it."""
    if EXPORT_METADATA not in header:
        return tensors
    try:
        record = json.loads(header[EXPORT_METADATA])
    except ValueError:
        raise UsageError(f"{path}'s header record '{EXPORT_METADATA}' is not JSON") from None
    out = OrderedDict(tensors)
    out._metadata = OrderedDict({EXPORT_METADATA: record})
    return out


_TORCHSCRIPT = (
    "it is a TorchScript archive (OpenAI CLIP's .pt format), which only the clip_* teachers and --clip-checkpoint "
    "read (its tensors, as data; its code is never run)"
)
# What a weight file may import when unpickled (what torch's weights_only loader allows, plus our Namespace).
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "argparse.Namespace", "builtins.set")


def _pickle_globals(data: bytes) -> list[str]:
    """The module.name of every global a pickle imports (GLOBAL, or STACK_GLOBAL after two strings)."""
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a truncated pickle: the names read so far are enough
        pass
    return names


def _pickles(path: Path) -> list[bytes]:
    """The pickles of a torch file: a zip archive's data.pkl, or the file itself when it starts as a pickle
    (the legacy torch format is a series of them)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [zf.read(n) for n in zf.namelist() if n.endswith("data.pkl")]
    data = path.read_bytes()
    return [data] if data[:1] == b"\x80" else []


def pickled_globals(path: str | os.PathLike) -> set[str]:
    """The module.name of every global a torch file's pickles import, read without unpickling anything
    (empty for a file that is no readable zip or pickle)."""
    try:
        return {g for p in _pickles(Path(path)) for g in _pickle_globals(p)}
    except (zipfile.BadZipFile, OSError):
        return set()


def _describe(path: Path, e: Exception) -> str:
    """Why a file is not a weight file we read, from what it is (never torch's advice to set
    weights_only=False, which would run any code the file holds)."""
    head = path.read_bytes()[:64]
    pickles = _pickles(path)
    if zipfile.is_zipfile(path) and not pickles:
        return "it is a zip archive, not a torch checkpoint"
    if not zipfile.is_zipfile(path) and head.startswith(b"PK"):
        return "it is a truncated or damaged torch checkpoint (its zip archive is incomplete)"
    unsafe = sorted({g for p in pickles for g in _pickle_globals(p) if not g.startswith(_SAFE_GLOBAL_PREFIXES)})
    if unsafe:
        return f"it is a pickle that imports {', '.join(unsafe[:3])}: refused, code in a weight file is never run"
    if pickles and not zipfile.is_zipfile(path) and "magic number" in str(e):
        return "it is a plain Python pickle, not a torch checkpoint"
    if pickles:
        return f"it is a damaged torch checkpoint ({str(e).strip().splitlines()[0][:120] if str(e).strip() else e})"
    return f"it is not a torch file (it starts with {head[:16]!r})"


def is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --- TorchScript archives, read as data ----------------------------------------------------------
# An archive is a zip of <root>/data.pkl (a pickle of the module objects, of the archive's own
# `__torch__.*` classes, whose state holds the tensors), <root>/data/<key> (the tensors' storages) and
# <root>/code/ (the classes, which torch.jit.load compiles and runs: __setstate__ and the like). Here the
# pickle may import only what its tensors and attributes need; the archive's classes become inert
# records, and which of their tensors are parameters and buffers is read from the `__parameters__` and
# `__buffers__` lines of their definitions as text.
class _Unreadable(Exception):
    """Why an archive cannot be read as data, in words."""


class _ScriptObject:
    """An object of one of the archive's classes: it keeps the state the pickle gives it, and nothing runs."""

    module, name, state = "", "", None

    def __new__(cls, *args):
        return object.__new__(cls)

    def __setstate__(self, state: object) -> None:
        self.state = state


def _same(value: object, *_: object) -> object:
    return value


def _archive_globals() -> dict[str, object]:
    """What an archive's pickle may import: the tensor rebuild functions and storage types that torch's
    weights_only unpickler allows, OrderedDict, and TorchScript's list/dict tags (which only return their value)."""
    from torch import _weights_only_unpickler

    allowed = {
        k: v
        for k, v in _weights_only_unpickler._get_allowed_globals().items()
        if k.startswith("torch._utils._rebuild_") or isinstance(v, torch.serialization.StorageType)
    }
    allowed["collections.OrderedDict"] = OrderedDict
    for tag in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag"):
        allowed[f"torch.jit._pickle.{tag}"] = _same
    return allowed


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, archive: _Archive) -> None:
        super().__init__(io.BytesIO(archive.read("data.pkl")))
        self.archive, self.allowed, self.classes = archive, _archive_globals(), {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            key = (module, name)
            if key not in self.classes:
                self.classes[key] = type(name, (_ScriptObject,), {"module": module, "name": name})
            return self.classes[key]
        if f"{module}.{name}" in self.allowed:
            return self.allowed[f"{module}.{name}"]
        raise _Unreadable(f"its pickle imports {module}.{name}, which a module's weights never need: refused")

    def persistent_load(self, pid: object) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Unreadable(f"its pickle refers to {str(pid)[:60]}, not to a tensor storage")
        _, storage_type, key, _, numel = pid
        return self.archive.storage(str(key), storage_type.dtype, int(numel))


class _Archive:
    """A TorchScript archive's records (by name under its root folder) and tensor storages."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        roots = [n[: -len("/data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(roots) != 1:
            raise _Unreadable("it holds no <folder>/data.pkl")
        self.zf, self.root, self.storages, self.sources, self.classes = zf, roots[0], {}, {}, {}
        self.swap = self.read("byteorder").decode() != sys.byteorder if self.has("byteorder") else False

    def has(self, name: str) -> bool:
        return f"{self.root}/{name}" in self.zf.NameToInfo

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise _Unreadable(f"it has no {name}")
        return self.zf.read(f"{self.root}/{name}")

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.storage.TypedStorage:
        if key not in self.storages:
            data = bytearray(self.read(f"data/{key}"))
            nbytes = numel * dtype.itemsize
            if len(data) < nbytes:
                raise _Unreadable(f"its storage data/{key} holds {len(data)} bytes, not {nbytes}")
            untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
            if self.swap:
                untyped.byteswap(dtype)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]

    def declared(self, obj: _ScriptObject) -> dict[str, list[str]] | None:
        """{"__parameters__": [...], "__buffers__": [...]} of a module's class, from its definition's text
        (code/<module path>.py); None for a class that is no module. Each class is read once."""
        if (obj.module, obj.name) not in self.classes:
            self.classes[obj.module, obj.name] = self._declared(obj)
        return self.classes[obj.module, obj.name]

    def _declared(self, obj: _ScriptObject) -> dict[str, list[str]] | None:
        path = f"code/{obj.module.replace('.', '/')}.py"
        if path not in self.sources:
            self.sources[path] = self.read(path).decode("utf-8").splitlines()
        lines = self.sources[path]
        start = next((i for i, line in enumerate(lines) if line.startswith(f"class {obj.name}(Module):")), None)
        if start is None:
            return None
        found = {}
        for line in lines[start + 1 :]:
            if not line[:1].isspace():
                break
            key, _, value = line.strip().partition(" = ")
            if key in ("__parameters__", "__buffers__"):
                found[key] = ast.literal_eval(value)
        return found

    def tensors(self, obj: _ScriptObject, prefix: str = "") -> StateDict:
        """Module `obj`'s parameters, buffers and then its submodules' (recursively), named and ordered as
        torch.jit.load(...).state_dict() names them."""
        declared = self.declared(obj)
        if not isinstance(obj.state, dict):
            raise _Unreadable(
                f"its {obj.module}.{obj.name} sets its state with the archive's own code (__setstate__), "
                "which is never run, so its weights cannot be read as data"
            )
        out = {}
        for kind in ("__parameters__", "__buffers__"):
            names = set(declared.get(kind, ()))
            out.update({prefix + k: v.detach() for k, v in obj.state.items() if k in names and torch.is_tensor(v)})
        for k, v in obj.state.items():
            if isinstance(v, _ScriptObject) and self.declared(v) is not None:
                out.update(self.tensors(v, f"{prefix}{k}."))
        return out


# what to do with an archive that cannot be read as data but is trusted: its state dict, which is read as data
CONVERT = (
    'if you trust it, convert it: python -c "import sys, torch; torch.save(torch.jit.load(sys.argv[1], '
    "map_location='cpu').state_dict(), sys.argv[2])\" FILE.pt FILE.pth, and pass FILE.pth"
)


def torchscript_state_dict(path: str | os.PathLike) -> StateDict:
    """A TorchScript archive's parameters and buffers (OpenAI CLIP's .pt files), as
    `torch.jit.load(path).state_dict()` gives them, read as data: nothing of the archive is compiled or run,
    and a damaged or forged archive is a ValueError."""
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(zf)
            root = _ArchiveUnpickler(archive).load()
            if not isinstance(root, _ScriptObject) or archive.declared(root) is None:
                raise _Unreadable(f"its data.pkl holds a {type(root).__name__}, not a module")
            return archive.tensors(root)
    except _Unreadable as e:
        raise UsageError(f"cannot read TorchScript archive {path}: {e}; {CONVERT}") from None
    except Exception as e:  # noqa: BLE001 - a damaged zip, pickle or code file raises many types
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read TorchScript archive {path}: it is damaged ({why})") from None


def load_strict(model: nn.Module, state_dict: StateDict, source: str, *, optional: tuple[str, ...] = ()) -> None:
    """load_state_dict(strict=True) with an error that names the missing/unexpected/mis-shaped keys.

    Keys in `optional` (e.g. a mask token a teacher file does not carry) may be absent.
    """
    check_keys(model.state_dict(), state_dict, source, optional=optional)
    model.load_state_dict(state_dict, strict=False)


def check_keys(own: StateDict, state_dict: StateDict, source: str, *, optional: tuple[str, ...] = ()) -> None:
    """Raise one error naming every key of `state_dict` missing from, unknown to or mis-shaped for `own`."""
    missing = sorted(k for k in own if k not in state_dict and k not in optional)
    unexpected = sorted(k for k in state_dict if k not in own)
    shapes = sorted(
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {few_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model): {few_names(shapes)}")
    if problems:
        raise UsageError(f"weights in {source} do not match the model; " + "; ".join(problems))


def few_names(items: list[str], n: int = 8) -> str:
    items = sorted(items, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def swap(key: str, pairs: tuple[tuple[str, str], ...], reverse: bool) -> str:
    """Replace the first matching prefix of `key` (ours -> theirs, or theirs -> ours when reversed): how the
    families rename the parts of a ViT their official layout names differently."""
    for ours, theirs in pairs:
        a, b = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(a):
            return b + key[len(a) :]
    return key


def strip_prefix(state_dict: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Keep the keys under the first prefix that any key carries, with that prefix removed."""
    for p in prefixes:
        if any(k.startswith(p) for k in state_dict):
            return {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
    return dict(state_dict)


def backbone_name(path: str | os.PathLike) -> str:
    """A backbone file's name for titles and labels: its folder and file name, since every run exports
    the same `backbone.pth`."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


class Normalization(NamedTuple):
    """The mean and std a backbone's inputs were normalised with in training (what its evaluations must use)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, record: dict) -> Normalization | None:
        """The "mean" and "std" a record (an export's metadata, timm's pretrained_cfg) holds, else None."""
        mean, std = record.get("mean"), record.get("std")
        if all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std)):
            return cls(tuple(map(float, mean)), tuple(map(float, std)))
        return None


def export_metadata(ckpt: object) -> dict:
    """{"img_size", "patch_size"} an exported backbone is built at, its training size unless it was exported at
    another (scripts.export --img-size) ({} for other files): the official
    DinoVisionTransformer loads it strictly only when built with these. With "family" and "model" when the
    export says which family and model it is (a timm model's weights do not say it themselves),
    "normalization" (a Normalization) when it records the mean and std its inputs had, and "architecture" and
    "model_args" for weights in timm's layout (models.exports: timm's model name and create_model arguments)."""
    meta = getattr(ckpt, "_metadata", None)
    record = meta.get(EXPORT_METADATA) if isinstance(meta, dict) else None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in ("img_size", "patch_size")):
        return {}  # not ours, or not a record we wrote: the weights alone tell the shape
    names = {k: record[k] for k in ("family", "model", "architecture") if isinstance(record.get(k), str)}
    if isinstance(record.get("model_args"), dict):
        names["model_args"] = record["model_args"]
    if (normalization := Normalization.of(record)) is not None:
        names["normalization"] = normalization
    return {"img_size": record["img_size"], "patch_size": record["patch_size"], **names}
