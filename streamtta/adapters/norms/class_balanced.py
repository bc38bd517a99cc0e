"""Class-balanced test statistics ("cb-stats"): label-shift-robust normalisation from pseudo-labels.

Streams whose labels are temporally correlated (class-sorted, Dirichlet) break BN-adapt: a batch
of one class is normalised with that class's statistics, which erases exactly the signal that
identifies the class. This layer keeps, per class ``c``, a *slot* with the class-conditional
statistics ``(m_c, v_c)`` of its input, and normalises with their **class-balanced marginal**::

    mean = mean_c m_c,        var = mean_c v_c + mean_c (m_c - mean)**2

so the class mix of the current batch does not move the normalisation. The slots are driven by
pseudo-labels ``p`` (``(B, num_classes)`` probabilities, set by the adapter from a forward pass
with the stored statistics, see :func:`set_pseudo_labels`); hard labels ``y_b = argmax p_b`` are
used. For a batch with instance statistics ``(mu_b, var_b)`` (over the spatial dims):

1. **shared domain shift** (from samples whose slot is established, weight ``w_b = W[y_b]``)::

       delta = sum_b w_b (mu_b - m_{y_b}) / sum_b w_b                 (mean shift)
       rho   = log sum_b w_b (var_b + (mu_b - m_{y_b} - delta)**2) - log sum_b w_b v_{y_b}
       m_c  <- m_c + s * delta,   v_c <- v_c * exp(s * rho)          for every class c

   with ``s = shift_rate * mean_b w_b * B / (B + shift_kappa)``: a corruption moves every class,
   so one class's batch is enough to carry the shift to all slots;
2. **class update** for the classes present (``n_c`` samples, ``a_c = n_c / (n_c + kappa) *
   (alpha + (1 - alpha)(1 - W_c))``)::

       m_c <- m_c + a_c (mean_{b: y_b = c} mu_b - m_c)
       v_c <- v_c + a_c (pooled var of class c in the batch - v_c)
       W_c <- W_c + a_c (1 - W_c)                                     (slot established-ness)

The current batch is normalised with the marginal of the *updated* slots (as RoTTA's RBN uses its
updated EMA), gradients flow through ``mu_b``/``var_b``. Slots start at the source statistics
with ``W = 0``: until a class has been seen its slot holds the source marginal and takes no part
in the shift estimate. Batch size 1 works: a class with a single sample in the batch measures its
variance around the slot mean (so the between-instance part is not lost) and the shift step
shrinks with ``B``.

Without pseudo-labels (``labels is None``) the layer normalises with the stored marginal and
records nothing: the adapter always provides them; standalone users call
:func:`set_pseudo_labels` before each forward.

>>> import torch
>>> layer = ClassBalancedNorm(3, num_classes=2)
>>> x = torch.randn(8, 3, 4, 4)
>>> layer.labels = torch.tensor([[1.0, 0.0]] * 8)      # all predicted class 0
>>> _ = layer(x); layer.commit()
>>> layer.slot_weight.tolist()[1], layer.slot_weight.tolist()[0] > 0   # only slot 0 learned
(0.0, True)
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from streamtta.adapters.norms.base import AdaptiveNorm, affine_normalize, instance_stats


class ClassBalancedNorm(AdaptiveNorm):
    """Normalise with the class-balanced marginal of per-class statistics slots (see module doc)."""

    needs_pseudo_labels = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        source_mean: torch.Tensor | None = None,
        source_var: torch.Tensor | None = None,
        num_classes: int = 10,
        alpha: float = 0.5,
        kappa: float = 8.0,
        shift_rate: float = 1.0,
        shift_kappa: float = 4.0,
        var_shift: bool = True,
        soft_shift: bool = False,
        debias_batch: bool = False,
        batch_kappa: float = 2.0,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, source_mean, source_var)
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"cb-stats needs num_classes >= 2, got {num_classes!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"cb-stats alpha must be in (0, 1], got {alpha}")
        if kappa < 0 or shift_kappa < 0:
            raise ValueError(f"kappa and shift_kappa must be >= 0, got {kappa}, {shift_kappa}")
        if not 0.0 <= shift_rate <= 1.0:
            raise ValueError(f"shift_rate must be in [0, 1], got {shift_rate}")
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.kappa = float(kappa)
        self.shift_rate = float(shift_rate)
        self.shift_kappa = float(shift_kappa)
        self.var_shift = bool(var_shift)
        self.soft_shift = bool(soft_shift)
        self.debias_batch = bool(debias_batch)
        self.batch_kappa = float(batch_kappa)
        self.register_buffer("slot_means", self.source_mean.expand(self.num_classes, -1).clone())
        self.register_buffer("slot_vars", self.source_var.expand(self.num_classes, -1).clone())
        self.register_buffer("slot_weight", torch.zeros(self.num_classes))
        #: ``(B, num_classes)`` pseudo-label probabilities, or ``(B,)`` class ids (-1 = ignore the
    #: sample), for the next forward.
        self.labels: torch.Tensor | None = None

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._NormBase, **kwargs) -> "ClassBalancedNorm":
        if "num_classes" not in kwargs:
            raise ValueError("cb-stats layers need num_classes (the adapter passes it)")
        return super().from_bn(bn, **kwargs)  # type: ignore[return-value]

    # -- maths ----------------------------------------------------------------------------------
    @staticmethod
    def marginal(means: torch.Tensor, vars_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-balanced ``(mean, var)`` of slots ``(N, C)`` (uniform class prior)."""
        m = means.mean(dim=0)
        return m, vars_.mean(dim=0) + (means - m).pow(2).mean(dim=0)

    def _one_hot(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if labels.dim() == 2:
            if labels.shape[1] != self.num_classes:
                raise ValueError(
                    f"pseudo-labels have {labels.shape[1]} classes, the layer {self.num_classes}"
                )
            labels = labels.argmax(dim=1)
        ids = labels.long().to(like.device)
        known = (ids >= 0).unsqueeze(1)  # class id -1 = no label: the sample is ignored
        return (F.one_hot(ids.clamp_min(0), self.num_classes) * known).to(like.dtype)

    def updated_slots(
        self, mean_i: torch.Tensor, var_i: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots after one batch (``means``, ``vars``, ``weight``); differentiable in the inputs."""
        H = self._one_hot(labels, mean_i)  # (B, N)
        B = max(float(H.sum()), 1e-12)
        Sm, Sv, W = self.slot_means, self.slot_vars, self.slot_weight
        Q = H
        if self.soft_shift and labels.dim() == 2:
            Q = labels.to(mean_i) * W  # responsibilities restricted to established slots
            Q = Q / Q.sum(dim=1, keepdim=True).clamp_min(1e-12)
        wb = Q @ W  # established-ness of each sample's slot
        mass = wb.sum()
        if float(mass) > 1e-6:
            s = self.shift_rate * float(mass) / B * B / (B + self.shift_kappa)
            mu_exp = Q @ Sm
            delta = (wb.unsqueeze(1) * (mean_i - mu_exp)).sum(dim=0) / mass
            new_m = Sm + s * delta
            if self.var_shift:
                obs = var_i + (mean_i - mu_exp - delta).pow(2)
                expected = Q @ (Sv + Sm.pow(2)) - mu_exp.pow(2)
                rho = torch.log((wb.unsqueeze(1) * obs).sum(dim=0) + self.eps) - torch.log(
                    (wb.unsqueeze(1) * expected).sum(dim=0) + self.eps
                )
                new_v = Sv * torch.exp(s * rho)
            else:
                new_v = Sv
            Sm, Sv = new_m, new_v
        n = H.sum(dim=0)  # (N,)
        a = (n / (n + self.kappa).clamp_min(1e-12)) * (self.alpha + (1 - self.alpha) * (1 - W))
        a = a.unsqueeze(1)
        present = n.unsqueeze(1) > 0
        denom = n.clamp_min(1.0).unsqueeze(1)
        s1 = H.t() @ mean_i  # (N, C) per-class sums
        s2 = H.t() @ (var_i + mean_i * mean_i)
        class_mean = s1 / denom
        pooled = (s2 / denom - class_mean.pow(2)).clamp_min(0.0)
        # a class seen once this batch: measure its spread around the slot mean instead (the
        # pooled variance of one sample lacks the between-instance part)
        single = (s2 - 2 * s1 * Sm + n.unsqueeze(1) * Sm.pow(2)) / denom
        class_var = torch.where(n.unsqueeze(1) >= 2, pooled, single.clamp_min(0.0))
        Sm = torch.where(present, Sm + a * (class_mean - Sm), Sm)
        Sv = torch.where(present, Sv + a * (class_var - Sv), Sv)
        W = W + a.squeeze(1) * (1 - W)
        return Sm, Sv, W

    def debiased_batch_stats(
        self, mean_i: torch.Tensor, var_i: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch statistics corrected for the batch's (pseudo-)class mix using the slots' class structure."""
        B = mean_i.shape[0]
        if labels.dim() == 1 and labels.is_floating_point() and labels.shape[0] == self.num_classes:
            pi = labels.to(mean_i) / labels.sum().clamp_min(1e-12)  # a class-mix guess
        else:
            pi = self._one_hot(labels, mean_i).mean(dim=0)  # (N,)
        Sm, Sv = self.slot_means, self.slot_vars
        mS, vS = self.marginal(Sm, Sv)
        sd = (vS + self.eps).sqrt()
        off = (Sm - mS) / sd  # standardised class offsets (N, C)
        wrel = Sv / (vS + self.eps)  # relative within-class variances
        o_bar = pi @ off
        denom = pi @ wrel + pi @ (off - o_bar).pow(2)
        bm = mean_i.mean(dim=0)
        bv = var_i.mean(dim=0) + (mean_i - bm).pow(2).mean(dim=0)
        v = bv / denom.clamp_min(1e-3)
        m = bm - (v + self.eps).sqrt() * o_bar
        w = B / (B + self.batch_kappa)
        v = w * v + (1 - w) * vS + w * (1 - w) * (m - mS).pow(2)
        m = w * m + (1 - w) * mS
        return m, v

    # -- module API -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.labels is None or self.stats_mode == "frozen":
            if self.prior is not None and self.debias_batch:
                mean_i, var_i = instance_stats(x)
                m, v = self.debiased_batch_stats(mean_i, var_i, self.prior)
            else:
                m, v = self.marginal(self.slot_means, self.slot_vars)
            return affine_normalize(x, m, v, self.weight, self.bias, self.eps)
        if self.labels.shape[0] != x.shape[0]:
            raise ValueError(f"pseudo-labels for {self.labels.shape[0]} samples, batch has {x.shape[0]}")
        mean_i, var_i = instance_stats(x)
        if self.debias_batch:
            m, v = self.debiased_batch_stats(mean_i, var_i, self.labels)
        else:
            Sm, Sv, _ = self.updated_slots(mean_i, var_i, self.labels)
            m, v = self.marginal(Sm, Sv)
        self._record((mean_i.detach(), var_i.detach(), self.labels.detach()))
        return affine_normalize(x, m, v, self.weight, self.bias, self.eps)

    @torch.no_grad()
    def commit(self, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
        """Apply the recorded update; ``labels`` (e.g. the post-forward predictions) replace the
        pseudo-labels the forward used."""
        if labels is not None and self._pending is not None:
            mean_i, var_i, _ = self._pending
            self._pending = (mean_i, var_i, labels.detach())
        super().commit(mask)

    def _apply_update(self, pending: tuple, mask: torch.Tensor | None) -> None:
        mean_i, var_i, labels = pending
        if mask is not None:
            mean_i, var_i, labels = mean_i[mask], var_i[mask], labels[mask]
        Sm, Sv, W = self.updated_slots(mean_i, var_i, labels)
        self.slot_means.copy_(Sm)
        self.slot_vars.copy_(Sv.clamp_min(0.0))
        self.slot_weight.copy_(W)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_classes={self.num_classes}, alpha={self.alpha}, kappa={self.kappa}"


def label_norms(model: nn.Module) -> list[ClassBalancedNorm]:
    """The layers of ``model`` that consume pseudo-labels."""
    return [m for m in model.modules() if getattr(m, "needs_pseudo_labels", False)]


def set_pseudo_labels(layers: Iterable[nn.Module] | nn.Module, labels: torch.Tensor | None) -> None:
    """Give every pseudo-label-driven layer the labels of the next forward (``None`` clears)."""
    mods = label_norms(layers) if isinstance(layers, nn.Module) else list(layers)
    for m in mods:
        m.labels = labels


def set_class_prior(layers: Iterable[nn.Module] | nn.Module, prior: torch.Tensor | None) -> None:
    """Give every pseudo-label-driven layer a class-mix guess for a label-free pre-pass."""
    mods = label_norms(layers) if isinstance(layers, nn.Module) else list(layers)
    for m in mods:
        m.prior = prior
