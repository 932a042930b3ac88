"""Writing files so that a reader never sees half of one, and folders that one process owns at a time.

- :func:`atomic_open` / :func:`atomic_write_bytes` write ``path.tmp.<pid>``, fsync it and rename it over
  ``path``: a crash, a full disk or a failed rename leaves the old file (or none) and no temp file behind.
- :func:`append_line` appends one whole line or nothing (a full disk cuts the file back).
- :func:`make_dir` creates an output folder or says in one line why it cannot (a file is in the way,
  a read-only file system, no permission).
- :class:`FolderLock` takes an exclusive ``fcntl.flock`` on ``<folder>/.lock``: a second process that
  wants the folder is refused at once with one line; the kernel drops the lock when its holder dies, so a
  killed run leaves no stale lock. Only the process that took it holds it: a forked child closes its
  inherited copy at once, so a worker that outlives its parent cannot keep the folder locked.
- Outputs never destroy inputs: :func:`refuse_inputs` refuses an output path that is one of the tool's
  inputs (or, for an output folder, holds one), compared after resolving symlinks and ``..`` and by inode
  (hard links); :func:`check_output_folder` lets a tool replace a folder only when it is missing, empty,
  carries the tool's marker (:func:`mark_output_folder`) or holds nothing but the tool's own file names.
  Each refusal is one :class:`OutputClash` line naming the path.
Every OS failure becomes a :class:`~core.errors.TinyLMError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from core.errors import TinyLMError

LOCK_NAME = ".lock"
MARKER_NAME = ".tinylm-output"  # names the tool that wrote an output folder (see check_output_folder)


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


def temp_path(path: str | Path) -> Path:
    """The temp name a writer of ``path`` uses (``<name>.tmp.<pid>``, beside it; see :func:`is_temp_file`)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp.{os.getpid()}")


def refuse_special(path: Path) -> None:
    """Refuse to replace an existing ``path`` that is not a regular file: renaming over ``/dev/full`` (as
    root) or a folder would destroy it."""
    if path.exists() and not path.is_file():
        raise FileWriteError("is not a regular file (a folder or a device); refusing to replace it", path=path)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Make the finished temp file ``tmp`` the file ``path``: fsync it, rename it over ``path``, fsync the
    folder. An OSError becomes one FileWriteError naming ``path``, and ``tmp`` is removed."""
    tmp, path = Path(tmp), Path(path)
    try:
        refuse_special(path)
    except FileWriteError:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileWriteError(f"cannot write ({os_reason(e)})", path=path) from None
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace ``path`` only when the ``with`` block ends normally.

    It writes :func:`temp_path` and :func:`publish`-es it on exit. Any OSError (full disk, read-only file
    system, a failed rename) becomes one FileWriteError naming ``path``; on any failure the temp file is
    removed and ``path`` keeps its old contents (or stays absent).
    """
    path = Path(path)
    refuse_special(path)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as f:
            yield f
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileWriteError(f"cannot write ({os_reason(e)})", path=path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)


def check_file_target(path: str | Path, what: str = "output file") -> Path:
    """Before long work that ends by writing ``path``: create its folder, and refuse a folder in its place
    (one FileWriteError naming it), so the work is not wasted."""
    path = Path(path)
    make_dir(path.parent, f"folder of the {what}")
    if path.is_dir():
        raise FileWriteError(f"the {what} is a folder, not a file", path=path)
    return path


