"""The decoded-image cache file: written image by image, resumable, committed by one rename.

Layout (little-endian)::

    0     header: magic, format, index offset, index length (then zeros up to DATA_START)
    4096  the images, uint8 HxWxC, one after the other (the order of ``relpaths``)
    ...   the index: JSON (dataset, size, key, relpaths, unreadable files), then the
          shapes (int32, n x 3) and the per-image channel sums (float64, n x 6)

A build writes ``NAME.partial`` and, every :data:`CHECKPOINT_SECONDS` and when it
stops, ``NAME.partial.json``: how many files it has done and what it has written. A
later build with the same key continues from there; only :meth:`CacheWriter.commit`
renames the partial file to ``NAME``, so a reader never sees a half-written cache.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..files import BusyError, atomic_write_json, commit_file, exclusive_lock, lock_holder

MAGIC = b"BPLIMGS\x00"
FORMAT = 2
HEADER = struct.Struct("<8sIIQQ")  # magic, format, reserved, index offset, index length
DATA_START = 4096
#: How often a build records its progress (and on every stop, Ctrl-C included).
CHECKPOINT_SECONDS = 20.0
SUFFIX = ".cache"
PARTIAL = ".partial"
#: The names a cache folder holds: ``<dataset>-<px>px-<key>`` and a suffix (``.pt``: bpl
#: 0.x's format 1, no longer read).
_NAME = re.compile(r"^(?P<dataset>.+)-(?P<px>\d+)px-(?P<key>[0-9a-f]{16})"
                   r"(?P<suffix>\.cache|\.cache\.partial|\.pt)$")


@dataclass
class CacheIndex:
    """What a cache file holds: its images' files, shapes and channel sums, and what failed."""

    key: str
    dataset: str
    size: int
    root: str
    relpaths: list[str]
    bad: list[tuple[str, str]]  # (relative path, why it could not be read)
    shapes: torch.Tensor  # int64, n x 3 (C, H, W)
    sums: torch.Tensor  # float64, n x 6: per channel, sum of pixel / 255, then of its square
    created: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of pixels."""
        return int(self.shapes.prod(dim=1).sum()) if len(self.shapes) else 0


def default_cache_dir() -> Path:
    """Where decoded images are kept: $BPL_CACHE_DIR, else $XDG_CACHE_HOME/bpl/images
    (``~/.cache/bpl/images``)."""
    if os.environ.get("BPL_CACHE_DIR"):
        return Path(os.environ["BPL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bpl" / "images"


def lock_path(path: Path) -> Path:
    """The lock a build of ``path`` holds."""
    return path.with_name(path.name + ".lock")


def partial_path(path: Path) -> Path:
    """The file a build of ``path`` writes before it is complete."""
    return path.with_name(path.name + PARTIAL)


def progress_path(path: Path) -> Path:
    """Where a build of ``path`` records how far it got."""
    return path.with_name(path.name + PARTIAL + ".json")


def read_index(path: Path) -> CacheIndex:
    """The index of a complete cache file; a damaged or foreign file raises DataError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise DataError(f"{path} is not a bpl image cache (too short)")
        magic, fmt, _, offset, length = HEADER.unpack(head)
        if magic != MAGIC or fmt != FORMAT:
            raise DataError(f"{path} is not a bpl image cache of format {FORMAT}")
        f.seek(offset)
        meta = json.loads(f.read(length))
    n = len(meta["relpaths"])
    end = offset + length + n * 3 * 4 + n * 6 * 8
    if size != end:
        raise DataError(f"{path} has {size} bytes where its index says {end}")
    shapes = np.fromfile(path, dtype="<i4", count=n * 3, offset=offset + length).reshape(n, 3)
    sums = np.fromfile(path, dtype="<f8", count=n * 6, offset=offset + length + n * 12)
    index = CacheIndex(meta["key"], meta["dataset"], int(meta["size"]), meta.get("root", ""),
                       list(meta["relpaths"]), [tuple(b) for b in meta["bad"]],
                       torch.from_numpy(shapes.astype(np.int64)),
                       torch.from_numpy(sums.reshape(n, 6).copy()), meta.get("created", ""))
    if DATA_START + index.nbytes != offset:
        raise DataError(f"{path}: its images end at {DATA_START + index.nbytes}, its index "
                        f"starts at {offset}")
    return index


def read_progress(path: Path) -> dict[str, Any] | None:
    """The recorded progress of an unfinished build of ``path`` (None: none, or unreadable)."""
    try:
        return json.loads(progress_path(path).read_text())
    except (OSError, ValueError):
        return None


