"""``load_dataset``: a named dataset to train, validation and test datasets, split and normalised."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from ..errors import DataError, arg
from .cache import (
    DEFAULT_BUDGET,
    CachedImages,
    build_cache,
    cached_channel_stats,
    channel_stats,
    check_cache,
    find_bad,
)
from .download import resolve_root
from .images import ImageFiles, ImageSource, PackedImages, resize_size
from .registry import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSpec,
    Stats,
    default_root,
    get_spec,
)
from .splits import (
    SPLIT_FORMAT,
    all_rows,
    check_class_count,
    check_split_files,
    check_training_classes,
    drop_bad,
    make_split,
    read_split,
    split_train,
    stratified_split,
    write_split,
)
from .transforms import SceneDataset, eval_transform, train_transform

log = logging.getLogger(__name__)

#: The bundled digits: the 1,797 8x8 images (values 0..16) and labels of the UCI "Optical
#: Recognition of Handwritten Digits" test set (Alpaydin & Kaynak 1998, CC BY 4.0), as
#: scikit-learn ships them; 45 kB in the package, so the demo needs no download.
DIGITS_FILE = "digits.npz"


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[PackedImages, tuple[int, ...]]:
    """The 1,797 8x8 digits as uint8 RGB (0..16 scaled to 0..255) and their labels."""
    with (resources.files(__package__) / DIGITS_FILE).open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    x = torch.from_numpy(np.round(images * (255.0 / 16.0)).astype(np.uint8))
    rgb = x[:, None].expand(-1, 3, -1, -1)
    return PackedImages.from_images(list(rgb)), tuple(int(t) for t in labels)


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
    split_train(split, seed, val_ratio, train_subset)
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
    #: How the images are read: ``memory``, ``mmap`` (from the cache file), ``off``
    #: (decoded on every read) or ``bundled`` (digits); ``cache_why`` says why.
    cache_mode: str = "off"
    cache_why: str = ""

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
        write_split(path, self.split)
        return path


def _choose_stats(
    spec: DatasetSpec,
    split: dict[str, Any],
    normalization: str,
    compute: Callable[[], tuple[Stats, Stats]],
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
    mean, std = compute()
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
    cache: bool | str = "auto",
    cache_dir: str | Path | None = None,
    cache_budget: float = DEFAULT_BUDGET,
    skip_bad: bool = False,
    download: bool = False,
    normalization: str = "auto",
    progress: bool = True,
) -> SceneData:
    """Build the train, validation and test datasets of a named dataset (see ``DATASETS``).

    A new split puts ``train_ratio`` of each class in training (the dataset's default
    when None), keeps ``train_subset`` of that (per class; all when None), and moves
    ``val_ratio`` of what is left to validation; all fixed by ``seed``. ``split_file``:
    if it exists, its files, labels and mean/std are used as they are (so an
    evaluation sees exactly the training run's test images); if not, the new split is
    written there.  ``cache`` decodes every image once at ``round(image_size / 0.875)`` px
    into a file in ``cache_dir`` (default: :func:`bpl.data.default_cache_dir`), which
    the next run, DataLoader workers and torchrun processes reuse: ``"auto"`` (or True)
    reads it into memory if it fits ``cache_budget`` x the available memory and from
    disk beyond; ``"memory"``, ``"mmap"`` (from disk) as said; ``"off"`` (or False)
    decodes each image whenever it is read.  ``normalization``:
    ``auto`` (the split file's, else the dataset's known values, else computed from the
    training split), ``imagenet``, or ``compute``. ``progress=False`` hides the progress bars.
    """
    spec = get_spec(name)
    if image_size < 1:
        raise DataError(f"{arg('image_size')} must be a positive number of pixels, got "
                        f"{image_size}", param="image_size")
    split_path = Path(split_file) if split_file is not None else None
    split = read_split(split_path) if split_path is not None and split_path.exists() else None
    if split is not None:
        check_class_count(spec, len(split["classes"]), split_path)
    mode = {True: "auto", False: "off"}.get(cache, cache) if isinstance(cache, bool) else cache
    check_cache(mode, cache_budget)
    cached: CachedImages | None = None
    if spec.name == "digits":
        split = split or _digits_split(seed, train_ratio, val_ratio, train_subset)
        data_root, source = None, _digits()[0]
        index = {f"{i:04d}": i for i in range(len(source))}
    else:
        data_root, split = _locate(spec, root, split, split_path, seed, train_ratio, download,
                                   val_ratio, train_subset, progress)
        source, index, cached = _image_source(
            spec, data_root, split, image_size, mode, cache_dir, cache_budget, skip_bad, progress
        )
    if split.get("dataset", spec.name) != spec.name:
        log.warning("split %s was made for %s, not %s", split_path, split["dataset"], spec.name)
    check_training_classes(split)
    train_idx = _indices(split["train"], index, split_path)
    mean, std, stats_source = _choose_stats(
        spec,
        split,
        normalization,
        lambda: cached_channel_stats(cached.index, train_idx) if cached is not None else
        channel_stats(_progress((source[i] for i in train_idx), len(train_idx), progress)),
    )
    split.update(mean=list(mean), std=list(std), stats_source=stats_source)
    if split_path is not None and not split_path.exists():
        write_split(split_path, split)
        log.info("wrote split %s", split_path)
    data = _assemble(spec, data_root, split, source, index, image_size, (mean, std, stats_source))
    if cached is not None:
        data.cache_file, data.cache_mode, data.cache_why = cached.path, cached.mode, cached.why
    elif spec.name == "digits":
        data.cache_mode, data.cache_why = "bundled", "the digits ship decoded with bpl"
    else:
        data.cache_why = f"asked for ({arg('cache', cache)})"
    return data


def draw_split(
    name: str = "digits",
    root: str | Path | None = None,
    *,
    seed: int = 0,
    train_ratio: float | None = None,
    val_ratio: float = 0.1,
    train_subset: float | None = None,
) -> dict[str, Any]:
    """The split :func:`load_dataset` draws for a new run with the same arguments: which
    images are for training, validation and test. It lists the folder and decodes and
    downloads nothing, so a study can count a split's images before it runs."""
    spec = get_spec(name)
    if spec.name == "digits":
        return _digits_split(seed, train_ratio, val_ratio, train_subset)
    return _locate(spec, root, None, None, seed, train_ratio, False, val_ratio, train_subset,
                   False)[1]


def _indices(rows: Sequence[Sequence[Any]], index: dict[str, int], where: Path | None) -> list[int]:
    """Positions in the image source of a split's rows (a foreign split file fails clearly)."""
    try:
        return [index[rel] for rel, _ in rows]
    except KeyError as exc:
        raise DataError(
            f"split file {where} lists image {exc.args[0]!r}, which this dataset does not have; "
            "pass the dataset the split was made for, or delete the split file"
        ) from None


def _progress(items: Iterable[torch.Tensor], total: int, progress: bool) -> Iterable[torch.Tensor]:
    return tqdm(items, total=total, desc="mean/std", unit="img", disable=None if progress else True,
                leave=False)


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
    progress: bool,
) -> tuple[Path, dict[str, Any]]:
    """Resolve the data root and return it with the split (read from file or made now)."""
    if root is None and split is not None and split.get("root"):
        root = split["root"]
    if root is None:
        if spec.name == "imagefolder":
            raise DataError(f"imagefolder needs the folder with one sub-folder per class as "
                            f"{arg('root')}", param="root")
        root = default_root(spec.name)
    data_root = resolve_root(spec, Path(root).expanduser(), download, progress)
    if split is None:
        return data_root, make_split(spec, data_root, seed, train_ratio, val_ratio, train_subset)
    assert split_path is not None
    check_split_files(split, data_root, split_path)
    log.info("using split %s (%d train / %d val / %d test)", split_path, len(split["train"]),
             len(split.get("val", [])), len(split["test"]))
    return data_root, split


