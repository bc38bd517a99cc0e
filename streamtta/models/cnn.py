"""A plain VGG-style CNN with a choice of normalisation layer, for 32x32 inputs.

Three stages of ``conv3x3 -> norm -> ReLU`` twice then 2x2 max pooling (widths 16/32/64 by default),
global average pooling and a final ``nn.Linear`` named ``fc``. ``norm`` picks the normalisation:

* ``"bn"`` -- ``BatchNorm2d`` (test-time statistics adapters apply);
* ``"gn"`` -- ``GroupNorm`` with ``groups`` groups (per-sample statistics, as in most detection and
  segmentation backbones);
* ``"ln"`` -- a LayerNorm over channels at every position (``GroupNorm`` with one group normalises over
  channels *and* positions; this one is the channels-last LayerNorm of ConvNeXt-style models, written
  as ``nn.LayerNorm`` applied to ``(N, H, W, C)``).

The held-out scenarios (``simulations/heldout/``) use these as backbones the adaptation defaults were
never tuned on. Inputs are raw ``[0, 1]`` images: the first layer ``normalize`` standardises them.

>>> import torch
>>> net = CNN(num_classes=8, in_channels=1, norm="ln").eval()
>>> net(torch.rand(2, 1, 32, 32)).shape, net.forward_features(torch.rand(2, 1, 32, 32)).shape
(torch.Size([2, 8]), torch.Size([2, 64]))
>>> sorted({type(m).__name__ for m in CNN(4, norm="gn").modules() if type(m).__name__.endswith("Norm")})
['GroupNorm']
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from streamtta.models.normalize import Normalize

NORMS = ("bn", "gn", "ln")


class ChannelLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the channels of an ``(N, C, H, W)`` map, at each position."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """The normalisation layer ``kind`` (one of :data:`NORMS`) for ``channels`` channels."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "ln":
        return ChannelLayerNorm(channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class CNN(nn.Module):
    """``normalize -> 3 x [conv-norm-ReLU x 2, maxpool] -> avgpool -> fc`` (see the module docstring).

    Parameters
    ----------
    num_classes
        Width of the classifier ``fc``.
    in_channels
        1 for digits, 3 for RGB images.
    widths
        Channels of the three stages; ``widths[-1]`` is the feature dimension.
    norm, groups
        Normalisation layer (``"bn"``, ``"gn"``, ``"ln"``) and the GroupNorm group count.
    mean, std
        Per-channel input normalisation applied by the first layer (defaults: 0 and 1).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 norm: str = "bn", groups: int = 8, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3 or min(widths) < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"need three positive widths, num_classes and in_channels >= 1; got {widths}, "
                             f"{num_classes}, {in_channels}")
        self.num_classes, self.in_channels, self.norm_kind = int(num_classes), int(in_channels), norm
        self.feature_dim = widths[-1]
        self.normalize = Normalize(mean if mean is not None else [0.0] * in_channels,
                                   std if std is not None else [1.0] * in_channels)
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), make_norm(norm, w, groups), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of ``fc``), shape ``(N, widths[-1])``."""
        return torch.flatten(self.pool(self.body(self.normalize(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
