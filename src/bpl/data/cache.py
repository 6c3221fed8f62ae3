"""The decoded-image cache: every image decoded once into a file, read in memory or from disk.

A build decodes the images a few at a time into a cache file (:mod:`.cachefile`) in
the cache folder (``cache_dir``; default :func:`default_cache_dir`), keyed by the
files' names and byte sizes and the decoded size, so the next run, every DataLoader
worker and every torchrun process on the machine read the same file; one process
builds it while the others wait on its lock. The file is then loaded into memory where
it fits the memory budget (``cache_budget`` of the available memory) and read from
disk through the page cache beyond it (``cache="auto"``), or as asked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CorruptImageError, DataError, arg
from ..files import exclusive_lock
from .cachefile import (
    DATA_START,
    SUFFIX,
    CacheIndex,
    CacheWriter,
    default_cache_dir,
    lock_path,
    partial_path,
    read_index,
)
from .images import DiskImages, ImageSource, PackedImages, load_resized
from .registry import Stats

log = logging.getLogger(__name__)

#: ``cache=``: choose by size, in memory, read from disk (memory-mapped file), or none.
CACHE_MODES = ("auto", "memory", "mmap", "off")
#: ``cache_budget``: the share of the available memory the in-memory cache may take
#: (divided among the torchrun processes of the machine), beyond which it is read from disk.
DEFAULT_BUDGET = 0.5
#: How many unreadable files an error names (all are counted).
MAX_BAD_NAMED = 10
#: Images being decoded at once, per thread: what a build holds beyond the file.
WINDOW_PER_THREAD = 4
#: The key's salt: a change of decoding (resize, colour conversion) must change it.
KEY_VERSION = 2


def available_memory() -> int:
    """Bytes of memory this process may still use: MemAvailable, within a cgroup's limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62  # unknown: no budget
    try:  # cgroup v2: a container's limit less what it uses
        group = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit != "max":
            used = int((folder / "memory.current").read_text())
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError, IndexError):
        pass
    return avail


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


# --------------------------------------------------------------------------- statistics


def pixel_sums(img: torch.Tensor) -> torch.Tensor:
    """Per channel, the sum of pixel / 255 and of its square (float64) of a uint8 3xHxW image."""
    x = img.reshape(3, -1).to(torch.float32) / 255.0
    return torch.cat([x.sum(1, dtype=torch.float64), (x * x).sum(1, dtype=torch.float64)])


def _stats(rows: Iterable[tuple[list[float], int]]) -> tuple[Stats, Stats]:
    """Mean and std from per-image (sums, pixel count), added in order as float64."""
    total, sq, n = [0.0] * 3, [0.0] * 3, 0
    for sums, pixels in rows:
        for c in range(3):
            total[c] += sums[c]
            sq[c] += sums[3 + c]
        n += pixels
    if n == 0:
        raise DataError("cannot compute mean/std: the training split is empty")
    mean = torch.tensor(total, dtype=torch.float64) / n
    std = (torch.tensor(sq, dtype=torch.float64) / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def channel_stats(images: Iterable[torch.Tensor]) -> tuple[Stats, Stats]:
    """Per-channel mean and std (over all pixels, values in [0, 1]) of uint8 3xHxW images."""
    return _stats((pixel_sums(img).tolist(), img[0].numel()) for img in images)


def cached_channel_stats(index: CacheIndex, positions: Sequence[int]) -> tuple[Stats, Stats]:
    """:func:`channel_stats` of the cached images at ``positions``, from the sums the cache
    recorded (the same numbers, without reading an image)."""
    sums = index.sums[list(positions)].tolist()
    pixels = (index.shapes[list(positions), 1] * index.shapes[list(positions), 2]).tolist()
    return _stats(zip(sums, pixels))


# --------------------------------------------------------------------------- decoding


def _decode(path: Path, size: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    try:
        img = load_resized(path, size)
    except CorruptImageError as exc:
        return None, None, exc.reason
    return img, pixel_sums(img), ""


def decode_stream(
    root: Path, relpaths: Sequence[str], size: int, progress: bool = True, done: int = 0,
) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor | None, str]]:
    """``(relpath, image or None, its pixel_sums, why not)`` of each file, in order, decoded
    by a few threads; only a small window of images is in memory at any time."""
    threads = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=threads)
    pending: deque[tuple[str, Future]] = deque()
    todo = iter(relpaths)
    bar = tqdm(total=len(relpaths) + done, initial=done, desc="decoding", unit="img",
               disable=None if progress else True, leave=False)
    try:
        for rel in todo:
            pending.append((rel, pool.submit(_decode, root / rel, size)))
            if len(pending) < threads * WINDOW_PER_THREAD:
                continue
            rel0, fut = pending.popleft()
            bar.update()
            yield rel0, *fut.result()
        while pending:
            rel0, fut = pending.popleft()
            bar.update()
            yield rel0, *fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _warn_bad(root: Path, rel: str, reason: str, skip_bad: bool) -> None:
    if skip_bad:
        log.warning("skipping unreadable image %s (%s)", root / rel, reason)


