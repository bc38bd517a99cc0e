"""Calibration on the user's own clean data.

A model without streamtta metadata (a user's ``nn.Module``, TorchScript file or ``module:factory``) has no
source data of its own, so nothing tells the OOD scorer what "in distribution" looks like: without
calibration a run flags no sample as OOD. Calibrating fits the pipeline on the user's clean data
(:meth:`streamtta.Pipeline.fit_source`): scorer memories and thresholds (95% TPR on a hold-out), the
novel-class detector and the adapter's source references. With labels the classes are the labels;
without, the model's own predictions stand in for them (unsupervised).

* :mod:`.data` -- read ``.npz`` (``x``, optional ``y``), ``.npy``, ``.csv`` and ``.parquet`` data;
* :mod:`.file` -- the calibration file (``<model>.calib.npz``: the data themselves, plain arrays, with the
  model's fingerprint) that ``streamtta calibrate`` writes and later runs of that model load.

>>> import torch, streamtta
>>> torch.manual_seed(0) and None
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> pipe = streamtta.Pipeline(net, adapter="source", scorer="energy")
>>> describe(pipe)
'none: no OOD flags without calibration data (streamtta calibrate --model M --data source.npz, or run --calibrate-from FILE)'
>>> print(describe(pipe.calibrate(torch.randn(100, 8))))
arrays: 100 samples of shape (8,), no labels: unsupervised (the model's predictions stand in for classes)
"""
from __future__ import annotations

from typing import Any

from streamtta.calibration.data import DATA_SUFFIXES, CalibrationData, CalibrationError, as_data, read_data
from streamtta.calibration.file import (
    CALIBRATION_FORMAT,
    default_calibration_path,
    is_calibration_file,
    load_any,
    load_calibration,
    model_fingerprint,
    save_calibration,
)

__all__ = [
    "CALIBRATION_FORMAT", "DATA_SUFFIXES", "HOW_TO_CALIBRATE", "CalibrationData", "CalibrationError", "NO_CALIBRATION", "as_data",
    "default_calibration_path", "describe", "is_calibration_file", "load_any", "load_calibration",
    "model_fingerprint", "read_data", "save_calibration",
]

#: how to calibrate a model from the command line
HOW_TO_CALIBRATE = "streamtta calibrate --model M --data source.npz, or run --calibrate-from FILE"
#: what a run without any calibration says (summary, metrics.json)
NO_CALIBRATION = f"none: no OOD flags without calibration data ({HOW_TO_CALIBRATE})"


def describe(pipeline: Any) -> str:
    """One line on how ``pipeline`` was calibrated: the data it was fitted on, the model's own source data,
    or :data:`NO_CALIBRATION`."""
    info = getattr(pipeline, "calibration", None)
    if info is not None:
        return info.describe()
    if getattr(pipeline, "calibrated", False):
        meta = pipeline.blueprint.meta
        return f"the model's own source data ({meta.dataset})" if meta is not None else "source data"
    return NO_CALIBRATION
