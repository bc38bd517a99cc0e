"""river's Page-Hinkley drift test, one independent detector per row (stream), updated with numpy.

:class:`StreamPageHinkley` keeps the state of many ``river.drift.PageHinkley`` detectors as float64
arrays (one entry per row) and updates any subset of rows in one vectorised call. Per row it follows
river 0.26's arithmetic operation by operation, so detections are the same as one river detector per
row fed the same values:

* a row whose last update set ``drift_detected`` is reset first on its next update (river's
  ``if self.drift_detected: self._reset()``);
* the running mean is river's ``stats.Mean`` (``mean += (1 / n) * (x - mean)``, ``n`` counted since the
  last reset); ``sum_increase = alpha * sum_increase + dev - delta`` and
  ``sum_decrease = alpha * sum_decrease + dev + delta`` with ``dev = x - mean``;
* the minimum of ``sum_increase`` starts at ``inf``, the maximum of ``sum_decrease`` at ``-1``;
* once ``n >= min_instances`` the test is ``sum_increase - min > threshold`` (mode ``"up"``),
  ``max - sum_decrease > threshold`` (``"down"``) or either (``"both"``).

Non-finite values are skipped (that row is not updated and reports False). The state is plain data
(torch tensors, numbers, a string), so ``torch.load(weights_only=True)`` reads it back.

>>> import numpy as np
>>> ph = StreamPageHinkley(min_instances=5, threshold=3.0, mode="up")
>>> ph.ensure(2)
>>> rows = np.array([0, 1] * 10)                # rows 0 and 1 interleaved
>>> values = np.where(np.arange(20) < 12, 0.0, [0.0, 5.0] * 10)   # row 1 jumps to 5 at its 7th value
>>> hits = ph.update(rows, values)
>>> [(int(r), int(i)) for i, r in enumerate(rows) if hits[i]]   # (row, position in the call)
[(1, 13)]
>>> ph.drift_detected.tolist()
[False, False]
>>> ph.update(np.array([1, 1]), np.array([np.nan, 5.0])).tolist()   # the NaN is skipped
[False, False]
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

MODES = ("up", "down", "both")
_FLOAT_FIELDS = ("n", "mean", "sum_increase", "sum_decrease", "min_increase", "max_decrease")
_FRESH = np.array([0.0, 0.0, 0.0, 0.0, math.inf, -1.0])  # a fresh detector, in _FLOAT_FIELDS order
_FORMAT = "stream_page_hinkley/1"


def _check_params(min_instances: Any, delta: Any, threshold: Any, alpha: Any, mode: Any) -> tuple:
    """Validated ``(min_instances, delta, threshold, alpha, mode)``; ValueError naming the bad one."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    try:
        mi, d, t, a = int(min_instances), float(delta), float(threshold), float(alpha)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad Page-Hinkley settings: {e}") from e
    if isinstance(min_instances, bool) or mi != min_instances or mi < 1:
        raise ValueError(f"min_instances must be an integer >= 1, got {min_instances!r}")
    if not math.isfinite(d):
        raise ValueError(f"delta must be finite, got {delta!r}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if not (0 < a <= 1):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return mi, d, t, a, str(mode)


def _rounds(rows: np.ndarray) -> list[np.ndarray]:
    """Positions of ``rows`` grouped by occurrence: round k holds the k-th occurrence of every row
    (each row at most once per round), positions in arrival order."""
    pos = np.arange(len(rows))
    if len(rows) <= 1:
        return [pos]
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    new = np.empty(len(rows), dtype=bool)
    new[0] = True
    np.not_equal(srt[1:], srt[:-1], out=new[1:])
    if new.all():  # distinct rows: one round
        return [pos]
    occ_sorted = pos - np.maximum.accumulate(np.where(new, pos, 0))
    occ = np.empty_like(occ_sorted)
    occ[order] = occ_sorted
    by_round = np.argsort(occ, kind="stable")
    return np.split(by_round, np.cumsum(np.bincount(occ))[:-1])


class StreamPageHinkley:
    """river's PageHinkley, one independent detector per row, updated for many rows at once.

    ``capacity`` rows exist from the start (more with :meth:`ensure`). The settings mean what they
    mean in ``river.drift.PageHinkley`` and are shared by all rows.

    >>> ph = StreamPageHinkley(capacity=3)
    >>> ph.n_rows, ph.drift_detected.tolist()
    (3, [False, False, False])
    >>> StreamPageHinkley(mode="sideways")
    Traceback (most recent call last):
    ...
    ValueError: mode must be one of ('up', 'down', 'both'), got 'sideways'
    """

    def __init__(self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both", capacity: int = 0):
        (self.min_instances, self.delta, self.threshold,
         self.alpha, self.mode) = _check_params(min_instances, delta, threshold, alpha, mode)
        self._n_rows = 0
        self._s = np.empty((0, len(_FLOAT_FIELDS)), dtype=np.float64)  # one row per detector
        self._drift = np.zeros(0, dtype=bool)
        self.ensure(int(capacity))

    # -- rows ------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """How many rows (detectors) exist: rows ``0 .. n_rows - 1``."""
        return self._n_rows

    def ensure(self, n_rows: int) -> None:
        """Grow so that rows ``0 .. n_rows - 1`` exist; new rows are fresh detectors (never shrinks)."""
        n_rows = int(n_rows)
        if n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {n_rows}")
        if n_rows <= self._n_rows:
            return
        cap = len(self._drift)
        if n_rows > cap:  # geometric growth: many small ensure() calls stay cheap
            new_cap = max(n_rows, 2 * cap, 16)
            grown = np.empty((new_cap, len(_FLOAT_FIELDS)), dtype=np.float64)
            grown[:self._n_rows] = self._s[:self._n_rows]
            self._s = grown
            drift = np.zeros(new_cap, dtype=bool)
            drift[:self._n_rows] = self._drift[:self._n_rows]
            self._drift = drift
        old, self._n_rows = self._n_rows, n_rows
        self._fresh(np.arange(old, n_rows))

    def _fresh(self, rows: np.ndarray) -> None:
        self._s[rows] = _FRESH
        self._drift[rows] = False

    def _check_rows(self, rows: Any) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 1:
            raise ValueError(f"rows must be a 1-d array, got shape {r.shape}")
        if r.size == 0:
            return r.astype(np.int64)
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"rows must be integers, got dtype {r.dtype}")
        r = r.astype(np.int64, copy=False)
        if r.min() < 0 or r.max() >= self._n_rows:
            raise ValueError(f"rows must be in [0, {self._n_rows}) (call ensure() first), "
                             f"got values in [{r.min()}, {r.max()}]")
        return r

    def reset_rows(self, rows: Any) -> None:
        """Fresh detectors on ``rows`` (e.g. a row reused by a new stream); drift flags cleared."""
        self._fresh(self._check_rows(rows))

    @property
    def drift_detected(self) -> np.ndarray:
        """Per row, river's ``drift_detected`` after that row's last update (a copy, bool (n_rows,))."""
        return self._drift[:self._n_rows].copy()

    # -- updates ---------------------------------------------------------------------------
    def update(self, rows: Any, values: Any) -> np.ndarray:
        """Feed ``values[i]`` to row ``rows[i]``, in arrival order (repeated rows in sequence).

        Returns bool (N,): True where that update set ``drift_detected`` for its row. Non-finite
        values are skipped (no update, False).
        """
        r = self._check_rows(rows)
        x = np.asarray(values, dtype=np.float64)
        if x.shape != r.shape:
            raise ValueError(f"rows and values differ in shape: {r.shape} vs {x.shape}")
        finite = np.isfinite(x)
        if finite.all():
            rounds = _rounds(r)
            if len(rounds) == 1:  # the common case: distinct rows, all finite
                return self._step(r, x)
            keep = None
        else:
            keep = np.flatnonzero(finite)
            r, x = r[keep], x[keep]
            rounds = _rounds(r)
        out = np.zeros(len(finite), dtype=bool)
        if len(r) == 0:
            return out
        hits = np.empty(len(r), dtype=bool)
        for idx in rounds:
            hits[idx] = self._step(r[idx], x[idx])
        if keep is None:
            return hits
        out[keep] = hits
        return out

    def _step(self, r: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One river update on each of the distinct rows ``r``; returns their new drift flags."""
        st = self._s[r]  # (k, 6) copy, columns in _FLOAT_FIELDS order
        pending = self._drift[r]
        if pending.any():  # river: `if self.drift_detected: self._reset()`
            st[pending] = _FRESH
        n, mean, s_inc, s_dec, min_inc, max_dec = st.T  # views into st: updated in place below
        n += 1.0
        mean += (1.0 / n) * (x - mean)
        dev = x - mean
        s_inc *= self.alpha
        s_inc += dev
        s_inc -= self.delta
        s_dec *= self.alpha
        s_dec += dev
        s_dec += self.delta
        np.minimum(min_inc, s_inc, out=min_inc)
        np.maximum(max_dec, s_dec, out=max_dec)
        if self.mode == "up":
            hit = (s_inc - min_inc) > self.threshold
        elif self.mode == "down":
            hit = (max_dec - s_dec) > self.threshold
        else:
            hit = ((s_inc - min_inc) > self.threshold) | ((max_dec - s_dec) > self.threshold)
        # rows not yet at min_instances keep their flag, which is False (a True flag was just reset)
        hit &= n >= self.min_instances
        self._s[r] = st
        self._drift[r] = hit
        return hit

    # -- persistence -----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The hyperparameters, as plain numbers and a string."""
        return {"min_instances": self.min_instances, "delta": self.delta, "threshold": self.threshold,
                "alpha": self.alpha, "mode": self.mode}

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the settings, ``n_rows`` and one float64 tensor per state field (bool for
        ``drift``), each of shape (n_rows,); ``torch.load(weights_only=True)`` reads it."""
        n = self._n_rows
        state: dict[str, Any] = {"format": _FORMAT, **self.settings(), "n_rows": n}
        for j, k in enumerate(_FLOAT_FIELDS):
            state[k] = torch.from_numpy(self._s[:n, j].copy())
        state["drift"] = torch.from_numpy(self._drift[:n].copy())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (its settings included: the sums were built with them; a
        change of settings is logged). ValueError, with nothing changed, on a malformed state."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a mapping, got {type(state).__name__}")
        missing = [k for k in ("format", "n_rows", "drift", *_FLOAT_FIELDS, *self.settings()) if k not in state]
        if missing:
            raise ValueError(f"StreamPageHinkley state lacks {missing}")
        if state["format"] != _FORMAT:
            raise ValueError(f"unknown StreamPageHinkley state format {state['format']!r} (expected {_FORMAT!r})")
        params = _check_params(state["min_instances"], state["delta"], state["threshold"],
                               state["alpha"], state["mode"])
        n = state["n_rows"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_rows must be an integer >= 0, got {n!r}")
        n = int(n)
        arrays = {k: _as_array(state[k], k, n, np.float64) for k in _FLOAT_FIELDS}
        drift = _as_array(state["drift"], "drift", n, bool)
        for k in ("n", "mean", "sum_increase", "sum_decrease", "max_decrease"):
            if not np.isfinite(arrays[k]).all():
                raise ValueError(f"state field {k!r} holds non-finite values")
        if np.isnan(arrays["min_increase"]).any() or (arrays["n"] < 0).any():
            raise ValueError("state field 'min_increase' holds NaN or 'n' is negative")
        if params != tuple(self.settings().values()):
            log.warning("StreamPageHinkley state with settings %s loaded over %s: the saved settings apply",
                        dict(zip(self.settings(), params)), self.settings())
        (self.min_instances, self.delta, self.threshold, self.alpha, self.mode) = params
        self._s = np.stack([arrays[k] for k in _FLOAT_FIELDS], axis=1) if n else np.empty((0, len(_FLOAT_FIELDS)))
        self._drift, self._n_rows = drift, n


def _as_array(value: Any, name: str, n: int, dtype: Any) -> np.ndarray:
    """``value`` (tensor, array or list) as a fresh numpy array of shape (n,) and ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        a = np.array(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state field {name!r} is not an array: {e}") from e
    if a.shape != (n,):
        raise ValueError(f"state field {name!r} has shape {a.shape}, expected ({n},)")
    if dtype is bool and a.dtype != bool:
        raise ValueError(f"state field {name!r} must be boolean, got dtype {a.dtype}")
    if dtype is not bool and not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"state field {name!r} must be numeric, got dtype {a.dtype}")
    return a.astype(dtype, copy=True)
