"""Do-no-harm output guard: fall back to the non-adapting source model where it is the better bet.

Adapting normalisation statistics costs a little accuracy on domains that are (almost) the
source domain: there the source statistics are simply the best ones. Two rules, both on outputs only
(adaptation itself -- statistics, parameters, features -- is unaffected):

* **batch**: when the adapted model and the frozen source model (source statistics and source
  affine parameters) predict the same class for at least ``agreement`` of the batch, the domain is
  taken as benign and the step returns the source model's logits;
* **per sample** (``mixed=True``): a sample's distance to a set of normalisation statistics is the
  KL divergence between its instance statistics at the first normalisation layer and those
  statistics (mean over channels; :func:`normalized_distance`). A *source-like* sample (distance
  to the source statistics within ``near`` x the reference) gets the source model's logits when

  - the batch mixes it with samples far from the source (at least ``far_fraction`` of the batch
    beyond ``far`` x the reference: a gradual transition between domains, whose batch statistics
    belong to the far part), or
  - the statistics the adapter normalised it with do not fit it (distance beyond ``stale`` x the
    reference: statistics still tuned to the previous, far domain).

  The reference is the 99th percentile of the source distances of clean source samples
  (:meth:`calibrate`; the engine calls it through ``CompositeAdapter.fit_source``); without
  it these rules are off.

Costs up to one extra forward pass without gradients. With ``probe=k`` (default 16; 0 = always the whole
batch) the adapter runs the source model on ``k`` probe samples, on the rest of the batch only when the
probe says the batch rule may fire (:meth:`SourceFallback.may_fire`), and otherwise only on the samples the
per-sample rules pick (see :mod:`streamtta.adapters.shared_passes`; only when the first norm layer is
``cb-stats``, else the whole batch runs). On the tuning and held-out streams ``probe=16`` scored the same accuracy
as ``probe=0`` (README, "Compute cost").

>>> import torch
>>> g = SourceFallback(agreement=0.75)
>>> src = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
>>> ada = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])   # 3 of 4 agree
>>> out, used = g.choose(ada, src); used, torch.equal(out, src)
(True, True)
>>> g = SourceFallback(agreement=1.0, far_fraction=0.25)
>>> g.calibrate(torch.tensor([0.01, 0.02, 0.05]))            # distances of clean source samples
>>> ada = torch.tensor([[0.0, 1.0]] * 4)
>>> out, used = g.choose(ada, src, distance=torch.tensor([0.01, 3.0, 3.0, 0.02]))
>>> used, out.argmax(1).tolist(), g.last_n_near                # samples 0 and 3 are source-like
(False, [0, 1, 1, 0], 2)
>>> out, _ = g.choose(ada, src, distance=torch.tensor([0.01, 0.02, 0.01, 0.02]),   # no far sample,
...                   fit=torch.tensor([1.0, 0.02, 0.01, 0.02]))   # but sample 0's statistics do not fit it
>>> out.argmax(1).tolist()
[0, 1, 1, 1]
"""
from __future__ import annotations

import torch

from streamtta.adapters.context import StepContext
from streamtta.adapters.guards.base import Guard
from streamtta.adapters.norms.base import instance_stats


