"""Which samples of a batch may update an adapter's state: input sanitising and the gate mask."""
from __future__ import annotations

import torch

from streamtta.adapters.base import Gate


def sanitize_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a ``(B, ...)`` batch and zero every non-finite sample (one would poison the batch
    statistics for everybody). Returns the batch and the per-sample finite-input mask (None when
    every sample is finite).

    >>> x, finite = sanitize_batch(torch.tensor([[1.0, 2.0], [float("nan"), 3.0]]))
    >>> x.tolist(), finite.tolist()
    ([[1.0, 2.0], [0.0, 0.0]], [True, False])
    >>> sanitize_batch(torch.ones(3, 2))[1] is None
    True
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"step expects a non-empty batch tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    B = int(x.shape[0])
    finite_in = torch.isfinite(x.reshape(B, -1)).all(dim=1) if x.is_floating_point() else None
    if finite_in is None or bool(finite_in.all()):
        return x, None
    x = torch.where(finite_in.view((B,) + (1,) * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype))
    return x, finite_in


def admission_mask(logits: torch.Tensor, features: torch.Tensor, finite_in: torch.Tensor | None,
              gate: Gate | None) -> torch.Tensor:
    """Samples that may update any state: finite logits, finite inputs (``finite_in``, None = all)
    and accepted by ``gate`` (called with the detached ``(logits, features)``)."""
    B = int(logits.shape[0])
    mask = torch.isfinite(logits.detach()).all(dim=1)
    if finite_in is not None:
        mask = mask & finite_in.to(mask.device)
    if gate is not None:
        g = torch.as_tensor(gate(logits.detach(), features.detach()), device=mask.device)
        if g.shape != (B,):
            raise ValueError(f"gate must return a ({B},) bool mask, got shape {tuple(g.shape)}")
        mask = mask & g.bool()
    return mask
