"""Training recipes of the built-in source models: architecture and optimisation per dataset."""
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