def atomic_write_bytes(path: str | Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``path`` atomically (:func:`atomic_open`); return their sha256 hex digest."""
    digest = hashlib.sha256()
    with atomic_open(path) as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def append_line(path: str | Path, line: str) -> None:
    """Append one text line to ``path`` (created if absent) so that a reader never sees part of it.

    The file is ``flock``-ed while the line is written with one ``write``; if that write fails or is short
    (a full disk), the file is cut back to its previous length, and a FileWriteError names ``path``.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise FileWriteError(f"cannot open for appending ({os_reason(e)})", path=path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):  # a device such as /dev/full cannot be truncated
                os.ftruncate(fd, size)
            raise FileWriteError(f"cannot append ({os_reason(e)})", path=path) from None
    finally:
        os.close(fd)


def atomic_write_folder(out: str | Path, files: dict[str, bytes], what: str = "output folder") -> Path:
    """Write the folder ``out`` holding ``files`` (name -> bytes) atomically: every file is written and
    fsync-ed in a temporary folder beside ``out``, then that folder is renamed to ``out`` (an earlier ``out``
    is moved aside first, put back if the rename fails, then removed). Any OS failure is one FileWriteError
    naming ``out``; nothing temporary is left behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileWriteError(f"the {what} exists and is not a folder", path=out)
    parent = make_dir(out.parent, f"folder of the {what}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise FileWriteError(f"cannot create a temporary folder beside it ({os_reason(e)})", path=out) from None
    old = None
    try:
        os.chmod(tmp, 0o755)
        for name, data in files.items():
            with (tmp / name).open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp / name, 0o644)
        if out.exists():
            old = parent / f".{out.name}.old.{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
                old = None
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FileWriteError(f"cannot write the {what} ({os_reason(e)})", path=out) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
    return out


def atomic_write_text(path: str | Path, text: str) -> str:
    return atomic_write_bytes(path, [text.encode("utf-8")])


def atomic_write_json(path: str | Path, obj: Any) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "file", error: type[TinyLMError] = TinyLMError) -> Any:
    """Parse a JSON file or raise one line naming it (missing, unreadable, not UTF-8, not JSON), as an
    ``error`` (the caller's own TinyLMError subclass, so that nothing needs re-wrapping)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"the {what} is missing", path=path) from None
    except OSError as e:
        raise error(f"cannot read the {what} ({os_reason(e)})", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"the {what} is corrupt: not valid JSON ({e})", path=path) from None


def is_temp_file(name: str) -> bool:
    """True for the temp files :func:`atomic_write_bytes` leaves only when killed mid-write."""
    return ".tmp." in name or name.endswith(".tmp")


# ---- outputs never replace inputs -------------------------------------------------------------------------


class OutputClash(FileWriteError):
    """An output path that would replace or delete an input, or a folder holding files the tool did not write."""


Named = tuple[str, "str | Path | None"]  # (the flag or role that names a path, the path; None: not given)


def same_path(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` name the same file or folder: equal once symlinks and ``..`` are resolved, or the same
    inode (a hard link, a bind mount)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def is_within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or lies somewhere inside it (resolved; the folder also by inode)."""
    resolved, top = Path(path).resolve(), Path(folder).resolve()
    if resolved == top or top in resolved.parents:
        return True
    return any(same_path(parent, folder) for parent in [Path(path), *Path(path).resolve().parents]
               if parent.exists())


def refuse_inputs(out: str | Path, inputs: Iterable[Named], out_flag: str = "--out", folder: bool = False) -> Path:
    """Refuse ``out`` (one OutputClash naming it) when it is one of ``inputs`` or, for an output ``folder``
    that is replaced or filled, when an input lies inside it. Returns ``out`` as a Path."""
    out = Path(out)
    for flag, path in inputs:
        if path is None or str(path) == "":
            continue
        clash = is_within(path, out) if folder else same_path(out, path)
        if clash:
            where = "is" if same_path(out, path) else "holds"
            raise OutputClash(f"{out_flag} {where} the input {flag} {path}; an output never replaces an input: "
                              "choose another path", path=out)
    return out


def refuse_same_outputs(outputs: Iterable[Named]) -> None:
    """Refuse two outputs of one run that are the same file (the second would replace the first)."""
    given = [(flag, Path(path)) for flag, path in outputs if path is not None]
    for i, (flag, path) in enumerate(given):
        for other_flag, other in given[:i]:
            if same_path(path, other):
                raise OutputClash(f"{flag} and {other_flag} are the same file; give each its own path", path=path)


def check_output_folder(out: str | Path, tool: str, own: Callable[[str], bool] = lambda name: False,
                        inputs: Iterable[Named] = (), out_flag: str = "--out") -> Path:
    """The folder ``out`` may be written (and replaced) by ``tool``: no input is or lies in it, and it is
    missing, empty, marked as ``tool``'s (:func:`mark_output_folder`), or holds only names ``own`` accepts
    (the tool's exact file set; its lock and temp files always count as its own). Else one OutputClash."""
    out = refuse_inputs(out, inputs, out_flag, folder=True)
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileWriteError("the output folder is a file, not a folder", path=out)
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise FileWriteError(f"cannot read the {out_flag} folder ({os_reason(e)})", path=out) from None
    if MARKER_NAME in names and written_by(out) == tool:
        return out
    foreign = [n for n in names if not (own(n) or n in (LOCK_NAME, MARKER_NAME) or is_temp_file(n))]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputClash(f"{out_flag} holds files {tool} did not write ({shown}); choose a new or empty folder",
                          path=out)
    return out


def written_by(folder: str | Path) -> str | None:
    """The tool named by ``folder``'s marker, or None."""
    try:
        return (Path(folder) / MARKER_NAME).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def mark_output_folder(folder: str | Path, tool: str) -> None:
    """Mark ``folder`` as written by ``tool``, so that a re-run of ``tool`` may replace it."""
    atomic_write_text(Path(folder) / MARKER_NAME, tool + "\n")


def publish_together(pairs: list[tuple[Path, Path]]) -> None:
    """Publish several finished temp files (``[(tmp, path), ...]``) as one output: either every ``path``
    becomes its temp file, or (an OSError on the way) every ``path`` keeps its old contents and no temp
    file is left. The old files are kept as hard links until all renames succeeded."""
    backups: list[tuple[Path, Path]] = []
    done: list[Path] = []
    try:
        for _, path in pairs:
            refuse_special(path)
        for _, path in pairs:
            if path.exists():
                backup = path.with_name(f"{path.name}.old.tmp.{os.getpid()}")
                backup.unlink(missing_ok=True)
                os.link(path, backup)
                backups.append((backup, path))
        for tmp, path in pairs:
            publish(tmp, path)
            done.append(path)
    except BaseException:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
        restored = {path for _, path in backups}
        for backup, path in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, path)
            backup.unlink(missing_ok=True)  # rename(2) between two links of one file does nothing
        for path in done:
            if path not in restored:
                path.unlink(missing_ok=True)  # it did not exist before
        raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)


_HELD_LOCKS: set[int] = set()  # the lock fds this process holds (closed in a forked child)


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock fds, so that only the parent holds the lock
    (an flock belongs to the open file, which a fork shares; a child outliving its parent would keep it)."""
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock`` held for the ``with`` block.

    ``what`` names the job in the refusal ("pack", "training run"). ``create`` (the folder's name in
    messages, e.g. "run folder") creates the folder first; then a job that fails before writing anything into a
    folder it created removes it again, so a failed first attempt leaves no empty folder behind. The lock file
    holds the holder's pid for the message and is emptied on release; it is otherwise not removed (removing it
    would race with a new holder).
    """

    def __init__(self, folder: str | Path, what: str, create: str | None = None) -> None:
        self.folder, self.what, self.create = Path(folder), what, create
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> FolderLock:
        if self.create:
            self._created = not self.folder.exists()
            make_dir(self.folder, self.create)
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
        _HELD_LOCKS.add(fd)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # a released lock names no holder (the folder stays reproducible)
            os.ftruncate(self._fd, 0)
        if exc_type is not None and self._created:
            with contextlib.suppress(OSError):  # only a folder that holds nothing but the lock is removed
                if [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                    (self.folder / LOCK_NAME).unlink()
                    self.folder.rmdir()
        _HELD_LOCKS.discard(self._fd)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
