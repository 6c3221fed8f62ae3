"""The datasets bpl knows by name: class counts, default splits, statistics, sources."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

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


#: Folder names (lower case, ``_`` as ``-``) that say which named dataset a folder holds.
_FOLDER_NAMES = {
    "ucm": "ucm", "ucmerced": "ucm", "uc-merced": "ucm", "ucmerced-landuse": "ucm",
    "nwpu-resisc45": "nwpu-resisc45", "rsd46-whu": "rsd46-whu",
    "eurosat": "eurosat", "eurosat-rgb": "eurosat",
}


def guess_dataset(root: str | Path) -> str:
    """The dataset a folder given without a name holds: a named one its folder name
    recognises (``UCMerced_LandUse`` -> ``ucm``, ``NWPU-RESISC45`` -> ``nwpu-resisc45``),
    else ``imagefolder`` (any ``root/<class>/<image>`` tree).
    """
    name = Path(root).expanduser().resolve().name.lower().replace("_", "-")
    return _FOLDER_NAMES.get(name, "imagefolder")


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset name or alias (case-insensitive); unknown names raise DataError."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[key]


def default_root(name: str) -> Path:
    """Where a named dataset lives when ``root`` is not given: $BPL_DATA/<name> or ~/.cache/bpl/data."""
    base = os.environ.get("BPL_DATA") or Path.home() / ".cache" / "bpl" / "data"
    return Path(base).expanduser() / name


