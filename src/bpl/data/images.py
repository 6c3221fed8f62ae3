"""Decoding image files to uint8 RGB tensors, resized once, and the two sources of decoded images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..errors import CorruptImageError, DataError, arg

CROP_FRACTION = 0.875


# Pillow's own list, not torchvision's fixed IMG_EXTENSIONS: it lacks formats Pillow reads (.gif, .jp2).
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
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise CorruptImageError(
            f"cannot read image {path} ({reason}); replace or delete the file, "
            f"or pass {arg('skip_bad', True)} to skip unreadable images", reason=reason,
        ) from exc
    return torch.from_numpy(arr).permute(2, 0, 1)  # channels-last strides: fast uint8 resize


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop (and of the cache): round(image_size / 0.875)."""
    return int(round(image_size / CROP_FRACTION))


def _resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    return TF.resize(img, [size], antialias=True)


def load_resized(path: Path, size: int) -> torch.Tensor:
    """Decode ``path`` and resize its shorter side to ``size`` (the cache's and the disk source's read)."""
    return _resize_shorter(read_image(path), size)


# --------------------------------------------------------------------------- image sources


def offsets_of(shapes: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Where each of the packed CxHxW images begins (and, last, where the last one ends)."""
    sizes = shapes.to(torch.int64).prod(dim=1)
    return torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]) + start


#: Bytes read per call when loading a cache file into memory (one read() stops near 2 GiB).
_READ_CHUNK = 1 << 30


class PackedImages:
    """Many uint8 CxHxW images packed in one flat tensor: one allocation, cheap to pickle."""

    def __init__(self, buffer: torch.Tensor, shapes: torch.Tensor) -> None:
        self.buffer = buffer
        self.shapes = shapes.to(torch.int64)
        self.offsets = offsets_of(self.shapes)

    @classmethod
    def from_file(cls, path: str | Path, shapes: torch.Tensor, start: int) -> PackedImages:
        """Read the images a cache file holds from byte ``start`` into memory (one allocation)."""
        shapes = shapes.to(torch.int64)
        buffer = torch.empty(int(offsets_of(shapes)[-1]), dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < len(view):
                got = f.readinto(view[done : done + _READ_CHUNK])
                if not got:
                    raise _short_file(path)
                done += got
        return cls(buffer, shapes)

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
        return load_resized(self.root / self.relpaths[i], self.size)


def _short_file(path: str | Path) -> DataError:
    return DataError(f"image cache {path} is shorter than its index says (cut or changed since it "
                     "was written); delete it (`bpl cache clear`) and run again")


class DiskImages:
    """Images of a cache file, read on every access through the page cache, never whole.

    ``access="pread"`` (the default) copies each image out with one ``os.pread``, so a
    process's resident memory stays one batch however large the file; ``"mmap"`` maps
    the file and hands out views (its pages count in the resident memory of every
    process that touched them). The file is opened at once, so a forked DataLoader
    worker shares it, and reopened by path after unpickling.
    """

    def __init__(self, path: str | Path, shapes: torch.Tensor, start: int,
                 access: str = "pread") -> None:
        if access not in ("pread", "mmap"):
            raise ValueError(f"access must be 'pread' or 'mmap', got {access!r}")
        self.path, self.start = Path(path), int(start)
        self.access = access if hasattr(os, "preadv") else "mmap"
        self.shapes = shapes.to(torch.int64)
        self.offsets = offsets_of(self.shapes, self.start)
        self._fd: int | None = None
        self._map: np.memmap | None = None
        self._open()

    def _open(self) -> None:
        if self.access == "pread":
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        else:  # copy-on-write: writable views, so torch does not warn; nothing goes to the file
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, h, w = self.shapes[i].tolist()
        start, n = int(self.offsets[i]), c * h * w
        if self._map is not None:
            flat = torch.from_numpy(self._map[start : start + n])
            if flat.numel() != n:
                raise _short_file(self.path)
        else:
            flat = torch.empty(n, dtype=torch.uint8)
            if os.preadv(self._fd, [flat.numpy()], start) != n:
                raise _short_file(self.path)
        return flat.view(h, w, c).permute(2, 0, 1)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1]) - self.start

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_map")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None, _map=None)
        self._open()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


ImageSource = PackedImages | DiskImages | ImageFiles

