"""Scanning class folders, reproducible stratified splits, and split files."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, arg
from ..files import atomic_write_json
from .images import IMAGE_EXTENSIONS
from .registry import DatasetSpec

log = logging.getLogger(__name__)

SPLIT_FORMAT = 1
PARTS = ("train", "val", "test")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_image(p: Path) -> bool:
    return p.is_file() and _is_image_name(p.name)


def _list_images(folder: Path, prefix: str) -> list[str]:
    """Image files below ``folder`` (recursive) as ``prefix/<path below folder>``, in
    ``os.walk``'s order (each folder's files sorted, then its sub-folders sorted; hidden
    ones and links to folders skipped). ``os.scandir`` knows which entries are files, so
    a folder of 100,000 images costs no stat call per file."""
    found: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    found += [f"{prefix}/{e.name}" for e in entries
              if not e.is_dir() and _is_image_name(e.name) and e.is_file()]
    for e in entries:
        if e.is_dir() and not e.name.startswith(".") and not e.is_symlink():
            found += _list_images(Path(e.path), f"{prefix}/{e.name}")
    return found


# Not torchvision's find_classes: that takes hidden folders (.ipynb_checkpoints) as classes.
def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_classes(
    root: Path, base: Path, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/**/<image>`` as (path relative to ``base``, label) pairs."""
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}; pass an existing folder as "
                        f"{arg('root')}", param="root")
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
        files = _list_images(root / c, (root / c).relative_to(base).as_posix())
        empty += [] if files else [c]
        samples += [(rel, classes.index(c)) for rel in files]
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
    if len(classes) < 2:
        raise DataError(
            f"{root} has {len(found)} class folder ({found[0]}); a classifier needs at least 2: "
            "give root one sub-folder per class"
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


def check_ratios(train_ratio: float | None = None, val_ratio: float = 0.0,
                 train_subset: float | None = None) -> None:
    """Refuse a split fraction out of its range (``None``: the dataset's own, or all)."""
    if train_ratio is not None and not 0.0 < train_ratio < 1.0:
        raise DataError(f"{arg('train_ratio')} must be between 0 and 1 (exclusive), got "
                        f"{train_ratio}", param="train_ratio")
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"{arg('val_ratio')} must be at least 0 and below 1, got {val_ratio}",
                        param="val_ratio")
    if train_subset is not None and not 0.0 < train_subset <= 1.0:
        raise DataError(f"{arg('train_subset')} must be above 0 and at most 1, got "
                        f"{train_subset}", param="train_subset")


