"""Adapter state: snapshots (deep copies whose tensors cannot alias the live state) and restoring them."""
from __future__ import annotations

import copy
from typing import Any

import torch

from streamtta.adapters.norms.base import set_stats_mode


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


def adapter_state(adapter: Any) -> dict[str, Any]:
    """Snapshot of everything that changes while a composite adapter streams: model (parameters and
    statistics), optimizer, objective, filter and guard state, step count (plus its spec, to name it)."""
    return clone_state(
        {
            "spec": adapter.spec,
            "model": adapter.model.state_dict(),
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
