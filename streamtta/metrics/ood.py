"""OOD-detection metrics (AUROC, FPR at a TPR, AUPR-In/Out) as fractions, computed with scikit-learn.

Scores follow the project convention (``streamtta.types.OOD_HIGHER_IS_MORE_OOD``): **higher = more
OOD**. The positive class of AUROC and AUPR-Out is the *unknown* (OOD) sample. Since AUROC is symmetric,
this AUROC equals the usual "ID positive, confidence score" AUROC of the literature.

* ``auroc``: ``roc_auc_score(is_unknown, score)``; 1 = every unknown scores above every known sample.
* ``fpr95``: FPR at 95 % TPR with **OOD positive**. Let ``t`` be the largest threshold such that at least
  95 % of the unknown samples have ``score >= t``; ``fpr95`` is the fraction of *known* samples with
  ``score >= t`` (known samples that a detector catching 95 % of unknowns would wrongly flag).
* ``fpr95_id``: the classic OOD-literature variant (ID positive, e.g. ODIN/KNN papers). Let ``t`` be the
  smallest threshold such that at least 95 % of known samples have ``score <= t``; ``fpr95_id`` is the
  fraction of *unknown* samples with ``score <= t`` (unknowns accepted as ID). Use it to compare with
  published FPR95 numbers.
* ``aupr_in``: average precision with known samples positive and ``-score`` as the ranking.
* ``aupr_out``: average precision with unknown samples positive and ``score`` as the ranking.

Non-finite scores are dropped first; every metric is ``None`` when only one class is left.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import _as_bool, _check_same_len


def _ood_inputs(scores: Any, is_unknown: Any) -> tuple[np.ndarray, np.ndarray] | None:
    s = np.asarray(scores, dtype=np.float64).ravel()
    u = _as_bool(is_unknown, "is_unknown")
    _check_same_len(scores=s, is_unknown=u)
    keep = np.isfinite(s)
    s, u = s[keep], u[keep]
    if u.all() or not u.any():  # need both classes
        return None
    return s, u


def _check_tpr(tpr: float) -> None:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")


def _fpr_at(positive: np.ndarray, ranking: np.ndarray, tpr: float) -> float:
    """FPR of the ROC curve of ``(positive, ranking)`` at the first point whose TPR reaches ``tpr``."""
    from sklearn.metrics import roc_curve

    fpr_c, tpr_c, _ = roc_curve(positive, ranking, drop_intermediate=False)
    idx = int(np.searchsorted(tpr_c, tpr - 1e-12, side="left"))  # tpr_c is non-decreasing
    return float(fpr_c[min(idx, len(fpr_c) - 1)])


def auroc(scores: Any, is_unknown: Any) -> float | None:
    """Area under the ROC curve, unknown = positive, higher score = more OOD. ``None`` if one class is absent.

    >>> auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True])
    0.0
    """
    from sklearn.metrics import roc_auc_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(roc_auc_score(d[1], d[0]))


def fpr_at_tpr(scores: Any, is_unknown: Any, tpr: float = 0.95) -> float | None:
    """Fraction of known samples flagged at the largest threshold that flags ``>= tpr`` of unknowns.

    A sample is flagged when ``score >= t``. This is FPR@95TPR with OOD positive (see the module docstring).

    >>> fpr_at_tpr([0.1, 0.5, 0.6, 0.7, 0.9], [False, False, True, True, True], tpr=0.95)
    0.0
    """
    _check_tpr(tpr)
    d = _ood_inputs(scores, is_unknown)
    return None if d is None else _fpr_at(d[1], d[0], tpr)


def fpr_at_tpr_id(scores: Any, is_unknown: Any, tpr: float = 0.95) -> float | None:
    """Classic FPR@95TPR with ID positive: fraction of unknowns accepted when ``>= tpr`` of knowns are.

    A sample is accepted as ID when ``score <= t``, ``t`` the smallest threshold accepting ``>= tpr`` of
    known samples.

    >>> fpr_at_tpr_id([0.1, 0.2, 0.3, 0.25, 0.9], [False, False, False, True, True], tpr=0.95)
    0.5
    """
    _check_tpr(tpr)
    d = _ood_inputs(scores, is_unknown)
    return None if d is None else _fpr_at(~d[1], -d[0], tpr)


def aupr_in(scores: Any, is_unknown: Any) -> float | None:
    """Average precision with known samples positive, ranked by ``-score``."""
    from sklearn.metrics import average_precision_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(average_precision_score(~d[1], -d[0]))


def aupr_out(scores: Any, is_unknown: Any) -> float | None:
    """Average precision with unknown samples positive, ranked by ``score``."""
    from sklearn.metrics import average_precision_score

    d = _ood_inputs(scores, is_unknown)
    return None if d is None else float(average_precision_score(d[1], d[0]))


def ood_metrics(scores: Any, is_unknown: Any, tpr: float = 0.95) -> dict[str, float | None]:
    """``{auroc, fpr95, fpr95_id, aupr_in, aupr_out}`` as fractions; all ``None`` if a class is absent."""
    return {
        "auroc": auroc(scores, is_unknown),
        "fpr95": fpr_at_tpr(scores, is_unknown, tpr),
        "fpr95_id": fpr_at_tpr_id(scores, is_unknown, tpr),
        "aupr_in": aupr_in(scores, is_unknown),
        "aupr_out": aupr_out(scores, is_unknown),
    }
