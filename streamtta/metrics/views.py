"""Per-batch views of a :class:`~streamtta.runlog.RunLog`: batch series and where alerts fall."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from streamtta.runlog import RunLog


def _unknown_mask(log: "RunLog", known_classes: set[int] | None) -> np.ndarray:
    u = log.is_unknown()
    if known_classes is not None:
        y = log.labels()
        kc = np.asarray(sorted(int(c) for c in known_classes), dtype=np.int64)
        u = u | ((y >= 0) & ~np.isin(y, kc))
    return u


def _kind_names(kinds: Iterable[object]) -> set[str]:
    """Alert kinds as strings (enum members by their value)."""
    return {str(getattr(k, "value", k)) for k in kinds}


def batch_series(log: "RunLog", *, known_classes: set[int] | None = None) -> dict[str, np.ndarray]:
    """Per-batch series: ``acc`` (percent over known labelled samples, NaN if none), ``entropy`` (mean),
    ``ood_rate`` (percent flagged), ``ood_score`` (mean), ``update_rate`` (percent used in the update),
    ``n`` (batch size), ``end`` (last sample index of the batch)."""
    sizes = log.batch_column("size")
    n_b = len(sizes)
    unk = _unknown_mask(log, known_classes)
    preds, labels = log.preds(), log.labels()
    known = (labels >= 0) & ~unk
    correct = (preds == labels) & known
    ent, sc, fl = log.entropy(), log.ood_scores(), log.ood_flags().astype(np.float64)
    upd = log.sample_column("updated").astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n_b else np.zeros(0, np.int64)

    def seg_mean(v: np.ndarray) -> np.ndarray:
        out = np.full(n_b, np.nan)
        if v.size != sizes.sum():  # field not logged per sample
            return out
        for i, (s, n) in enumerate(zip(starts, sizes)):
            w = v[s:s + n]
            w = w[np.isfinite(w)]
            if w.size:
                out[i] = w.mean()
        return out

    acc = np.full(n_b, np.nan)
    for i, (s, n) in enumerate(zip(starts, sizes)):
        k = known[s:s + n]
        if k.any():
            acc[i] = 100.0 * correct[s:s + n][k].mean()
    return {
        "acc": acc,
        "entropy": seg_mean(ent),
        "ood_rate": 100.0 * seg_mean(fl),
        "ood_score": seg_mean(sc),
        "update_rate": 100.0 * seg_mean(upd),
        "n": sizes,
        "end": (np.cumsum(sizes) - 1) if n_b else np.zeros(0, np.int64),
    }


def alert_batches(log: "RunLog", kinds: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """``(batch position, kind)`` for every alert in ``log.alerts`` (optionally only ``kinds``).

    An alert is placed by its ``offsets`` (``topic``, ``partition``, ``last`` inside a batch's offset
    range; with several matches, e.g. a replayed range, the one whose :attr:`BatchRecord.index` equals
    the alert's ``batch_index``, else the first). Alerts without usable offsets are placed by
    ``batch_index`` matched against :attr:`BatchRecord.index` (per-stream batch counters can differ from
    the log position when one log mixes several partitions, hence offsets first). Unplaceable alerts are
    dropped.
    """
    kinds_set = None if kinds is None else _kind_names(kinds)
    # batch columns (one pass over a spooled log's file), then array tests per alert
    firsts, lasts, index = (log.batch_column(c) for c in ("first_offset", "last_offset", "index"))
    topic_arr, part_arr = log.batch_column("topic"), log.batch_column("partition")
    pos_of = {bi_: i for i, bi_ in enumerate(index.tolist())}
    out: list[tuple[int, str]] = []
    for a in log.alerts:
        kind = str(getattr(a.get("kind"), "value", a.get("kind")))
        if kinds_set is not None and kind not in kinds_set:
            continue
        bi = a.get("batch_index")
        bi = None if bi is None else int(bi)
        off = a.get("offsets") or {}
        cands: list[int] = []
        if off.get("last") is not None:
            last = int(off["last"])
            hit = (firsts <= last) & (last <= lasts)
            if "topic" in off:
                hit &= topic_arr == off["topic"]
            if "partition" in off:
                hit &= part_arr == off["partition"]
            cands = np.flatnonzero(hit).tolist()
        pos: int | None = None
        if cands:
            pos = next((i for i in cands if index[i] == bi), cands[0])
        elif bi is not None and bi in pos_of:
            pos = pos_of[bi]
        if pos is not None:
            out.append((pos, kind))
    return out
