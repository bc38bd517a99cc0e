"""Closed-set and open-set (OWTTT) accuracy, as fractions in ``[0, 1]``."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import _as_bool, _check_same_len


def accuracy(preds: Any, labels: Any, mask: Any = None) -> float | None:
    """Fraction of ``preds == labels`` over ``mask`` (default: all samples with ``label >= 0``).

    Returns ``None`` when no sample is selected.

    >>> accuracy([1, 2, 3, 0], [1, 2, 0, -1])
    0.6666666666666666
    """
    p = np.asarray(preds).ravel()
    y = np.asarray(labels).ravel()
    _check_same_len(preds=p, labels=y)
    m = (y >= 0) if mask is None else _as_bool(mask, "mask")
    _check_same_len(preds=p, mask=m)
    if not m.any():
        return None
    return float((p[m] == y[m]).mean())


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """``2ab / (a + b)``; 0 when both are 0; ``None`` when either is ``None``.

    >>> harmonic_mean(0.8, 0.5)
    0.6153846153846154
    """
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def open_set_accuracy(preds: Any, labels: Any, ood_flags: Any, is_unknown: Any) -> dict[str, float | None]:
    """OWTTT open-set accuracies as fractions.

    * ``acc_s``: over known samples with a label (``label >= 0`` and not unknown), correct iff the class
      is right **and** the sample is not flagged OOD;
    * ``acc_n``: fraction of unknown samples flagged OOD;
    * ``acc_h``: harmonic mean of the two.

    >>> r = open_set_accuracy([1, 2, 2, 0], [1, 2, 5, -1], [False, True, True, False], [False, False, True, True])
    >>> r["acc_s"], r["acc_n"], round(r["acc_h"], 3)
    (0.5, 0.5, 0.5)
    """
    p = np.asarray(preds).ravel()
    y = np.asarray(labels).ravel()
    f = _as_bool(ood_flags, "ood_flags")
    u = _as_bool(is_unknown, "is_unknown")
    _check_same_len(preds=p, labels=y, ood_flags=f, is_unknown=u)
    known = (y >= 0) & ~u
    acc_s = float(((p == y) & ~f)[known].mean()) if known.any() else None
    acc_n = float(f[u].mean()) if u.any() else None
    return {"acc_s": acc_s, "acc_n": acc_n, "acc_h": harmonic_mean(acc_s, acc_n)}