def stratified_split(
    samples: Sequence[tuple[str, int]], train_ratio: float, seed: int | str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split each class separately (``round(n * ratio)`` to train), reproducibly for a seed."""
    check_ratios(train_ratio=train_ratio)
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


def split_train(
    split: dict[str, Any], seed: int, val_ratio: float, train_subset: float | None
) -> None:
    """Keep ``train_subset`` of the training split (per class), then carve the validation
    split out of it; both fixed by the seed and recorded in ``split``."""
    check_ratios(val_ratio=val_ratio, train_subset=train_subset)
    train = [tuple(s) for s in split["train"]]
    if train_subset is not None and train_subset < 1.0:
        train, left_out = stratified_split(train, train_subset, f"{seed}:subset")
        # how a later check tells the images the subset left out from images added since
        split["left_out"] = {"count": len(left_out), "sha1": _digest(rel for rel, _ in left_out)}
    val: list[tuple[str, int]] = []
    if val_ratio > 0:
        train, val = stratified_split(train, 1.0 - val_ratio, f"{seed}:val")
    split.update(train=[list(r) for r in train], val=[list(r) for r in val],
                 val_ratio=val_ratio, train_subset=train_subset)



def make_split(
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
    check_class_count(spec, len(classes), root)
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
    split_train(split, seed, val_ratio, train_subset)
    return split


def check_class_count(spec: DatasetSpec, n: int, where: Path | str) -> None:
    """Refuse a folder or split whose class count differs from the named dataset's."""
    if spec.num_classes is not None and n != spec.num_classes:
        raise DataError(
            f"{spec.name} has {spec.num_classes} classes but {where} has {n}; "
            f"point {arg('root')} at the folder holding all {spec.num_classes}, or use "
            f"{arg('name', 'imagefolder')}", param="root"
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


def write_split(path: Path, obj: Any) -> None:
    """Write a split file atomically (compact indentation, as split files always were)."""
    atomic_write_json(path, obj, indent=1, newline=False)


def _digest(rels) -> str:
    """A short fingerprint of a set of relative paths (order does not matter)."""
    return hashlib.sha1("\n".join(sorted(rels)).encode()).hexdigest()


def check_split_files(split: dict[str, Any], root: Path, split_file: Path) -> None:
    """Refuse a split file that lists images missing under ``root`` or whose classes no
    longer match its folders; say so when images were added since (the split is fixed:
    a resumed or evaluated run does not take them)."""
    base = os.fspath(root)
    for rel, _ in all_rows(split):
        if not os.path.isfile(os.path.join(base, rel)):  # not pathlib: fast on 100,000 files
            raise DataError(
                f"image {root / rel} listed in split file {split_file} is missing; "
                "restore it, pass the root the split was made from, or delete the split file"
            )
    if split.get("layout") not in ("split", "presplit") or not root.is_dir():
        return
    tops = [root] if split["layout"] == "split" else [d for d in _presplit(root) or ()]
    found = {d for top in tops for d in _class_dirs(top)}
    added_classes = sorted(found - set(split["classes"]))
    if added_classes:
        raise DataError(
            f"{root} has class folders that split file {split_file} does not know "
            f"({', '.join(added_classes[:5])}); the run's model has no output for them: "
            "start a new run (another --out) to train on them, or move them away")
    known = {rel for rel, _ in all_rows(split)} | set(split.get("bad", []))
    added = [rel for top in tops for _, rels in [_scan_classes(top, root, split["classes"])]
             for rel, _ in rels if rel not in known]
    left_out = split.get("left_out") or {"count": 0, "sha1": _digest([])}
    if _digest(added) == left_out["sha1"]:
        return  # nothing, or exactly the images --train-subset left out
    n_added = len(added) - left_out["count"]
    example = f" (e.g. {added[0]})" if not split.get("left_out") else ""
    if n_added > 0 and split.get("train_subset") and not split.get("left_out"):
        # a --train-subset split from before bpl recorded what the subset left out: the
        # unlisted images are those, images added since, or both; it cannot tell
        log.info("%d images under %s are not in split file %s (its --train-subset %s left "
                 "images out, and it predates the record of which): this run keeps its split",
                 n_added, root, split_file, split["train_subset"])
    elif n_added > 0:
        log.warning("%d images under %s were added after split file %s was written%s; "
                    "this run keeps its split and does not use them: start a new run (another "
                    "--out) to train on them", n_added, root, split_file, example)


def check_training_classes(split: dict[str, Any]) -> None:
    """Refuse a split in which a class has no training image (a model would get an output it
    can never learn); warn when validation takes most of what training had."""
    counts = [0] * len(split["classes"])
    for _, label in split["train"]:
        counts[label] += 1
    empty = [name for name, n in zip(split["classes"], counts, strict=True) if n == 0]
    if empty:
        why = (f" after {len(split['bad'])} unreadable images were skipped" if split.get("bad")
               else "")
        raise DataError(
            f"no training image is left in class{'es' if len(empty) > 1 else ''} "
            f"{', '.join(map(repr, empty[:5]))}{why}; add readable images to "
            f"{'them' if len(empty) > 1 else 'it'} or remove the folder")
    n_train, n_val = len(split["train"]), len(split.get("val", []))
    if n_val > n_train:
        log.warning("the validation split (%d images) is larger than the training split (%d, "
                    "%.1f per class): lower --val-ratio (now %s) to train on more", n_val,
                    n_train, n_train / len(counts), split.get("val_ratio"))


def split_digests(split: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the images of each part of a split (train, val, test): what tells
    whether two runs split the data alike."""
    return {part: _digest(str(r[0]) for r in split.get(part, [])) for part in PARTS}


def all_rows(split: dict[str, Any]) -> list[Sequence[Any]]:
    """Every (path, label) row of a split: train, validation and test."""
    return [r for part in PARTS for r in split.get(part, [])]


def drop_bad(split: dict[str, Any], bad: Sequence[str]) -> None:
    """Remove unreadable images from every part of ``split`` and record them under ``bad``."""
    if bad:
        dropped = set(bad)
        for part in PARTS:
            if part in split:
                split[part] = [s for s in split[part] if s[0] not in dropped]
        split["bad"] = sorted(set(split.get("bad", [])) | dropped)


