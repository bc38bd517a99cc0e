"""Penultimate features of any classifier: the input of its last ``nn.Linear``.

OOD scorers and prototype memories work on these features. They are captured with a forward
pre-hook on the classifier layer, so this works on any ``nn.Module`` whose last ``nn.Linear`` (in
module registration order) is the classifier -- including models whose norm layers an adapter has
swapped out. Pass ``layer="name"`` when the classifier is not the last registered Linear.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> last_linear(net).in_features
8
>>> logits, feats = forward_with_features(net, torch.randn(5, 4))
>>> logits.shape, feats.shape
(torch.Size([5, 3]), torch.Size([5, 8]))
>>> with FeatureHook(net) as hook:
...     _ = net(torch.randn(2, 4))
>>> hook.features.shape
torch.Size([2, 8])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _is_linear(module: nn.Module) -> bool:
    if _is_script(module):
        return getattr(module, "original_name", None) == "Linear"
    return isinstance(module, nn.Linear)


def last_linear(model: nn.Module, layer: str | None = None) -> nn.Linear:
    """The classifier layer: ``model.get_submodule(layer)`` if given, else the last ``nn.Linear``."""
    if layer is not None:
        try:
            found = model.get_submodule(layer)
        except AttributeError as e:
            names = [n for n, m in model.named_modules() if _is_linear(m)]
            raise ValueError(f"model has no submodule {layer!r}; its Linear layers are {names}") from e
        if not _is_linear(found):
            raise ValueError(f"layer {layer!r} is a {type(found).__name__}, not an nn.Linear")
        return found  # type: ignore[return-value]
    last = None
    for _, m in model.named_modules():
        if _is_linear(m):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take features from")
    return last  # type: ignore[return-value]


def feature_dim(model: nn.Module, layer: str | None = None) -> int:
    """Dimension of the features (``in_features`` of the classifier layer)."""
    lin = last_linear(model, layer)
    return int(lin.in_features) if not _is_script(lin) else int(lin.weight.shape[1])


class FeatureHook:
    """Record the input of the classifier layer on every forward pass of ``model``.

    After each forward, ``hook.features`` holds that batch's features (not detached: gradients can
    flow through them). Use as a context manager or call :meth:`remove`. TorchScript modules do
    not run Python hooks; use :func:`forward_with_features` for them.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        if _is_script(model):
            raise TypeError(
                "FeatureHook cannot hook a TorchScript module (Python hooks do not run inside it); "
                "use forward_with_features(), which calls its exported forward_features()"
            )
        self.layer = last_linear(model, layer)
        self.features: torch.Tensor | None = None
        self._handle = self.layer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "FeatureHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def forward_with_features(
    model: nn.Module, x: torch.Tensor, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning ``(logits, features)``; gradients flow through both.

    For TorchScript modules the model must export ``forward_features`` (ours do) and its
    classifier must be applied directly to those features.
    """
    if _is_script(model):
        if layer is not None:
            raise ValueError("layer= is not supported for TorchScript modules")
        if not hasattr(model, "forward_features"):
            raise TypeError(
                "this TorchScript module does not export forward_features(); features cannot be "
                "captured from it. Export it with streamtta.models.export_torchscript or load the "
                "weights via 'module:factory' + state dict instead"
            )
        feats = model.forward_features(x)
        return last_linear(model)(feats), feats
    hook = FeatureHook(model, layer)
    try:
        logits = model(x)
    finally:
        hook.remove()
    if hook.features is None:
        raise RuntimeError(
            f"the classifier layer {hook.layer} was not called during forward(); pass layer= to "
            "name the layer whose input are the features"
        )
    return logits, hook.features
