"""Remote-sensing scene datasets: a registry, reproducible splits, cached decoding, transforms.

``load_dataset(name, root, ...)`` turns a folder of images into train, validation and
test ``torch.utils.data.Dataset`` objects yielding ``(float32 3xSxS normalised tensor,
int label)``.

- Layouts: ``root/<class>/<image>`` (split per class with a seed, 80/20 by default, as in
  the paper) or ``root/train/<class>/...`` + ``root/val|test/<class>/...`` (used as is).
- The validation split is carved out of the training split (10% per class by default,
  fixed by the seed): epochs and recipes are chosen on it, so the test split is only
  ever evaluated, never used to choose.
- The split (relative paths, labels, class names, mean/std) is a small JSON file; a run
  saves it and evaluation reads it back, so the test images are exactly the same.
- Images are decoded once into a packed uint8 cache at ``round(image_size / 0.875)`` px on
  the shorter side (in memory, optionally on disk), so epochs at 96-224 px never re-decode
  256 px TIFFs.  Without the cache every read goes through the very same decode + resize,
  so evaluation gives identical tensors either way.
- ``digits`` (scikit-learn's bundled 8x8 handwritten digits) needs no files or download.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .errors import ChecksumError, CorruptImageError, DataError
from .files import atomic_save, atomic_write_json

__all__ = [
    "DATASETS",
    "ChecksumError",
    "CorruptImageError",
    "DataError",
    "DatasetSpec",
    "ImageFiles",
    "PackedImages",
    "SceneData",
    "SceneDataset",
    "channel_stats",
    "download_and_extract",
    "eval_transform",
    "load_dataset",
    "read_image",
    "read_split",
    "resize_size",
    "stratified_split",
    "train_transform",
    "verify_file",
]

log = logging.getLogger(__name__)

#: Evaluation resizes to ``round(size / CROP_FRACTION)`` then centre-crops ``size``.
CROP_FRACTION = 0.875
SPLIT_FORMAT = 1
PARTS = ("train", "val", "test")
CACHE_FORMAT = 1

Stats = tuple[float, float, float]

IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
# UC Merced Land Use, measured once over all 2,100 images of ../shared/data/ucmerced
# (the JPEG q95 re-encoding, full resolution, RGB / 255, population std over every pixel).
# The 65 original TIFFs of ucmerced-tif-sample agree with their JPEGs to within 3e-4.
UCM_MEAN: Stats = (0.4842, 0.4901, 0.4505)
UCM_STD: Stats = (0.2179, 0.2018, 0.1964)


@dataclass(frozen=True)
class DatasetSpec:
    """What bpl knows about a named dataset: class count, default split, statistics, source."""

    name: str
    description: str
    num_classes: int | None = None
    train_ratio: float = 0.8
    mean: Stats | None = None
    std: Stats | None = None
    stats_source: str = ""
    subdirs: tuple[str, ...] = ()  # where the class folders may sit below ``root``
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (the reference's)
    hflip: bool = True


DATASETS: dict[str, DatasetSpec] = {
    "ucm": DatasetSpec(
        "ucm",
        "UC Merced Land Use: 21 classes x 100 images, 256x256 (44 odd sizes), TIFF",
        num_classes=21,
        mean=UCM_MEAN,
        std=UCM_STD,
        stats_source="UC Merced (measured, hard-coded)",
        subdirs=("Images", "UCMerced_LandUse/Images"),
        url="http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip",
        # The official archive publishes no checksum and we have not verified one: left None
        # on purpose (the size/checksum check is skipped with a warning).  Pass md5=/sha256=
        # to download_and_extract, or fill these in once measured on a trusted download.
        md5=None,
        sha256=None,
    ),
    "nwpu-resisc45": DatasetSpec(
        "nwpu-resisc45",
        "NWPU-RESISC45: 45 classes x 700 images, 256x256 JPEG",
        num_classes=45,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stats_source="ImageNet (not measured on NWPU-RESISC45)",
        subdirs=("NWPU-RESISC45",),
    ),
    "rsd46-whu": DatasetSpec(
        "rsd46-whu",
        "RSD46-WHU: 46 classes, 256x256; a train/ + test/ tree is used as is",
        num_classes=46,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stats_source="ImageNet (not measured on RSD46-WHU)",
        subdirs=("RSD46-WHU",),
    ),
    "eurosat": DatasetSpec(
        "eurosat",
        "EuroSAT (RGB): 10 classes, 27,000 Sentinel-2 patches, 64x64 JPEG; stratified 80/20",
        num_classes=10,
        subdirs=("2750", "EuroSAT", "EuroSAT_RGB"),
        # mean/std: computed from the training split of each split (written to split.json)
    ),
    "imagefolder": DatasetSpec("imagefolder", "any root/<class>/<image> tree"),
    "digits": DatasetSpec(
        "digits",
        "scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled to RGB",
        num_classes=10,
        crop_scale=(0.6, 1.0),  # small crops of an 8x8 digit leave nothing to recognise
        hflip=False,  # mirrored digits are other digits (or none)
    ),
}

_ALIASES = {"ucmerced": "ucm", "uc-merced": "ucm", "nwpu": "nwpu-resisc45", "rsd46": "rsd46-whu"}


# --------------------------------------------------------------------------- images


def _readable_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


IMAGE_EXTENSIONS = _readable_extensions()


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any Pillow image: drops alpha, expands grey/palette, rescales 16-bit."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 255.0 if im.mode in ("I", "F") and a.max(initial=0) <= 255 else 65535.0
        a = np.clip(a * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def read_image(path: str | Path) -> torch.Tensor:
    """Decode one image file to a uint8 3xHxW RGB tensor; unreadable files raise CorruptImageError."""
    try:
        with Image.open(path) as im:
            arr = np.array(_to_rgb(im), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or delete the file, "
            "or pass skip_bad=True to skip unreadable images"
        ) from exc
    return torch.from_numpy(arr).permute(2, 0, 1)  # channels-last strides: fast uint8 resize


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop (and of the cache): round(image_size / 0.875)."""
    return int(round(image_size / CROP_FRACTION))


