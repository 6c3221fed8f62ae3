"""Training and evaluation transforms, and the (image, label) dataset built from an image source."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .images import ImageSource, resize_size


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

