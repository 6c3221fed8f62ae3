"""Architectures by name: torchvision's classification models and two tiny CNNs for tests and demos."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ..errors import BPLError


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)


class _BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual addition (1x1 conv+BN on the shortcut when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """A ~100k-parameter ResNet for 32-64 px inputs: 3x3 stem, stages of 16/32/64 channels."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: tuple[int, ...] = (2, 2, 1)) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [_BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1)
                     for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = w
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyVGG(nn.Module):
    """A plain conv+BN+ReLU stack (no residuals), ~60k parameters, for 32-64 px inputs."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [*_conv_bn(cin, w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


TINY: dict[str, Callable[[int], nn.Module]] = {
    "tiny_resnet": lambda n: TinyResNet(n),
    "tiny_vgg": lambda n: TinyVGG(n),
}


def list_models() -> list[str]:
    """Every architecture name :func:`build_model` accepts."""
    return sorted(TINY) + sorted(torchvision.models.list_models(module=torchvision.models))




def stock_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised architecture by name (tiny CNN or torchvision); unknown names raise."""
    if arch in TINY:
        return TINY[arch](num_classes)
    if arch.startswith("timm/"):
        return _timm_model(arch.removeprefix("timm/"), num_classes)
    try:
        return torchvision.models.get_model(arch, num_classes=num_classes)
    except ValueError:
        raise BPLError(
            f"unknown architecture {arch!r}; use a torchvision classification model name "
            f"(e.g. resnet18, resnet50, mobilenet_v2), timm/NAME (e.g. timm/resnet26d, with "
            f"the timm extra installed) or one of {', '.join(sorted(TINY))}"
        ) from None


def _timm_model(name: str, num_classes: int) -> nn.Module:
    """A timm architecture by name, freshly initialised (the optional extra ``bpl[timm]``)."""
    try:
        import timm
    except ImportError:
        raise BPLError(
            f"--arch timm/{name} needs timm: pip install 'bpl[timm]' (or pip install timm)"
        ) from None
    if name not in timm.list_models():
        raise BPLError(f"timm has no architecture {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


