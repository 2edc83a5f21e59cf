"""Output folders and atomic writes: a crash, a kill -9 or a full disk never leaves half a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


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


class DiskFullError(OSError):
    """A write that failed for lack of space or quota; the message names the folder and what is kept."""

    def __str__(self) -> str:
        return self.strerror


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
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the last {path.name} is intact" if path.exists() else f"{path.name} was not written"
            raise DiskFullError(e.errno, f"no space left on {path.parent} ({e.strerror}); {kept}") from None
        raise


def remove_stale_temp_files(directory: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temp files atomic_save leaves when killed (-9) mid-write, for the given file names."""
    stale = [p for name in names for p in Path(directory).glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Text (results.json) written the same way: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def atomic_write_json(obj: object, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
