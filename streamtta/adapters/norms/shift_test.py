"""The new-domain test of ``cb-stats``: did a batch move further from the stored statistics than its classes explain?

:class:`~streamtta.adapters.norms.class_balanced.ClassBalancedNorm` runs this test in its pre-pass; a layer
whose test fires normalises the pre-pass with the batch's own statistics and re-anchors its slots.

**Distance test.** With the slots' class-balanced marginal ``(mS, vS)`` and the batch's pooled statistics
``(bm, bv)``, all means over features::

    z  = mean |bm - mS| / sqrt(vS)               rc = max_c mean |log(v_c / vS)|
    r  = mean |log(bv / vS)|                     zc = max_c mean |m_c - mS| / sqrt(vS)

fires when ``z > k max(zc, floor) + 0.05`` or ``r > k max(rc, floor / 2) + 0.05``: the batch lies further from
the marginal than the furthest class does (``floor``: what unseen classes may add).

**Imbalance veto** (``imbalance_ratio`` > 0; ``cb-stats`` uses it while its class structure is unknown). A
batch drawn from a few classes of the *same* domain loses the between-class part of the variance and moves its
mean by about as much: over the classes, the mean of ``(m_c - mS)**2 / vS`` equals the mean of
``1 - v_c / vS`` (both are the between-class share of the variance). A domain shift breaks that balance: an
offset moves the mean without a variance deficit, a contrast loss shrinks the variance without moving the
mean, noise adds variance. With::

    s = mean (bm - mS)**2 / vS,    d = mean max(0, 1 - bv / vS),    g = mean max(0, log(bv / vS))

a firing test is vetoed when ``g <= 0.1``, ``s <= ratio * d + 0.05`` and ``d <= ratio * s + 0.05``. Without a
class prior the distance test cannot tell a one-class batch from a new domain (``zc`` is 0 and the floor is
a guess): on a class-sorted sensor stream (an MLP, whose features separate classes by far more than the
floor) it fired on every batch, so the layer never learned a class and normalised one-class batches with
their own statistics (BN-adapt). Chosen on tuning streams (README, "Adaptation on label-correlated
streams").

>>> import torch
>>> slots_m, slots_v = torch.zeros(4, 3), torch.ones(4, 3)          # no class structure yet
>>> one_class = (torch.full((3,), 0.8), torch.full((3,), 0.3))     # mean moved, variance lost alike
>>> offset = (torch.full((3,), 0.8), torch.ones(3))                # mean moved, variance kept
>>> [shift_detected(*b, slots_m, slots_v) for b in (one_class, offset)]
[True, True]
>>> [shift_detected(*b, slots_m, slots_v, imbalance_ratio=3.0) for b in (one_class, offset)]
[False, True]
"""
from __future__ import annotations

import torch

#: The veto's tolerances: variance growth no class subset explains, and the slack of ``s`` against ``d``.
GROWTH_TOLERANCE = 0.1
BALANCE_SLACK = 0.05


def class_balanced_marginal(means: torch.Tensor, vars_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced ``(mean, var)`` of per-class statistics ``(N, C)`` (uniform class prior)."""
    m = means.mean(dim=0)
    return m, vars_.mean(dim=0) + (means - m).pow(2).mean(dim=0)


def imbalance_signature(bm: torch.Tensor, bv: torch.Tensor, mS: torch.Tensor, vS: torch.Tensor,
                        eps: float = 1e-5) -> tuple[float, float, float]:
    """``(s, d, g)`` of the module docstring: the batch's squared standardised mean shift, variance deficit
    and log-variance growth against ``(mS, vS)``, means over features."""
    ratio = (bv + eps) / (vS + eps)
    s = float(((bm - mS).pow(2) / (vS + eps)).mean())
    d = float((1 - ratio).clamp_min(0).mean())
    g = float(torch.log(ratio).clamp_min(0).mean())
    return s, d, g


def shift_detected(bm: torch.Tensor, bv: torch.Tensor, slot_means: torch.Tensor, slot_vars: torch.Tensor, *,
                   eps: float = 1e-5, factor: float = 2.0, floor: float = 0.25,
                   imbalance_ratio: float = 0.0) -> bool:
    """True when the batch statistics ``(bm, bv)`` moved further from the slots' marginal than any class
    explains (the distance test), unless ``imbalance_ratio`` > 0 and the move looks like a class imbalance of
    the same domain (the veto); see the module docstring."""
    m, v = class_balanced_marginal(slot_means, slot_vars)
    sd = (v + eps).sqrt()
    z = float(((bm - m) / sd).abs().mean())
    r = float(torch.log((bv + eps) / (v + eps)).abs().mean())
    zc = float(((slot_means - m) / sd).abs().mean(dim=1).max())
    rc = float(torch.log((slot_vars + eps) / (v + eps)).abs().mean(dim=1).max())
    # unseen classes may differ from the marginal by more than the slots show yet
    zc, rc = max(zc, floor), max(rc, floor / 2)
    if not (z > factor * zc + 0.05 or r > factor * rc + 0.05):
        return False
    if imbalance_ratio <= 0:
        return True
    s, d, g = imbalance_signature(bm, bv, m, v, eps)
    balanced = s <= imbalance_ratio * d + BALANCE_SLACK and d <= imbalance_ratio * s + BALANCE_SLACK
    return not (g <= GROWTH_TOLERANCE and balanced)
