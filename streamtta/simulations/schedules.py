"""Shift schedules as plain data: which domain and severity each stream position comes from.

A :class:`Schedule` is a sequence of :class:`Segment` objects. A segment has ``n`` samples drawn from
one or several *conditions* ``(domain, severity)`` (several = mixed domains, drawn uniformly per
sample) and an optional ``ramp``: over its first ``ramp`` samples the stream moves gradually from the
previous segment's conditions to the new ones (sample ``j`` is new with probability ``(j+1)/(ramp+1)``).
The index where a segment with different conditions begins is a *change point*: the sample index at
which a scheduled shift starts (for a ramp, the first sample of the ramp).

Builders cover the usual settings: :func:`continual` (domains in sequence, optionally cycled and with
a severity sequence such as :data:`GRADUAL_SEVERITIES`), :func:`mixed`, :func:`abrupt`. Unknown-class
injection is scheduled with :func:`ood_mask`.

>>> from streamtta.simulations.schedules import continual, GRADUAL_SEVERITIES
>>> s = continual(["fog", "contrast"], severity=5, samples_per_domain=100)
>>> len(s), s.change_points()
(200, [100])
>>> g = continual(["fog"], severity=GRADUAL_SEVERITIES, samples_per_domain=10)
>>> [seg.conditions[0][1] for seg in g.segments]
[1, 2, 3, 4, 5, 4, 3, 2, 1]
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Severity sequence of the "gradual" setting (mariodoebler): up to 5 and back down.
GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)

Condition = tuple[str, int]  # (domain name, severity); severity 0 for "clean"


@dataclass(frozen=True)
class Segment:
    """``n`` consecutive samples from ``conditions`` (uniform mixture when several)."""

    conditions: tuple[Condition, ...]
    n: int
    ramp: int = 0

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"segment length must be >= 0, got {self.n}")
        if not self.conditions:
            raise ValueError("a segment needs at least one (domain, severity) condition")
        if not 0 <= self.ramp <= self.n:
            raise ValueError(f"ramp must be in 0..n={self.n}, got {self.ramp}")

    @property
    def label(self) -> str:
        if len(self.conditions) == 1:
            d, s = self.conditions[0]
            return d if s == 0 else f"{d}@{s}"
        return "mixed(" + ",".join(d if s == 0 else f"{d}@{s}" for d, s in self.conditions) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"conditions": [[d, int(s)] for d, s in self.conditions], "n": int(self.n), "ramp": int(self.ramp)}


@dataclass(frozen=True)
class Schedule:
    """An ordered tuple of segments covering stream positions ``0 .. len-1``."""

    segments: tuple[Segment, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(sum(s.n for s in self.segments))

    def starts(self) -> list[int]:
        """Start index of every segment."""
        out, pos = [], 0
        for s in self.segments:
            out.append(pos)
            pos += s.n
        return out

    def change_points(self) -> list[int]:
        """Start indices of segments whose conditions differ from the previous segment's."""
        cps = []
        for prev, seg, start in zip(self.segments, self.segments[1:], self.starts()[1:]):
            if seg.n > 0 and set(seg.conditions) != set(prev.conditions):
                cps.append(start)
        return cps

    def shifts(self) -> list[dict[str, Any]]:
        """One record per change point: index, from/to labels, ``abrupt`` or ``gradual`` (ramp)."""
        out = []
        for prev, seg, start in zip(self.segments, self.segments[1:], self.starts()[1:]):
            if seg.n > 0 and set(seg.conditions) != set(prev.conditions):
                out.append({
                    "index": start, "kind": "covariate", "from": prev.label, "to": seg.label,
                    "transition": "gradual" if seg.ramp else "abrupt", "length": int(seg.ramp),
                })
        return out

    def conditions(self) -> list[Condition]:
        """Distinct conditions in order of first appearance."""
        seen: dict[Condition, None] = {}
        for seg in self.segments:
            for c in seg.conditions:
                seen.setdefault(c, None)
        return list(seen)

    def assign(self, seed: int | None = 0) -> tuple[list[Condition], np.ndarray, np.ndarray]:
        """Draw the condition of every position.

        Returns ``(conditions, cond_id, segment_id)``: ``conditions[cond_id[t]]`` is the
        ``(domain, severity)`` of position ``t``; ``segment_id[t]`` its segment index.
        """
        conds = self.conditions()
        code = {c: i for i, c in enumerate(conds)}
        rng = np.random.default_rng(np.random.SeedSequence([0 if seed is None else int(seed), 0x5C4ED]))
        cond_id = np.empty(len(self), dtype=np.int64)
        seg_id = np.empty(len(self), dtype=np.int64)
        pos = 0
        prev: Segment | None = None
        for k, seg in enumerate(self.segments):
            ids = np.array([code[c] for c in seg.conditions])
            draw = ids[rng.integers(0, len(ids), size=seg.n)] if len(ids) > 1 else np.full(seg.n, ids[0])
            if seg.ramp and prev is not None:
                old = np.array([code[c] for c in prev.conditions])
                j = np.arange(seg.ramp)
                is_new = rng.random(seg.ramp) < (j + 1) / (seg.ramp + 1)
                old_draw = old[rng.integers(0, len(old), size=seg.ramp)]
                draw[: seg.ramp] = np.where(is_new, draw[: seg.ramp], old_draw)
            cond_id[pos : pos + seg.n] = draw
            seg_id[pos : pos + seg.n] = k
            pos += seg.n
            prev = seg
        return conds, cond_id, seg_id

    def to_dict(self) -> dict[str, Any]:
        return {"n_samples": len(self), "segments": [s.to_dict() for s in self.segments],
                "change_points": self.change_points()}


