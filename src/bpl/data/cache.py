"""Decoding every image once into a packed cache (in memory, optionally on disk), and mean/std."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CorruptImageError, DataError
from ..files import atomic_save
from .images import PackedImages, load_resized
from .registry import Stats

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
#: How many unreadable files an error names (all are counted).
MAX_BAD_NAMED = 10


def decode_all(
    root: Path, relpaths: Sequence[str], size: int, skip_bad: bool, keep: bool = True,
    progress: bool = True,
) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode (and resize) every image with a small thread pool; returns images and bad paths.

    Without ``skip_bad`` every file is still tried, so the error names all the unreadable
    ones (up to :data:`MAX_BAD_NAMED`) at once, not one per run.
    """
    reasons: dict[str, str] = {}

    def work(rel: str) -> torch.Tensor | None:
        try:
            img = load_resized(root / rel, size)
        except CorruptImageError as exc:
            reasons[rel] = exc.reason
            if skip_bad:
                log.warning("skipping unreadable image %s (%s)", root / rel, exc.reason)
            return None
        return img if keep else torch.empty(0, dtype=torch.uint8)  # checked, not kept

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        images = list(
            tqdm(
                pool.map(work, relpaths),
                total=len(relpaths),
                desc="decoding",
                unit="img",
                disable=None if progress else True,
                leave=False,
            )
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bad = [rel for rel, img in zip(relpaths, images) if img is None]
    if bad and not skip_bad:
        named = ", ".join(f"{rel} ({reasons[rel]})" for rel in bad[:MAX_BAD_NAMED])
        more = f" and {len(bad) - MAX_BAD_NAMED} more" if len(bad) > MAX_BAD_NAMED else ""
        raise CorruptImageError(
            f"{len(bad)} unreadable image(s) under {root}: {named}{more}; replace or delete "
            "them, or pass skip_bad=True to skip unreadable images",
            reason=f"{len(bad)} unreadable",
        )
    return (images if keep else []), bad


def _cache_key(root: Path, relpaths: Sequence[str], size: int) -> str:
    """Hash of the file list (with byte sizes) and the cached size: any change rebuilds."""
    h = hashlib.sha256(f"bpl-cache:{CACHE_FORMAT}:{size}\n".encode())
    for rel in relpaths:
        try:
            nbytes = (root / rel).stat().st_size
        except OSError:
            nbytes = -1
        h.update(f"{rel}\t{nbytes}\n".encode())
    return h.hexdigest()


def _load_cache_file(path: Path, key: str) -> tuple[PackedImages, list[str], list[str]] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True, mmap=True)
        if blob.get("key") != key:
            return None
        return (
            PackedImages(blob["buffer"], blob["shapes"]),
            list(blob["relpaths"]),
            list(blob["bad"]),
        )
    except Exception as exc:  # a damaged cache is only a lost speed-up: rebuild it
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, exc)
        return None


def _save_cache_file(
    path: Path, key: str, packed: PackedImages, relpaths: list[str], bad: list[str]
) -> None:
    blob = {
        "format": CACHE_FORMAT,
        "key": key,
        "relpaths": relpaths,
        "bad": bad,
        "buffer": packed.buffer,
        "shapes": packed.shapes,
    }
    atomic_save(blob, path)


def build_cache(
    name: str, root: Path, relpaths: list[str], size: int, skip_bad: bool, cache_dir: Path | None,
    progress: bool = True,
) -> tuple[PackedImages, list[str], list[str], Path | None]:
    """Decoded images of ``relpaths`` (minus bad ones): from the disk cache or decoded now."""
    key = _cache_key(root, relpaths, size)
    path = Path(cache_dir) / f"{name}-{size}px-{key[:16]}.pt" if cache_dir is not None else None
    hit = _load_cache_file(path, key) if path is not None else None
    if hit is not None and (skip_bad or not hit[2]):
        log.info("loaded %d cached images from %s", len(hit[1]), path)
        return (*hit, path)
    log.info(
        "decoding %d images into a cache of about %.0f MB",
        len(relpaths),
        len(relpaths) * 3 * size * size / 2**20,
    )
    images, bad = decode_all(root, relpaths, size, skip_bad, progress=progress)
    good = [rel for rel, img in zip(relpaths, images) if img is not None]
    kept = [img for img in images if img is not None]
    del images
    packed = PackedImages.from_images(kept, consume=True)
    log.info("cached %d images at %d px (%.1f MB)", len(good), size, packed.nbytes / 2**20)
    if path is not None:
        _save_cache_file(path, key, packed, good, bad)
        log.info("wrote image cache %s", path)
    return packed, good, bad, path


def channel_stats(images: Iterable[torch.Tensor]) -> tuple[Stats, Stats]:
    """Per-channel mean and std (over all pixels, values in [0, 1]) of uint8 3xHxW images."""
    total = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    n = 0
    for img in images:
        x = img.reshape(3, -1).to(torch.float32) / 255.0
        total += x.sum(1, dtype=torch.float64)
        sq += (x * x).sum(1, dtype=torch.float64)
        n += x.shape[1]
    if n == 0:
        raise DataError("cannot compute mean/std: the training split is empty")
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


