"""The fingerprint of what a per-stream state was made by: the model's weights and the configuration
sections that shape a state (adapter, scorer, monitor). A checkpoint carries it; a restore under another
fingerprint would load one model's or adapter's state into another, so the stream starts fresh instead.

>>> import torch
>>> from streamtta.config import load_config
>>> cfg = load_config(overrides={}, env=False)
>>> m = torch.nn.Linear(3, 2)
>>> a = fingerprint(m, cfg); a == fingerprint(m, cfg), len(a)
(True, 16)
>>> cfg.adapter.spec = "bn"; a == fingerprint(m, cfg)
False
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["fingerprint"]


def fingerprint(model: torch.nn.Module, cfg: Any) -> str:
    """16 hex digits over the model's parameters and buffers (names, shapes, dtypes, values) and the
    ``adapter``, ``scorer`` and ``monitor`` sections of ``cfg``."""
    h = hashlib.sha1()
    sections = {name: getattr(cfg, name).model_dump(mode="json") for name in ("adapter", "scorer", "monitor")}
    h.update(json.dumps(sections, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