def _resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    return TF.resize(img, [size], antialias=True)


def _load_resized(path: Path, size: int) -> torch.Tensor:
    return _resize_shorter(read_image(path), size)


# --------------------------------------------------------------------------- image sources


class PackedImages:
    """Many uint8 CxHxW images packed in one flat tensor: one allocation, cheap to pickle."""

    def __init__(self, buffer: torch.Tensor, shapes: torch.Tensor) -> None:
        self.buffer = buffer
        self.shapes = shapes.to(torch.int64)
        sizes = self.shapes.prod(dim=1)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])

    @classmethod
    def from_images(cls, images: list[torch.Tensor | None], consume: bool = False) -> PackedImages:
        """Pack 3xHxW uint8 tensors (stored HxWxC, so reads are channels-last).

        ``consume=True`` drops each list entry once copied, so packing a large cache
        needs little more memory than the cache itself.
        """
        shapes = torch.tensor([tuple(t.shape) for t in images], dtype=torch.int64).reshape(-1, 3)
        buffer = torch.empty(int(shapes.prod(dim=1).sum()), dtype=torch.uint8)
        start = 0
        for k, (c, h, w) in enumerate(shapes.tolist()):
            buffer[start : start + c * h * w].view(h, w, c).copy_(images[k].permute(1, 2, 0))
            start += c * h * w
            if consume:
                images[k] = None
        return cls(buffer, shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, h, w = self.shapes[i].tolist()
        start = int(self.offsets[i])
        return self.buffer[start : start + c * h * w].view(h, w, c).permute(2, 0, 1)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


class ImageFiles:
    """Images read from disk on every access, with the same decode + resize as the cache."""

    def __init__(self, root: Path, relpaths: Sequence[str], size: int) -> None:
        self.root, self.relpaths, self.size = Path(root), list(relpaths), size

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _load_resized(self.root / self.relpaths[i], self.size)


ImageSource = PackedImages | ImageFiles


# --------------------------------------------------------------------------- transforms


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
) -> v2.Compose:
    """RandomResizedCrop + horizontal flip (the reference code's), then float32 normalise."""
    steps: list[Any] = [v2.RandomResizedCrop(image_size, scale=scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the shorter side to round(size / 0.875), centre-crop ``size``, normalise."""
    return v2.Compose(
        [
            v2.Resize(resize_size(image_size), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class SceneDataset(Dataset):
    """``(image, label)`` pairs: a subset of an image source with a transform; picklable."""

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
        classes: Sequence[str],
    ) -> None:
        self.source, self.transform = source, transform
        self.indices, self.targets, self.classes = list(indices), list(labels), list(classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source[self.indices[i]]), self.targets[i]


# --------------------------------------------------------------------------- scanning


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted, hidden files and folders skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(dirpath) / f)]
    return found


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_classes(
    root: Path, base: Path, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/**/<image>`` as (path relative to ``base``, label) pairs."""
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}; pass root= an existing folder")
    found = _class_dirs(root)
    if not found:
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DataError(
            f"no images found under {root}{hint}; expected one sub-folder per class: "
            "root/<class>/<image>"
        )
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{root} has class folders not in the training set: {', '.join(unknown)}; "
            "give train/ a folder for every class"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for c in found:
        files, label = _list_images(root / c), classes.index(c)
        empty += [] if files else [c]
        samples += [(p.relative_to(base).as_posix(), label) for p in files]
    if not samples:
        raise DataError(
            f"no images found under {root} ({len(found)} class folders, all empty); "
            f"supported: .jpg .png .tif and other Pillow formats"
        )
    if empty:
        raise DataError(
            f"class folder {root / empty[0]} has no images ({len(empty)} empty in all); "
            "add images or remove the folder"
        )
    return classes, samples


def _presplit(root: Path) -> tuple[Path, Path] | None:
    """``(train, test)`` folders if ``root`` is already split, else None."""
    if not (root / "train").is_dir():
        return None
    tests = [root / n for n in ("test", "val") if (root / n).is_dir()]
    if not tests:
        raise DataError(
            f"{root} has train/ but neither val/ nor test/; add one, or point root at train/ "
            "to split it"
        )
    if len(tests) == 2:
        log.warning("%s has both test/ and val/: evaluating on test/, val/ is not used", root)
    return root / "train", tests[0]


def _n_train(n: int, ratio: float) -> int:
    k = int(math.floor(n * ratio + 0.5))
    return min(max(k, 1), n - 1) if n >= 2 else n


def stratified_split(
    samples: Sequence[tuple[str, int]], train_ratio: float, seed: int | str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split each class separately (``round(n * ratio)`` to train), reproducibly for a seed."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"train_ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    by_class: dict[int, list[str]] = {}
    for rel, label in samples:
        by_class.setdefault(label, []).append(rel)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        random.Random(f"bpl-split:{seed}:{label}").shuffle(items)
        k = _n_train(len(items), train_ratio)
        train += [(r, label) for r in sorted(items[:k])]
        test += [(r, label) for r in sorted(items[k:])]
    return train, test


def _split_train(
    split: dict[str, Any], seed: int, val_ratio: float, train_subset: float | None
) -> None:
    """Keep ``train_subset`` of the training split (per class), then carve the validation
    split out of it; both fixed by the seed and recorded in ``split``."""
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"val_ratio must be in [0, 1), got {val_ratio}")
    if train_subset is not None and not 0.0 < train_subset <= 1.0:
        raise DataError(f"train_subset must be in (0, 1], got {train_subset}")
    train = [tuple(s) for s in split["train"]]
    if train_subset is not None and train_subset < 1.0:
        train, _ = stratified_split(train, train_subset, f"{seed}:subset")
    val: list[tuple[str, int]] = []
    if val_ratio > 0:
        train, val = stratified_split(train, 1.0 - val_ratio, f"{seed}:val")
    split.update(train=[list(r) for r in train], val=[list(r) for r in val],
                 val_ratio=val_ratio, train_subset=train_subset)


# --------------------------------------------------------------------------- split files


def _make_split(
    spec: DatasetSpec,
    root: Path,
    seed: int,
    train_ratio: float | None,
    val_ratio: float,
    train_subset: float | None,
) -> dict[str, Any]:
    """Scan ``root`` and split it (or take its train/ + val|test/ folders as they are)."""
    dirs = _presplit(root)
    if dirs is not None:
        if train_ratio is not None:
            log.warning("%s is already split into train/ and test/: train_ratio ignored", root)
        classes, train = _scan_classes(dirs[0], root)
        _, test = _scan_classes(dirs[1], root, classes)
        layout, ratio = "presplit", None
    else:
        classes, samples = _scan_classes(root, root)
        ratio = spec.train_ratio if train_ratio is None else train_ratio
        train, test = stratified_split(samples, ratio, seed)
        layout = "split"
    _check_class_count(spec, len(classes), root)
    split = {
        "format": SPLIT_FORMAT,
        "dataset": spec.name,
        "layout": layout,
        "seed": seed,
        "train_ratio": ratio,
        "root": str(root),
        "classes": classes,
        "train": [list(s) for s in train],
        "test": [list(s) for s in test],
    }
    _split_train(split, seed, val_ratio, train_subset)
    return split


def _check_class_count(spec: DatasetSpec, n: int, where: Path | str) -> None:
    if spec.num_classes is not None and n != spec.num_classes:
        raise DataError(
            f"{spec.name} has {spec.num_classes} classes but {where} has {n}; "
            f"point root at the folder holding all {spec.num_classes}, or use name='imagefolder'"
        )


def read_split(path: str | Path) -> dict[str, Any]:
    """Read a split JSON written by ``SceneData.save_split`` and check its shape."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read split file {path}: {exc}; delete it to make a new split"
        ) from exc
    missing = [
        k for k in ("classes", "train", "test") if not isinstance(split, dict) or k not in split
    ]
    if missing:
        raise DataError(
            f"split file {path} is not a bpl split (missing {', '.join(missing)}); "
            "delete it to make a new split"
        )
    return split


def _write_json(path: Path, obj: Any) -> None:
    """Write a split file atomically (compact indentation, as split files always were)."""
    atomic_write_json(path, obj, indent=1, newline=False)


def _check_split_files(split: dict[str, Any], root: Path, split_file: Path) -> None:
    for rel, _ in _all_rows(split):
        if not (root / rel).is_file():
            raise DataError(
                f"image {root / rel} listed in split file {split_file} is missing; "
                "restore it, pass the root the split was made from, or delete the split file"
            )


# --------------------------------------------------------------------------- decoding + cache


def _decode_all(
    root: Path, relpaths: Sequence[str], size: int, skip_bad: bool, keep: bool = True
) -> tuple[list[torch.Tensor | None], list[str]]:
    """Decode (and resize) every image with a small thread pool; returns images and bad paths."""

    def work(rel: str) -> torch.Tensor | None:
        try:
            img = _load_resized(root / rel, size)
        except CorruptImageError as exc:
            if not skip_bad:
                raise
            log.warning("skipping unreadable image: %s", exc)
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
                disable=None,
                leave=False,
            )
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bad = [rel for rel, img in zip(relpaths, images) if img is None]
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


def _build_cache(
    name: str, root: Path, relpaths: list[str], size: int, skip_bad: bool, cache_dir: Path | None
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
    images, bad = _decode_all(root, relpaths, size, skip_bad)
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


# --------------------------------------------------------------------------- download


def verify_file(
    path: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    label: str | None = None,
) -> None:
    """Check a file's byte size and md5/sha256; raise ChecksumError naming what differs.

    ``label`` names the file in the message (e.g. the URL it was downloaded from).
    """
    path = Path(path)
    label = label or str(path)
    if size is not None and path.stat().st_size != size:
        raise ChecksumError(
            f"{label} has {path.stat().st_size} bytes but {size} were expected; the download is "
            "incomplete or the file changed upstream: retry, or pass the new size"
        )
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want is None:
            continue
        h = hashlib.new(algo)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest().lower() != want.lower():
            raise ChecksumError(
                f"{label} has {algo} {h.hexdigest()} but {want} was expected; the download is "
                "corrupt or the file changed upstream: retry, or pass the new checksum"
            )


def _fetch(url: str, archive: Path, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(archive, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=None) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(
            f"cannot download {url} ({exc}); check the network, or download and unpack it "
            f"by hand into {dest}"
        ) from exc


def download_and_extract(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> Path:
    """Download a zip archive, verify it, unpack it to a temp folder, then rename it to ``dest``.

    Nothing half-written is left behind: the archive and the temp folder sit next to
    ``dest`` and are removed on any failure; ``dest`` appears only once complete.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(
            f"cannot unpack into {dest}: it exists and is not empty; remove it or pick another root"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if md5 is None and sha256 is None and size is None:
        log.warning("no checksum known for %s: the download is not verified", url)
    fd, archive = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".zip")
    os.close(fd)
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.part-"))
    try:
        _fetch(url, Path(archive), dest)
        verify_file(archive, md5=md5, sha256=sha256, size=size, label=f"download of {url}")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmpdir)
        except zipfile.BadZipFile as exc:
            raise DataError(
                f"{url} is not a valid zip archive ({exc}); retry the download"
            ) from exc
        if dest.exists():
            dest.rmdir()
        os.replace(tmpdir, dest)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        Path(archive).unlink(missing_ok=True)
    log.info("unpacked %s into %s", url, dest)
    return dest


