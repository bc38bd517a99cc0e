"""Small helpers shared by the adapter components (entropy, norm-parameter collection, feature hook)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

#: Module types whose affine ``weight``/``bias`` count as "norm affine parameters".
AFFINE_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of ``softmax(logits)``; shape ``(B,)``.

    >>> softmax_entropy(torch.zeros(2, 4)).tolist()  # uniform over 4 classes -> ln 4
    [1.3862943649291992, 1.3862943649291992]
    """
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def iter_norm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every normalisation module of ``model`` (BatchNorm*, streamtta norms, LayerNorm, GroupNorm; in a
    TorchScript module, those whose ``original_name`` says so)."""
    from streamtta.adapters.norms.base import AdaptiveNorm
    from streamtta.adapters.scripted import SCRIPT_AFFINE_NORMS, script_type

    for name, m in model.named_modules():
        if isinstance(m, AFFINE_NORM_TYPES + (AdaptiveNorm,)) or script_type(m) in SCRIPT_AFFINE_NORMS:
            yield name, m


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine ``weight``/``bias`` parameters of every norm layer, in module order."""
    params: list[nn.Parameter] = []
    for _, m in iter_norm_modules(model):
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter):
                params.append(p)
    return params


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` in registration order (usually the classifier head)."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


class FeatureHook:
    """Records the input (or output) of one sub-module on every forward, flattened to ``(B, D)``.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> hook = FeatureHook(net, "3")
    >>> _ = net(torch.zeros(5, 4)); hook.value.shape
    torch.Size([5, 3])
    """

    def __init__(self, model: nn.Module, layer: str, which: str = "input") -> None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(
                f"feature_layer={layer!r} is not a sub-module of the model; "
                f"known names include {sorted(n for n in modules if n)[:12]}"
            )
        if which not in ("input", "output"):
            raise ValueError(f"feature hook 'which' must be 'input' or 'output', got {which!r}")
        self.layer = layer
        self.which = which
        self.value: torch.Tensor | None = None
        self._handle = modules[layer].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        t = inputs[0] if self.which == "input" else output
        self.value = t.flatten(1) if t.dim() > 2 else t

    def pop(self) -> torch.Tensor | None:
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        self._handle.remove()
