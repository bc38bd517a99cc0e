"""Read a user's clean source data for calibration: ``.npz``, ``.npy``, ``.csv`` or ``.parquet``.

* ``.npz`` -- ``x`` (samples × features…) and optional ``y`` (integer class indices); ``labels=KEY`` takes
  the labels from another key; an optional 1-D string array ``feature_names`` names the features;
* ``.npy`` -- ``x`` alone (no labels);
* ``.csv`` -- numeric columns, one sample per row; a first row that is not all numbers is the header
  (the feature names). ``labels=COLUMN`` names the label column (by header name, or by 0-based index);
* ``.parquet`` -- numeric columns as for CSV; needs ``pyarrow`` (or ``pandas`` with a parquet engine).

Everything loads as plain data (``allow_pickle=False``; nothing in a file runs code).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "rows.csv"
>>> _ = p.write_text("temp,rpm,label\\n21.5,900,0\\n22.0,950,1\\n")
>>> d = read_data(p, labels="label")
>>> d.x.tolist(), d.y.tolist(), d.feature_names
([[21.5, 900.0], [22.0, 950.0]], [0, 1], ('temp', 'rpm'))
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CalibrationError", "CalibrationData", "read_data", "as_data", "DATA_SUFFIXES"]

#: the data files :func:`read_data` reads
DATA_SUFFIXES = (".npz", ".npy", ".csv", ".parquet")


class CalibrationError(ValueError):
    """Calibration data or a calibration file cannot be used; the message says why and what to do."""


@dataclass
class CalibrationData:
    """Clean source samples ``x`` (float32, samples × features…), optional integer labels ``y``, optional
    feature names (the column order of ``x``) and where they came from."""

    x: np.ndarray
    y: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None
    source: str = "arrays"

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def describe(self) -> str:
        kind = "labelled" if self.labelled else "no labels: unsupervised (the model's predictions stand in for classes)"
        return f"{self.source}: {len(self.x)} samples of shape {tuple(self.x.shape[1:])}, {kind}"


def as_data(x: Any, y: Any = None, *, feature_names: Any = None, source: str = "arrays") -> CalibrationData:
    """Validate arrays: at least 2 dimensions after batching, finite floats, integer labels of matching length."""
    xa = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if xa.dtype.kind not in "fiu":
        raise CalibrationError(f"{source}: x must be numeric, got dtype {xa.dtype}")
    xa = xa.astype(np.float32)
    if xa.ndim == 1:
        xa = xa[:, None]
    if xa.ndim < 2 or len(xa) == 0:
        raise CalibrationError(f"{source}: x must hold samples × features…, got shape {xa.shape}")
    bad = ~np.isfinite(xa)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise CalibrationError(f"{source}: x has {int(bad.sum())} non-finite value(s) (first in sample {row})")
    ya = None
    if y is not None:
        ya = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y).reshape(-1)
        if ya.dtype.kind == "f":
            if not np.all(np.isfinite(ya)) or not np.all(ya == np.round(ya)):
                raise CalibrationError(f"{source}: labels must be integer class indices, got non-integer values")
        elif ya.dtype.kind not in "iu":
            raise CalibrationError(f"{source}: labels must be integer class indices, got dtype {ya.dtype}")
        ya = ya.astype(np.int64)
        if len(ya) != len(xa):
            raise CalibrationError(f"{source}: {len(xa)} samples but {len(ya)} labels")
    names = None
    if feature_names is not None:
        names = tuple(str(n) for n in np.asarray(feature_names).reshape(-1).tolist())
        if xa.ndim != 2 or len(names) != xa.shape[1] or len(set(names)) != len(names) or not all(names):
            raise CalibrationError(f"{source}: {len(names)} feature names for x of shape {xa.shape} (need one "
                                   "distinct non-empty name per column of 2-D x)")
    return CalibrationData(xa, ya, names, source)


def read_data(path: str | os.PathLike, labels: str | None = None) -> CalibrationData:
    """Read a data file (format by suffix, see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration data file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _read_npz(p, labels)
    if suffix == ".npy":
        if labels is not None:
            raise CalibrationError(f"{p.name}: a .npy file holds x only; put labels in a .npz (keys x, y) or a "
                                   "CSV/parquet column")
        return as_data(_np_load(p), source=p.name)
    if suffix == ".csv":
        return _read_csv(p, labels)
    if suffix == ".parquet":
        return _read_parquet(p, labels)
    raise CalibrationError(f"{p.name}: unknown data format {suffix or '(no suffix)'!r}; use one of "
                           f"{', '.join(DATA_SUFFIXES)}")


def _np_load(p: Path) -> Any:
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise CalibrationError(f"{p.name}: cannot be loaded as plain data ({e})") from None


def _read_npz(p: Path, labels: str | None) -> CalibrationData:
    with _np_load(p) as z:
        keys = list(z.files)
        if "x" not in keys:
            raise CalibrationError(f"{p.name}: a .npz needs the key 'x' (samples × features…) and optionally 'y'; "
                                   f"it has {keys}")
        ykey = labels if labels is not None else ("y" if "y" in keys else None)
        if ykey is not None and ykey not in keys:
            raise CalibrationError(f"{p.name}: no labels key {ykey!r}; it has {keys}")
        names = _array(z, "feature_names", p) if "feature_names" in keys else None
        return as_data(_array(z, "x", p), _array(z, ykey, p) if ykey else None, feature_names=names, source=p.name)


def _array(z: Any, key: str, p: Path) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:  # an object array needs pickle: refused
        raise CalibrationError(f"{p.name}: {key!r} cannot be loaded as plain data ({e})") from None


def _number(cell: str) -> float | None:
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _label_column(labels: str | None, header: list[str] | None, width: int, name: str) -> int | None:
    if labels is None:
        return None
    if header is not None and labels in header:
        return header.index(labels)
    if labels.isdigit() and int(labels) < width:
        return int(labels)
    known = f"columns {header}" if header is not None else f"{width} unnamed columns (give a 0-based index)"
    raise CalibrationError(f"{name}: no label column {labels!r}; it has {known}")


def _read_csv(p: Path, labels: str | None) -> CalibrationData:
    with p.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise CalibrationError(f"{p.name}: empty CSV file")
    header = None
    if any(_number(c) is None for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(header) if header is not None else len(rows[0]) if rows else 0
    col = _label_column(labels, header, width, p.name)
    values = np.empty((len(rows), width), np.float64)
    for i, r in enumerate(rows):
        if len(r) != width:
            raise CalibrationError(f"{p.name}: row {i + 1 + (header is not None)} has {len(r)} columns, expected {width}")
        for j, c in enumerate(r):
            v = _number(c)
            if v is None:
                where = header[j] if header is not None else j
                raise CalibrationError(f"{p.name}: row {i + 1 + (header is not None)}, column {where!r}: {c!r} is "
                                       "not a finite number (feature and label columns must be numeric)")
            values[i, j] = v
    keep = [j for j in range(width) if j != col]
    names = [header[j] for j in keep] if header is not None else None
    return as_data(values[:, keep], values[:, col] if col is not None else None, feature_names=names, source=p.name)


def _read_parquet(p: Path, labels: str | None) -> CalibrationData:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        columns = {name: table.column(name).to_numpy() for name in table.column_names}
    except ImportError:
        try:
            import pandas as pd

            df = pd.read_parquet(p)
        except ImportError:
            raise CalibrationError(f"{p.name}: reading .parquet needs pyarrow (pip install pyarrow) or pandas with a "
                                   "parquet engine; or save the data as .npz (x, y) or .csv") from None
        columns = {str(c): df[c].to_numpy() for c in df.columns}
    names = list(columns)
    col = _label_column(labels, names, len(names), p.name)
    bad = [n for n in names if np.asarray(columns[n]).dtype.kind not in "fiu"]
    if bad:
        raise CalibrationError(f"{p.name}: non-numeric column(s) {bad} (feature and label columns must be numeric)")
    feats = [n for i, n in enumerate(names) if i != col]
    x = np.stack([np.asarray(columns[n], np.float64) for n in feats], axis=1) if feats else np.empty((0, 0))
    return as_data(x, columns[names[col]] if col is not None else None, feature_names=feats, source=p.name)
