"""Sample orderings of a labelled test set: i.i.d., class-sorted, and Dirichlet label-correlated.

Each function takes the labels of the samples to be streamed and returns a permutation of
``range(len(labels))`` (int64): position ``t`` of the stream shows sample ``order[t]``. All are
deterministic for a given ``seed`` and keep every index exactly once.

The Dirichlet sorter follows the NOTE / ``mariodoebler/test-time-adaptation`` construction: the
stream is cut into ``num_chunks`` (default: number of classes) chunks; each class's shuffled samples
are split over the chunks by proportions drawn from ``Dirichlet(delta * 1)``, chunks that already hold
``N / num_chunks`` samples get no more; retry until every chunk holds at least ``min_chunk_size``
samples; then chunk by chunk, the class pieces are emitted in a random class order. Small ``delta``
gives long single-class runs; large ``delta`` gives chunks holding a contiguous piece of every class
(runs of about ``N / (num_chunks * C)``), never i.i.d.; ``delta = 0`` means fully sorted.
:func:`dirichlet_chunks` returns the chunks themselves.

>>> import numpy as np
>>> from streamtta.simulations.orderings import dirichlet_order, iid_order, sorted_order
>>> y = np.repeat(np.arange(4), 25)
>>> o = dirichlet_order(y, delta=0.1, seed=0)
>>> sorted(o.tolist()) == list(range(100))
True
>>> y[sorted_order(y, seed=0)][:5].tolist()
[0, 0, 0, 0, 0]
"""
from __future__ import annotations

import numpy as np


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {y.shape}")
    return y


def iid_order(labels: np.ndarray, seed: int | None = 0) -> np.ndarray:
    """A uniformly random permutation."""
    y = _labels(labels)
    return np.random.default_rng(seed).permutation(len(y)).astype(np.int64)


def sorted_order(labels: np.ndarray, seed: int | None = 0) -> np.ndarray:
    """Class blocks in increasing label order; random order inside each block (shuffle, then stable sort)."""
    y = _labels(labels)
    perm = np.random.default_rng(seed).permutation(len(y))
    return perm[np.argsort(y[perm], kind="stable")].astype(np.int64)


def _draw_chunks(y: np.ndarray, delta: float, k: int, need: int, rng: np.random.Generator,
                 max_tries: int) -> list[list[np.ndarray]]:
    """Class pieces (index arrays) of each of ``k`` chunks, in the order the classes were dealt.

    Redraws until every chunk holds at least ``need`` samples; after ``max_tries`` draws the draw with
    the largest smallest chunk is kept.
    """
    n = len(y)
    classes = np.unique(y)
    cap = n / k
    best: list[list[np.ndarray]] | None = None
    best_min = -1
    for _ in range(max(1, int(max_tries))):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in classes:
            idx_c = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(k, delta))
            p = np.where(sizes < cap, p, 0.0)
            total = p.sum()
            if not np.isfinite(total) or total <= 0.0:
                # every open chunk drew ~0 mass (tiny delta): give the class to one open chunk
                p = np.zeros(k)
                p[rng.choice(np.flatnonzero(sizes < cap))] = 1.0
            else:
                p = p / total
            cuts = (np.cumsum(p) * len(idx_c)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx_c, cuts)):
                if len(piece):
                    chunks[j].append(piece)
                    sizes[j] += len(piece)
        smallest = int(sizes.min())
        if smallest > best_min:
            best, best_min = chunks, smallest
        if smallest >= need:
            break
    assert best is not None
    return best


def dirichlet_chunks(
    labels: np.ndarray,
    delta: float,
    seed: int | None = 0,
    num_chunks: int | None = None,
    min_chunk_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """The chunks of :func:`dirichlet_order` (``delta > 0``): one index array per chunk, in stream order.

    Inside a chunk each class present is one contiguous piece; the class pieces come in a random order.
    ``np.concatenate`` of the result is :func:`dirichlet_order` with the same arguments.

    >>> import numpy as np
    >>> y = np.repeat(np.arange(4), 25)
    >>> [len(c) >= 10 for c in dirichlet_chunks(y, delta=0.1, seed=0)]
    [True, True, True, True]
    """
    y = _labels(labels)
    delta = float(delta)
    if not np.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be a finite number > 0 for chunks, got {delta!r}")
    n = len(y)
    k = len(np.unique(y)) if num_chunks is None else int(num_chunks)
    if k < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks!r}")
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    best = _draw_chunks(y, delta, k, min(int(min_chunk_size), n // k), rng, max_tries)
    out: list[np.ndarray] = []
    for pieces in best:
        order = rng.permutation(len(pieces))
        out.append(np.concatenate([pieces[i] for i in order]).astype(np.int64) if len(pieces)
                   else np.zeros(0, dtype=np.int64))
    return out


def dirichlet_order(
    labels: np.ndarray,
    delta: float,
    seed: int | None = 0,
    num_chunks: int | None = None,
    min_chunk_size: int = 10,
    max_tries: int = 1000,
) -> np.ndarray:
    """Label-correlated order from the NOTE Dirichlet sorter (see module docstring).

    ``delta = 0`` returns :func:`sorted_order`. ``min_chunk_size`` is lowered to ``N // num_chunks``
    when the stream is too short to satisfy it; after ``max_tries`` draws the draw with the largest
    smallest chunk is used (a fixed count keeps it deterministic). :func:`dirichlet_chunks` gives the
    chunks themselves.
    """
    y = _labels(labels)
    delta = float(delta)
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    if delta == 0.0:
        return sorted_order(y, seed)
    chunks = dirichlet_chunks(y, delta, seed, num_chunks, min_chunk_size, max_tries)
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


def make_order(labels: np.ndarray, kind: str, seed: int | None = 0, delta: float = 0.1, num_chunks: int | None = None) -> np.ndarray:
    """Dispatch by name: ``"iid"``, ``"sorted"`` or ``"dirichlet"``."""
    if kind == "iid":
        return iid_order(labels, seed)
    if kind == "sorted":
        return sorted_order(labels, seed)
    if kind == "dirichlet":
        return dirichlet_order(labels, delta, seed, num_chunks=num_chunks)
    raise ValueError(f"unknown ordering kind {kind!r}; expected 'iid', 'sorted' or 'dirichlet'")
