"""Output folders and atomic writes: a crash, a kill -9 or a full disk never leaves half a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models.errors import UsageError
from models.exports import backbone_files


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create an output folder up front, so a bad path is one clear error before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable")
    return path


class DiskFullError(OSError):
    """A write that failed for lack of space or quota; the message names the folder and what is kept."""

    def __str__(self) -> str:
        return self.strerror


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError anywhere in `exc`'s __cause__/__context__ chain, else None. Libraries wrap it:
    torch's zip writer raises RuntimeError("unexpected pos") with the OSError only in __context__."""
    pending, seen, ours = [exc], set(), None
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DiskFullError):  # ours, whose strerror is a message: look for the system's below it
            ours = ours or e
        elif isinstance(e, OSError) and e.errno in DISK_FULL:
            return e
        pending += [e.__cause__, e.__context__]
    return ours


def raise_if_disk_full(exc: BaseException, path: str | os.PathLike, *more: str | os.PathLike) -> None:
    """Raise DiskFullError (one line: the folder, the cause, what is kept) when a full disk or quota caused `exc`
    while `path` (and `more`) were being replaced; otherwise return, and the caller re-raises `exc`. Call it
    in the except block, after removing the temp files."""
    full = disk_full_cause(exc)
    if full is None:
        return
    paths = [Path(p) for p in (path, *more)]
    folder = Path(os.path.commonpath([p.parent for p in paths]))
    names = ", ".join(str(p.relative_to(folder)) for p in paths)
    if all(p.exists() for p in paths):
        kept = f"the last {names} {'are' if len(paths) > 1 else 'is'} intact"
    else:
        kept = f"{names} {'were' if len(paths) > 1 else 'was'} not written"
    raise DiskFullError(full.errno, f"no space left on {folder} ({full.strerror}); {kept}") from None


def shared_mode(*, directory: bool = False) -> int:
    """The mode the umask gives a new file (or folder): what others on the cluster may read, which mkstemp's and
    mkdtemp's private 0600/0700 would deny."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_replace(path) as tmp: write(tmp)`: the body writes a temp file in path's folder, which then
    replaces `path` (fsynced, readable by the group like any file), so a crash or kill -9 never leaves half a
    file. On any failure the temp file is removed and `path` is untouched; a full disk or quota is
    DiskFullError, one line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        _fsync(tmp)
        os.chmod(tmp, shared_mode())  # mkstemp makes 0600; others on the cluster must read checkpoints
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(e, path)
        raise


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a late ENOSPC (NFS, quotas) surfaces here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save through atomic_replace. torch writes to a Python file object, so that a full disk is an
    OSError it wraps (a file name would give a C++ error that hides the cause)."""
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def remove_stale_temp_files(directory: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temp files atomic_replace leaves when killed (-9) mid-write, for the given file names."""
    stale = [p for name in names for p in Path(directory).glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Text (results.json, results.md) written through atomic_replace."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(obj: object, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def append_text(text: str, path: str | os.PathLike) -> None:
    """Append to a log (one write); a failure cuts the file back to what it held, so no half line is left, and a
    full disk is DiskFullError, one line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    size = os.fstat(fd).st_size
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data) :]
    except BaseException as e:
        os.ftruncate(fd, size)
        raise_if_disk_full(e, path)
        raise
    finally:
        os.close(fd)


def atomic_save_all(objs: dict[Path, object], journal: Path) -> None:
    """torch.save several files as one unit (the checkpoints of a run's students): after any kill,
    finish_saves(journal, ...) leaves either all the old files or all the new ones. A redo log: each new file
    is written in full beside its target (`.<name>.next`, atomic_save), then the journal naming them is written
    atomically (the commit point), then each is renamed onto its target and the journal removed."""
    folder = journal.parent
    staged = {path: _staged(path) for path in objs}
    try:
        for path, obj in objs.items():
            atomic_save(obj, staged[path])
        _fsync(folder)
        moves = [[os.path.relpath(staged[p], folder), os.path.relpath(p, folder)] for p in objs]
        atomic_write_json({"replace": moves}, journal)
    except BaseException as e:  # before the commit point: the old files stand
        for p in staged.values():
            p.unlink(missing_ok=True)
        raise_if_disk_full(e, *objs)
        raise
    finish_saves(journal, list(objs))


def finish_saves(journal: Path, paths: list[Path]) -> None:
    """Complete an atomic_save_all of `paths` that a kill interrupted: past its commit point (the journal is
    there), the staged files replace their targets; before it, they are removed (and their temp files)."""
    folder = journal.parent
    if journal.exists():
        # the journal only says that the save was committed: the files it may move are `paths`' own staged
        # files, so a journal written by anyone else can never rename other files of the folder
        expected = sorted([os.path.relpath(_staged(p), folder), os.path.relpath(p, folder)] for p in paths)
        try:
            moves = sorted(json.loads(journal.read_text())["replace"])
        except (ValueError, KeyError, TypeError):
            moves = None
        if moves != expected:
            raise UsageError(f"{journal} is not the journal of this run's checkpoints {', '.join(map(str, paths))}: "
                             "it is written atomically, so something else wrote it; remove it to continue")  # fmt: skip
        for path in paths:
            if _staged(path).exists():  # a kill in the middle of the renames left the rest to do
                os.replace(_staged(path), path)
        for d in {path.parent for path in paths}:
            _fsync(d)  # the renames reach the disk before the journal's removal does
        journal.unlink()
    remove_stale_temp_files(folder, (journal.name,))
    for path in paths:
        _staged(path).unlink(missing_ok=True)
        remove_stale_temp_files(path.parent, (_staged(path).name,))


def _staged(path: Path) -> Path:
    return path.with_name(f".{path.name}.next")


def file_sha256(path: str | os.PathLike) -> str:
    """A backbone file's sha256; a folder written by scripts.export: that of its config.json and weight file's
    digests (its README and ONNX graph are no part of the backbone)."""
    files = backbone_files(path)
    digests = []
    for file in files:
        with open(file, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    return digests[0] if len(files) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


def replace_folder(target: Path, write: Callable[[Path], None], *, ours: Callable[[Path], bool], what: str) -> None:
    """Runs `write(folder)` into a new folder beside `target`, which then takes its place: a failure leaves no
    half folder and an earlier one intact. Only an empty folder or one of ours (`ours(target)`, one of `what`)
    is replaced; anything else is refused in one line."""
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not ours(target)):
        raise UsageError(f"{target} exists and is not {what}: choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(new)
        for path in (new, *new.iterdir()):  # mkdtemp's and safetensors' 0600: others on the cluster read them too
            path.chmod(shared_mode(directory=path.is_dir()))
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            target.rename(old / target.name)
            new.rename(target)
            shutil.rmtree(old)
        else:
            new.rename(target)
    except BaseException as e:
        shutil.rmtree(new, ignore_errors=True)
        raise_if_disk_full(e, target)
        raise
