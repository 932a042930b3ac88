"""Writing files so that a reader never sees half of one, and folders that one process owns at a time.

- :func:`atomic_write_bytes` writes ``path.tmp.<pid>``, fsyncs it and renames it over ``path``: a crash,
  a full disk or a failed rename leaves the old file (or none) and no temp file behind.
- :func:`make_dir` creates an output folder or says in one line why it cannot (a file is in the way,
  a read-only file system, no permission).
- :class:`FolderLock` takes an exclusive ``fcntl.flock`` on ``<folder>/.lock``: a second process that
  wants the folder is refused at once with one line; the kernel drops the lock when its holder dies, so a
  killed run leaves no stale lock.
Every OS failure becomes a :class:`~core.errors.TinyLMError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from core.errors import TinyLMError

LOCK_NAME = ".lock"


class FileWriteError(TinyLMError):
    """A file or folder that could not be written (full disk, read-only, permissions, a file in the way)."""


def os_reason(e: OSError) -> str:
    """A short human reason for an OS error ("no space left on device", ...)."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return (e.strerror or str(e)).lower()


def make_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or raise one line naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileWriteError(f"the {what} is a file, not a folder", path=path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileWriteError(f"cannot create the {what} ({os_reason(e)})", path=path) from None
    if not os.access(path, os.W_OK):
        raise FileWriteError(f"the {what} is not writable", path=path)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``path`` atomically (temp file, fsync, rename); return their sha256 hex digest."""
    path = Path(path)
    digest = hashlib.sha256()
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileWriteError(f"cannot write ({os_reason(e)})", path=path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> str:
    return atomic_write_bytes(path, [text.encode("utf-8")])


def atomic_write_json(path: str | Path, obj: Any) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file or raise one line naming it (missing, unreadable, not UTF-8, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise TinyLMError(f"the {what} is missing", path=path) from None
    except OSError as e:
        raise TinyLMError(f"cannot read the {what} ({os_reason(e)})", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TinyLMError(f"the {what} is corrupt: not valid JSON ({e})", path=path) from None


def is_temp_file(name: str) -> bool:
    """True for the temp files :func:`atomic_write_bytes` leaves only when killed mid-write."""
    return ".tmp." in name or name.endswith(".tmp")


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` held for the ``with`` block.

    ``what`` names the job in the refusal ("pack", "training run"). The lock file holds the holder's pid
    for the message; it is not removed (removing it would race with a new holder).
    """

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        path = self.folder / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FileWriteError(f"cannot create the lock file ({os_reason(e)})", path=path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TinyLMError(f"another {self.what} (pid {holder}) is using this folder; wait for it or "
                              "choose another folder", path=self.folder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # a released lock names no holder (the folder stays reproducible)
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
