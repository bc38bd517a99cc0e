"""Aggregation of bench results over seeds: mean and sample standard deviation per metric."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    a = np.asarray(vals, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size >= 2 else None)


def _metric_stats(rs: list[Mapping[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None],
                                                       dict[str, int]]:
    """Mean, std and number of seeds with a value, per numeric metric of one group's results."""
    names = list(dict.fromkeys(k for r in rs for k in r["metrics"]))
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    cnt: dict[str, int] = {}
    for k in names:
        vals = [float(r["metrics"][k]) for r in rs if _is_num(r["metrics"].get(k))]
        if not vals and any(r["metrics"].get(k) is not None for r in rs):
            continue  # non-numeric metric (e.g. a string): not aggregated
        mean[k], std[k] = _mean_std(vals)
        cnt[k] = len(vals)
    return mean, std, cnt


def _per_domain_means(rs: list[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean per domain and metric over one group's results."""
    pdm: dict[str, dict[str, float | None]] = {}
    doms = list(dict.fromkeys(d for r in rs for d in (r.get("per_domain") or {})))
    for d in doms:
        keys = list(dict.fromkeys(k for r in rs for k in (r.get("per_domain") or {}).get(d, {})))
        pdm[d] = {}
        for k in keys:
            vals = [float(r["per_domain"][d][k]) for r in rs
                    if d in (r.get("per_domain") or {}) and _is_num(r["per_domain"][d].get(k))]
            pdm[d][k] = _mean_std(vals)[0]
    return pdm


def aggregate(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of every numeric metric, per ``(scenario, method)``.

    Groups keep the order in which they first appear. ``None``/NaN values are skipped (``metrics_n``
    counts the seeds that had a value); ``metrics_std`` is ``None`` with fewer than two values.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in results:
        missing = [k for k in ("scenario", "method", "metrics") if k not in r]
        if missing:
            raise ValueError(f"result entry is missing {missing}: {sorted(r)}")
        groups.setdefault((str(r["scenario"]), str(r["method"])), []).append(r)
    out: list[dict[str, Any]] = []
    for (scen, meth), rs in groups.items():
        mean, std, cnt = _metric_stats(rs)
        out.append({
            "scenario": scen,
            "method": meth,
            "n_seeds": len(rs),
            "seeds": [r.get("seed") for r in rs],
            "metrics_mean": mean,
            "metrics_std": std,
            "metrics_n": cnt,
            "per_domain_mean": _per_domain_means(rs),
        })
    return out
