"""Which samples of a batch may update an adapter's state: input sanitising and the gate mask."""
from __future__ import annotations

import torch

from streamtta.adapters.base import Gate


def sanitize_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a ``(B, ...)`` batch and replace every sample holding NaN/Inf (one would poison the batch
    statistics for everybody) by the mean of the batch's finite samples (zeros when none is finite), so
    it barely moves the statistics the other samples are normalised with. Returns the batch and the
    per-sample finite-input mask (None when every sample is finite). The caller keeps such samples out
    of every update (:func:`admission_mask`); :class:`~streamtta.results.BatchResult` flags them.

    >>> x, finite = sanitize_batch(torch.tensor([[1.0, 2.0], [float("nan"), 3.0], [3.0, float("inf")]]))
    >>> x.tolist(), finite.tolist()
    ([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], [True, False, False])
    >>> sanitize_batch(torch.tensor([[float("nan")]]))[0].tolist()
    [[0.0]]
    >>> sanitize_batch(torch.ones(3, 2))[1] is None
    True
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"step expects a non-empty batch tensor (B, ...), got {getattr(x, 'shape', type(x))}")
    B = int(x.shape[0])
    finite_in = torch.isfinite(x.reshape(B, -1)).all(dim=1) if x.is_floating_point() else None
    if finite_in is None or bool(finite_in.all()):
        return x, None
    fill = x[finite_in].mean(dim=0) if bool(finite_in.any()) else torch.zeros(x.shape[1:], dtype=x.dtype)
    x = torch.where(finite_in.view((B,) + (1,) * (x.dim() - 1)), x, fill.to(x.device).unsqueeze(0))
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