def _image_source(
    spec: DatasetSpec,
    root: Path,
    split: dict[str, Any],
    image_size: int,
    mode: str,
    cache_dir: str | Path | None,
    budget: float,
    skip_bad: bool,
    progress: bool,
) -> tuple[ImageSource, dict[str, int], CachedImages | None]:
    """Cached or on-disk images for every file of the split; bad ones dropped."""
    relpaths = sorted({rel for rel, _ in all_rows(split)})
    size = resize_size(image_size)
    source: ImageSource
    cached = None
    if mode != "off":
        cdir = Path(cache_dir).expanduser() if cache_dir is not None else None
        cached = build_cache(spec.name, root, relpaths, size, skip_bad, cdir, progress, mode,
                             budget)
        source, good = cached.source, cached.index.relpaths
        bad = [rel for rel, _ in cached.index.bad]
    else:
        log.info("image cache: off (%s): every image is decoded when it is read", arg("cache", "off"))
        bad = find_bad(root, relpaths, size, True, progress) if skip_bad else []
        dropped = set(bad)
        good = [rel for rel in relpaths if rel not in dropped]
        source = ImageFiles(root, good, size)
    if bad:
        log.warning(
            "skipped %d unreadable images, e.g. %s", len(bad), root / bad[0]
        )
    drop_bad(split, bad)
    return source, {rel: i for i, rel in enumerate(good)}, cached


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
