"""The simulated stream: :class:`SimStream` (plan drawn up front, inputs rendered lazily) and :func:`build_stream`."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamtta.types import Sample

from ..orderings import make_order
from ..schedules import Schedule, ood_mask
from .files import find_scenario
from .providers import EXTERNAL, HELDOUT, KNOWN, _Provider, build_provider
from .spec import Scenario

DEFAULT_CHUNK = 1024


def _epoch_draw(pool_size: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` indices from ``range(pool_size)``: whole random permutations back to back, the last cut."""
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if pool_size == 0:
        raise ValueError("cannot draw samples from an empty pool (no test samples of the requested classes)")
    reps = -(-m // pool_size)
    return np.concatenate([rng.permutation(pool_size) for _ in range(reps)])[:m].astype(np.int64)


def _int_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SimStream:
    """A replayable simulated stream; build it with :func:`build_stream`.

    Per-sample ground truth is available up front as arrays (``labels``, ``domains``, ``severities``,
    ``is_unknown``); the inputs are generated lazily by :meth:`iter_samples` / :meth:`materialize`.
    ``labels`` holds the true class (unknown digits keep their digit, ``is_unknown`` marks them);
    ``-1`` only for synthetic OOD inputs that have no class (their ``Sample.label`` is ``None``).
    """

    def __init__(self, scenario: Scenario, seed: int, provider: _Provider, schedule: Schedule,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self.scenario, self.seed, self.provider, self.schedule = scenario, int(seed), provider, schedule
        self.chunk_size = int(chunk_size)
        self.stream_id = f"{scenario.name}:{self.seed}"
        n = len(schedule)
        self.conditions, self.cond_id, self.segment_id = schedule.assign(self.seed)
        ood = scenario.ood
        self.is_unknown = ood_mask(n, ood.ratio, self.seed, ood.start, ood.stop) if ood.ratio > 0 else np.zeros(n, bool)
        self.pool = np.where(self.is_unknown, HELDOUT if ood.source == "heldout" else EXTERNAL, KNOWN).astype(np.int64)
        self.base = np.zeros(n, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xBA5E]))
        known_labels = provider.pool_labels[KNOWN]
        order = scenario.ordering
        starts = schedule.starts() + [n]
        for k in range(len(schedule.segments)):
            lo, hi = starts[k], starts[k + 1]
            pos = lo + np.flatnonzero(~self.is_unknown[lo:hi])
            drawn = _epoch_draw(len(known_labels), len(pos), rng)
            perm = make_order(known_labels[drawn], order.kind, _int_seed(self.seed, 0x0DE, k), order.delta, order.num_chunks)
            self.base[pos] = drawn[perm]
        unk = np.flatnonzero(self.is_unknown)
        if len(unk):
            upool = int(self.pool[unk[0]])
            self.base[unk] = _epoch_draw(len(provider.pool_labels[upool]), len(unk), rng)
        self.labels = np.empty(n, dtype=np.int64)
        for p in (KNOWN, HELDOUT, EXTERNAL):
            sel = self.pool == p
            if sel.any():
                self.labels[sel] = provider.pool_labels[p][self.base[sel]]
        dom_names = [c[0] for c in self.conditions]
        self.severities = np.array([c[1] for c in self.conditions], dtype=np.int64)[self.cond_id]
        self.domains: list[str] = [dom_names[i] for i in self.cond_id.tolist()]
        for a in (self.cond_id, self.segment_id, self.is_unknown, self.pool, self.base, self.labels, self.severities):
            a.setflags(write=False)

    # -- ground truth ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cond_id)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.provider.sample_shape)

    @property
    def domain_names(self) -> list[str]:
        """Distinct domains in order of first appearance."""
        return list(dict.fromkeys(c[0] for c in self.conditions))

    @property
    def segment_starts(self) -> list[int]:
        """First index of every schedule segment (where ``reset_each_domain`` resets)."""
        return [s for s, seg in zip(self.schedule.starts(), self.schedule.segments) if seg.n > 0]

    def shifts(self) -> list[dict[str, Any]]:
        """Every scheduled shift: covariate (domain change) and semantic (unknowns start / stop)."""
        out = self.schedule.shifts()
        ood, n = self.scenario.ood, len(self)
        if ood.ratio > 0:
            if 0 < ood.start < n:
                out.append({"index": ood.start, "kind": "semantic", "from": "known", "to": f"unknown:{ood.source}@{ood.ratio}",
                            "transition": "abrupt", "length": 0})
            if ood.stop is not None and ood.stop < n:
                out.append({"index": ood.stop, "kind": "semantic", "from": f"unknown:{ood.source}@{ood.ratio}", "to": "known",
                            "transition": "abrupt", "length": 0})
        return sorted(out, key=lambda d: d["index"])

    @property
    def change_points(self) -> list[int]:
        """Sample indices where a scheduled shift (covariate or semantic) begins."""
        return sorted({s["index"] for s in self.shifts()})

    def fingerprint(self) -> str:
        """SHA-256 of the stream plan (which input, condition and unknown flag at every position)."""
        h = hashlib.sha256()
        for a in (self.cond_id, self.pool, self.base, self.labels, self.is_unknown.astype(np.int8)):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([list(c) for c in self.conditions]).encode())
        h.update(str(self.chunk_size).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: scenario, seed, schedule, shifts, counts and a plan fingerprint."""
        lab = self.labels[~self.is_unknown]
        return {
            "stream_id": self.stream_id,
            "name": self.scenario.name,
            "seed": self.seed,
            "dataset": self.scenario.dataset,
            "model": self.scenario.model,
            "n_samples": len(self),
            "sample_shape": list(self.sample_shape),
            "scenario": self.scenario.model_dump(mode="json"),
            "schedule": self.schedule.to_dict(),
            "segment_starts": self.segment_starts,
            "change_points": self.change_points,
            "shifts": self.shifts(),
            "domain_counts": dict(Counter(self.domains)),
            "n_unknown": int(self.is_unknown.sum()),
            "known_class_counts": {str(k): int(v) for k, v in sorted(Counter(lab.tolist()).items())},
            "data": self.provider.describe(),
            "chunk_size": self.chunk_size,
            "fingerprint": self.fingerprint(),
        }

    # -- inputs ------------------------------------------------------------------------------------
    def _render_chunk(self, c: int) -> np.ndarray:
        lo, hi = c * self.chunk_size, min(len(self), (c + 1) * self.chunk_size)
        out = np.empty((hi - lo,) + self.sample_shape, dtype=np.float32)
        keys = self.cond_id[lo:hi] * 3 + self.pool[lo:hi]
        for key in np.unique(keys).tolist():
            sel = np.flatnonzero(keys == key)
            cid, pool = divmod(int(key), 3)
            out[sel] = self.provider.render(
                self.conditions[cid], pool, self.base[lo + sel],
                np.random.SeedSequence([self.seed, 0xD0, cid]),
                np.random.SeedSequence([self.seed, 0x5A, c, cid, pool]),
            )
        return out

    def iter_chunks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_index, x)`` blocks (generation chunks clipped to ``[start, stop)``)."""
        n = len(self)
        stop = n if stop is None else max(0, min(int(stop), n))
        start = max(0, int(start))
        if start >= stop:
            return
        for c in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            lo = c * self.chunk_size
            x = self._render_chunk(c)
            a, b = max(start, lo) - lo, min(stop, lo + len(x)) - lo
            yield lo + a, x[a:b]

    def materialize(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of positions ``[start, stop)`` as arrays (same values as :meth:`iter_samples`)."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        parts = [x for _, x in self.iter_chunks(start, stop)]
        x = np.concatenate(parts) if parts else np.zeros((0,) + self.sample_shape, dtype=np.float32)
        return x, self.labels[start:stop].copy()

    def iter_samples(self, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Yield one :class:`~streamtta.types.Sample` per position, generated lazily chunk by chunk."""
        for lo, x in self.iter_chunks(start, stop):
            for j in range(len(x)):
                t = lo + j
                label = int(self.labels[t])
                yield Sample(
                    x=x[j], stream_id=self.stream_id, label=label if label >= 0 else None,
                    event_time=float(t), domain=self.domains[t], is_unknown=bool(self.is_unknown[t]),
                    meta={"index": t, "severity": int(self.severities[t]), "segment": int(self.segment_id[t])},
                )

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def __repr__(self) -> str:
        return f"SimStream({self.stream_id!r}, n={len(self)}, domains={len(self.domain_names)}, change_points={len(self.change_points)})"


def build_stream(scenario: Scenario | str | os.PathLike[str], seed: int | None = None, data_dir: str | os.PathLike[str] | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> SimStream:
    """Build the stream of ``scenario`` (a :class:`Scenario`, a TOML path or a built-in name).

    ``seed`` defaults to ``scenario.seed``; ``data_dir`` overrides ``scenario.data_dir`` (CIFAR-C,
    also read from ``$STREAMTTA_DATA_DIR``). The noise drawn for a sample depends on ``chunk_size``,
    so keep the default to reproduce a recorded stream.
    """
    sc = scenario if isinstance(scenario, Scenario) else find_scenario(scenario)
    seed = sc.seed if seed is None else int(seed)
    provider = build_provider(sc, seed, data_dir)
    return SimStream(sc, seed, provider, sc.schedule(), chunk_size)