def default_root(name: str) -> Path:
    """Where a named dataset lives when ``root`` is not given: $BPL_DATA/<name> or ~/.cache/bpl/data."""
    base = os.environ.get("BPL_DATA") or Path.home() / ".cache" / "bpl" / "data"
    return Path(base).expanduser() / name


def _resolve_root(spec: DatasetSpec, root: Path, download: bool) -> Path:
    """The folder holding the class folders (or train/ + test/), downloading it if asked."""
    if download and not _has_files(root):
        if spec.url is None:
            raise DataError(
                f"no download address is known for {spec.name}; download it by hand and pass root="
            )
        download_and_extract(spec.url, root, md5=spec.md5, sha256=spec.sha256)
    if not root.is_dir():
        fix = " or pass download=True" if spec.url else ""
        raise DataError(
            f"dataset folder not found: {root}; pass root= the folder with one sub-folder per class{fix}"
        )
    for sub in spec.subdirs:
        if (root / sub).is_dir():
            return root / sub
    return root


def _has_files(root: Path) -> bool:
    return root.is_dir() and any(True for _ in root.iterdir())


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[PackedImages, tuple[int, ...]]:
    """sklearn's 1,797 8x8 digits as uint8 RGB (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))
    rgb = x[:, None].expand(-1, 3, -1, -1)
    return PackedImages.from_images(list(rgb)), tuple(int(t) for t in bunch.target)


def _digits_split(
    seed: int, train_ratio: float | None, val_ratio: float, train_subset: float | None
) -> dict[str, Any]:
    samples = [(f"{i:04d}", t) for i, t in enumerate(_digits()[1])]
    ratio = DATASETS["digits"].train_ratio if train_ratio is None else train_ratio
    train, test = stratified_split(samples, ratio, seed)
    split = {
        "format": SPLIT_FORMAT,
        "dataset": "digits",
        "layout": "split",
        "seed": seed,
        "train_ratio": ratio,
        "root": None,
        "classes": [str(d) for d in range(10)],
        "train": [list(s) for s in train],
        "test": [list(s) for s in test],
    }
    _split_train(split, seed, val_ratio, train_subset)
    return split


# --------------------------------------------------------------------------- entry point


@dataclass
class SceneData:
    """The result of ``load_dataset``: train/val/test datasets, classes, normalisation, split.

    ``val`` is ``None`` when the split has no validation part (``val_ratio=0``, or a split
    file written before bpl carved one).
    """

    name: str
    root: Path | None
    train: SceneDataset
    val: SceneDataset | None
    test: SceneDataset
    classes: list[str]
    mean: Stats
    std: Stats
    split: dict[str, Any]
    image_size: int
    stats_source: str
    bad: list[str] = field(default_factory=list)
    cache_file: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_bad(self) -> int:
        """How many unreadable images were skipped (``skip_bad=True``)."""
        return len(self.bad)

    def save_split(self, path: str | Path) -> Path:
        """Write the split (files, labels, classes, mean/std) as JSON, atomically."""
        path = Path(path)
        _write_json(path, self.split)
        return path


def _get_spec(name: str) -> DatasetSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]


def _all_rows(split: dict[str, Any]) -> list[Sequence[Any]]:
    """Every (path, label) row of a split: train, validation and test."""
    return [r for part in PARTS for r in split.get(part, [])]


def _drop_bad(split: dict[str, Any], bad: Sequence[str]) -> None:
    if bad:
        dropped = set(bad)
        for part in PARTS:
            if part in split:
                split[part] = [s for s in split[part] if s[0] not in dropped]
        split["bad"] = sorted(set(split.get("bad", [])) | dropped)


def _choose_stats(
    spec: DatasetSpec,
    split: dict[str, Any],
    normalization: str,
    train_images: Callable[[], Iterable[torch.Tensor]],
) -> tuple[Stats, Stats, str]:
    """Mean/std: from the split file, the dataset's known values, ImageNet, or computed now."""
    if normalization not in ("auto", "imagenet", "compute"):
        raise DataError(
            f"normalization must be 'auto', 'imagenet' or 'compute', got {normalization!r}"
        )
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD, "ImageNet"
    if normalization == "auto" and split.get("mean") and split.get("std"):
        return tuple(split["mean"]), tuple(split["std"]), split.get("stats_source", "split file")
    if normalization == "auto" and spec.mean is not None and spec.std is not None:
        return spec.mean, spec.std, spec.stats_source
    mean, std = channel_stats(train_images())
    return mean, std, "computed from the training split"


