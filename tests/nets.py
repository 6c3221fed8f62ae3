"""Small hand-made CNNs that cover the conv shapes the fusion must handle."""

from __future__ import annotations

import torch
from torch import nn


class ConvZoo(nn.Module):
    """Stride 2, padding 0/1/2, dilation 2, groups, depthwise, conv bias, 5x5 and non-square kernels."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=0, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 12, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, (3, 1), stride=(2, 1), padding=(1, 0), padding_mode="reflect"),
            nn.BatchNorm2d(12), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style norm+activation layer: a BatchNorm2d subclass that applies drop and act."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class NormActNet(nn.Module):
    """Conv followed by a norm+act layer, as in timm CNNs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class SharedOutput(nn.Module):
    """conv1's output feeds its BN and a shortcut: it must be left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(y))) + y


class Untraceable(nn.Module):
    """Data-dependent control flow inside a child module stops torch.fx."""

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = self.Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.bn(self.conv(x)))


class NoBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class PreActNet(nn.Module):
    """Pre-activation design: BN -> ReLU -> conv, outputs going to additions and a concatenation.

    No conv feeds a BatchNorm2d directly except one (``trans`` feeds ``norm_t``), and the
    stem conv has a bias and no norm: what DenseNets and pre-activation ResNets look like.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.trans = nn.Conv2d(12, 12, 1, bias=False)
        self.norm_t = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 12, 3, stride=2, padding=1, bias=True)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.conv1(torch.relu(self.bn1(x)))
        x = x + self.conv2(torch.relu(self.bn2(y)))  # pre-activation residual
        x = torch.cat([x, self.conv3(torch.relu(self.bn3(x)))], 1)  # dense connection
        x = torch.relu(self.norm_t(self.trans(x)))
        return self.fc(torch.relu(self.conv4(x)).mean((2, 3)))


class GroupedNet(nn.Module):
    """ResNeXt / MobileNet shapes: 1x1 -> grouped 3x3 -> 1x1 with a residual, and a depthwise 5x5."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(48), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(48, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=4, bias=False),
                                     nn.BatchNorm2d(48), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(48, 48, 1, bias=False), nn.BatchNorm2d(48))
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 5, padding=2, groups=48, bias=False),
                                       nn.BatchNorm2d(48), nn.ReLU())
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.expand(self.grouped(self.reduce(x))))
        return self.fc(self.depthwise(x).mean((2, 3)))


class NormActStack(nn.Module):
    """A deeper norm+act net (timm RegNet style): conv -> BatchNormAct2d, grouped, with a residual."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 48, 3, stride=2, padding=1, bias=False), BatchNormAct2d(48)
        self.conv2, self.bn2 = nn.Conv2d(48, 48, 3, padding=1, groups=2, bias=False), BatchNormAct2d(48)
        self.conv3, self.bn3 = nn.Conv2d(48, 48, 1, bias=False), nn.BatchNorm2d(48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = torch.relu(x + self.bn3(self.conv3(self.bn2(self.conv2(x)))))
        return self.fc(x.mean((2, 3)))