def unreadable_error(root: Path, bad: Sequence[tuple[str, str]]) -> CorruptImageError:
    """The error naming the unreadable files (the first :data:`MAX_BAD_NAMED`) and the fix."""
    named = ", ".join(f"{rel} ({reason})" for rel, reason in bad[:MAX_BAD_NAMED])
    more = f" and {len(bad) - MAX_BAD_NAMED} more" if len(bad) > MAX_BAD_NAMED else ""
    return CorruptImageError(
        f"{len(bad)} unreadable image(s) under {root}: {named}{more}; replace or delete "
        f"them, or pass {arg('skip_bad', True)} to skip unreadable images",
        reason=f"{len(bad)} unreadable",
    )


def find_bad(
    root: Path, relpaths: Sequence[str], size: int, skip_bad: bool, progress: bool = True,
) -> list[str]:
    """Try to decode every file and return the unreadable ones (nothing is kept).

    Without ``skip_bad`` every file is still tried, so the error names all the unreadable
    ones (up to :data:`MAX_BAD_NAMED`) at once, not one per run.
    """
    bad = []
    for rel, img, _, reason in decode_stream(root, relpaths, size, progress):
        if img is None:
            _warn_bad(root, rel, reason, skip_bad)
            bad.append((rel, reason))
    if bad and not skip_bad:
        raise unreadable_error(root, bad)
    return [rel for rel, _ in bad]


# --------------------------------------------------------------------------- the cache


def cache_key(root: Path, relpaths: Sequence[str], size: int) -> str:
    """Hash of the files' identity (the folder, each file's name, byte size and modification
    time) and the decoded size: any change builds another cache."""
    h = hashlib.sha256(f"bpl-cache:{KEY_VERSION}:{size}:{Path(root).resolve()}\n".encode())
    base = os.fspath(root)
    for rel in relpaths:
        try:
            st = os.stat(os.path.join(base, rel))  # not pathlib: 100,000 files in a second
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\t-1\n".encode())
    return h.hexdigest()


@dataclass
class CachedImages:
    """The images of a cache and how they are read: ``mode`` (memory or mmap) and ``why``."""

    source: ImageSource
    index: CacheIndex
    path: Path
    mode: str
    why: str


def choose_mode(mode: str, nbytes: int, budget: float = DEFAULT_BUDGET) -> tuple[str, str]:
    """``memory`` or ``mmap`` for a cache of ``nbytes``, and why (for the log).

    ``auto`` keeps it in memory while one copy per torchrun process of the machine
    (``LOCAL_WORLD_SIZE``) fits ``budget`` x the available memory.
    """
    if mode in ("memory", "mmap"):
        return mode, f"asked for ({arg('cache', mode)})"
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    avail = available_memory()
    limit = budget * avail
    need = nbytes * procs
    copies = f" x {procs} processes" if procs > 1 else ""
    fits = need <= limit
    return ("memory" if fits else "mmap"), (
        f"{_gb(nbytes)}{copies} {'fits' if fits else 'is over'} the memory budget of "
        f"{_gb(limit)} ({arg('cache_budget', budget)} of {_gb(avail)} available)")


def check_cache(mode: str, budget: float = DEFAULT_BUDGET) -> None:
    """Refuse an unknown cache mode, or a memory budget that is not a share of 0 to 1."""
    if mode not in CACHE_MODES:
        raise DataError(f"{arg('cache')} must be one of {', '.join(CACHE_MODES)}, got {mode!r}",
                        param="cache")
    if isinstance(budget, bool) or not 0.0 <= budget <= 1.0:
        raise DataError(f"{arg('cache_budget')} is a share of the available memory, from 0 to "
                        f"1, got {budget}", param="cache_budget")


def cache_path(cache_dir: Path, name: str, size: int, key: str) -> Path:
    """The cache file of dataset ``name`` at ``size`` px with ``key``."""
    return Path(cache_dir) / f"{name}-{size}px-{key[:16]}{SUFFIX}"


def _complete(path: Path, key: str) -> CacheIndex | None:
    """The index of the complete cache at ``path`` for ``key``; None if it must be built."""
    if not path.is_file():
        return None
    try:
        index = read_index(path)
    except (OSError, ValueError, KeyError, DataError) as exc:
        log.warning("ignoring damaged image cache %s (%s); rebuilding it", path, exc)
        return None
    return index if index.key == key else None


