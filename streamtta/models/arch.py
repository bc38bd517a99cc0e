"""Architecture names used in checkpoints -> constructors.

>>> net = build_model("mlp", {"in_features": 3, "num_classes": 2, "hidden": [8]})
>>> type(net).__name__, net.fc.out_features
('MLP', 2)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from streamtta.models.cnn import CNN
from streamtta.models.mlp import MLP
from streamtta.models.resnet import ResNet

#: ``ModelMeta.arch`` -> constructor taking ``**arch_kwargs`` plus ``mean``/``std``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"resnet": ResNet, "mlp": MLP, "cnn": CNN}


def build_model(
    arch: str,
    arch_kwargs: Mapping[str, Any],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Instantiate architecture ``arch`` (randomly initialised)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**dict(arch_kwargs), mean=mean, std=std)
    except TypeError as e:
        raise ValueError(f"bad arch_kwargs {dict(arch_kwargs)!r} for architecture {arch!r}: {e}") from e
