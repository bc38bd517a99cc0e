"""Small CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with BatchNorm2d, for 32x32 inputs.

Depth ``6n + 2``: a 3x3 stem, three stages of ``n`` basic blocks (widths 16/32/64 by default,
stride 2 at the start of stages 2 and 3), global average pooling and a final ``nn.Linear`` named
``fc``. The features used for OOD scoring are the input of ``fc`` (``widths[-1]`` numbers).
Inputs are raw ``[0, 1]`` images: the first layer ``normalize`` standardises them.

>>> import torch
>>> net = resnet8(num_classes=8, in_channels=1).eval()
>>> net(torch.rand(2, 1, 32, 32)).shape
torch.Size([2, 8])
>>> net.forward_features(torch.rand(2, 1, 32, 32)).shape
torch.Size([2, 64])
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from streamtta.models.cnn import make_norm
from streamtta.models.normalize import Normalize


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet.

    Parameters
    ----------
    num_classes
        Width of the classifier ``fc``.
    in_channels
        1 for digits, 3 for RGB images.
    widths
        Channels of the three stages; ``widths[-1]`` is the feature dimension.
    blocks_per_stage
        ``n`` in depth ``6n + 2`` (1 -> ResNet-8, 3 -> ResNet-20).
    norm
        ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm, 8 groups) or ``"ln"`` (channels-last LayerNorm); see
        :func:`streamtta.models.cnn.make_norm`.
    mean, std
        Per-channel input normalisation applied by the first layer (defaults: 0 and 1).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        norm: str = "bn",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive ints, got {widths}")
        if num_classes < 1 or in_channels < 1 or blocks_per_stage < 1:
            raise ValueError(
                f"num_classes, in_channels and blocks_per_stage must be >= 1, got "
                f"{num_classes}, {in_channels}, {blocks_per_stage}"
            )
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.feature_dim = widths[-1]
        self.normalize = Normalize(
            mean if mean is not None else [0.0] * in_channels,
            std if std is not None else [1.0] * in_channels,
        )
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1, norm=norm))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of ``fc``), shape ``(N, widths[-1])``."""
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet8(num_classes: int = 10, in_channels: int = 1, **kwargs) -> ResNet:
    """ResNet-8 (one block per stage), widths 16/32/64 unless given."""
    return ResNet(num_classes=num_classes, in_channels=in_channels, blocks_per_stage=1, **kwargs)


def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet:
    """ResNet-20 (three blocks per stage), widths 16/32/64 unless given."""
    return ResNet(num_classes=num_classes, in_channels=in_channels, blocks_per_stage=3, **kwargs)