def load_dataset(
    name: str = "digits",
    root: str | Path | None = None,
    *,
    image_size: int = 224,
    seed: int = 0,
    train_ratio: float | None = None,
    val_ratio: float = 0.1,
    train_subset: float | None = None,
    split_file: str | Path | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    skip_bad: bool = False,
    download: bool = False,
    normalization: str = "auto",
) -> SceneData:
    """Build the train, validation and test datasets of a named dataset (see ``DATASETS``).

    A new split puts ``train_ratio`` of each class in training (the dataset's default
    when None), keeps ``train_subset`` of that (per class; all when None), and moves
    ``val_ratio`` of what is left to validation; all fixed by ``seed``. ``split_file``:
    if it exists, its files, labels and mean/std are used as they are (so an
    evaluation sees exactly the training run's test images); if not, the new split is
    written there.  ``cache`` decodes every image once at ``round(image_size / 0.875)`` px;
    ``cache_dir`` also keeps that cache on disk for the next run.  ``normalization``:
    ``auto`` (the split file's, else the dataset's known values, else computed from the
    training split), ``imagenet``, or ``compute``.
    """
    spec = _get_spec(name)
    if image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    split_path = Path(split_file) if split_file is not None else None
    split = read_split(split_path) if split_path is not None and split_path.exists() else None
    if split is not None:
        _check_class_count(spec, len(split["classes"]), split_path)
    cache_file: Path | None = None
    if spec.name == "digits":
        split = split or _digits_split(seed, train_ratio, val_ratio, train_subset)
        data_root, source = None, _digits()[0]
        index = {f"{i:04d}": i for i in range(len(source))}
    else:
        data_root, split = _locate(spec, root, split, split_path, seed, train_ratio, download,
                                   val_ratio, train_subset)
        source, index, cache_file = _image_source(
            spec, data_root, split, image_size, cache, cache_dir, skip_bad
        )
    if split.get("dataset", spec.name) != spec.name:
        log.warning("split %s was made for %s, not %s", split_path, split["dataset"], spec.name)
    train_idx = _indices(split["train"], index, split_path)
    mean, std, stats_source = _choose_stats(
        spec,
        split,
        normalization,
        lambda: _progress((source[i] for i in train_idx), len(train_idx)),
    )
    split.update(mean=list(mean), std=list(std), stats_source=stats_source)
    if split_path is not None and not split_path.exists():
        _write_json(split_path, split)
        log.info("wrote split %s", split_path)
    data = _assemble(spec, data_root, split, source, index, image_size, (mean, std, stats_source))
    data.cache_file = cache_file
    return data