def _unwritable(cache_dir: Path, exc: OSError) -> DataError:
    return DataError(f"cannot write the image cache in {cache_dir} ({exc.strerror or exc}): pass "
                     f"a folder you may write as {arg('cache_dir')}, or {arg('cache', 'off')} "
                     "to decode every image when it is read", param="cache_dir")


def build_cache(
    name: str,
    root: Path,
    relpaths: Sequence[str],
    size: int,
    skip_bad: bool,
    cache_dir: Path | None = None,
    progress: bool = True,
    mode: str = "auto",
    budget: float = DEFAULT_BUDGET,
    access: str = "pread",
) -> CachedImages:
    """The decoded images of ``relpaths`` (unreadable ones left out), from their cache file,
    built first if missing (by one process at a time: the others wait for it, then read it).
    """
    check_cache(mode, budget)
    if mode == "off":
        raise DataError("build_cache builds a cache; cache='off' decodes on the fly instead")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(root, relpaths, size)
    path = cache_path(cache_dir, name, size, key)
    index = _complete(path, key)
    if index is None:
        index = _build_locked(name, root, relpaths, size, path, key, progress)
    else:
        log.info("found the decoded images in %s", path)
    if index.bad and not skip_bad:
        raise unreadable_error(root, index.bad)
    for rel, reason in index.bad:
        _warn_bad(root, rel, reason, skip_bad)
    chosen, why = choose_mode(mode, index.nbytes, budget)
    if chosen == "memory":
        source: ImageSource = PackedImages.from_file(path, index.shapes, DATA_START)
        log.info("image cache: in memory, %s: %s", _gb(index.nbytes), why)
    else:
        source = DiskImages(path, index.shapes, DATA_START, access=access)
        log.info("image cache: read from disk (%s), %s: %s", path, _gb(index.nbytes), why)
    return CachedImages(source, index, path, chosen, why)


def _build_locked(
    name: str, root: Path, relpaths: Sequence[str], size: int, path: Path, key: str,
    progress: bool,
) -> CacheIndex:
    """Build ``path`` holding its lock; a process that finds it busy waits, then reads it."""
    def busy(holder: str) -> None:
        log.info("waiting for %s to finish the image cache %s", holder or "another process", path)

    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(lock_path(path), on_busy=busy))
        except OSError as exc:
            raise _unwritable(path.parent, exc) from exc
        index = _complete(path, key)  # another process may have built it while we waited
        if index is not None:
            log.info("found the decoded images in %s", path)
            return index
        return _build(name, root, relpaths, size, path, key, progress)


def _build(
    name: str, root: Path, relpaths: Sequence[str], size: int, path: Path, key: str,
    progress: bool,
) -> CacheIndex:
    """Decode ``relpaths`` into ``path`` (continuing an unfinished build) and commit it."""
    estimate = len(relpaths) * 3 * size * size  # square images; the check is a courtesy
    partial = partial_path(path)
    written = partial.stat().st_size if partial.is_file() else 0
    free = shutil.disk_usage(path.parent).free
    if free + written < estimate + (64 << 20):
        raise DataError(
            f"the image cache of {len(relpaths)} images at {size} px needs about "
            f"{_gb(estimate)} in {path.parent}, which has {_gb(free)} free: pass a folder on a "
            f"larger disk as {arg('cache_dir')}, or {arg('cache', 'off')} to decode every image "
            "when it is read", param="cache_dir")
    try:
        writer = CacheWriter(path, key, name, size, root)
    except OSError as exc:
        raise _unwritable(path.parent, exc) from exc
    try:
        todo = relpaths[writer.done:]
        if writer.resumed:
            log.info("continuing the image cache %s: %d of %d images done", path, writer.done,
                     len(relpaths))
        log.info("decoding %d images at %d px into %s (about %s)", len(todo), size, path,
                 _gb(estimate * len(todo) / max(len(relpaths), 1)))
        for rel, img, sums, reason in decode_stream(root, todo, size, progress, writer.done):
            if img is None:
                writer.add_bad(rel, reason)
            else:
                writer.add(rel, img, sums)
        writer.commit()
    except OSError as exc:
        _stop(writer)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left for the image cache in {path.parent}: free some "
                            f"space, pass a folder on a larger disk as {arg('cache_dir')}, or "
                            f"{arg('cache', 'off')}; the next run continues the cache where it "
                            "stopped", param="cache_dir") from exc
        raise
    except BaseException:
        _stop(writer)
        raise
    log.info("wrote the image cache %s", path)
    return read_index(path)


def _stop(writer: CacheWriter) -> None:
    """Close an unfinished build, keeping its progress for the next run if that can be done."""
    try:
        writer.close()
    except OSError as exc:
        log.warning("could not record the progress of the image cache %s (%s)", writer.path, exc)