def normalized_distance(z: torch.Tensor, channels: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample distance of normalised activations ``z`` to the standard normal they should follow.

    ``(B, C, *spatial)``: mean over channels of ``KL(N(m_bc, v_bc) || N(0, 1))`` with the instance
    statistics ``m, v`` of ``z`` over the spatial dims; ``(B, C)``: half the mean square.
    ``channels`` (bool ``(C,)``) restricts the mean. For ``z = (x - mu) / sigma`` this is the KL
    divergence between each sample's instance statistics and ``N(mu, sigma^2)``.
    """
    if channels is not None:
        z = z[:, channels]
    if z.dim() == 2:
        return 0.5 * (z * z).mean(dim=1)
    m, v = instance_stats(z)
    return kl_to_standard(m, v, eps)


def kl_to_standard(m: torch.Tensor, v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean over channels of ``KL(N(m, v + eps) || N(0, 1))`` for per-sample, per-channel ``(B, C)`` ``m, v``."""
    v = v + eps
    return (0.5 * (v + m * m - 1.0 - torch.log(v))).mean(dim=1)


def stats_distances(mean_i: torch.Tensor, var_i: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor],
                    used: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor | None,
                    eps: float = 1e-5, spatial: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`source_distance` and :func:`fit_distance` of a norm layer's input from its instance
    statistics ``(mean_i, var_i)`` (``(B, C)``, over spatial dims) alone, without touching the
    activations: ``source`` = the layer's source ``(mean, var)``, ``used`` = the ``(C,)`` statistics it
    normalised the batch with, ``weight`` its affine weight (channels with ``|weight| <= 1e-6`` left out
    of the fit, as :func:`fit_distance` does). ``eps`` is the layer's; ``spatial=False``: ``(B, C)``
    inputs (``mean_i`` the input itself), whose distance is half the mean square.

    >>> x = torch.randn(4, 3, 5, 5) * 2 + 1
    >>> mean, var = torch.zeros(3), torch.ones(3)
    >>> d, f = stats_distances(*instance_stats(x), (mean, var), (mean, var), None)
    >>> bool(torch.allclose(d, source_distance(x, mean, var), atol=1e-4)), bool(torch.allclose(d, f))
    (True, True)
    """
    sm, sv = source
    sd = (sv.clamp_min(0) + eps).sqrt()
    um, uv = used
    ud = (uv.clamp_min(0) + eps).sqrt()
    sz, fz = (mean_i - sm) / sd, (mean_i - um) / ud
    keep = None if weight is None else weight.detach().abs() > 1e-6  # fit_distance cannot recover z there
    if not spatial:
        fz = fz if keep is None else fz[:, keep]
        return 0.5 * (sz * sz).mean(dim=1), 0.5 * (fz * fz).mean(dim=1)
    fv = var_i / ud.pow(2)
    if keep is not None:
        fz, fv = fz[:, keep], fv[:, keep]
    return kl_to_standard(sz, var_i / sd.pow(2)), kl_to_standard(fz, fv)


def source_distance(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample distance of a norm layer's input ``x`` to its source statistics ``(mean, var)``:
    :func:`normalized_distance` of ``(x - mean) / sqrt(var + eps)``."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    return normalized_distance((x - mean.view(view)) / (var.clamp_min(0) + eps).sqrt().view(view))


def fit_distance(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-sample distance of a norm layer's input to the statistics the layer normalised it with,
    recovered from its output ``y = weight * z + bias`` (any per-sample, per-channel statistics)."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    z, channels = y, None
    if bias is not None:
        z = z - bias.view(view)
    if weight is not None:
        channels = weight.abs() > 1e-6
        z = z / torch.where(channels, weight, torch.ones_like(weight)).view(view)
    return normalized_distance(z, channels)


class SourceFallback(Guard):
    """Source model's logits for benign batches, and for source-like samples of mixed batches or that
    the adapted statistics do not fit."""

    name = "source-fallback"
    #: the adapter computes the exact source model's logits for :meth:`choose`.
    needs_source_model = True

    def __init__(self, agreement: float = 0.95, mixed: bool = True, near: float = 1.0, far: float = 5.0,
                 far_fraction: float = 0.1, stale: float = 3.0, quantile: float = 0.99, probe: int = 16) -> None:
        if not 0.0 < agreement <= 1.0:
            raise ValueError(f"source-fallback agreement must be in (0, 1], got {agreement}")
        if not 0.0 < near <= far or stale <= 0:
            raise ValueError(f"source-fallback needs 0 < near <= far and stale > 0, got near={near}, far={far}, "
                             f"stale={stale}")
        if not 0.0 < far_fraction <= 1.0 or not 0.0 < quantile <= 1.0:
            raise ValueError(f"far_fraction and quantile must be in (0, 1], got {far_fraction}, {quantile}")
        self.agreement = float(agreement)
        self.mixed = bool(mixed)
        self.near, self.far = float(near), float(far)
        self.far_fraction = float(far_fraction)
        self.stale = float(stale)
        self.quantile = float(quantile)
        if int(probe) != probe or probe < 0:
            raise ValueError(f"source-fallback probe must be an integer >= 0, got {probe!r}")
        #: 0: the source model runs on the whole batch; k > 0 (default 16): the adapter runs it on k probe samples
        #: first and on the rest only when the batch rule may fire (see :meth:`may_fire`)
        self.probe = int(probe)
        #: reference distance of clean source samples (``quantile`` of them); None = rule off
        self.reference: float | None = None
        self.last_n_near = 0

    @property
    def needs_distance(self) -> bool:
        return self.mixed and self.reference is not None

    def calibrate(self, distances: torch.Tensor) -> None:
        """Set the reference from the :func:`source_distance` values of clean source samples."""
        d = torch.as_tensor(distances, dtype=torch.float64).reshape(-1)
        d = d[torch.isfinite(d)]
        if d.numel() == 0:
            raise ValueError("source-fallback calibration got no finite distances")
        self.reference = float(torch.quantile(d, self.quantile))

    def choose(self, adapted: torch.Tensor, source: torch.Tensor, distance: torch.Tensor | None = None,
               fit: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """``(logits to return, whether they are the source model's for the whole batch)``.

        ``distance``: each sample's :func:`source_distance`; ``fit``: its :func:`fit_distance` to the
        statistics the adapter normalised it with (both at the first norm layer; optional).
        """
        self.last_n_near = 0
        agree = (adapted.argmax(dim=1) == source.argmax(dim=1)).float().mean()
        if float(agree) >= self.agreement:
            return source, True
        use = self.sample_rule(distance, fit)
        if use is not None and bool(use.any()):
            self.last_n_near = int(use.sum())
            return torch.where(use.unsqueeze(1).to(adapted.device), source, adapted), False
        return adapted, False

    def sample_rule(self, distance: torch.Tensor | None, fit: torch.Tensor | None = None) -> torch.Tensor | None:
        """The samples the per-sample rules give the source logits (bool ``(B,)``; None when they are off).
        Needs no source logits: the adapter can run the source model on these samples only."""
        if distance is None or not self.needs_distance:
            return None
        ref = max(float(self.reference), 1e-12)
        near = distance <= self.near * ref
        use = torch.zeros_like(near)
        if float((distance > self.far * ref).float().mean()) >= self.far_fraction:
            use |= near  # mixed batch
        if fit is not None:
            use |= near & (fit.to(near.device) > self.stale * ref)  # statistics that do not fit
        return use

    def may_fire(self, agree: float, n: int) -> bool:
        """Whether the batch rule may fire given the agreement ``agree`` on ``n`` probe samples: the
        probe agreement is at least :attr:`agreement` minus three binomial standard deviations
        (at ``agreement``, so a batch at the threshold is almost never missed).

        >>> g = SourceFallback(agreement=0.95, probe=16)
        >>> g.may_fire(13 / 16, 16), g.may_fire(12 / 16, 16)
        (True, False)
        """
        sd = (self.agreement * (1.0 - self.agreement) / max(n, 1)) ** 0.5
        return agree >= self.agreement - 3.0 * sd - 1e-9

    def after_step(self, adapter, ctx: StepContext, mask: torch.Tensor, updated: bool) -> bool:
        return False

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        ref = state.get("reference")
        self.reference = None if ref is None else float(ref)
