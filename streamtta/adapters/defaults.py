"""The default adapter spec of a model: what ``"default"`` means for *this* model.

* a model with BatchNorm layers: :data:`~streamtta.adapters.terms.DEFAULT_SPEC` (class-balanced test
  statistics with the source fallback, gradient-free);
* a model whose norm layers are all GroupNorm / LayerNorm (no batch statistics to re-estimate):
  :data:`NO_BATCHNORM_SPEC` = ``align`` -- their outputs re-standardised per channel with a moving average
  of the test batches' statistics onto the source ones (measured by ``fit_source``; batches of a few
  classes weigh little, see :mod:`streamtta.adapters.norms.aligned`). Entropy-filtered updates of the norm affine parameters
  (SAR-style, :data:`NO_BATCHNORM_GRADIENT_SPEC`) are opt-in: on the tuning streams they gained nothing over
  ``align`` and, at TENT's learning rate, collapsed a LayerNorm model on a continual stream (README,
  "Held-out scenarios and backbones"); on TorchScript (no layer can be replaced) the default is ``source``;
* a model without any norm affine parameter: ``"source"`` (nothing to adapt);
* a TorchScript model: the closest spec that runs on it (:func:`~streamtta.adapters.scripted.runnable_default`).

``build_adapter("default", model, C)`` and the engine's ``adapter.spec = "default"`` both resolve here.

>>> from torch import nn
>>> bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
>>> ln = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
>>> default_spec(bn) == DEFAULT_SPEC, default_spec(ln) == NO_BATCHNORM_SPEC
(True, True)
>>> default_spec(nn.Sequential(nn.Linear(4, 3)))
'source'
"""
from __future__ import annotations

from torch import nn

from streamtta.adapters.terms import DEFAULT_SPEC

#: The default of models without BatchNorm (GroupNorm / LayerNorm); chosen on the ``digits-c`` scenarios
#: with the ``digits-resnet-gn`` / ``digits-resnet-ln`` backbones, reported on held-out ones.
NO_BATCHNORM_SPEC = "align"
#: The entropy-filtered variant (opt-in): align plus SAR-style filtered entropy updates of the norm affine
#: parameters at a small learning rate, reset on collapse, pulled towards the source.
NO_BATCHNORM_GRADIENT_SPEC = "align+tent(lr=0.0002)+ent-margin+sar-reset+ema-source"
#: The default on a TorchScript model without BatchNorm (``align`` cannot replace compiled layers).
NO_BATCHNORM_SCRIPT_SPEC = "source"


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has a BatchNorm layer (eager, or by original name in TorchScript)."""
    from streamtta.adapters.scripted import is_script, script_batchnorms

    if is_script(model):
        return bool(script_batchnorms(model))
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_spec(model: nn.Module) -> str:
    """The spec ``"default"`` stands for on ``model`` (see the module docstring)."""
    from streamtta.adapters.scripted import is_script, runnable_default

    if has_batchnorm(model):
        return runnable_default(model, DEFAULT_SPEC) if is_script(model) else DEFAULT_SPEC
    alignable = any(isinstance(m, nn.GroupNorm) or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1)
                    for m in model.modules())
    if is_script(model) or not alignable:
        return NO_BATCHNORM_SCRIPT_SPEC if is_script(model) else "source"
    return NO_BATCHNORM_SPEC


def is_default(spec: object) -> bool:
    """True for the spec string ``"default"`` (any case, surrounding blanks)."""
    return isinstance(spec, str) and spec.strip().lower() == "default"
