"""Which parameters re-adaptation and meta-training touch, and small logit helpers.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
...                     nn.Flatten(), nn.Linear(4, 3))
>>> adaptable_parameter_names(net)
['1.weight', '1.bias']
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

OOD_HEAD_NAME = "ood_head"


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    try:
        from streamtta.adapters.norms.base import AdaptiveNorm

        return isinstance(m, AdaptiveNorm)
    except Exception:  # pragma: no cover - adapters package unavailable
        return False


def adaptable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the norm affine parameters (module order) plus those of ``model.ood_head``."""
    names: list[str] = []
    for mname, m in model.named_modules():
        if _is_norm(m):
            for attr in ("weight", "bias"):
                if isinstance(getattr(m, attr, None), nn.Parameter):
                    names.append(f"{mname}.{attr}" if mname else attr)
    head = getattr(model, OOD_HEAD_NAME, None)
    if isinstance(head, nn.Module):
        names += [f"{OOD_HEAD_NAME}.{n}" for n, _ in head.named_parameters()]
    return names


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, Mapping):
        return out["logits"]
    raise TypeError(f"model output of type {type(out).__name__} has no logits")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy per row of ``logits``."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy ``-T * logsumexp(logits / T)`` per row (higher = more OOD)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


@contextmanager
def batch_stat_norms(model: nn.Module) -> Iterator[None]:
    """Norm layers use batch statistics and leave their running statistics untouched."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.training, m.momentum))
            m.train()
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
