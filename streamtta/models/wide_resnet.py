"""Wide ResNet for 32x32 images (Zagoruyko & Komodakis 2016): WRN-``depth``-``widen``.

Pre-activation basic blocks (BN-ReLU-conv, twice; a 1x1 conv shortcut where the shape changes), depth
``6n + 4`` (``n`` blocks in each of three stages of widths ``16k, 32k, 64k``, stride 2 at the start of
stages 2 and 3), a final BN-ReLU, global average pooling and ``fc``, the last ``nn.Linear`` (its input,
``64k`` numbers, are the features OOD scoring uses). WRN-28-2, the usual CIFAR-10 TTA backbone, has
about 1.47 million parameters. Weights are random (Kaiming-initialised); :mod:`streamtta.gpucheck` uses
it to measure throughput at a realistic size, not to classify.

>>> import torch
>>> net = wide_resnet(28, 2, num_classes=10).eval()
>>> net(torch.rand(2, 3, 32, 32)).shape, net.feature_dim
(torch.Size([2, 10]), 128)
>>> 1.4e6 < sum(p.numel() for p in net.parameters()) < 1.5e6
True
>>> wide_resnet(10, 1).layer1[0].conv1.out_channels
16
"""
from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1 conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu2(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` (see the module docstring); ``depth - 4`` must be a multiple of 6."""

    def __init__(self, depth: int = 28, widen: int = 2, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"widen, num_classes and in_channels must be >= 1, got {widen}, {num_classes}, "
                             f"{in_channels}")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.num_classes, self.feature_dim = int(num_classes), widths[-1]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        cin, stages = 16, []
        for i, w in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(PreActBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``fc``, shape ``(N, 64 * widen)``."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return torch.flatten(self.pool(self.relu(self.bn(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def wide_resnet(depth: int = 28, widen: int = 2, num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-``depth``-``widen`` with random weights (WRN-28-2 by default)."""
    return WideResNet(depth, widen, num_classes, in_channels)