class CacheWriter:
    """Writes a cache file image by image; resumes an unfinished build with the same key.

    Each image is recorded in one step after its bytes are written (so a Ctrl-C between
    the two leaves bytes the record does not count, which a resume cuts off).
    """

    def __init__(self, path: Path, key: str, dataset: str, size: int, root: Path) -> None:
        self.path, self.key = Path(path), key
        self.meta = {"dataset": dataset, "size": size, "root": str(root)}
        self.partial = partial_path(self.path)
        self.images: list[tuple[str, list[int], list[float]]] = []  # (relpath, CHW, sums)
        self.bad: list[list[str]] = []
        state = read_progress(self.path)
        resumable = (state is not None and state.get("key") == key and self.partial.is_file()
                     and self.partial.stat().st_size >= state["bytes"])
        if resumable:
            self.images = [(r, s, m) for r, s, m in state["images"]]
            self.bad = state["bad"]
            self.file = open(self.partial, "r+b")  # noqa: SIM115 - closed by commit()/close()
        else:
            progress_path(self.path).unlink(missing_ok=True)
            self.file = open(self.partial, "w+b")  # noqa: SIM115
        self.file.truncate(self._recorded_end())  # drop bytes written after the record
        self.file.seek(self._recorded_end())
        self.resumed = self.done
        self._last = time.monotonic()

    @property
    def done(self) -> int:
        """How many files (readable or not) the cache has taken so far."""
        return len(self.images) + len(self.bad)

    def _recorded_end(self) -> int:
        return DATA_START + sum(c * h * w for _, (c, h, w), _ in self.images)

    def add(self, rel: str, img: torch.Tensor, sums: torch.Tensor) -> None:
        """Append one decoded 3xHxW uint8 image (stored HxWxC) and its channel sums."""
        record = (rel, list(img.shape), sums.tolist())
        self.file.write(memoryview(img.permute(1, 2, 0).contiguous().numpy()).cast("B"))
        self.images.append(record)
        if time.monotonic() - self._last > CHECKPOINT_SECONDS:
            self.checkpoint()

    def add_bad(self, rel: str, reason: str) -> None:
        """Record a file that could not be read."""
        self.bad.append([rel, reason])

    def checkpoint(self) -> None:
        """Make everything added so far survive a crash: sync the images, then record them."""
        images, bad = list(self.images), list(self.bad)
        self.file.flush()
        os.fsync(self.file.fileno())
        atomic_write_json(progress_path(self.path), {
            "key": self.key, "bytes": DATA_START + sum(c * h * w for _, (c, h, w), _ in images),
            "images": images, "bad": bad, **self.meta}, indent=None)
        self._last = time.monotonic()

    def commit(self) -> Path:
        """Write the index and rename the finished file to its name, in one step."""
        end = self._recorded_end()
        meta = {"format": FORMAT, "key": self.key, **self.meta,
                "relpaths": [r for r, _, _ in self.images], "bad": self.bad,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        blob = json.dumps(meta).encode()
        self.file.seek(end)
        self.file.truncate()
        self.file.write(blob)
        shapes = np.asarray([s for _, s, _ in self.images], dtype="<i4").reshape(-1, 3)
        sums = np.asarray([m for _, _, m in self.images], dtype="<f8").reshape(-1, 6)
        self.file.write(shapes.tobytes())
        self.file.write(sums.tobytes())
        self.file.seek(0)
        self.file.write(HEADER.pack(MAGIC, FORMAT, 0, end, len(blob)))
        self.file.close()
        commit_file(self.partial, self.path)
        progress_path(self.path).unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        """Stop without finishing: record the progress, so the next build continues."""
        if not self.file.closed:
            try:
                self.checkpoint()
            finally:
                self.file.close()


# --------------------------------------------------------------------------- listing, clearing


@dataclass
class CacheEntry:
    """One cache in a cache folder, as ``bpl cache ls`` shows it."""

    path: Path  # the complete file's name (a partial one's is beside it)
    dataset: str
    size: int  # px of the shorter side
    images: int | None  # None: unknown (old format, damaged)
    nbytes: int  # on disk, partial files included
    state: str  # complete, partial, building (by ``holder``), old format, damaged
    written: float  # modification time
    root: str = ""
    holder: str = ""


def _entry(path: Path) -> CacheEntry:
    """What the cache ``path`` (complete or not) is; ``path`` is the complete file's name."""
    m = _NAME.match(path.name)
    assert m is not None
    dataset, px = m["dataset"], int(m["px"])
    files = [f for f in (path, partial_path(path), progress_path(path)) if f.is_file()]
    nbytes = sum(f.stat().st_size for f in files)
    written = max((f.stat().st_mtime for f in files), default=0.0)
    holder = lock_holder(lock_path(path)) or ""
    if path.suffix == ".pt":
        return CacheEntry(path, dataset, px, None, nbytes, "old format", written)
    if path.is_file():
        try:
            index = read_index(path)
            return CacheEntry(path, dataset, px, len(index.relpaths), nbytes, "complete",
                              written, index.root, holder)
        except (OSError, ValueError, KeyError, DataError):
            return CacheEntry(path, dataset, px, None, nbytes, "damaged", written, "", holder)
    state = read_progress(path) or {}
    done = len(state.get("images", []))
    return CacheEntry(path, dataset, px, done, nbytes, "building" if holder else "partial",
                      written, state.get("root", ""), holder)


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[CacheEntry]:
    """The caches in ``cache_dir`` (default: the default cache folder), newest first."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not folder.is_dir():
        return []
    names = set()
    for f in folder.iterdir():
        m = _NAME.match(f.name)
        if m:
            suffix = ".pt" if m["suffix"] == ".pt" else SUFFIX
            names.add(f.with_name(f"{m['dataset']}-{m['px']}px-{m['key']}{suffix}"))
    return sorted((_entry(p) for p in names), key=lambda e: e.written, reverse=True)


def clear_caches(
    cache_dir: str | os.PathLike | None = None, dataset: str | None = None,
) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Delete the caches in ``cache_dir`` (of ``dataset`` only, if given); returns those
    deleted and those left because a build is writing them. A run reading a deleted
    cache keeps its open file; only the next run decodes again."""
    removed, busy = [], []
    for entry in list_caches(cache_dir):
        if dataset is not None and entry.dataset != dataset:
            continue
        lock = lock_path(entry.path)
        try:
            with exclusive_lock(lock):
                for f in (entry.path, partial_path(entry.path), progress_path(entry.path)):
                    f.unlink(missing_ok=True)
                lock.unlink(missing_ok=True)  # a builder waiting on it takes the lock again
        except BusyError as exc:
            entry.holder = exc.holder
            busy.append(entry)
            continue
        removed.append(entry)
    return removed, busy
