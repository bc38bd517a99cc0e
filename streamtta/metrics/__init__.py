"""Evaluation metrics over a :class:`~streamtta.runlog.RunLog`: accuracy, OOD, open-set, shift detection, speed.

Everything here is a pure function over numpy arrays, plus :func:`summarize`, which reads a run log and
returns one JSON-ready dict. Labels, domains and ``is_unknown`` are evaluation-only fields; the engine
never adapts on them, and every metric that needs them returns ``None`` when they are absent (live
streams), instead of raising.

* :mod:`.classification` -- accuracy, open-set accuracy (ACC_S / ACC_N / ACC_H);
* :mod:`.ood` -- AUROC, FPR at 95 % TPR (both polarities), AUPR-In / AUPR-Out; polarity conventions;
* :mod:`.shift` -- matching detections to change points (the matching rule), sample -> batch;
* :mod:`.recovery` -- rolling accuracy, batches until recovery, runs below a reference series;
* :mod:`.speed` -- latency percentiles and throughput;
* :mod:`.views` -- per-batch series of a run log and the batches its alerts fall in;
* :mod:`.summary` -- :func:`summarize` and :func:`scalar_metrics`.

Units: the pure functions return **fractions** in ``[0, 1]``, like scikit-learn; :func:`summarize`
reports every rate in **percent** (0-100), as papers do. OOD scores are **higher = more OOD**.

>>> import numpy as np
>>> round(auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])), 3)
1.0
>>> r = match_detections([100, 300], [120, 150, 50], n_samples=400)
>>> r["delays"], r["n_missed"], r["n_false_alarms"], r["n_redundant"]
([20, None], 1, 1, 1)
"""
from __future__ import annotations

from .classification import accuracy, harmonic_mean, open_set_accuracy
from .ood import aupr_in, aupr_out, auroc, fpr_at_tpr, fpr_at_tpr_id, ood_metrics
from .recovery import longest_run_below, recovery_batches, rolling_mean
from .shift import change_points_from_domains, match_detections, sample_to_batch
from .speed import latency_percentiles, throughput
from .summary import SHIFT_ALERT_KINDS, scalar_metrics, summarize
from .views import alert_batches, batch_series

__all__ = [
    "SHIFT_ALERT_KINDS",
    "accuracy",
    "auroc",
    "fpr_at_tpr",
    "fpr_at_tpr_id",
    "aupr_in",
    "aupr_out",
    "ood_metrics",
    "harmonic_mean",
    "open_set_accuracy",
    "match_detections",
    "change_points_from_domains",
    "sample_to_batch",
    "rolling_mean",
    "recovery_batches",
    "longest_run_below",
    "latency_percentiles",
    "throughput",
    "batch_series",
    "alert_batches",
    "summarize",
    "scalar_metrics",
]
