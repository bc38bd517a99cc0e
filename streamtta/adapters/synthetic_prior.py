"""A class prior without source data: class-conditional inputs synthesised from the source model itself.

``cb-stats`` corrects one-class batches from the first batch on when it knows each class's statistics, which
:meth:`~streamtta.adapters.source_fit.SourceFitMixin.fit_source` measures on labelled source data. Without
source data, :func:`synthesize_inputs` makes stand-ins by *model inversion* (DeepInversion, Yin et al., CVPR
2020): inputs ``x = mu + sd * z``, ``per_class`` per class, start from noise at the per-channel scale
``(mu, sd)`` of an example batch (unlabelled test data will do) and ``z`` is optimised with Adam so that

* the source model classifies each input as its assigned class (cross-entropy), and
* the batch, balanced over the classes, reproduces every norm layer's source statistics (the BatchNorm
  running statistics: squared standardised mean difference plus squared log-variance ratio, averaged over
  channels and summed over layers).

:meth:`~streamtta.adapters.source_fit.SourceFitMixin.fit_source_free` feeds the result to ``fit_source``.
Needs norm layers with source statistics (BatchNorm, or streamtta's replacements of it) and an eager
(not TorchScript) model. Measured on the tuning streams (README, "A class prior without source data"):
on the digits ResNet it beat the real source data's prior; on the sensor MLP it varied with the
synthesis seed from far better to far worse, so it is opt-in.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> x, y = synthesize_inputs(net, 3, torch.randn(32, 4), per_class=8, steps=100)
>>> tuple(x.shape), y.tolist()[:4]
((24, 4), [0, 0, 0, 0])
>>> float((net(x).argmax(1) == y).float().mean()) > 0.8   # the model takes them for their classes
True
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from streamtta.adapters.norms.aligned import AlignedNorm
from streamtta.progress import progress_bar


def source_norm_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, var)`` a norm layer normalises its input with in the source model: a streamtta BatchNorm
    replacement's ``source_mean``/``source_var``, a BatchNorm's running statistics; None for other modules
    (``align``'s source statistics describe a LayerNorm / GroupNorm's *output*: not matched)."""
    if isinstance(module, AlignedNorm):
        return None
    mean = getattr(module, "source_mean", None)
    if mean is not None:
        return mean, module.source_var
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        return module.running_mean, module.running_var
    return None


def synthesize_inputs(
    model: nn.Module,
    num_classes: int,
    example: torch.Tensor,
    *,
    per_class: int = 16,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``per_class`` inputs per class that the source ``model`` takes for class ``y`` and whose
    batch reproduces its norm layers' source statistics (see the module docstring). ``example``: a batch
    giving the input shape and per-channel scale. ``forward`` runs the source model (default: ``model``
    itself, which must then normalise with its source statistics: ``eval()`` BatchNorm; a BatchNorm in training
    mode is refused). The model must return ``(B, num_classes)`` logits."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("a synthetic class prior needs an eager model (TorchScript modules take no forward hooks)")
    if any(int(v) != v for v in (per_class, steps, num_classes)) or per_class < 1 or steps < 1 or num_classes < 2:
        raise ValueError(f"need integers per_class >= 1, steps >= 1 and num_classes >= 2, got {per_class}, {steps}, "
                         f"{num_classes}")
    norms = [m for m in model.modules() if source_norm_stats(m) is not None]
    if not norms:
        raise ValueError("the model has no norm layer with source statistics (BatchNorm) to match")
    if forward is None and any(m.training for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError("a BatchNorm in training mode would normalise with the synthetic batch and overwrite its "
                         "running statistics: call model.eval() first")
    example = torch.as_tensor(example, dtype=torch.float32)
    if example.dim() < 2 or example.shape[0] < 2 or not torch.isfinite(example).all():
        raise ValueError(f"example must be a finite batch of >= 2 inputs, got shape {tuple(example.shape)}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    dims = [0] + list(range(2, example.dim()))
    mu = example.mean(dims, keepdim=True).to(dev)
    sd = example.std(dims, keepdim=True).clamp_min(1e-3).to(dev)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(int(num_classes)).repeat_interleave(int(per_class)).to(dev)
    z = torch.randn((len(y), *example.shape[1:]), generator=gen).to(dev).requires_grad_(True)
    terms: list[torch.Tensor] = []

    def match(mod: nn.Module, inp: Sequence[torch.Tensor]) -> None:
        a = inp[0]
        mean, var = source_norm_stats(mod)  # type: ignore[misc]
        red = [0] + list(range(2, a.dim()))
        eps = float(getattr(mod, "eps", 1e-5))
        terms.append(((a.mean(red) - mean).pow(2) / (var + eps)).mean()
                     + (torch.log(a.var(red, unbiased=False) + eps) - torch.log(var + eps)).pow(2).mean())

    run = forward if forward is not None else model
    opt = torch.optim.Adam([z], lr=lr)
    handles = [m.register_forward_pre_hook(match) for m in norms]
    try:
        with torch.enable_grad(), progress_bar(steps, "synthetic class prior", enabled=progress) as advance:
            for _ in range(int(steps)):
                terms.clear()
                logits = run(mu + sd * z)
                if logits.dim() != 2 or logits.shape[1] != num_classes:
                    raise ValueError(f"the model returns logits of shape {tuple(logits.shape)}, not (B, {num_classes})")
                loss = F.cross_entropy(logits, y) + sum(terms)
                opt.zero_grad(set_to_none=True)
                (grad,) = torch.autograd.grad(loss, [z])
                z.grad = grad
                opt.step()
                advance(1)
    finally:
        for h in handles:
            h.remove()
    return (mu + sd * z).detach(), y
