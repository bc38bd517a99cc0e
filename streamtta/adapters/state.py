"""Adapter state: snapshots (deep copies whose tensors cannot alias the live state), restoring them, and
per-stream copies that share the model's fixed weights.

:func:`stream_copy` copies a built adapter for one more stream without copying what no stream ever
changes: the parameters of the layers that are not normalisation layers and the source statistics of
the streamtta norm layers stay shared (read-only) by all the copies, and their ``state_dict`` leaves
them out (``adapter.shared_keys``). The norm layers' affine parameters and statistics, optimizer,
filters and guards are each copy's own. A TorchScript model cannot share tensors with another one: its
copies hold their own fixed tensors (equal values; still left out of the state).

>>> from torch import nn
>>> from streamtta.adapters import build_adapter
>>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> proto = share_fixed(build_adapter("bn", net, 3))
>>> a, b = stream_copy(proto), stream_copy(proto)
>>> a.model[0].weight is b.model[0].weight, a.model[1].weight is b.model[1].weight
(True, False)
>>> sorted(a.state_dict()["model"])          # no shared weight in a stream's state
['1.bias', '1.weight']
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from streamtta.adapters.common import iter_norm_modules
from streamtta.adapters.norms.base import AdaptiveNorm, set_stats_mode


def clone_state(obj: Any) -> Any:
    """Deep copy with tensors cloned (detached), so later in-place updates cannot leak in.

    >>> live = {"w": torch.zeros(2), "steps": [1, (2, 3)]}
    >>> snap = clone_state(live); live["w"] += 1
    >>> snap["w"].tolist(), snap["steps"]
    ([0.0, 0.0], [1, (2, 3)])
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def fixed_tensors(adapter: Any) -> dict[str, torch.Tensor]:
    """Model state entries no stream changes: parameters outside the normalisation layers (frozen; the
    objective and re-adaptation move only the norm affine parameters) and the source statistics of the
    streamtta norm layers. Buffers of other layers are not counted (a model may update them)."""
    adapted = {id(p) for p in adapter.parameters_to_adapt()}
    norms = {name for name, _ in iter_norm_modules(adapter.model)}
    fixed: dict[str, torch.Tensor] = {}
    for mname, m in adapter.model.named_modules():
        if mname in norms:
            if isinstance(m, AdaptiveNorm):
                for b in ("source_mean", "source_var"):
                    fixed[f"{mname}.{b}" if mname else b] = getattr(m, b)
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in adapted:
                fixed[f"{mname}.{pname}" if mname else pname] = p
    return fixed


def share_fixed(adapter: Any) -> Any:
    """Mark ``adapter`` as the owner of fixed tensors that :func:`stream_copy` copies share; its state and
    initial state leave them out from now on. Returns ``adapter``."""
    adapter.shared_keys = set(fixed_tensors(adapter))
    adapter._initial_state = adapter.state_dict()
    return adapter


def stream_copy(adapter: Any) -> Any:
    """A copy of a :func:`share_fixed` adapter for one more stream: what a stream changes is copied, the
    fixed tensors, the source parameter values and the initial state (all read-only) are shared, and a
    fresh optimizer is built (the original's has never stepped)."""
    keys = getattr(adapter, "shared_keys", None)
    if keys is None:
        raise ValueError("stream_copy needs an adapter marked by share_fixed()")
    fixed = fixed_tensors(adapter)
    memo: dict[int, Any] = {id(t): t for k, t in fixed.items() if k in keys}
    memo.update({id(t): t for t in adapter._source_params.values()})
    memo[id(adapter._initial_state)] = adapter._initial_state
    if adapter.optimizer is not None:
        memo[id(adapter.optimizer)] = None
    _copy_modules(adapter.model, memo)
    other = copy.deepcopy(adapter, memo)
    other.shared_keys = set(keys)
    if adapter.optimizer is not None:
        other.optimizer = other._make_optimizer()
    return other


def _plain_module(m: nn.Module) -> bool:
    """True when ``copy.deepcopy`` copies ``m`` the default way (no custom copy, pickling or ``__new__``;
    TorchScript modules, for one, have their own ``__deepcopy__``)."""
    t = type(m)
    return (t.__getstate__ is nn.Module.__getstate__ and t.__setstate__ is nn.Module.__setstate__
            and getattr(t, "__deepcopy__", None) is None and t.__reduce_ex__ is object.__reduce_ex__
            and t.__reduce__ is object.__reduce__ and t.__new__ is object.__new__)


