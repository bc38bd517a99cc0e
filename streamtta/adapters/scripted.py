"""TorchScript models inside an adapter: what runs on a compiled graph, and how.

A TorchScript module (``torch.jit.script`` or ``torch.jit.trace``, saved and loaded with
``torch.jit.load``) cannot have its BatchNorm layers swapped for streamtta's norm layers, and Python
hooks do not run inside it. What it does allow: setting ``requires_grad`` per parameter, reaching its
sub-modules through ``named_modules()`` (``original_name`` tells the type), re-assigning parameters
and buffers, and switching ``training`` per sub-module -- which a *scripted* BatchNorm honours at run
time, while a *traced* one keeps the eval mode it was traced in (methods marked ``@torch.jit.export``,
such as ``forward_features``, are scripted even in a traced module).

Pipelines and the engine rebuild a *scripted* ``nn.Sequential`` of standard layers as its eager twin first
(:mod:`streamtta.models.unscript`), so what follows concerns other compiled models, and adapters built
directly with :func:`~streamtta.adapters.build_adapter` on a TorchScript module.

:class:`ScriptedModel` wraps a copy of the module for the adapter:

* ``bn`` (BN-adapt) runs the BatchNorm layers in training mode, so each normalises with its test
  batch's statistics, on scratch copies of the running statistics (the source statistics never move);
  batches smaller than ``min_batch_size`` keep the source statistics, as :class:`BatchStatsNorm` does;
* the source model (filters such as ``conf-drop``, ``source-fallback``) is the same module with the
  source values of the affine parameters assigned for one forward;
* features are ``forward_features(x)`` when the module exports it and its last ``Linear`` applied to
  them gives the logits (checked on the first batch; ``streamtta.models.export_torchscript`` output
  does), or for an ``nn.Sequential`` ending in a ``Linear`` the input of that ``Linear`` (its other layers
  run one by one); otherwise the logits themselves serve as features (with a warning).

Terms per model (:func:`unsupported_norms` says which spec norms are refused):

* no BatchNorm (LayerNorm / GroupNorm models): every spec but ``align`` runs, as on the eager module
  (statistics norms have nothing to adapt there either; ``align`` would replace the LayerNorm / GroupNorm
  layers);
* scripted BatchNorm: ``source`` and ``bn`` (without ``source_weight``) with any objective, filter and
  guard; ``source-fallback`` keeps its batch rule only (its per-sample rules need the first norm
  layer's input, which a compiled graph does not give out); ``rbn``, ``unmix-tns``, ``cb-stats`` refused;
* traced BatchNorm: ``source`` with any objective, filter and guard (``bn`` too when the module exports a
  scripted ``forward_features``).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> unsupported_norms(torch.jit.script(net)), unsupported_norms(torch.jit.trace(net, torch.rand(2, 4)))
(['align', 'cb-stats', 'rbn', 'unmix-tns'], ['align', 'bn', 'cb-stats', 'rbn', 'unmix-tns'])
>>> wrapped = ScriptedModel(torch.jit.script(net), batch_stats=True)
>>> x = torch.randn(16, 4) * 3 + 1
>>> torch.allclose(wrapped(x), net.train()(x), atol=1e-5)       # test-batch statistics
True
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import nn

#: ``original_name`` of the TorchScript sub-modules that are BatchNorm layers
SCRIPT_BATCHNORMS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})
#: ``original_name`` of the TorchScript sub-modules whose ``weight``/``bias`` are norm affine parameters
SCRIPT_AFFINE_NORMS = SCRIPT_BATCHNORMS | {"LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
                                           "InstanceNorm3d"}
#: the norm terms that replace BatchNorm layers (impossible inside a compiled graph)
REPLACING_NORMS = ("align", "cb-stats", "rbn", "unmix-tns")


def is_script(module: Any) -> bool:
    """True for a TorchScript module (scripted or traced, also after ``torch.jit.load``)."""
    return isinstance(module, torch.jit.ScriptModule)


def script_type(module: nn.Module) -> str | None:
    """The original class name of a TorchScript sub-module (None for an eager module)."""
    return getattr(module, "original_name", None) if is_script(module) else None


def script_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm sub-modules of a TorchScript module, in module order."""
    return [m for _, m in model.named_modules() if script_type(m) in SCRIPT_BATCHNORMS]


def honours_train_mode(model: nn.Module, method: str | None = None) -> bool:
    """True when TorchScript ``model``'s ``method`` (default: the one the adapter calls, ``forward_features``
    when exported, else ``forward``) reads its BatchNorm layers' ``training`` at run time (scripted code),
    False when tracing fixed it."""
    method = method or ("forward_features" if hasattr(model, "forward_features") else "forward")
    try:
        return 'name="training"' in str(getattr(model, method).inlined_graph)
    except (AttributeError, RuntimeError):  # pragma: no cover - a method without a graph
        return False


