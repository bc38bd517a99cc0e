"""Per-stream shift detection in grouped mode: a fleet whose ids each switch domain once.

:func:`switch_fleet` builds the fleet: id ``k`` sends ``per_domain`` samples of the scenario's domain
``k mod D``, then ``per_domain`` of domain ``(k + 3) mod D`` (its own change point is its sample
``per_domain``); the ids are interleaved at random. :func:`evaluate` runs it through a
:class:`~streamtta.grouped.GroupedPipeline` in batches and counts, per id, whether a ``covariate_shift``
alert came after its switch (detected, with the delay in its own samples) or before (a false alarm), and the
accuracy overall, on each id's first 30 samples after its switch and on the rest.

``python -m streamtta.simulations.switch_fleet --seed 0`` runs it on ``digits-c-iid`` (100 ids) with the
per-stream detectors on and off (the figures of the README's "Many streams").

>>> from streamtta.simulations.scenario import Scenario, build_stream
>>> sc = Scenario(name="demo", dataset="digits-c", model="digits-resnet", domains=["fog", "contrast"],
...               samples_per_domain=40, known_classes=list(range(8)))
>>> ids, x, y = switch_fleet(build_stream(sc, seed=0), streams=4, per_domain=10, seed=0)
>>> x.shape, sorted(set(k for k, _ in ids)), max(j for _, j in ids)
((80, 1, 32, 32), [0, 1, 2, 3], 19)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["evaluate", "switch_fleet"]


def switch_fleet(stream: Any, *, streams: int = 100, per_domain: int = 100, seed: int = 0
                 ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """``(arrivals, x, y)``: ``arrivals[i] = (id, its sample index)`` in arrival order, inputs and labels."""
    by_dom: dict[Any, list[Any]] = {}
    for s in stream.iter_samples():
        by_dom.setdefault(s.domain, []).append(s)
    doms = list(by_dom)
    rng = np.random.default_rng(seed)
    seqs = []
    for k in range(streams):
        a, b = doms[k % len(doms)], doms[(k + 3) % len(doms)]
        pa = rng.choice(len(by_dom[a]), per_domain, replace=False)
        pb = rng.choice(len(by_dom[b]), per_domain, replace=False)
        seqs.append([by_dom[a][i] for i in pa] + [by_dom[b][i] for i in pb])
    order = np.repeat(np.arange(streams), 2 * per_domain)
    rng.shuffle(order)
    nxt = [0] * streams
    arrivals = []
    for k in order.tolist():
        arrivals.append((k, nxt[k]))
        nxt[k] += 1
    x = np.stack([seqs[k][j].x for k, j in arrivals]).astype(np.float32)
    y = np.array([seqs[k][j].label for k, j in arrivals])
    return arrivals, x, y


def evaluate(group: Any, arrivals: list[tuple[int, int]], x: np.ndarray, y: np.ndarray, *, per_domain: int = 100,
             batch_size: int = 64) -> dict[str, Any]:
    """Run the fleet through ``group`` (a fresh :class:`~streamtta.grouped.GroupedPipeline`); the figures."""
    preds = np.empty(len(x), int)
    first_hit: dict[int, int] = {}
    false_alarms = semantic = 0
    for s in range(0, len(x), batch_size):
        res = group.process(torch.from_numpy(x[s:s + batch_size]),
                            stream_ids=[f"id{k}" for k, _ in arrivals[s:s + batch_size]])
        preds[s:s + batch_size] = res.predictions
        for a in res.alerts:
            if a.kind.value != "covariate_shift":
                semantic += 1
                continue
            k, j = arrivals[a.offsets.first]
            if j < per_domain:
                false_alarms += 1
            else:
                first_hit.setdefault(k, j - per_domain)
    j = np.array([j for _, j in arrivals])
    after = (j >= per_domain) & (j < per_domain + 30)
    later = j >= per_domain + 30
    delays = list(first_hit.values())
    pct = lambda m: round(100.0 * float((preds[m] == y[m]).mean()), 2)  # noqa: E731
    return {"streams": len({k for k, _ in arrivals}), "detected": len(first_hit),
            "delay_median": float(np.median(delays)) if delays else None, "false_alarms": false_alarms,
            "semantic_alerts": semantic, "acc": pct(np.ones(len(x), bool)), "acc_first_30_after": pct(after),
            "acc_later": pct(later)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from streamtta.config import load_config
    from streamtta.grouped import GroupedPipeline
    from streamtta.runner import build_pipeline
    from streamtta.simulations.scenario import build_stream, load_scenario

    p = argparse.ArgumentParser(prog="python -m streamtta.simulations.switch_fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="simulations/digits-c-iid.toml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streams", type=int, default=100)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    sc = load_scenario(a.scenario)
    arrivals, x, y = switch_fleet(build_stream(sc, a.seed), streams=a.streams, seed=a.seed)
    for label, monitor in (("detectors off", False), ("detectors on (defaults)", True)):
        cfg = load_config(overrides={"model": {"source": sc.model, "threads": 1}, "engine": {"state_key": "stream_id"},
                                     "grouped": {"enabled": True}, "monitor": {"enabled": monitor}}, env=False)
        r = evaluate(GroupedPipeline.from_pipeline(build_pipeline(cfg)), arrivals, x, y)
        print(json.dumps({"run": label, "seed": a.seed, **r}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
