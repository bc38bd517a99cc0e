"""Test-time normalisation layers (one per file), drop-in replacements of ``nn.BatchNorm1d/2d``.

* :class:`BatchStatsNorm` -- BN-adapt, test-batch statistics (``"bn"``);
* :class:`RobustBatchNorm` -- RoTTA's robust EMA statistics (``"rbn"``);
* :class:`UnMixTNS` -- UnMix-TNS, K un-mixed statistics components (``"unmix-tns"``);
* :class:`ClassBalancedNorm` -- BN-adapt corrected for the batch's class mix (``"cb-stats"``);
* :class:`AlignedNorm` -- replaces LayerNorm / GroupNorm instead: their output aligned per channel to its
  source statistics with the test batch's (``"align"``).

``make_norm_factory(name, **kwargs)`` returns the ``bn -> layer`` factory used by
:func:`replace_batchnorms`; ``"source"`` keeps the original BatchNorm layers (frozen running stats).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from torch import nn

from streamtta.adapters.norms.base import (
    AdaptiveNorm,
    adaptive_norms,
    commit_stats,
    frozen_stats,
    replace_batchnorms,
    set_stats_mode,
    source_stats,
)
from streamtta.adapters.norms.aligned import AlignedNorm, replace_sample_norms
from streamtta.adapters.norms.bn_adapt import BatchStatsNorm
from streamtta.adapters.class_mix import em_class_mix
from streamtta.adapters.class_mix import label_norms, set_class_mix
from streamtta.adapters.norms.class_balanced import ClassBalancedNorm
from streamtta.adapters.norms.rbn import RobustBatchNorm
from streamtta.adapters.norms.unmix_tns import UnMixTNS

NORM_CLASSES: dict[str, type[AdaptiveNorm] | None] = {
    "source": None,
    "bn": BatchStatsNorm,
    "rbn": RobustBatchNorm,
    "unmix-tns": UnMixTNS,
    "cb-stats": ClassBalancedNorm,
    "align": AlignedNorm,
}


def make_norm_factory(name: str, seed: int | None = 0, **kwargs: Any) -> Callable[[nn.Module], nn.Module] | None:
    """``bn -> replacement layer`` for the norm called ``name`` (None for ``"source"``).

    For UnMix-TNS, layer ``i`` (in module order) draws its component noise from seed ``seed + i``
    so that building the same adapter twice gives identical components.
    """
    if name not in NORM_CLASSES:
        raise ValueError(f"unknown norm {name!r}; expected one of {sorted(NORM_CLASSES)}")
    cls = NORM_CLASSES[name]
    if cls is None:
        if kwargs:
            raise ValueError(f"norm 'source' takes no arguments, got {sorted(kwargs)}")
        return None
    counter = itertools.count()

    def factory(bn: nn.Module) -> nn.Module:
        kw = dict(kwargs)
        if cls is UnMixTNS:
            kw["seed"] = None if seed is None else int(seed) + next(counter)
        return cls.from_bn(bn, **kw)

    factory.kwargs = dict(kwargs)  # type: ignore[attr-defined]
    return factory


def replace_norms(model: nn.Module, name: str, factory: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Swap the layers norm ``name`` replaces: LayerNorm / GroupNorm for ``"align"``, else BatchNorm."""
    if name == "align":
        return replace_sample_norms(model, **{k: v for k, v in getattr(factory, "kwargs", {}).items()})
    return replace_batchnorms(model, factory)


__all__ = [
    "AdaptiveNorm",
    "BatchStatsNorm",
    "RobustBatchNorm",
    "UnMixTNS",
    "ClassBalancedNorm",
    "label_norms",
    "set_class_mix",
    "em_class_mix",
    "NORM_CLASSES",
    "make_norm_factory",
    "replace_batchnorms",
    "replace_norms",
    "AlignedNorm",
    "set_stats_mode",
    "frozen_stats",
    "commit_stats",
    "source_stats",
    "adaptive_norms",
]
