"""Training recipes of the built-in source models: architecture and optimisation per dataset.

``RECIPES["digits"]`` and ``RECIPES["segment"]`` are the defaults of each dataset (the models the tuned
scenarios use). The others train the *held-out* backbones of ``simulations/heldout/``: a second digits
architecture (a plain CNN, another seed, no augmentation, so corruptions hurt it much more) with BatchNorm,
GroupNorm or LayerNorm, and a LayerNorm sensor MLP. No adaptation method or hyperparameter was chosen on them;
``digits-resnet-gn`` / ``digits-resnet-ln`` are the tuning-side GroupNorm / LayerNorm backbones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Default architecture and optimisation settings of one built-in dataset."""

    name: str  # builtin model name
    arch: str
    arch_kwargs: dict[str, Any]
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    augment: bool
    #: Default unknown classes, as negative offsets from the end (-1 = last class).
    unknown_from_end: tuple[int, ...] = field(default=(-1,))
    #: The dataset it trains on (default: the recipe's key in :data:`RECIPES`).
    dataset: str | None = None


RECIPES: dict[str, Recipe] = {
    "digits": Recipe(
        name="digits-resnet",
        arch="resnet",
        arch_kwargs={"in_channels": 1, "widths": [16, 32, 64], "blocks_per_stage": 1},
        epochs=12,
        lr=0.05,
        batch_size=64,
        weight_decay=5e-4,
        augment=True,
        unknown_from_end=(-2, -1),
    ),
    "segment": Recipe(
        name="segment-mlp",
        arch="mlp",
        arch_kwargs={"hidden": [64, 32], "dropout": 0.0},
        epochs=60,
        lr=0.05,
        batch_size=64,
        weight_decay=5e-4,
        augment=False,
        unknown_from_end=(-1,),
    ),
}


def _heldout_cnn(norm: str) -> Recipe:
    suffix = "" if norm == "bn" else f"-{norm}"
    return Recipe(name=f"digits-cnn{suffix}", arch="cnn",
                  arch_kwargs={"in_channels": 1, "widths": [16, 32, 64], "norm": norm},
                  epochs=10, lr=0.05 if norm == "bn" else 0.02, batch_size=64, weight_decay=5e-4, augment=False,
                  unknown_from_end=(-2, -1), dataset="digits")


def _tuning_resnet(norm: str) -> Recipe:
    base = RECIPES["digits"]
    return Recipe(name=f"digits-resnet-{norm}", arch="resnet", arch_kwargs=dict(base.arch_kwargs, norm=norm),
                  epochs=20, lr=0.05, batch_size=base.batch_size, weight_decay=base.weight_decay,
                  augment=True, unknown_from_end=base.unknown_from_end, dataset="digits")


#: The tuning-side GroupNorm / LayerNorm variants of digits-resnet (the digits-c scenarios with these
#: backbones are where the non-BatchNorm default was chosen).
RECIPES.update({r.name: r for r in (_tuning_resnet("gn"), _tuning_resnet("ln"))})
RECIPES.update({r.name: r for r in (_heldout_cnn("bn"), _heldout_cnn("gn"), _heldout_cnn("ln"))})
RECIPES["segment-mlp-ln"] = Recipe(name="segment-mlp-ln", arch="mlp",
                                   arch_kwargs={"hidden": [64, 32], "dropout": 0.0, "norm": "ln"}, epochs=60,
                                   lr=0.02, batch_size=64, weight_decay=5e-4, augment=False, dataset="segment")
