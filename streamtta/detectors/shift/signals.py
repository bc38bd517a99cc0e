"""Per-batch signals the shift monitor watches.

* :func:`batch_signals` (model signals): ``ood_rate`` (fraction of the batch flagged OOD, about
  ``1 - tpr`` under no shift), ``id_entropy`` (mean prediction entropy of the ID-accepted samples),
  ``mean_score`` (mean OOD score), ``low_score`` (25th percentile of the scores, used to type a shift)
  and, when given, ``unknown_hits`` (fraction of the batch nearest an unknown prototype);
* :func:`input_signals` (model-free): ``in_mean``, ``in_std`` and, for images, ``in_hf``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Signals that drive detection unless configured otherwise.
DEFAULT_SIGNALS = ("ood_rate", "id_entropy", "mean_score", "in_mean", "in_std", "in_hf")
#: Signals that describe the inputs only (covariate evidence).
INPUT_SIGNALS = ("in_mean", "in_std", "in_hf")


def batch_signals(scores: Any, flags: Any, entropy: Any, unknown_hits: Any | None = None) -> dict[str, float]:
    """The standard per-batch signals from per-sample scores, OOD flags and entropies.

    >>> s = batch_signals([0.1, 0.2, 0.9], [False, False, True], [0.5, 0.7, 2.0])
    >>> round(s["ood_rate"], 3), round(s["id_entropy"], 3), round(s["mean_score"], 3)
    (0.333, 0.6, 0.4)
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    flags = np.asarray(flags, bool).reshape(-1)
    entropy = np.asarray(entropy, np.float64).reshape(-1)
    if not (len(scores) == len(flags) == len(entropy)):
        raise ValueError(f"scores, flags and entropy differ in length: {len(scores)}, {len(flags)}, {len(entropy)}")
    if len(scores) == 0:
        raise ValueError("batch_signals got an empty batch")
    out = {
        "ood_rate": float(flags.mean()),
        "id_entropy": float(entropy[~flags].mean()) if (~flags).any() else float("nan"),
        "mean_score": float(scores.mean()),
        "low_score": float(np.quantile(scores, 0.25)),
    }
    if unknown_hits is not None:
        out["unknown_hits"] = float(np.mean(np.asarray(unknown_hits, np.float64)))
    return out


def input_signals(x: Any) -> dict[str, float]:
    """Per-batch input statistics: mean, standard deviation and (images) high-frequency energy.

    ``in_hf`` is the mean absolute difference between neighbouring pixels (rows and columns);
    noise raises it, blur lowers it. These model-free signals catch corruption changes that leave
    the model's confidence unchanged.

    >>> import numpy as np
    >>> s = input_signals(np.zeros((4, 1, 8, 8)))
    >>> sorted(s), s["in_hf"]
    (['in_hf', 'in_mean', 'in_std'], 0.0)
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.size == 0:
        raise ValueError("input_signals got an empty batch")
    out = {"in_mean": float(a.mean()), "in_std": float(a.std())}
    if a.ndim >= 3 and a.shape[-1] > 1 and a.shape[-2] > 1:
        out["in_hf"] = float(np.abs(np.diff(a, axis=-1)).mean() + np.abs(np.diff(a, axis=-2)).mean())
    return out