def _copy_modules(root: nn.Module, memo: dict[int, Any]) -> None:
    """Deep-copy the module tree of ``root`` into ``memo`` as ``copy.deepcopy`` would, but faster: the
    many empty hook dictionaries of every module are created empty instead of being reconstructed.
    Module trees with a module that copies itself its own way (a TorchScript model's wrapper) are copied
    with ``copy.deepcopy`` first, so that references to their tensors map to the copy's; their fixed
    tensors are copied, not shared."""
    modules = list(root.modules())
    if not all(_plain_module(m) for m in modules):
        memo[id(root)] = copy.deepcopy(root, memo)
        return
    for m in modules:
        memo[id(m)] = object.__new__(type(m))
    for m in modules:
        new = memo[id(m)]
        for k, v in m.__dict__.items():
            if k == "_compiled_call_impl":  # as nn.Module.__getstate__: not copied
                continue
            if not v and type(v) in (dict, OrderedDict, set):
                new.__dict__[k] = type(v)()
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)


def _unshare(adapter: Any, model_state: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``model_state`` to load into a copy that shares fixed tensors: shared ones equal to
    the current values are dropped; one that differs (a checkpoint of other weights) is loaded into a
    private copy of that tensor, which is no longer shared."""
    keys = adapter.shared_keys
    out = {}
    for k, v in model_state.items():
        if k in keys:
            mname, _, attr = k.rpartition(".")
            mod = adapter.model.get_submodule(mname)
            cur = getattr(mod, attr)
            if torch.is_tensor(v) and v.shape == cur.shape and torch.equal(v.to(cur.device, cur.dtype), cur):
                continue
            if isinstance(cur, nn.Parameter):
                setattr(mod, attr, nn.Parameter(cur.detach().clone(), requires_grad=cur.requires_grad))
            else:
                mod.register_buffer(attr, cur.detach().clone())
            keys.discard(k)
        out[k] = v
    return out


def adapter_state(adapter: Any) -> dict[str, Any]:
    """Snapshot of everything that changes while a composite adapter streams: model (parameters and
    statistics, without the fixed tensors a :func:`stream_copy` shares), optimizer, objective, filter and
    guard state, step count (plus its spec, to name it)."""
    model_state = adapter.model.state_dict()
    keys = getattr(adapter, "shared_keys", None)
    if keys:
        model_state = {k: v for k, v in model_state.items() if k not in keys}
    return clone_state(
        {
            "spec": adapter.spec,
            "model": model_state,
            "optimizer": None if adapter.optimizer is None else adapter.optimizer.state_dict(),
            "objective": None if adapter.objective is None else adapter.objective.state_dict(),
            "filters": [f.state_dict() for f in adapter.filters],
            "guards": [g.state_dict() for g in adapter.guards],
            "n_steps": adapter.n_steps,
        }
    )


def load_adapter_state(adapter: Any, state: dict[str, Any]) -> None:
    """Restore an :func:`adapter_state` snapshot into an adapter of the same spec (tensors copied)."""
    missing = {"model", "optimizer", "filters", "guards"} - set(state)
    if missing:
        raise KeyError(f"adapter state is missing {sorted(missing)}")
    if len(state["filters"]) != len(adapter.filters) or len(state["guards"]) != len(adapter.guards):
        raise ValueError(
            f"state has {len(state['filters'])} filters / {len(state['guards'])} guards, this adapter "
            f"{len(adapter.filters)} / {len(adapter.guards)} (spec {state.get('spec')!r} vs {adapter.spec!r})"
        )
    keys = getattr(adapter, "shared_keys", None)
    if keys:
        model_state = _unshare(adapter, state["model"])
        missing, unexpected = adapter.model.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if k not in keys]
        if missing or unexpected:
            raise RuntimeError(f"error loading the adapter's model state: missing keys {missing}, "
                               f"unexpected keys {list(unexpected)}")
    else:
        adapter.model.load_state_dict(state["model"])
    set_stats_mode(adapter.model, "deferred")
    if adapter.optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError("state has no optimizer state but this adapter has an objective")
        adapter.optimizer.load_state_dict(clone_state(state["optimizer"]))
    if adapter.objective is not None and state.get("objective") is not None:
        adapter.objective.load_state_dict(clone_state(state["objective"]))
    for f, s in zip(adapter.filters, state["filters"]):
        f.load_state_dict(clone_state(s))
    for g, s in zip(adapter.guards, state["guards"]):
        g.load_state_dict(clone_state(s))
    adapter.n_steps = int(state.get("n_steps", 0))
