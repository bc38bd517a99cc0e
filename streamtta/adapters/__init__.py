"""Online test-time adapters: ``norm x objective x filters x guards``, chosen by a spec string.

Build one with :func:`build_adapter` from any classifier ``nn.Module`` with BatchNorm layers (it is
deep-copied; the caller's module is never modified; TorchScript modules run the terms listed in
:mod:`streamtta.adapters.scripted` and are refused the others at build time), then call :meth:`~CompositeAdapter.step`
on each incoming batch. ``step`` returns the *pre-update* logits (predict-then-adapt), the
features (input of the last ``nn.Linear``) and the mask of samples that fed the update.

>>> import torch
>>> from torch import nn
>>> from streamtta.adapters import DEFAULT_SPEC, build_adapter
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
>>> adapter = build_adapter(DEFAULT_SPEC, net.eval(), num_classes=4)
>>> out = adapter.step(torch.rand(16, 1, 12, 12))
>>> out.logits.shape, out.features.shape, out.update_mask.dtype
(torch.Size([16, 4]), torch.Size([16, 8]), torch.bool)
>>> ood_gate = lambda logits, feats: logits.softmax(1).max(1).values > 0.0   # the engine passes its scorer
>>> out = adapter.step(torch.rand(1, 1, 12, 12), gate=ood_gate)   # batch size 1 works
>>> snapshot = adapter.state_dict(); adapter.reset()                   # back to the source state
>>> adapter.load_state_dict(snapshot)                                  # ...and forward again
>>> len(adapter.parameters_to_adapt())   # BatchNorm weight and bias
2
>>> learner = build_adapter("unmix-tns(K=8)+tent+conf-drop+ema-source", net.eval(), 4, lr=1e-3)
>>> bool(learner.step(torch.rand(16, 1, 12, 12)).update_mask.any())  # TENT updated on kept samples
True

Spec grammar (full details in :mod:`streamtta.adapters.spec`)::

    "source"                 no adaptation              "bn"        BN-adapt (test-batch statistics)
    "rbn" / "rotta-stats"    RoTTA robust statistics    "unmix-tns" UnMix-TNS as published (no gradient step)
    "cb-stats"               class-balanced BN-adapt    "tent" = "bn+tent"    "rdumb" = "eata+periodic(every=1000)"
    "eata" = "bn+eata-loss+ent-margin+redundancy"
    "unmix-tns(K=16)+tent(lr=1e-4)+conf-drop+ema-source(momentum=0.99)"      any combination, arguments inline

Overrides (``build_adapter(spec, model, C, lr=..., K=..., e_margin=..., reset_every=...)``) beat
inline arguments; see :data:`streamtta.adapters.spec.OVERRIDE_KEYS`.

**The default** (:data:`DEFAULT_SPEC` = ``"cb-stats+source-fallback"``) is gradient-free:
``cb-stats`` normalises every batch with its own statistics corrected for its (estimated)
class mix, using per-class statistics slots that start from the source data's class statistics
(the engine calls :meth:`~CompositeAdapter.fit_source`) and follow confident pseudo-labels
(see :mod:`streamtta.adapters.norms.class_balanced`); ``source-fallback`` returns the
non-adapting source model's prediction on batches where both models agree on >= 95% of the
samples (benign, near-source domains, where adapting statistics can only cost a little), and on
single source-like samples (first-layer instance statistics within the clean-source range,
measured in the same pass) when their batch also holds far samples
(gradual domain transitions) or when the statistics the adapter used do not fit them (still tuned
to a previous, far domain).
Gradient steps are opt-in, e.g. ``"cb-stats+tent+conf-drop+ema-source"``. That is the default of
BatchNorm models; ``"default"`` resolves per model (:func:`~streamtta.adapters.defaults.default_spec`): a
GroupNorm / LayerNorm model gets ``align`` (its norm outputs re-standardised per channel onto their source
statistics on batches that hold most classes) with entropy-filtered, reset-guarded updates of the norm affine
parameters; a TorchScript model the closest spec it can run.

Layout: :mod:`~streamtta.adapters.composite` (the adapter and its step),
:mod:`~streamtta.adapters.spec` (the spec API: :mod:`~streamtta.adapters.terms`,
:mod:`~streamtta.adapters.grammar`, :mod:`~streamtta.adapters.build`), one package per component
kind (:mod:`~streamtta.adapters.norms`, :mod:`~streamtta.adapters.objectives`,
:mod:`~streamtta.adapters.filters`, :mod:`~streamtta.adapters.guards`).
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
