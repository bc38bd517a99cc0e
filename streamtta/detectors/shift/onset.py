"""Where inside a batch did the stream change? A one-change-point locator for arrival-ordered batches.

A consumer batch holds records in arrival order, so an abrupt shift that falls inside a batch splits
it into a prefix from the old domain and a suffix from the new one. Normalisation statistics
computed over such a batch fit neither part: it is the batch a shift costs most on, and it comes
before any monitor can confirm the shift. :class:`OnsetLocator` finds the split so that the batch
can be processed again as two batches (see :meth:`streamtta.readapt.ReAdapter.reprocess`).

Per-sample descriptors (model-free, cheap): for images ``(B, C, H, W)`` the per-channel mean, log
standard deviation and log high-frequency energy (mean absolute difference of neighbouring pixels:
noise raises it, blur lowers it); for vectors ``(B, D)`` the values themselves. Columns are
standardised over the batch; the statistic of a split at ``t`` is the CUSUM / Ward criterion
``t (B - t) / B * ||mean(prefix) - mean(suffix)||^2 / D``, maximised over ``min_segment <= t <=
B - min_segment``. Its significance is a permutation test: the same maximum over ``permutations``
random orders of the batch (the order carries no information when there is no change point).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(0.5, 0.1, size=(64, 1, 8, 8)).astype("float32")
>>> x[40:] = rng.normal(0.5, 0.3, size=(24, 1, 8, 8))          # noisier from sample 40 on
>>> onset = OnsetLocator().locate(x)
>>> onset.index, onset.p_value < 0.01
(40, True)
>>> OnsetLocator().locate(rng.normal(0.5, 0.1, size=(64, 1, 8, 8))) is None   # no change inside
True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Onset:
    """A located change point: samples ``[:index]`` before it, ``[index:]`` after it."""

    index: int
    statistic: float
    p_value: float


def sample_descriptors(x: Any) -> np.ndarray:
    """Per-sample descriptors ``(B, F)`` used to locate a change point (see the module docstring)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"sample_descriptors expects a batch (B, ...), got shape {a.shape}")
    if a.ndim == 2:
        return a
    if a.ndim == 3:  # (B, C, L): treat as one-row images
        a = a[:, :, None, :]
    b, c = a.shape[:2]
    flat = a.reshape(b, c, -1)
    cols = [flat.mean(2), np.log(flat.std(2) + 1e-6)]
    if a.shape[-1] > 1:
        hf = np.abs(np.diff(a, axis=-1)).reshape(b, c, -1).mean(2)
        if a.shape[-2] > 1:
            hf = hf + np.abs(np.diff(a, axis=-2)).reshape(b, c, -1).mean(2)
        cols.append(np.log(hf + 1e-6))
    return np.concatenate(cols, axis=1)


def _max_split(z: np.ndarray, lo: int, hi: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Best split statistic and position (prefix length in ``[lo, hi]``) for each order in ``z`` (P, B, F'),
    normalised by ``f`` descriptors."""
    p, b, _ = z.shape
    full = np.cumsum(z, axis=1)
    cum = full[:, lo - 1:hi, :]                             # sums of the prefixes of length lo..hi
    t = np.arange(lo, hi + 1, dtype=np.float64)
    diff = cum / t[None, :, None] - (full[:, -1:, :] - cum) / (b - t)[None, :, None]
    stat = (t * (b - t) / b)[None, :] * (diff ** 2).sum(2) / f
    k = stat.argmax(1)
    return stat[np.arange(p), k], k + lo


class OnsetLocator:
    """Locate one change point inside an arrival-ordered batch (see the module docstring).

    Parameters
    ----------
    min_segment
        Fewest samples on either side of a split (statistics of fewer samples are too noisy to
        normalise with); batches shorter than ``2 * min_segment`` are never split.
    permutations
        Random orders in the permutation test.
    alpha
        Significance level: a split is reported when its p-value is below it.
    seed
        Seed of the permutations (deterministic results).
    """

    def __init__(self, min_segment: int = 8, permutations: int = 199, alpha: float = 0.01, seed: int = 0) -> None:
        if min_segment < 1 or permutations < 1 or not 0.0 < alpha < 1.0:
            raise ValueError(f"need min_segment >= 1, permutations >= 1, 0 < alpha < 1; got {min_segment}, "
                             f"{permutations}, {alpha}")
        self.min_segment = int(min_segment)
        self.permutations = int(permutations)
        self.alpha = float(alpha)
        self.seed = int(seed)

    def locate(self, x: Any) -> Onset | None:
        """The change point inside batch ``x``, or None when there is no significant one."""
        d = sample_descriptors(x)
        b = d.shape[0]
        if b < 2 * self.min_segment:
            return None
        sd = d.std(0)
        keep = sd > 1e-9
        if not keep.any():
            return None
        z = (d[:, keep] - d[:, keep].mean(0)) / sd[keep]
        f = z.shape[1]
        if f > b:  # wide vectors: the batch's own orthonormal basis keeps every squared distance, in b columns
            u, sv, _ = np.linalg.svd(z, full_matrices=False)
            z = u * sv
        lo, hi = self.min_segment, b - self.min_segment
        stat, pos = _max_split(z[None], lo, hi, f)
        rng = np.random.default_rng(self.seed)
        perms = np.argsort(rng.random((self.permutations, b)), axis=1)
        chunk = max(1, (1 << 22) // (b * z.shape[1]))  # bounded memory: ~32 MB per array
        null = np.concatenate([_max_split(z[perms[i:i + chunk]], lo, hi, f)[0] for i in range(0, len(perms), chunk)])
        p_value = float((1 + int((null >= stat[0]).sum())) / (1 + self.permutations))
        if p_value >= self.alpha:
            return None
        return Onset(index=int(pos[0]), statistic=float(stat[0]), p_value=p_value)
