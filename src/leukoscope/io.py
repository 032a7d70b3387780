"""Atomic, durable file output: write to a temporary file in the same folder, fsync it, rename it, fsync the folder.

Temporary files are named ``.NAME.PID.RANDOM.tmp`` (the writer's process id in the name). A
process killed mid-write leaves one behind; the first atomic write of a later process into
the same folder removes the stale ones (:func:`remove_stale_temp_files`): a temporary file is
stale when it is older than :data:`STALE_AFTER_S` (1 h), or older than
:data:`DEAD_PID_GRACE_S` (60 s) and the process in its name no longer runs on this machine.
Only names of that pattern (and the older ``.NAME.RANDOM.tmp`` form, by age alone) are touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: folder_lock runs unlocked
    fcntl = None

_UMASK = os.umask(0)
os.umask(_UMASK)


#: A temporary file older than this (seconds) is stale whatever its writer.
STALE_AFTER_S = 3600.0
#: A temporary file whose writer's process no longer runs is stale once older than this (seconds).
DEAD_PID_GRACE_S = 60.0
#: ``.NAME.PID.RANDOM.tmp`` (this module's temporary files) and the older ``.NAME.RANDOM.tmp``
#: (``RANDOM``: :func:`tempfile.mkstemp`'s 8 characters).
_TMP_WITH_PID = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_TMP_OLD = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_CLEANED: set[str] = set()  # folders this process has cleaned already


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep the file
    return True


def remove_stale_temp_files(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the stale temporary files of interrupted atomic writes in ``folder`` (the rule in the
    module docstring); returns the paths removed. Other files are never touched."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        name = e.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        m = _TMP_WITH_PID.match(name)
        if m is None and not _TMP_OLD.match(name):
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            age = now - e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = age > STALE_AFTER_S or (m is not None and age > DEAD_PID_GRACE_S
                                        and not _pid_running(int(m.group("pid"))))
        if stale:
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
    return removed


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync folders
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True):
    """Yield a temporary path beside ``path``; on success it is fsynced and replaces ``path`` atomically,
    and the folder is fsynced, so that after a crash ``path`` holds either the old or the whole new file.
    ``durable=False`` skips the two fsyncs (about 14 ms per file on ext4) for bulk outputs that can be
    made again, such as the thousands of images of a synthetic dataset; the rename stays atomic.

    The first call of a process for a folder removes stale temporary files of interrupted writes
    (:func:`remove_stale_temp_files`).

    An :class:`OSError` without a file name (a full disk inside ``write``) is raised again naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.fspath(path.parent)
    if os.path.abspath(folder) not in _CLEANED:
        _CLEANED.add(os.path.abspath(folder))
        remove_stale_temp_files(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(folder)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:  # e.g. disk full inside write(): name the file
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: The lock file of a folder held by :func:`folder_lock`.
LOCK_NAME = ".leukoscope.lock"
_HELD: dict[str, int] = {}  # folders this process holds: absolute path -> depth


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock."""


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "--out folder"):
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.leukoscope.lock``, which
    records the holder's pid) for the duration of the block. Another process that asks for it gets
    :class:`FolderLockedError` at once, naming the folder and the holder's pid. Re-entrant within a
    process; released when the block ends or the process dies (the file itself stays). Where
    ``fcntl`` does not exist (Windows) the block runs unlocked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(folder)
    if key in _HELD or fcntl is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    lock = folder / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderLockedError(
                f"{folder} is in use by another leukoscope process (pid {holder}); wait for it to finish, "
                f"or choose another {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield folder
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(obj, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n", path)


def atomic_write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (cached per path, size and modification time)."""
    st = os.stat(path)
    return _sha256(os.fspath(path), st.st_size, st.st_mtime_ns)
