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
- Images are decoded once into a packed uint8 cache file at ``round(image_size / 0.875)`` px
  on the shorter side (``default_cache_dir()``: ``~/.cache/bpl/images``), written a few
  images at a time and shared by later runs, DataLoader workers and torchrun processes;
  it is read into memory where it fits the memory budget and from disk beyond, so epochs
  at 96-224 px never re-decode 256 px TIFFs and a dataset larger than memory trains.
  Without the cache every read goes through the very same decode + resize, so
  evaluation gives identical tensors either way.
- ``digits`` (scikit-learn's bundled 8x8 handwritten digits) needs no files or download.
"""

from ..errors import ChecksumError, CorruptImageError, DataError
from .cache import CACHE_MODES, channel_stats
from .cachefile import clear_caches, default_cache_dir, list_caches
from .download import download_and_extract, verify_file
from .images import (
    IMAGE_EXTENSIONS,
    DiskImages,
    ImageFiles,
    PackedImages,
    read_image,
    resize_size,
)
from .load import SceneData, draw_split, load_dataset
from .registry import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UCM_MEAN,
    UCM_STD,
    DatasetSpec,
    default_root,
)
from .splits import read_split, split_digests, stratified_split
from .transforms import SceneDataset, eval_transform, train_transform

__all__ = [
    "CACHE_MODES",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "UCM_MEAN",
    "UCM_STD",
    "ChecksumError",
    "CorruptImageError",
    "DataError",
    "DatasetSpec",
    "DiskImages",
    "ImageFiles",
    "PackedImages",
    "SceneData",
    "SceneDataset",
    "channel_stats",
    "clear_caches",
    "default_cache_dir",
    "default_root",
    "download_and_extract",
    "draw_split",
    "eval_transform",
    "list_caches",
    "load_dataset",
    "read_image",
    "read_split",
    "resize_size",
    "split_digests",
    "stratified_split",
    "train_transform",
    "verify_file",
]
