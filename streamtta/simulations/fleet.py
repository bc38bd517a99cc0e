"""A fleet: one scenario stream spread over many stream ids, each id seeing one domain.

A live deployment rarely has one stream: a plant has hundreds of sensors, a city thousands of cameras,
each with its own miscalibration, lens or weather. :class:`FleetStream` turns any scenario stream into
such a fleet: ``streams`` stream ids, id ``k`` assigned to the ``k``-th domain of the scenario (round
robin), a domain's samples dealt in turn to its ids (each id keeps them in their order), and the ids
interleaved at random, so one consumed batch holds samples of many ids and many domains. An adapter that
keeps one state for the whole partition sees a mixture of domains; one that keeps a state per stream id
(``engine.state_key = "stream_id"``, with ``grouped.enabled`` for thousands of ids) sees one domain each.

``streamtta bench SCENARIO --streams N`` runs any scenario as a fleet of ``N`` ids. The fleet has no
global change points (each id stays in its domain), and ``reset_each_domain`` does not apply to it.

>>> from streamtta.simulations.scenario import Scenario, build_stream
>>> sc = Scenario(name="demo", dataset="digits-c", model="digits-resnet", domains=["fog", "contrast"],
...               samples_per_domain=20, known_classes=list(range(8)))
>>> fleet = FleetStream(build_stream(sc, seed=0), streams=4, seed=0)
>>> len(fleet), len({s.stream_id for s in fleet.iter_samples()})
(40, 4)
>>> sorted({(s.stream_id, s.domain) for s in fleet.iter_samples()})[:2]
[('demo:0/s0000', 'fog'), ('demo:0/s0001', 'contrast')]
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from streamtta.types import Sample

__all__ = ["FleetStream"]


class FleetStream:
    """``stream`` (a :class:`~streamtta.simulations.scenario.SimStream`) as ``streams`` interleaved stream
    ids (see the module docstring); ``seed`` draws the interleaving. The samples are rendered once."""

    #: the engine must not reset per domain: the domains are interleaved
    interleaved = True

    def __init__(self, stream: Any, streams: int, seed: int = 0) -> None:
        if streams < 1:
            raise ValueError(f"a fleet needs at least one stream id, got {streams}")
        self.base, self.streams, self.seed = stream, int(streams), int(seed)
        samples = list(stream.iter_samples())
        domains = list(dict.fromkeys(s.domain for s in samples))
        width = max(4, len(str(self.streams - 1)))

        def name(k: int) -> str:
            return f"{stream.stream_id}/s{k:0{width}d}"

        by_domain: dict[Any, list[int]] = {d: [k for k in range(self.streams) if k % len(domains) == i]
                                           for i, d in enumerate(domains)}
        queues: list[list[Sample]] = [[] for _ in range(self.streams)]
        dealt: dict[Any, int] = {d: 0 for d in domains}
        for s in samples:
            ids = by_domain[s.domain]
            if not ids:  # more domains than stream ids: the domain goes to the ids round robin
                ids = [domains.index(s.domain) % self.streams]
            k = ids[dealt[s.domain] % len(ids)]
            dealt[s.domain] += 1
            queues[k].append(replace(s, stream_id=name(k)))
        order = np.repeat(np.arange(self.streams), [len(q) for q in queues])
        np.random.default_rng(seed).shuffle(order)
        nxt = [0] * self.streams
        self._samples: list[Sample] = []
        for k in order.tolist():
            self._samples.append(queues[k][nxt[k]])
            nxt[k] += 1
        self.stream_id = stream.stream_id
        #: the domain of every stream id (None: an id that got no sample)
        self.domain_of = {name(k): q[0].domain if q else None for k, q in enumerate(queues)}

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def change_points(self) -> list[int]:
        """None: every id stays in its domain."""
        return []

    def iter_samples(self, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        yield from self._samples[start:stop]

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def describe(self) -> dict[str, Any]:
        """The base stream's description plus the fleet's ids and seed."""
        ids = [k for k, v in self.domain_of.items() if v is not None]
        return {**self.base.describe(), "fleet": {"streams": self.streams, "active_ids": len(ids), "seed": self.seed,
                                                   "assignment": "id k -> k-th domain (round robin)"}}

    def __repr__(self) -> str:
        return f"FleetStream({self.stream_id!r}, n={len(self)}, streams={self.streams})"
