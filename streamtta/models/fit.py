"""The supervised training loop of the source models: SGD with Nesterov momentum 0.9, weight decay
on the weight matrices only (not on biases and norm parameters), linear warm-up then cosine
learning-rate decay."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from streamtta.models.augment import random_affine


def warmup_cosine(lr: float, total: int) -> Callable[[int], float]:
    """Learning rate of step ``i`` (0-based) of ``total``: linear warm-up over the first 5% of the
    steps (at least one), then cosine decay to 0.

    >>> at = warmup_cosine(1.0, 40)
    >>> at(0), at(1), at(2)
    (0.5, 1.0, 1.0)
    """
    warmup = max(1, total // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return lr_at


def _progress_bar(label: str, total: int) -> tuple[Any, Any]:
    """A started rich progress bar and its task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), transient=False)
    bar.start()
    return bar, bar.add_task(f"train {label}", total=total, status="")


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    augment: bool,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    progress: bool,
    label: str,
) -> int:
    """Train ``model`` (left in train mode) with cross-entropy on ``(x, y)`` for ``epochs`` epochs of
    ``max(1, len(y) // batch_size)`` shuffled batches (``seed`` drives shuffling and augmentation).
    Returns the number of optimizer steps taken."""
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    n = len(y)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    lr_at = warmup_cosine(lr, total)
    bar, task = _progress_bar(label, total) if progress and total else (None, None)
    model.train()
    step = 0
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in range(steps_per_epoch):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                xb, yb = x[idx], y[idx]
                if augment:
                    xb = random_affine(xb, gen)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
                if bar is not None:
                    bar.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    finally:
        if bar is not None:
            bar.stop()
    return step
