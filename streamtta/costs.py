"""Compute costs of adapters and scorers: ``streamtta bench SCENARIO --cost``.

For every method (adapter spec) and scorer, on the same batches of a scenario's stream, three timings
per batch, each the median over batches and repeats, in milliseconds:

* ``forward_ms``: the plain source model (``eval()``, ``no_grad``, stock BatchNorm with source
  statistics) on the batch; the yardstick;
* ``step_ms``: ``Adapter.step(x)``: the method's whole online step (its norm layers, forward passes,
  backward pass and optimizer step where it has them, filters, guards);
* ``scoring_ms``: what the engine adds per batch for open-set work, with the engine's own code
  (:meth:`~streamtta.pipeline.Pipeline.step`'s scoring + :meth:`~streamtta.pipeline.Pipeline.learn_scores`):
  the scorer and the adaptation gate scorer, flags and online (prototype-memory) updates.

Ratios: ``step_ratio = step_ms / forward_ms`` and ``scoring_share = scoring_ms / step_ms`` (percent).
For a norm-only spec (``bn``, ``unmix-tns``, ``rbn``) the step *is* a forward pass with that norm, so
``step_ratio - 1`` is the norm layer's overhead over plain BatchNorm.

Measured in one process, one method after the other, batches in stream order, after
``warmup`` untimed batches, the plain forward interleaved with the step on each batch; torch's thread count is printed
with the table (set it with ``--set model.threads=N``). Figures vary by machine; compare rows of one table.

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
...                     nn.Flatten(), nn.Linear(4, 3)).eval()
>>> x = torch.rand(64, 1, 8, 8)
>>> t = time_batches(lambda b: net(b), x, batch_size=16, warmup=1)
>>> len(t), all(v > 0 for v in t)
(3, True)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from streamtta.config import Config


def time_batches(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_size: int, warmup: int = 2,
                 repeats: int = 1) -> list[float]:
    """Seconds of ``fn(batch)`` for every batch of ``x`` after the first ``warmup`` ones (repeated)."""
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    for b in batches[:warmup]:
        fn(b)
    out = []
    for _ in range(repeats):
        for b in batches[warmup:]:
            t0 = time.perf_counter()
            fn(b)
            out.append(time.perf_counter() - t0)
    return out


def measure_costs(cfgs: Sequence[tuple[str, Config]], methods: Sequence[str], model: torch.nn.Module, meta: Any,
                  x: np.ndarray, *, batch_size: int, warmup: int = 2, repeats: int = 2) -> list[dict[str, Any]]:
    """One row per (variant, method): medians in ms and the ratios described in the module docstring.

    The plain forward pass is timed on each batch right before the method's step on the same batch
    (interleaved), so a busy machine slows both alike and the ratio stays meaningful.
    """
    from streamtta.runner import build_pipeline

    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    model = model.eval()
    rows: list[dict[str, Any]] = []
    for label, base in cfgs:
        for method in methods:
            cfg = base.model_copy(deep=True)
            cfg.adapter.spec = method
            pipe = build_pipeline(cfg, model, meta)
            st = pipe.parts
            outs: list[Any] = []
            fwd_t: list[float] = []

            def step(b: torch.Tensor, st: Any = st, outs: list[Any] = outs, fwd_t: list[float] = fwd_t) -> None:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    model(b)
                    fwd_t.append(time.perf_counter() - t0)
                outs.append(st.adapter.step(b))

            step_t = time_batches(step, xt, batch_size, warmup, repeats)  # includes the forward: subtract
            step_t = [s - f for s, f in zip(step_t, fwd_t[warmup:])]
            score_t = []
            for out in outs[warmup:]:
                t0 = time.perf_counter()
                _, _, keep = pipe.score(out.features, out.logits)
                pipe.learn_scores(out.features, out.logits, keep)
                score_t.append(time.perf_counter() - t0)
            fwd_ms = 1e3 * float(np.median(fwd_t[warmup:]))
            step_ms, score_ms = 1e3 * float(np.median(step_t)), 1e3 * float(np.median(score_t))
            rows.append({"method": f"{method} ({label})" if label else method, "spec": pipe.blueprint.spec,
                         "scorer": pipe.blueprint.scorer_name, "batch_size": batch_size, "n_batches": len(step_t),
                         "forward_ms": round(fwd_ms, 3), "step_ms": round(step_ms, 3),
                         "scoring_ms": round(score_ms, 3), "step_ratio": round(step_ms / fwd_ms, 3),
                         "scoring_share_pct": round(100 * score_ms / step_ms, 2)})
    return rows


def print_cost_table(rows: Sequence[dict[str, Any]], console: Any = None, title: str = "streamtta bench --cost") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{title} (torch threads: {torch.get_num_threads()})")
    for col in ("Method", "Scorer", "forward ms", "step ms", "step / forward", "scoring ms", "scoring / step %"):
        t.add_column(col, justify="left" if col in ("Method", "Scorer") else "right")
    for r in rows:
        t.add_row(r["method"], r["scorer"], f"{r['forward_ms']:.2f}", f"{r['step_ms']:.2f}", f"{r['step_ratio']:.2f}x",
                  f"{r['scoring_ms']:.2f}", f"{r['scoring_share_pct']:.1f}")
    (console or Console()).print(t)


def cost_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The cost table as GitHub markdown (README).

    >>> print(cost_markdown([{"method": "bn", "scorer": "energy", "forward_ms": 1.0, "step_ms": 1.2,
    ...     "step_ratio": 1.2, "scoring_ms": 0.1, "scoring_share_pct": 8.3}]).splitlines()[2])
    | bn | energy | 1.00 | 1.20 | 1.20x | 0.10 | 8.3 |
    """
    lines = ["| Method | Scorer | forward ms | step ms | step / forward | scoring ms | scoring / step % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['scorer']} | {r['forward_ms']:.2f} | {r['step_ms']:.2f} | "
                     f"{r['step_ratio']:.2f}x | {r['scoring_ms']:.2f} | {r['scoring_share_pct']:.1f} |")
    return "\n".join(lines) + "\n"