def unsupported_norms(model: nn.Module, norm_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The spec norm terms that cannot run on TorchScript ``model`` (empty for an eager module); ``bn``
    with a ``source_weight`` counts as one (its blend needs the layer input)."""
    if not is_script(model):
        return []
    bns = script_batchnorms(model)
    if not bns:
        return ["align"]  # it replaces LayerNorm / GroupNorm layers
    bad = set(REPLACING_NORMS)
    if not honours_train_mode(model) or float((norm_kwargs or {}).get("source_weight", 0.0)) > 0:
        bad.add("bn")
    return sorted(bad)


def check_script_spec(model: nn.Module, norm: str, norm_kwargs: dict[str, Any] | None = None,
                      spec: str | None = None) -> None:
    """Raise a :class:`~streamtta.adapters.grammar.SpecError` when norm term ``norm`` (of ``spec``) cannot
    run on TorchScript ``model``, naming the terms that cannot and those that can."""
    from streamtta.adapters.grammar import SpecError
    from streamtta.adapters.terms import TERMS

    bad = unsupported_norms(model, norm_kwargs)
    if norm not in bad:
        return
    ok_norms = [t for t, info in TERMS.items() if info.kind == "norm" and t not in bad]
    others = sorted(t for t, info in TERMS.items() if info.kind != "norm")
    if norm == "align":
        why = "needs to replace its LayerNorm / GroupNorm layers, impossible inside a compiled graph"
    elif norm != "bn":
        why = "needs to replace its BatchNorm layers, impossible inside a compiled graph"
    elif (norm_kwargs or {}).get("source_weight"):
        why = "with source_weight needs each BatchNorm layer's input, which a compiled graph does not give out"
    else:
        why = "needs test-batch statistics, which its traced BatchNorm layers cannot give (tracing fixed eval mode)"
    example = "bn+tent" if "bn" in ok_norms else "source+tent"
    raise SpecError(
        f"spec {spec or norm!r} cannot run on this TorchScript model: term {norm!r} {why}. Terms that cannot run on "
        f"it: {', '.join(bad)}; terms that run: norms {', '.join(ok_norms)} with any of {', '.join(others)} "
        f"(e.g. {example!r}). Or load the eager module ('module:factory' + weights) to use every term"
    )


def runnable_default(model: nn.Module, spec: str) -> str:
    """``spec`` when it runs on ``model``; else the closest default that does on a TorchScript model with
    BatchNorm layers: ``bn+source-fallback`` (scripted) or ``source`` (traced)."""
    from streamtta.adapters.grammar import parse_spec

    norm = parse_spec(spec).norm
    bad = unsupported_norms(model, norm.args)
    if norm.name not in bad:
        return spec
    return "source" if "bn" in bad else "bn+source-fallback"


def copy_script(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of TorchScript ``module`` whose parameters are leaf ``nn.Parameter`` s again, with
    their ``requires_grad`` (a plain ``copy.deepcopy`` gives non-leaf tensors); ``memo`` learns the
    old -> new tensors, so a ``copy.deepcopy`` that shares it maps references to them."""
    memo = {} if memo is None else memo
    with torch.no_grad():
        new = copy.deepcopy(module)
    new_modules = dict(new.named_modules())
    for name, m in module.named_modules():
        twin = new_modules[name]
        for pname, p in m.named_parameters(recurse=False):
            q = nn.Parameter(getattr(twin, pname).detach(), requires_grad=p.requires_grad)
            setattr(twin, pname, q)
            memo[id(p)] = q
        for bname, b in m.named_buffers(recurse=False):
            memo[id(b)] = getattr(twin, bname)
    memo[id(module)] = new
    return new


@contextlib.contextmanager
def _batch_statistics(bns: list[nn.Module]) -> Iterator[None]:
    """BatchNorm layers in training mode (test-batch statistics) on scratch running statistics."""
    saved = []
    for m in bns:
        keep = {k: getattr(m, k) for k in ("running_mean", "running_var", "num_batches_tracked")}
        for k, v in keep.items():
            if v is not None:
                setattr(m, k, v.detach().clone())
        saved.append((m, keep))
        m.train()
    try:
        yield
    finally:
        for m, keep in saved:
            m.eval()
            for k, v in keep.items():
                if v is not None:
                    setattr(m, k, v)


class ScriptedModel(nn.Module):
    """A TorchScript module as the adapter's model (see the module docstring).

    ``batch_stats``: BatchNorm layers normalise with test-batch statistics (``bn``) on batches of at
    least ``min_batch_size``. ``use_source_stats`` (set by the source forward) forces the source ones.
    The features (input of the classifier) pass through ``features_tap``, which the adapter hooks.
    """

    def __init__(self, net: nn.Module, batch_stats: bool = False, min_batch_size: int = 2) -> None:
        super().__init__()
        if not is_script(net):
            raise TypeError(f"ScriptedModel wraps a TorchScript module, got {type(net).__name__}")
        self.net = net
        self.features_tap = nn.Identity()
        self.batch_stats = bool(batch_stats)
        self.min_batch_size = int(min_batch_size)
        self.use_source_stats = False
        #: a TorchScript ``nn.Sequential`` ending in a Linear: its features are the input of that Linear
        self.sequential = (not hasattr(net, "forward_features") and script_type(net) == "Sequential"
                           and len(list(net.children())) > 1 and script_type(list(net.children())[-1]) == "Linear")
        #: None: not checked yet; True / False: whether the features + last Linear give the logits
        self.split_features: bool | None = None if hasattr(net, "forward_features") or self.sequential else False
        if self.split_features is False:
            warnings.warn("this TorchScript model exports no forward_features(): OOD is scored on its logits, "
                          "which separates unknowns much worse; decorate a forward_features method with "
                          "@torch.jit.export (the last Linear applied to it must give the logits)", stacklevel=3)

    def __deepcopy__(self, memo: dict[int, Any]) -> "ScriptedModel":
        """As ``copy.deepcopy`` of a module, with the TorchScript module copied by :func:`copy_script`."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_modules":
                new.__dict__[k] = OrderedDict(
                    (n, copy_script(m, memo) if n == "net" else copy.deepcopy(m, memo)) for n, m in v.items())
            elif k != "_compiled_call_impl":
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def _head(self) -> nn.Module | None:
        last = None
        for _, m in self.net.named_modules():
            if script_type(m) == "Linear":
                last = m
        return last

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)``, or for a Sequential every layer but its last Linear."""
        if not self.sequential:
            return self.net.forward_features(x)
        for m in list(self.net.children())[:-1]:
            x = m(x)
        return x

    def _check_split(self, x: torch.Tensor) -> None:
        head = self._head()
        ok = head is not None
        if ok:
            with torch.no_grad():
                ok = bool(torch.allclose(head(self._features(x)), self.net(x), rtol=1e-4, atol=1e-5))
        if not ok:
            warnings.warn("this TorchScript module's features followed by its last Linear do not give its "
                          "logits; the logits serve as features", stacklevel=4)
        self.split_features = ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_features is None:
            self._check_split(x)
            via_forward = not self.split_features or self.sequential  # the BatchNorm layers run in forward()
            if self.batch_stats and via_forward and not honours_train_mode(self.net, "forward"):
                raise RuntimeError("bn: this TorchScript model's forward() was traced (its BatchNorm layers stay in "
                                   "eval mode) and no exported forward_features() leads to its logits; use 'source'")
        batch = self.batch_stats and not self.use_source_stats and x.shape[0] >= self.min_batch_size
        with _batch_statistics(script_batchnorms(self.net)) if batch else contextlib.nullcontext():
            if self.split_features:
                return self._head()(self.features_tap(self._features(x)))
            return self.net(x)


@contextlib.contextmanager
def assigned_params(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model``'s parameters named in ``values`` replaced by those values (no copy, no in-place write:
    graphs that hold the live parameters stay valid) until the context exits."""
    modules = dict(model.named_modules())
    saved = []
    for name, value in values.items():
        mname, _, attr = name.rpartition(".")
        mod = modules[mname]
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, nn.Parameter(value, requires_grad=False))
    try:
        yield
    finally:
        for mod, attr, p in reversed(saved):
            setattr(mod, attr, p)


def script_feature_layer(feature_layer: str | None) -> str:
    """The feature layer of a :class:`ScriptedModel` (its ``features_tap``); no layer inside a TorchScript
    model can be named, as no hook runs there."""
    if feature_layer is not None:
        raise ValueError(f"feature_layer={feature_layer!r}: no layer inside a TorchScript model can be hooked; its "
                         "features are forward_features(x) when it exports that method, else its logits")
    return "features_tap"


def wrap_script(model: nn.Module, norm: str, norm_kwargs: dict[str, Any], spec: str | None = None) -> ScriptedModel:
    """A copy of TorchScript ``model`` in a :class:`ScriptedModel` for norm term ``norm`` (no layer is
    replaced); a norm it cannot run is refused by :func:`check_script_spec`."""
    from streamtta.adapters.norms import NORM_CLASSES

    check_script_spec(model, norm, norm_kwargs, spec)
    has_bn = bool(script_batchnorms(model))
    if norm != "source" and not has_bn:
        warnings.warn(f"norm {norm!r}: the model has no BatchNorm layer, so normalisation does not adapt",
                      stacklevel=4)
    if norm == "bn":
        NORM_CLASSES["bn"](1, **norm_kwargs)  # the eager layer's argument checks
    return ScriptedModel(copy_script(model), batch_stats=norm == "bn" and has_bn,
                         min_batch_size=int(norm_kwargs.get("min_batch_size", 2)))