def _indices(rows: Sequence[Sequence[Any]], index: dict[str, int], where: Path | None) -> list[int]:
    """Positions in the image source of a split's rows (a foreign split file fails clearly)."""
    try:
        return [index[rel] for rel, _ in rows]
    except KeyError as exc:
        raise DataError(
            f"split file {where} lists image {exc.args[0]!r}, which this dataset does not have; "
            "pass the dataset the split was made for, or delete the split file"
        ) from None


def _progress(items: Iterable[torch.Tensor], total: int) -> Iterable[torch.Tensor]:
    return tqdm(items, total=total, desc="mean/std", unit="img", disable=None, leave=False)


def _locate(
    spec: DatasetSpec,
    root: str | Path | None,
    split: dict[str, Any] | None,
    split_path: Path | None,
    seed: int,
    train_ratio: float | None,
    download: bool,
    val_ratio: float,
    train_subset: float | None,
) -> tuple[Path, dict[str, Any]]:
    """Resolve the data root and return it with the split (read from file or made now)."""
    if root is None and split is not None and split.get("root"):
        root = split["root"]
    if root is None:
        if spec.name == "imagefolder":
            raise DataError("imagefolder needs root= the folder with one sub-folder per class")
        root = default_root(spec.name)
    data_root = _resolve_root(spec, Path(root).expanduser(), download)
    if split is None:
        return data_root, _make_split(spec, data_root, seed, train_ratio, val_ratio, train_subset)
    assert split_path is not None
    _check_split_files(split, data_root, split_path)
    log.info("using split %s (%d train / %d val / %d test)", split_path, len(split["train"]),
             len(split.get("val", [])), len(split["test"]))
    return data_root, split


