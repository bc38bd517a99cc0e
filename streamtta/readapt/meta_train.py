"""Meta-OOD re-adaptation: a meta-learned initialisation of the adaptable parameters (MOL-style).

Offline, :func:`meta_train` learns an initialisation ``theta*`` of the parameters an online adapter
updates (norm affine ``weight``/``bias``, plus the parameters of a module named ``ood_head`` if the
model has one) with first-order MAML (or Reptile) over synthetic shift tasks built from source
data. A task is a corruption family and severity (``streamtta.simulations.corruptions.corrupt``):

* inner loop (what is available online): ``inner_steps`` SGD steps on the mean prediction entropy
  of an unlabelled *support* batch of corrupted source images;
* outer (query) loss at the adapted parameters: cross-entropy on a labelled *query* batch of the
  same task plus ``energy_weight`` times the energy-margin OOD loss of Liu et al. (2020),
  ``relu(E(x_in) - m_in)^2 + relu(m_out - E(x_out))^2``, on synthetic outliers (pixel- and
  patch-shuffled copies of the query images, or ``outlier_x`` when given).

Norm layers use test-batch statistics during meta-training (as at test time), without touching
the stored running statistics. The result is saved next to the source checkpoint
(``digits-resnet.pt`` -> ``digits-resnet.meta-init.pt``).
"""
from __future__ import annotations

import copy
import logging
import time
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



# meta-training
# ----------------------------------------------------------------------------------------------
def _meta_get(meta_info: Any, key: str, default: Any = None) -> Any:
    if meta_info is None:
        return default
    if isinstance(meta_info, Mapping):
        return meta_info.get(key, default)
    return getattr(meta_info, key, default)


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
    x_all = torch.as_tensor(np.asarray(source_x) if not isinstance(source_x, torch.Tensor) else source_x).float()
    y_all = torch.as_tensor(np.asarray(source_y) if not isinstance(source_y, torch.Tensor) else source_y).long()
    if len(x_all) != len(y_all) or len(x_all) < 2:
        raise ValueError(f"need at least 2 source samples with one label each, got {len(x_all)} and {len(y_all)}")
    n_cls = _meta_get(meta_info, "num_classes")
    if n_cls is not None and (int(y_all.min()) < 0 or int(y_all.max()) >= int(n_cls)):
        raise ValueError(f"source_y must be output indices in [0, {n_cls}), got range "
                         f"[{int(y_all.min())}, {int(y_all.max())}]")
    if corrupt_fn is None or families is None:
        default_fn, default_fams = _default_corrupt()
        corrupt_fn = corrupt_fn or default_fn
        families = tuple(families or default_fams)
    families = tuple(families)
    if not families:
        raise ValueError("families must name at least one corruption")
    x_out_all = None if outlier_x is None else torch.as_tensor(np.asarray(outlier_x)).float()

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

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    with torch.no_grad(), batch_stat_norms(net):
        e_src = torch.cat([energy(_logits(net(x_all[i:i + 256]))) for i in range(0, min(len(x_all), 1024), 256)])
    m_in = float(e_src.median()) if m_in is None else float(m_in)
    m_out = float(m_in + max(2.0, 2.0 * float(e_src.std()))) if m_out is None else float(m_out)

    opt = torch.optim.Adam(theta, lr=outer_lr) if algorithm == "fomaml" else None
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    n = len(x_all)
    for step in range(steps):
        start = [p.detach().clone() for p in theta]
        grads = [torch.zeros_like(p) for p in theta]
        deltas = [torch.zeros_like(p) for p in theta]
        stats = {"inner": 0.0, "ce": 0.0, "energy": 0.0}
        for _ in range(tasks_per_step):
            fam = families[int(rng.integers(len(families)))]
            sev = int(severities[int(rng.integers(len(severities)))])
            idx = torch.randperm(n, generator=gen)
            s_idx, q_idx = idx[:min(support_size, n // 2)], idx[min(support_size, n // 2):][:query_size]
            task_seed = int(rng.integers(2**31 - 1))
            xs = torch.from_numpy(corrupt_fn(x_all[s_idx].numpy(), fam, sev, task_seed))
            xq = torch.from_numpy(corrupt_fn(x_all[q_idx].numpy(), fam, sev, task_seed + 1))
            yq = y_all[q_idx]
            if x_out_all is not None:
                o_idx = torch.randint(len(x_out_all), (len(q_idx),), generator=gen)
                xo = torch.from_numpy(corrupt_fn(x_out_all[o_idx].numpy(), fam, sev, task_seed + 2))
            else:
                xo = shuffled_outliers(xq, gen)
            with torch.no_grad():
                for p, s in zip(theta, start):
                    p.copy_(s)
            with batch_stat_norms(net):
                for _ in range(inner_steps):  # inner loop: unsupervised entropy on the support set
                    loss_in = entropy(_logits(net(xs))).mean()
                    g = torch.autograd.grad(loss_in, theta)
                    with torch.no_grad():
                        for p, gi in zip(theta, g):
                            p.sub_(inner_lr * gi)
                    stats["inner"] += float(loss_in.detach()) / (inner_steps * tasks_per_step)
                logits_q = _logits(net(torch.cat([xq, xo])))
            lq, lo = logits_q[: len(xq)], logits_q[len(xq):]
            ce = F.cross_entropy(lq, yq)
            e_loss = (F.relu(energy(lq) - m_in) ** 2).mean() + (F.relu(m_out - energy(lo)) ** 2).mean()
            loss_q = ce + energy_weight * e_loss
            stats["ce"] += float(ce.detach()) / tasks_per_step
            stats["energy"] += float(e_loss.detach()) / tasks_per_step
            if algorithm == "fomaml":
                g = torch.autograd.grad(loss_q, theta)
                for acc, gi in zip(grads, g):
                    acc.add_(gi / tasks_per_step)
            else:  # reptile: one supervised step on the query, then move towards the task solution
                g = torch.autograd.grad(loss_q, theta)
                with torch.no_grad():
                    for p, gi, d, s in zip(theta, g, deltas, start):
                        d.add_((p - inner_lr * gi - s) / tasks_per_step)
        with torch.no_grad():
            for p, s in zip(theta, start):
                p.copy_(s)
        if algorithm == "fomaml":
            opt.zero_grad(set_to_none=False)
            for p, gacc in zip(theta, grads):
                p.grad = gacc
            opt.step()
        else:
            with torch.no_grad():
                for p, d in zip(theta, deltas):
                    p.add_(outer_lr * d)
        history.append(stats)
        if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log.info("meta-train step %d/%d: inner entropy %.3f, query CE %.3f, energy loss %.3f (%.1fs)",
                     step + 1, steps, stats["inner"], stats["ce"], stats["energy"], time.perf_counter() - t0)
            print(f"meta-train {step + 1}/{steps}: inner entropy {stats['inner']:.3f}  query CE {stats['ce']:.3f}  "
                  f"energy loss {stats['energy']:.3f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    meta_train.last_history = history  # type: ignore[attr-defined]
    return {n: params[n].detach().clone() for n in names}


# ----------------------------------------------------------------------------------------------
# files


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


# ----------------------------------------------------------------------------------------------
# online re-adaptation
