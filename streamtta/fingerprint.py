"""The fingerprint of what a per-stream state was made by: the model's weights, the configuration
sections that shape a state (adapter, scorer, monitor) and what the scorers were calibrated on. A checkpoint carries it; a restore under another
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

__all__ = ["calibration_token", "fingerprint"]


def fingerprint(model: torch.nn.Module, cfg: Any = None, calibration: str = "") -> str:
    """16 hex digits over the model's parameters and buffers (names, shapes, dtypes, values), the
    ``adapter``, ``scorer`` and ``monitor`` sections of ``cfg`` (none: the weights alone) and
    ``calibration`` (see :func:`calibration_token`)."""
    h = hashlib.sha1(calibration.encode())
    sections = {name: getattr(cfg, name).model_dump(mode="json") if cfg is not None else {}
                for name in ("adapter", "scorer", "monitor")}
    h.update(json.dumps(sections, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_token(pipe: Any) -> str:
    """What ``pipe`` was calibrated on: a digest of its calibration data, ``"fitted"`` (a built-in model's
    own source data) or ``"uncalibrated"``. A state saved under one must not be restored under another:
    it carries the scorer memories of that calibration (or none).

    >>> import torch, streamtta
    >>> calibration_token(streamtta.Pipeline(torch.nn.Linear(3, 2), num_classes=2))
    'uncalibrated'
    """
    import numpy as np

    data = getattr(pipe, "calibration", None)
    if data is not None and getattr(data, "x", None) is not None:
        h = hashlib.sha1(np.ascontiguousarray(data.x).tobytes())
        if getattr(data, "y", None) is not None:
            h.update(np.ascontiguousarray(data.y).tobytes())
        return "data:" + h.hexdigest()[:16]
    return "fitted" if pipe.calibrated else "uncalibrated"
