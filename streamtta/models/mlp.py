"""MLP with BatchNorm1d (or LayerNorm) for feature vectors (sensor rows).

Hidden layers are ``Linear -> BatchNorm1d -> ReLU`` (``norm="ln"``: ``nn.LayerNorm`` instead); the classifier is the final ``nn.Linear``
named ``fc``. The features used for OOD scoring are the input of ``fc`` (``hidden[-1]`` numbers).
Inputs are raw rows: the first layer ``normalize`` standardises them.

>>> import torch
>>> net = MLP(in_features=18, num_classes=6, hidden=(32, 16)).eval()
>>> net(torch.randn(4, 18)).shape, net.forward_features(torch.randn(4, 18)).shape
(torch.Size([4, 6]), torch.Size([4, 16]))
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from streamtta.models.normalize import Normalize


class MLP(nn.Module):
    """``normalize -> [Linear -> BN1d -> ReLU] * len(hidden) -> fc``.

    Parameters
    ----------
    in_features
        Length of one input row.
    num_classes
        Width of the classifier ``fc``.
    hidden
        Hidden widths; ``hidden[-1]`` is the feature dimension.
    dropout
        Dropout after each hidden ReLU (0 disables it).
    norm
        ``"bn"`` (BatchNorm1d) or ``"ln"`` (LayerNorm) after each hidden Linear.
    mean, std
        Per-feature input normalisation applied by the first layer (defaults: 0 and 1).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (64, 64),
        dropout: float = 0.0,
        norm: str = "bn",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive ints, got {hidden}")
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in ("bn", "ln"):
            raise ValueError(f"norm must be 'bn' or 'ln', got {norm!r}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.feature_dim = hidden[-1]
        self.normalize = Normalize(
            mean if mean is not None else [0.0] * in_features,
            std if std is not None else [1.0] * in_features,
        )
        layers: list[nn.Module] = []
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.BatchNorm1d(h) if norm == "bn" else nn.LayerNorm(h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            cin = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of ``fc``), shape ``(N, hidden[-1])``."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
