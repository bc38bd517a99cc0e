"""Meta-OOD re-adaptation: a meta-learned initialisation of the adaptable parameters (MOL-style).

Offline, :func:`meta_train` learns an initialisation ``theta*`` of the parameters an online adapter
updates (norm affine ``weight``/``bias``, plus the parameters of a module named ``ood_head`` if the
model has one) with first-order MAML (or Reptile) over synthetic shift tasks built from source
data. A task is a corruption family and severity (``streamtta.simulations.corruptions.corrupt``):

* inner loop (what is available online): ``inner_steps`` SGD steps on the mean prediction entropy
  of an unlabelled *support* batch of corrupted source images;
* outer (query) loss at the adapted parameters: cross-entropy on a labelled *query* batch of the
  same task plus ``energy_weight`` times the energy-margin OOD loss of Liu et al. (2020),
  ``relu(E(x_in) - m_in)^2 + relu(m_out - E(x_out))^2``, on synthetic outliers (pixel- and patch-shuffled
  copies of the query images, or ``outlier_x``) that are a minority ``outlier_fraction`` of their batch.

Norm layers use test-batch statistics during meta-training (as at test time), without touching
the stored running statistics. The result is saved next to the source checkpoint
(``digits-resnet.pt`` -> ``digits-resnet.meta-init.pt``).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamtta.readapt.meta_init import meta_init_path, resolve_checkpoint, save_meta_init
from streamtta.readapt.params import _logits, adaptable_parameter_names, batch_stat_norms, energy, entropy

log = logging.getLogger("streamtta.readapt.meta_train")

CorruptFn = Callable[[np.ndarray, str, int, int], np.ndarray]


# synthetic outliers and tasks
# ----------------------------------------------------------------------------------------------
def shuffled_outliers(x: torch.Tensor, generator: torch.Generator, patch: int = 4) -> torch.Tensor:
    """Half pixel-shuffled, half patch-shuffled copies of images ``x`` (B, C, H, W).

    They keep the intensity statistics of the inputs but destroy their shape: OOD by construction.
    """
    b, c, h, w = x.shape
    out = x.clone()
    half = b // 2
    for i in range(half):  # pixel shuffle (same permutation for every channel)
        perm = torch.randperm(h * w, generator=generator)
        out[i] = x[i].reshape(c, -1)[:, perm].reshape(c, h, w)
    if h % patch == 0 and w % patch == 0:
        gh, gw = h // patch, w // patch
        for i in range(half, b):
            tiles = x[i].reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, c, patch, patch)
            tiles = tiles[torch.randperm(gh * gw, generator=generator)]
            out[i] = tiles.reshape(gh, gw, c, patch, patch).permute(2, 0, 3, 1, 4).reshape(c, h, w)
    else:
        for i in range(half, b):
            perm = torch.randperm(h * w, generator=generator)
            out[i] = x[i].reshape(c, -1)[:, perm].reshape(c, h, w)
    return out


def _default_corrupt() -> tuple[CorruptFn, tuple[str, ...]]:
    from streamtta.simulations.corruptions import CORRUPTIONS, corrupt

    return corrupt, tuple(CORRUPTIONS)


@dataclass
class ShiftTask:
    """One synthetic shift task: a corruption family and severity applied to source batches."""

    family: str
    severity: int
    support: torch.Tensor  # unlabelled corrupted images the inner loop adapts on
    query: torch.Tensor  # labelled corrupted images of the outer loss
    labels: torch.Tensor  # labels of ``query``
    outliers: torch.Tensor  # OOD images of the energy loss, one per query image


class TaskSampler:
    """Draws :class:`ShiftTask` s from clean source data (seeded: the same seed gives the same tasks).

    The support and query batches are disjoint random parts of the source data; the outliers are
    corrupted ``outlier_x`` images when given, else :func:`shuffled_outliers` of the query images.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, corrupt_fn: CorruptFn, families: Sequence[str],
                 severities: Sequence[int], support_size: int, query_size: int, outlier_x: torch.Tensor | None,
                 seed: int) -> None:
        self.x, self.y, self.outlier_x = x, y, outlier_x
        self.corrupt_fn = corrupt_fn
        self.families, self.severities = tuple(families), tuple(severities)
        self.support_size, self.query_size = support_size, query_size
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> ShiftTask:
        fam = self.families[int(self.rng.integers(len(self.families)))]
        sev = int(self.severities[int(self.rng.integers(len(self.severities)))])
        n = len(self.x)
        idx = torch.randperm(n, generator=self.gen)
        n_support = min(self.support_size, n // 2)
        s_idx, q_idx = idx[:n_support], idx[n_support:][:self.query_size]
        task_seed = int(self.rng.integers(2**31 - 1))
        xs = torch.from_numpy(self.corrupt_fn(self.x[s_idx].numpy(), fam, sev, task_seed))
        xq = torch.from_numpy(self.corrupt_fn(self.x[q_idx].numpy(), fam, sev, task_seed + 1))
        if self.outlier_x is not None:
            o_idx = torch.randint(len(self.outlier_x), (len(q_idx),), generator=self.gen)
            xo = torch.from_numpy(self.corrupt_fn(self.outlier_x[o_idx].numpy(), fam, sev, task_seed + 2))
        else:
            xo = shuffled_outliers(xq, self.gen)
        return ShiftTask(fam, sev, xs, xq, self.y[q_idx], xo)


# meta-training
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaSettings:
    """The meta-training hyperparameters one outer step needs (see :func:`meta_train`)."""

    algorithm: str
    inner_steps: int
    inner_lr: float
    outer_lr: float
    tasks_per_step: int
    energy_weight: float
    m_in: float
    m_out: float
    outlier_fraction: float | None


def _meta_get(meta_info: Any, key: str, default: Any = None) -> Any:
    if meta_info is None:
        return default
    if isinstance(meta_info, Mapping):
        return meta_info.get(key, default)
    return getattr(meta_info, key, default)


def _source_tensors(source_x: Any, source_y: Any, meta_info: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Source images as float and labels as long tensors, checked against ``meta_info.num_classes``."""
    x = torch.as_tensor(np.asarray(source_x) if not isinstance(source_x, torch.Tensor) else source_x).float()
    y = torch.as_tensor(np.asarray(source_y) if not isinstance(source_y, torch.Tensor) else source_y).long()
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need at least 2 source samples with one label each, got {len(x)} and {len(y)}")
    n_cls = _meta_get(meta_info, "num_classes")
    if n_cls is not None and (int(y.min()) < 0 or int(y.max()) >= int(n_cls)):
        raise ValueError(f"source_y must be output indices in [0, {n_cls}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return x, y


def _corruptions(corrupt_fn: CorruptFn | None, families: Sequence[str] | None) -> tuple[CorruptFn, tuple[str, ...]]:
    """The corruption function and families, streamtta's corruption library filling what is not given."""
    if corrupt_fn is None or families is None:
        default_fn, default_fams = _default_corrupt()
        corrupt_fn = corrupt_fn or default_fn
        families = tuple(families or default_fams)
    families = tuple(families)
    if not families:
        raise ValueError("families must name at least one corruption")
    return corrupt_fn, families


def _trainable_copy(model: nn.Module) -> tuple[nn.Module, list[str], list[nn.Parameter]]:
    """A deep copy of ``model`` in eval mode whose adaptable parameters alone require gradients."""
    net = copy.deepcopy(model)
    net.eval()
    names = adaptable_parameter_names(net)
    if not names:
        raise ValueError(f"{type(model).__name__} has no norm affine parameters to meta-learn")
    params = dict(net.named_parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    theta = [params[n] for n in names]
    for p in theta:
        p.requires_grad_(True)
    return net, names, theta


def energy_margins(net: nn.Module, x: torch.Tensor, m_in: float | None = None,
                   m_out: float | None = None) -> tuple[float, float]:
    """``(m_in, m_out)`` of the energy loss: by default the median energy of (up to 1024) clean source
    images and that plus ``max(2, 2 * std)``."""
    with torch.no_grad(), batch_stat_norms(net):
        e_src = torch.cat([energy(_logits(net(x[i:i + 256]))) for i in range(0, min(len(x), 1024), 256)])
    m_in = float(e_src.median()) if m_in is None else float(m_in)
    m_out = float(m_in + max(2.0, 2.0 * float(e_src.std()))) if m_out is None else float(m_out)
    return m_in, m_out


def inner_adapt(net: nn.Module, theta: Sequence[torch.Tensor], support: torch.Tensor, steps: int,
                lr: float) -> list[float]:
    """The inner loop: ``steps`` SGD steps on the mean prediction entropy of the unlabelled support
    batch (what is available online); returns the entropy before each step."""
    losses = []
    for _ in range(steps):
        loss = entropy(_logits(net(support))).mean()
        g = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            for p, gi in zip(theta, g):
                p.sub_(lr * gi)
        losses.append(float(loss.detach()))
    return losses


def query_loss(net: nn.Module, task: ShiftTask, m_in: float, m_out: float, energy_weight: float,
               outlier_fraction: float | None = None) -> tuple[torch.Tensor, float, float]:
    """The outer loss at the adapted parameters: cross-entropy on the labelled query batch plus
    ``energy_weight`` times the energy-margin loss ``relu(E(x_in) - m_in)^2 + relu(m_out - E(x_out))^2``;
    returns ``(loss, cross-entropy, energy loss)``. ``outlier_fraction=None``: one forward of query
    and outliers (test-batch statistics half outliers). ``f`` in (0, 1): the query alone for the
    cross-entropy and in-energy; the query plus ``round(f / (1 - f) * len(query))`` outliers (share ``f``,
    at most all) for the out-energy, as at test time where unknowns are a minority of a batch."""
    nq = len(task.query)
    if outlier_fraction is None:
        logits = _logits(net(torch.cat([task.query, task.outliers])))
        lq, lo = logits[:nq], logits[nq:]
    else:
        n_out = min(len(task.outliers), max(1, round(outlier_fraction / (1.0 - outlier_fraction) * nq)))
        lq = _logits(net(task.query))
        lo = _logits(net(torch.cat([task.query, task.outliers[:n_out]])))[nq:]
    ce = F.cross_entropy(lq, task.labels)
    e_loss = (F.relu(energy(lq) - m_in) ** 2).mean() + (F.relu(m_out - energy(lo)) ** 2).mean()
    return ce + energy_weight * e_loss, float(ce.detach()), float(e_loss.detach())


def _set_params(theta: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(theta, values):
            p.copy_(v)


def accumulate_task(loss: torch.Tensor, theta: Sequence[torch.Tensor], start: Sequence[torch.Tensor],
                    acc: Sequence[torch.Tensor], cfg: MetaSettings) -> None:
    """Add one task's share of the outer update to ``acc``: its query gradient (first-order MAML),
    or (Reptile) the move from ``start`` to the task solution after one more step on the query loss."""
    g = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        if cfg.algorithm == "fomaml":
            for a, gi in zip(acc, g):
                a.add_(gi / cfg.tasks_per_step)
        else:
            for p, gi, a, s in zip(theta, g, acc, start):
                a.add_((p - cfg.inner_lr * gi - s) / cfg.tasks_per_step)


def apply_update(theta: Sequence[torch.Tensor], acc: Sequence[torch.Tensor], cfg: MetaSettings,
                 opt: torch.optim.Optimizer | None) -> None:
    """The outer update from the accumulated task shares: an Adam step on the averaged query
    gradient (first-order MAML) or an interpolation step of rate ``outer_lr`` (Reptile)."""
    if cfg.algorithm == "fomaml":
        opt.zero_grad(set_to_none=False)
        for p, a in zip(theta, acc):
            p.grad = a
        opt.step()
    else:
        with torch.no_grad():
            for p, a in zip(theta, acc):
                p.add_(cfg.outer_lr * a)


def outer_step(net: nn.Module, theta: Sequence[torch.Tensor], tasks: TaskSampler, cfg: MetaSettings,
               opt: torch.optim.Optimizer | None) -> dict[str, float]:
    """One outer step over ``cfg.tasks_per_step`` tasks, each adapted from the same starting point;
    returns the mean inner entropy, query cross-entropy and energy loss."""
    start = [p.detach().clone() for p in theta]
    acc = [torch.zeros_like(p) for p in theta]
    stats = {"inner": 0.0, "ce": 0.0, "energy": 0.0}
    for _ in range(cfg.tasks_per_step):
        task = tasks.sample()
        _set_params(theta, start)
        with batch_stat_norms(net):
            for loss_in in inner_adapt(net, theta, task.support, cfg.inner_steps, cfg.inner_lr):
                stats["inner"] += loss_in / (cfg.inner_steps * cfg.tasks_per_step)
            loss_q, ce, e_loss = query_loss(net, task, cfg.m_in, cfg.m_out, cfg.energy_weight, cfg.outlier_fraction)
        stats["ce"] += ce / cfg.tasks_per_step
        stats["energy"] += e_loss / cfg.tasks_per_step
        accumulate_task(loss_q, theta, start, acc, cfg)
    _set_params(theta, start)
    apply_update(theta, acc, cfg, opt)
    return stats


def meta_train(
    model: nn.Module,
    meta_info: Any,
    source_x: Any,
    source_y: Any,
    *,
    outlier_x: Any | None = None,
    steps: int = 200,
    inner_steps: int = 1,
    inner_lr: float = 0.05,
    outer_lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    algorithm: str = "fomaml",
    tasks_per_step: int = 2,
    support_size: int = 64,
    query_size: int = 64,
    energy_weight: float = 0.1,
    m_in: float | None = None,
    m_out: float | None = None,
    outlier_fraction: float | None = 0.2,
    families: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corrupt_fn: CorruptFn | None = None,
) -> dict[str, torch.Tensor]:
    """Learn a meta-initialisation of the adaptable parameters; returns ``{name: tensor}``.

    Parameters
    ----------
    model
        Source classifier (not modified: a deep copy is trained).
    meta_info
        Model metadata (a :class:`~streamtta.models.checkpoint.ModelMeta`, a mapping or ``None``);
        only ``num_classes`` is read, for a sanity check of the labels.
    source_x, source_y
        Clean source images ``(N, C, H, W)`` in the model's input range and labels (model output
        indices).
    outlier_x
        Optional auxiliary outlier images (corrupted like the task); default: shuffled copies of
        the query images.
    steps, inner_steps, inner_lr, outer_lr
        Outer steps, inner entropy steps per task, inner SGD and outer Adam learning rates
        (Reptile: outer interpolation rate).
    algorithm
        ``"fomaml"`` (first-order MAML) or ``"reptile"``.
    tasks_per_step, support_size, query_size
        Tasks averaged per outer step and batch sizes.
    energy_weight, m_in, m_out
        Weight and margins of the energy OOD loss; margins default to the median clean-source
        energy and that plus ``max(2, 2 * std)``.
    outlier_fraction
        In (0, 1), default 0.2: cross-entropy on the query alone, out-energy on a batch where outliers are
        that share (``None``: one forward of query and outliers, as before; its init was ~2 points worse).
    families, severities
        Corruption families and severities tasks are drawn from (default: all of
        :data:`streamtta.simulations.corruptions.CORRUPTIONS`, severities 1-5).
    corrupt_fn
        ``corrupt(x, name, severity, seed)`` (default: streamtta's corruption library).
    """
    if algorithm not in ("fomaml", "reptile"):
        raise ValueError(f"algorithm must be 'fomaml' or 'reptile', got {algorithm!r}")
    if steps < 0 or inner_steps < 1 or tasks_per_step < 1:
        raise ValueError(f"need steps >= 0, inner_steps >= 1, tasks_per_step >= 1; got {steps}, {inner_steps}, "
                         f"{tasks_per_step}")
    if outlier_fraction is not None and not 0.0 < outlier_fraction < 1.0:
        raise ValueError(f"outlier_fraction must be None or in (0, 1), got {outlier_fraction}")
    x_all, y_all = _source_tensors(source_x, source_y, meta_info)
    corrupt_fn, families = _corruptions(corrupt_fn, families)
    x_out_all = None if outlier_x is None else torch.as_tensor(np.asarray(outlier_x)).float()
    net, names, theta = _trainable_copy(model)
    tasks = TaskSampler(x_all, y_all, corrupt_fn, families, severities, support_size, query_size, x_out_all, seed)
    m_in, m_out = energy_margins(net, x_all, m_in, m_out)
    cfg = MetaSettings(algorithm=algorithm, inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr,
                       tasks_per_step=tasks_per_step, energy_weight=energy_weight, m_in=m_in, m_out=m_out,
                       outlier_fraction=outlier_fraction)
    opt = torch.optim.Adam(theta, lr=outer_lr) if algorithm == "fomaml" else None
    t0 = time.perf_counter()
    for step in range(steps):
        stats = outer_step(net, theta, tasks, cfg, opt)
        if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            _report(step, steps, stats, time.perf_counter() - t0)
    return {n: p.detach().clone() for n, p in zip(names, theta)}


def _report(step: int, steps: int, stats: Mapping[str, float], seconds: float) -> None:
    log.info("meta-train step %d/%d: inner entropy %.3f, query CE %.3f, energy loss %.3f (%.1fs)",
             step + 1, steps, stats["inner"], stats["ce"], stats["energy"], seconds)
    print(f"meta-train {step + 1}/{steps}: inner entropy {stats['inner']:.3f}  query CE {stats['ce']:.3f}  "
          f"energy loss {stats['energy']:.3f}  ({seconds:.1f}s)", flush=True)


# command line
# ----------------------------------------------------------------------------------------------
def meta_train_cli(model_spec: str, *, steps: int = 200, seed: int = 0, out: str | Path | None = None,
                   progress: bool = True, **kw: Any) -> int:
    """``streamtta meta-train``: meta-train on the model's clean source split and save next to it."""
    from streamtta.models.data import load_source_train
    from streamtta.models.registry import load_model

    torch.manual_seed(seed)
    model, meta = load_model(model_spec)
    if meta is None:
        raise ValueError(f"model {model_spec!r} has no streamtta metadata: its source data are unknown")
    x, y = load_source_train(meta, as_index=True)
    t0 = time.perf_counter()
    init = meta_train(model, meta, x, y, steps=steps, seed=seed, progress=progress, **kw)
    path = Path(out) if out is not None else meta_init_path(resolve_checkpoint(model_spec))
    save_meta_init(init, path, info={"model": meta.name, "steps": steps, "seed": seed,
                                     "seconds": round(time.perf_counter() - t0, 2), **{k: str(v) for k, v in kw.items()}})
    print(f"meta-initialisation of {len(init)} tensors -> {path}")
    return 0
