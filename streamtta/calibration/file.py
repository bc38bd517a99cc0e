"""Calibration files: the user's clean source data, kept next to the model as plain data.

A calibration file (``<model>.calib.npz``, see :func:`default_calibration_path`) is a NumPy ``.npz``
archive written by :func:`save_calibration` and read with ``allow_pickle=False``: it holds arrays and
strings only, nothing in it runs code. It stores the calibration *data*, not fitted objects; a run that
loads it fits the pipeline on them again (scorer memories and thresholds, novel-class detector, the
adapter's source references), deterministically for a given configuration and seed.

=====================  ===================================================================================
key                    value
=====================  ===================================================================================
``format``             ``"streamtta.calibration"``
``version``            ``1``
``x``                  float32, samples × features…: the clean source samples
``y``                  int64 class indices (only when calibrated with labels)
``feature_names``      strings: the column order of ``x``, used to order JSON rows whose features are an
                       object (only when the data named their columns: CSV header, parquet, ``.npz`` key)
``model_fingerprint``  16 hex digits over the model's weights (:func:`model_fingerprint`); a file made for
                       other weights is refused
``model``              the model spec it was made for (information only)
``data_source``        the data file it came from (information only)
``created_at``         ISO time (information only)
=====================  ===================================================================================

>>> import tempfile, pathlib, torch
>>> net = torch.nn.Linear(4, 3)
>>> path = pathlib.Path(tempfile.mkdtemp()) / "net.calib.npz"
>>> _ = save_calibration(path, as_data(torch.randn(50, 4)), net, model_spec="net")
>>> load_calibration(path, net).x.shape
(50, 4)
>>> load_calibration(path, torch.nn.Linear(4, 3))
Traceback (most recent call last):
...
streamtta.calibration.data.CalibrationError: calibration file 'net.calib.npz' was made for other model weights ...
"""
from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtta.calibration.data import CalibrationData, CalibrationError, as_data, read_data
from streamtta.fingerprint import fingerprint

__all__ = ["CALIBRATION_FORMAT", "default_calibration_path", "is_calibration_file", "load_any",
           "load_calibration", "model_fingerprint", "save_calibration"]

CALIBRATION_FORMAT = "streamtta.calibration"
CALIBRATION_VERSION = 1
SUFFIX = ".calib.npz"


def model_fingerprint(model: torch.nn.Module) -> str:
    """:func:`streamtta.fingerprint.fingerprint` of the weights alone (no configuration): the same for a
    module and its TorchScript export, different for any other weights."""
    return fingerprint(model)


def default_calibration_path(model_spec: str, state_dict: str | os.PathLike | None = None) -> Path:
    """Where the calibration of a model lives: next to its weights (``sensor.pt`` -> ``sensor.calib.npz``;
    a model file, or the state dict of a ``module:factory``), else in the current directory
    (``sensor:factory`` -> ``./sensor.factory.calib.npz``)."""
    if state_dict is not None:
        return Path(state_dict).with_suffix(SUFFIX)
    p = Path(str(model_spec)).expanduser()
    if p.is_file():
        return p.with_suffix(SUFFIX)
    return Path.cwd() / f"{str(model_spec).replace(':', '.').replace(os.sep, '_')}{SUFFIX}"


def is_calibration_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix.lower() != ".npz" or not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return "format" in z.files and str(z["format"]) == CALIBRATION_FORMAT
    except (ValueError, OSError):
        return False


def save_calibration(path: str | os.PathLike, data: CalibrationData, model: torch.nn.Module, *,
                     model_spec: str = "") -> Path:
    """Write ``data`` as the calibration file of ``model`` (atomically: a reader sees the old file or the new)."""
    path = Path(path)
    arrays: dict[str, Any] = {
        "format": np.array(CALIBRATION_FORMAT), "version": np.array(CALIBRATION_VERSION),
        "x": np.ascontiguousarray(data.x, np.float32), "model_fingerprint": np.array(model_fingerprint(model)),
        "model": np.array(str(model_spec)), "data_source": np.array(data.source),
        "created_at": np.array(datetime.now().isoformat(timespec="seconds")),
    }
    if data.y is not None:
        arrays["y"] = np.asarray(data.y, np.int64)
    if data.feature_names is not None:
        arrays["feature_names"] = np.array(list(data.feature_names), dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_calibration(path: str | os.PathLike, model: torch.nn.Module | None = None) -> CalibrationData:
    """Read a calibration file; with ``model``, refuse one made for other weights (:class:`CalibrationError`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {str(p)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"{p.name} is not a calibration file ({e})") from None
    with z:
        if "format" not in z.files or str(z["format"]) != CALIBRATION_FORMAT:
            raise CalibrationError(f"{p.name} is not a streamtta calibration file (no format={CALIBRATION_FORMAT!r})")
        version = int(z["version"]) if "version" in z.files else -1
        if version != CALIBRATION_VERSION:
            raise CalibrationError(f"{p.name}: calibration file version {version}, this streamtta reads "
                                   f"{CALIBRATION_VERSION}; run `streamtta calibrate` again")
        if model is not None:
            made_for, this = str(z["model_fingerprint"]), model_fingerprint(model)
            if made_for != this:
                spec = str(z["model"]) if "model" in z.files else "?"
                raise CalibrationError(
                    f"calibration file {p.name!r} was made for other model weights (fingerprint {made_for}, model "
                    f"{spec!r}; this model: {this}): calibrate again (`streamtta calibrate --model M --data "
                    f"{str(z['data_source']) if 'data_source' in z.files else 'FILE'}`) or delete the file")
        names = z["feature_names"] if "feature_names" in z.files else None
        return as_data(z["x"], z["y"] if "y" in z.files else None, feature_names=names,
                       source=f"{p.name} (from {str(z['data_source'])})" if "data_source" in z.files else p.name)


def load_any(path: str | os.PathLike, model: torch.nn.Module | None = None,
             labels: str | None = None) -> CalibrationData:
    """A calibration file (checked against ``model``) or a data file (:func:`read_data`)."""
    if is_calibration_file(path):
        if labels is not None:
            raise CalibrationError(f"{Path(path).name} is a calibration file: its labels are fixed (no --labels)")
        return load_calibration(path, model)
    return read_data(path, labels)