def _severities(severity: int | Sequence[int]) -> list[int]:
    sev = [int(severity)] if isinstance(severity, (int, np.integer)) else [int(s) for s in severity]
    if not sev:
        raise ValueError("severity sequence is empty")
    return sev


def _cond(domain: str, severity: int) -> Condition:
    return (domain, 0) if domain == "clean" else (domain, int(severity))


def continual(
    domains: Sequence[str],
    severity: int | Sequence[int] = 5,
    samples_per_domain: int = 1000,
    n_samples: int | None = None,
    ramp: int = 0,
) -> Schedule:
    """Domains one after another, each at every severity of ``severity`` (an int or a sequence).

    With ``n_samples`` larger than one pass, the domain list is cycled and the last segment is cut
    to fit; with ``n_samples`` smaller, the pass is cut. ``ramp`` > 0 makes every shift after the first
    segment gradual over ``ramp`` samples. ``"clean"`` is a valid domain (severity ignored; one segment).
    """
    if not domains:
        raise ValueError("domains is empty")
    if samples_per_domain <= 0:
        raise ValueError(f"samples_per_domain must be > 0, got {samples_per_domain}")
    sevs = _severities(severity)
    # "clean" has no severity: one segment per appearance, whatever the severity sequence
    one_pass = [_cond(d, s) for d in domains for s in (sevs[:1] if d == "clean" else sevs)]
    total = len(one_pass) * samples_per_domain if n_samples is None else int(n_samples)
    if total <= 0:
        raise ValueError(f"n_samples must be > 0, got {n_samples}")
    segs: list[Segment] = []
    pos, i = 0, 0
    while pos < total:
        n = min(samples_per_domain, total - pos)
        r = min(ramp, n) if segs else 0
        segs.append(Segment((one_pass[i % len(one_pass)],), n, r))
        pos += n
        i += 1
    return Schedule(tuple(segs))


def mixed(domains: Sequence[str], severity: int | Sequence[int] = 5, n_samples: int = 1000) -> Schedule:
    """One segment drawing every sample uniformly from all ``(domain, severity)`` pairs."""
    if not domains:
        raise ValueError("domains is empty")
    conds = tuple(dict.fromkeys(_cond(d, s) for d in domains for s in _severities(severity)))
    return Schedule((Segment(conds, int(n_samples)),))


def abrupt(before: str, after: str, n_before: int, n_after: int, severity: int = 5, ramp: int = 0) -> Schedule:
    """Two segments, one shift at index ``n_before`` (gradual over ``ramp`` samples if > 0)."""
    return Schedule((Segment((_cond(before, severity),), n_before), Segment((_cond(after, severity),), n_after, ramp)))


def concat(*schedules: Schedule) -> Schedule:
    """Join schedules end to end."""
    return Schedule(tuple(seg for s in schedules for seg in s.segments))


def ood_mask(n: int, ratio: float, seed: int | None = 0, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Boolean mask with exactly ``round(ratio * (stop - start))`` True positions, uniform in ``[start, stop)``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ood ratio must be in [0, 1), got {ratio!r}")
    stop = n if stop is None else min(int(stop), n)
    start = max(0, int(start))
    mask = np.zeros(n, dtype=bool)
    width = max(0, stop - start)
    k = int(round(ratio * width))
    if k:
        rng = np.random.default_rng(np.random.SeedSequence([0 if seed is None else int(seed), 0x00D]))
        mask[start + rng.choice(width, size=k, replace=False)] = True
    return mask
