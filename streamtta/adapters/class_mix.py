"""Adapter-side support of the pseudo-label norms (``cb-stats``): the class mix of a batch,
the labels its statistics are committed with, class-conditional source statistics, and finding
those layers and handing them the class mix (:func:`label_norms`, :func:`set_class_mix`)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

#: Which labels a pseudo-label norm commits its statistics with (see ``CompositeAdapter``).
RELABEL = ("final", "prepass", "agree")


def em_class_mix(probs: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """EM estimate of a batch's class proportions from posteriors (Saerens et al., uniform train prior).

    >>> p = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    >>> [round(v, 2) for v in em_class_mix(p).tolist()]   # pushes mass towards the favoured class
    [0.98, 0.02]
    """
    n = probs.shape[1]
    pi = torch.full((n,), 1.0 / n, dtype=probs.dtype, device=probs.device)
    for _ in range(iters):
        q = probs * (pi * n)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
        pi = q.mean(dim=0)
    return pi


def balance_shrunk_mix(mix: torch.Tensor, balanced_tv: float = 0.3, imbalanced_tv: float = 0.6) -> torch.Tensor:
    """Shrink an estimated class mix towards uniform when it is close to uniform.

    An i.i.d. batch's EM class-mix estimate deviates from uniform by sampling and posterior noise;
    correcting the batch statistics for that spurious imbalance costs a little accuracy on i.i.d.
    streams, while label-correlated batches are far from uniform. With ``tv`` the
    total-variation distance of ``mix`` from uniform, the result is ``(1 - r) mix + r / C`` with
    ``r = 1`` for ``tv <= balanced_tv``, ``r = 0`` for ``tv >= imbalanced_tv``, linear in between.

    >>> m = balance_shrunk_mix(torch.tensor([0.3, 0.2, 0.25, 0.25]))     # tv = 0.05: balanced
    >>> m.tolist()
    [0.25, 0.25, 0.25, 0.25]
    >>> balance_shrunk_mix(torch.tensor([1.0, 0.0, 0.0, 0.0])).tolist()  # tv = 0.75: one class, kept
    [1.0, 0.0, 0.0, 0.0]
    """
    c = mix.numel()
    tv = 0.5 * float((mix - 1.0 / c).abs().sum())
    r = min(max((imbalanced_tv - tv) / (imbalanced_tv - balanced_tv), 0.0), 1.0)
    return (1.0 - r) * mix + r / c


def batch_class_mix(pre_logits: torch.Tensor, num_classes: int, balanced_tv: float | None,
                    imbalanced_tv: float | None, device: torch.device) -> torch.Tensor:
    """EM class mix of the pre-pass predictions (samples with finite probabilities only; uniform
    when there is none), shrunk by :func:`balance_shrunk_mix` unless ``balanced_tv`` is None."""
    probs = pre_logits.detach().softmax(dim=1)
    probs = probs[torch.isfinite(probs).all(dim=1)]
    if probs.shape[0] == 0:
        return torch.full((num_classes,), 1.0 / num_classes, device=device)
    mix = em_class_mix(probs)
    if balanced_tv is not None:
        mix = balance_shrunk_mix(mix, balanced_tv, imbalanced_tv)
    return mix


def commit_labels(relabel: str, label_confidence: float, logits: torch.Tensor,
                  pre_logits: torch.Tensor | None) -> torch.Tensor | None:
    """The labels pseudo-label norms commit their statistics with: ``"prepass"`` -- the pre-pass
    probabilities; ``"final"`` -- the class ids of the main forward, ``-1`` (ignored) below
    ``label_confidence``; ``"agree"`` -- as ``"final"``, and also ``-1`` where the pre-pass disagrees.
    None without a pre-pass.

    >>> logits = torch.tensor([[4.0, 0.0], [0.1, 0.0], [0.0, 4.0]])
    >>> commit_labels("final", 0.6, logits, logits).tolist()
    [0, -1, 1]
    >>> commit_labels("agree", 0.6, logits, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])).tolist()
    [0, -1, -1]
    """
    if pre_logits is None:
        return None
    if relabel == "prepass":
        return pre_logits.detach().softmax(dim=1)
    probs = logits.detach().softmax(dim=1)
    conf, ids = probs.max(dim=1)
    keep = conf >= label_confidence
    if relabel == "agree":
        keep = keep & (ids == pre_logits.argmax(dim=1))
    return torch.where(keep, ids, torch.full_like(ids, -1))


def class_conditional_stats(
    layer: torch.nn.Module, stats: Sequence[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class ``(means, vars)`` of a pseudo-label norm's input from its per-sample instance
    ``stats`` (``(mean, var)`` chunks in sample order) and labels ``y``: the mean instance mean, and
    the mean instance variance plus the variance of the instance means. Classes with fewer than two
    samples keep the layer's source statistics."""
    mean_i = torch.cat([a for a, _ in stats])
    var_i = torch.cat([b for _, b in stats])
    cm = layer.source_mean.expand_as(layer.slot_means).clone()
    cv = layer.source_var.expand_as(layer.slot_vars).clone()
    for c in range(num_classes):
        sel = y == c
        if int(sel.sum()) >= 2:
            cm[c] = mean_i[sel].mean(0)
            cv[c] = var_i[sel].mean(0) + mean_i[sel].var(0, unbiased=False)
    return cm, cv


def label_norms(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that need a class mix and pseudo-labels."""
    return [m for m in model.modules() if getattr(m, "needs_pseudo_labels", False)]


def set_class_mix(layers: Iterable[nn.Module] | nn.Module, class_mix: torch.Tensor | None) -> None:
    """Give every class-balanced layer the class mix of the next forward (``None``: stored marginal)."""
    mods = label_norms(layers) if isinstance(layers, nn.Module) else list(layers)
    for m in mods:
        m.class_mix = class_mix