def _image_source(
    spec: DatasetSpec,
    root: Path,
    split: dict[str, Any],
    image_size: int,
    cache: bool,
    cache_dir: str | Path | None,
    skip_bad: bool,
) -> tuple[ImageSource, dict[str, int], Path | None]:
    """Cached (packed) or on-disk images for every file of the split; bad ones dropped."""
    relpaths = sorted({rel for rel, _ in _all_rows(split)})
    size = resize_size(image_size)
    source: ImageSource
    cache_file = None
    if cache:
        cdir = Path(cache_dir) if cache_dir is not None else None
        source, good, bad, cache_file = _build_cache(
            spec.name, root, relpaths, size, skip_bad, cdir
        )
    else:
        bad = _decode_all(root, relpaths, size, True, keep=False)[1] if skip_bad else []
        dropped = set(bad)
        good = [rel for rel in relpaths if rel not in dropped]
        source = ImageFiles(root, good, size)
    if bad:
        log.warning(
            "skipped %d unreadable images (skip_bad=True), e.g. %s", len(bad), root / bad[0]
        )
    _drop_bad(split, bad)
    return source, {rel: i for i, rel in enumerate(good)}, cache_file


def _assemble(
    spec: DatasetSpec,
    root: Path | None,
    split: dict[str, Any],
    source: ImageSource,
    index: dict[str, int],
    image_size: int,
    stats: tuple[Stats, Stats, str],
) -> SceneData:
    mean, std, stats_source = stats
    classes = list(split["classes"])

    def subset(part: str, transform: v2.Compose) -> SceneDataset:
        rows = split[part]
        labels = [int(y) for _, y in rows]
        return SceneDataset(source, _indices(rows, index, None), labels, transform, classes)

    train = subset("train", train_transform(image_size, mean, std, spec.crop_scale, spec.hflip))
    val = subset("val", eval_transform(image_size, mean, std)) if split.get("val") else None
    test = subset("test", eval_transform(image_size, mean, std))
    log.info(
        "%s: %d classes, %d train / %d val / %d test images at %d px; mean/std: %s",
        spec.name,
        len(classes),
        len(train),
        len(val) if val is not None else 0,
        len(test),
        image_size,
        stats_source,
    )
    bad = list(split.get("bad", []))
    return SceneData(
        spec.name, root, train, val, test, classes, mean, std, split, image_size, stats_source,
        bad,
    )
