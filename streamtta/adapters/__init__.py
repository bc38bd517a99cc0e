"""Online test-time adapters: ``norm x objective x filters x guards``, chosen by a spec string.

Build one with :func:`build_adapter` from any classifier ``nn.Module`` with BatchNorm layers (it is
deep-copied; the caller's module is never modified), then call :meth:`~CompositeAdapter.step`
on each incoming batch. ``step`` returns the *pre-update* logits (predict-then-adapt), the
features (input of the last ``nn.Linear``) and the mask of samples that fed the update.

>>> import torch
>>> from torch import nn
>>> from streamtta.adapters import DEFAULT_SPEC, build_adapter
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
>>> adapter = build_adapter(DEFAULT_SPEC, net.eval(), num_classes=4, lr=1e-3)
>>> out = adapter.step(torch.rand(16, 1, 12, 12))
>>> out.logits.shape, out.features.shape, out.update_mask.dtype
(torch.Size([16, 4]), torch.Size([16, 8]), torch.bool)
>>> ood_gate = lambda logits, feats: logits.softmax(1).max(1).values > 0.0   # the engine passes its scorer
>>> out = adapter.step(torch.rand(1, 1, 12, 12), gate=ood_gate)   # batch size 1 works
>>> snapshot = adapter.state_dict(); adapter.reset()                   # back to the source state
>>> adapter.load_state_dict(snapshot)                                  # ...and forward again
>>> len(adapter.parameters_to_adapt())   # BatchNorm weight and bias
2

Spec grammar (full details in :mod:`streamtta.adapters.spec`)::

    "source"                 no adaptation              "bn"        BN-adapt (test-batch statistics)
    "rbn" / "rotta-stats"    RoTTA robust statistics    "unmix-tns" UnMix-TNS as published (no gradient step)
    "tent"  = "bn+tent"      "eata" = "bn+eata-loss+ent-margin+redundancy"     "rdumb" = "eata+periodic(every=1000)"
    "unmix-tns(K=16)+tent(lr=1e-4)+conf-drop+ema-source(momentum=0.99)"      any combination, arguments inline

Overrides (``build_adapter(spec, model, C, lr=..., K=..., e_margin=..., reset_every=...)``) beat
inline arguments; see :data:`streamtta.adapters.spec.OVERRIDE_KEYS`.

``DEFAULT_SPEC`` is the shipped default; the rationale and the measurements behind it are in
:mod:`streamtta.adapters.spec` (see ``DEFAULT_SPEC``'s comment) and the project docs.
"""
from streamtta.adapters.base import Adapter, Gate
from streamtta.adapters.composite import CompositeAdapter
from streamtta.adapters.spec import (
    DEFAULT_SPEC,
    OVERRIDE_KEYS,
    AdapterSpec,
    SpecError,
    build_adapter,
    parse_spec,
)

__all__ = [
    "Adapter",
    "Gate",
    "CompositeAdapter",
    "DEFAULT_SPEC",
    "OVERRIDE_KEYS",
    "AdapterSpec",
    "SpecError",
    "build_adapter",
    "parse_spec",
]
