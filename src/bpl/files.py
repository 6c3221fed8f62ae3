"""Atomic file writes: a crash, a full disk or a failed check never leaves half a file.

Every file bpl writes goes through :func:`atomic_path` (JSON, CSV and markdown through
:func:`atomic_write_text`, checkpoints :func:`atomic_save`, plots :func:`atomic_savefig`,
ONNX and TorchScript files the exporter's own ``atomic_path``), and so do the benchmarks';
the image cache, written over time, becomes its file in one step too (:func:`commit_file`).

Every writer puts its bytes in a temporary file beside the target, syncs it, gives it the
permissions a new file would get (``0666`` less the umask, usually ``0644``) and renames
it over the target in one step; on any error the temporary file is removed and the
previous file (if any) is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

try:  # POSIX; elsewhere a run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "BusyError",
    "exclusive_lock",
    "lock_holder",
    "atomic_path",
    "atomic_save",
    "atomic_savefig",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "commit_file",
]


def _new_file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp uses 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``.

    Whatever the body writes to the temporary path (any library that takes a file name)
    becomes ``path`` only if the body finishes; an exception removes it instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except PermissionError as exc:  # name the folder, not the temporary file never made
        raise PermissionError(exc.errno, f"no permission to write {path.name} in the folder",
                              str(path.parent)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the finished file ``tmp`` become ``path`` in one step: sync it, give it a new
    file's permissions and rename it over ``path`` (for files written in place over time,
    such as a resumable cache; :func:`atomic_path` uses it too)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _new_file_mode())
    os.replace(tmp, path)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, line endings as given) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int = 2, default: Any = None,
    newline: bool = True,
) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``newline``: end with a line break)."""
    text = json.dumps(obj, indent=indent, default=default)
    return atomic_write_text(path, text + "\n" if newline else text)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically; returns the path.

    A write that fails inside torch's zip writer (a full disk gives ``RuntimeError: ...
    unexpected pos``) is raised as the ``OSError`` it is, with the file it was for."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            if "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
                raise
            free = shutil.disk_usage(Path(path).parent).free
            code = errno.ENOSPC if free < 64 * 2**20 else errno.EIO
            raise OSError(code, f"{os.strerror(code)} ({free / 2**20:.0f} MiB free)",
                          str(path)) from exc
    return Path(path)


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """A matplotlib figure's ``fig.savefig(path, **kwargs)``, atomically; returns the path.

    The format is the suffix's (``.png``, ``.pdf``, ...) unless ``format=`` says otherwise:
    the temporary file's own suffix says nothing."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)
    return path


class BusyError(OSError):
    """Another process holds the lock; ``holder`` is what it wrote there (its pid)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, on_busy: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the body.

    If another process holds it: :class:`BusyError` at once, or, given ``on_busy``, call
    it with the holder (its pid) and wait for the lock. The lock is the kernel's
    (``flock``), so it ends with its process, even after ``kill -9``. The file stays; one
    deleted while held is noticed (the lock is taken again on the new file), so a
    cleaner may delete a lock file it holds itself. It records the holder's pid for the
    message a second process gets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a+") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip()
                    if on_busy is None:
                        raise BusyError(path, holder) from None
                    on_busy(holder)
                    on_busy = _ignore  # say it once, however long the wait
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                if not _same_file(f, path):  # deleted (and perhaps re-made) while we waited
                    continue
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            try:
                yield path
            finally:
                if fcntl is not None:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return


def _ignore(holder: str) -> None:
    """An ``on_busy`` that says nothing."""


def _same_file(f: Any, path: Path) -> bool:
    """Whether the open file ``f`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the lock file ``path`` (what it wrote there, e.g. ``pid 123``), or None
    if nobody does; looks without taking it or writing anything."""
    try:
        f = open(path)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        if fcntl is None:
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None
