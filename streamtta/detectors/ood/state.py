"""Plain-data scorer state: arrays go into a ``state_dict`` as CPU tensors, never as numpy objects, so a
saved state loads with ``torch.load(..., weights_only=True)`` (loading runs no code).

>>> import numpy as np
>>> t = tensor_state(np.arange(3))
>>> t.dtype, array_state(t, np.float32).tolist()
(torch.int64, [0.0, 1.0, 2.0])
>>> tensor_state(None) is None and array_state(None) is None
True
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def tensor_state(a: Any) -> torch.Tensor | None:
    """A CPU tensor copy of array ``a`` (``None`` stays ``None``)."""
    if a is None:
        return None
    return torch.from_numpy(np.array(a, copy=True))


def array_state(x: Any, dtype: Any = None) -> np.ndarray | None:
    """A numpy copy of a state entry (tensor, array or list; ``None`` stays ``None``)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=dtype, copy=True)
