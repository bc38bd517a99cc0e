"""The meta restart's pieces: unsupervised proxies, forwards over a buffer, the entropy steps, and the
rule that decides whether a restart is kept or rolled back. :meth:`ReAdapter.on_shift` puts them together.

Entropy proxies alone reward a restart that is confidently wrong (lower entropy, predictions still
spread over the classes); :func:`got_worse` therefore also compares how often the model agrees with the
adapter's frozen source copy (:func:`source_predictions`) before and after the restart.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Mapping

import torch
from torch import nn

from streamtta.readapt.params import _logits, entropy


def prediction_proxies(logits: torch.Tensor) -> dict[str, float]:
    """Unsupervised accuracy proxies: mean entropy, prediction-histogram entropy (normalised to
    [0, 1]) and mean confidence.

    >>> p = prediction_proxies(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
    >>> round(p["hist_entropy"], 3), round(p["mean_confidence"], 3)
    (1.0, 0.982)
    """
    p = logits.softmax(1)
    c = logits.shape[1]
    hist = torch.bincount(p.argmax(1), minlength=c).float()
    hist = hist / hist.sum()
    h_hist = float(-(hist[hist > 0] * hist[hist > 0].log()).sum() / math.log(c)) if c > 1 else 0.0
    return {"mean_entropy": float(entropy(logits).mean()), "hist_entropy": h_hist,
            "mean_confidence": float(p.max(1).values.mean())}


@torch.no_grad()
def forward_logits(adapter: Any, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, features)`` of ``x`` through the adapter in minibatches (features None when the
    adapter cannot give them)."""
    logits, feats = [], []
    for i in range(0, len(x), batch_size):
        try:
            lo, fe = adapter.features(x[i:i + batch_size])
        except NotImplementedError:
            lo, fe = _logits(adapter.model(x[i:i + batch_size])), None
        logits.append(lo)
        feats.append(fe)
    f = None if any(v is None for v in feats) else torch.cat(feats)
    return torch.cat(logits), f


@torch.no_grad()
def source_predictions(adapter: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor | None:
    """Predicted classes of the adapter's frozen source copy on ``x`` (source affine parameters with the
    current normalisation statistics, what the ``conf-drop`` filter compares with), or None when the
    adapter has no source copy (no ``_source_forward``)."""
    forward = getattr(adapter, "_source_forward", None)
    if forward is None or len(x) == 0:
        return None
    return torch.cat([_logits(forward(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def with_agreement(proxies: dict[str, float], logits: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
    """``proxies`` plus ``source_agreement``, the share of rows whose predicted class is ``reference``'s
    (unchanged when there is no reference).

    >>> with_agreement({}, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    {'source_agreement': 0.5}
    """
    if reference is None:
        return proxies
    return {**proxies, "source_agreement": float((logits.argmax(1) == reference.to(logits.device)).float().mean())}


def measure(adapter: Any, x: torch.Tensor, batch_size: int, reference: torch.Tensor | None
            ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """``(proxies, logits, features)`` of the adapter on ``x``: :func:`prediction_proxies` plus the
    agreement with ``reference`` (:func:`with_agreement`)."""
    logits, feats = forward_logits(adapter, x, batch_size)
    return with_agreement(prediction_proxies(logits), logits, reference), logits, feats


@torch.no_grad()
def load_init(model: nn.Module, params: list[torch.Tensor], init: Mapping[str, torch.Tensor]) -> int:
    """Copy the meta-initialisation into ``params`` (matched by name and shape); returns how many."""
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    n_loaded = 0
    for p in params:
        value = init.get(names_by_id.get(id(p), ""))
        if value is not None and value.shape == p.shape:
            p.copy_(value.to(p.device, p.dtype))
            n_loaded += 1
    return n_loaded


def entropy_steps(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, *, steps: int, lr: float,
                  batch_size: int, diversity_weight: float, generator: torch.Generator) -> None:
    """``steps`` Adam steps of mean entropy minus ``diversity_weight`` x prediction-diversity on random
    minibatches of ``x``; norm statistics frozen, buffers restored afterwards, ``requires_grad`` as before."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with ExitStack() as stack:
        from streamtta.adapters.norms.base import frozen_stats

        stack.enter_context(frozen_stats(model))
        for _ in range(steps):
            idx = torch.randperm(len(x), generator=generator)[:batch_size]
            logits = _logits(model(x[idx]))
            p_mean = logits.softmax(1).mean(0)
            loss = entropy(logits).mean() + diversity_weight * (p_mean * p_mean.clamp_min(1e-12).log()).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, r in zip(params, requires):
        p.grad = None
        p.requires_grad_(r)
    with torch.no_grad():  # undo any statistics side effect of the extra forwards
        for k, v in model.named_buffers():
            if k in buffers and v.shape == buffers[k].shape:
                v.copy_(buffers[k])


def got_worse(before: Mapping[str, float], after: Mapping[str, float], *, entropy_tolerance: float,
              hist_tolerance: float, agreement_tolerance: float | None = 0.0) -> bool:
    """True when the restart should be rolled back: the prediction histogram collapsed, or the mean
    entropy rose without the predictions spreading out (a collapsed model is confident on a few classes,
    so a restart that spreads its predictions again is kept even though its entropy is higher), or, when
    both carry ``source_agreement`` and ``agreement_tolerance`` is not None, the predictions moved away
    from the source copy's by more than ``agreement_tolerance`` (a confidently wrong restart: lower
    entropy, a spread histogram, but other classes than the source model and the model before it).

    >>> before = {"mean_entropy": 0.4, "hist_entropy": 0.98, "source_agreement": 0.95}
    >>> sure_but_wrong = {"mean_entropy": 0.3, "hist_entropy": 0.97, "source_agreement": 0.80}
    >>> got_worse(before, sure_but_wrong, entropy_tolerance=0.0, hist_tolerance=0.05)
    True
    >>> got_worse(before, sure_but_wrong, entropy_tolerance=0.0, hist_tolerance=0.05, agreement_tolerance=None)
    False
    """
    collapsed = after["hist_entropy"] < before["hist_entropy"] - hist_tolerance
    un_collapsed = after["hist_entropy"] > before["hist_entropy"] + hist_tolerance
    less_sure = after["mean_entropy"] > before["mean_entropy"] + entropy_tolerance
    drifted = (agreement_tolerance is not None and "source_agreement" in before and "source_agreement" in after
               and after["source_agreement"] < before["source_agreement"] - agreement_tolerance)
    return collapsed or drifted or (less_sure and not un_collapsed)
