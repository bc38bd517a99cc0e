"""Loader for the public CIFAR-10-C / CIFAR-100-C ``.npy`` layout (nothing is downloaded).

A directory such as ``CIFAR-10-C/`` holds one ``<corruption>.npy`` per corruption, each of shape
``(50000, 32, 32, 3)`` uint8 (10,000 test images per severity 1..5, in that order), and
``labels.npy`` with the matching labels. Arrays are memory-mapped, so only the requested slice
is read.

>>> import numpy as np, tempfile, os
>>> from streamtta.simulations.cifar_c import load_cifar_c
>>> d = tempfile.mkdtemp()
>>> np.save(os.path.join(d, "fog.npy"), np.zeros((50, 32, 32, 3), np.uint8))
>>> np.save(os.path.join(d, "labels.npy"), np.arange(50) % 10)
>>> x, y = load_cifar_c(d, "fog", severity=2, n_examples=4)  # 10 images per severity here
>>> x.shape, x.dtype.name, y.tolist()
((4, 3, 32, 32), 'float32', [0, 1, 2, 3])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

#: The 15 benchmark corruptions, in the standard order.
CIFAR_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
#: The four extra corruptions shipped in the same folders.
CIFAR_C_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
PER_SEVERITY = 10_000


def _open(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as exc:  # pragma: no cover - corrupt header
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def cifar_c_labels(root: str | Path, severity: int = 1, dataset: str = "cifar10", per_severity: int = PER_SEVERITY) -> np.ndarray:
    """Labels (int64) of the ``per_severity`` images of one severity block.

    ``labels.npy`` may hold ``5 * per_severity`` labels (the public layout) or one block of
    ``per_severity`` labels shared by all severities.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {dataset!r}")
    root = Path(root)
    labels = _open(root / "labels.npy", "CIFAR-C labels file")
    if labels.ndim != 1:
        raise ValueError(f"{root / 'labels.npy'}: expected a 1-d label array, got shape {labels.shape}")
    if labels.shape[0] == 5 * per_severity:
        lo = (int(severity) - 1) * per_severity
    elif labels.shape[0] == per_severity:  # one block shared by all severities
        lo = 0
    else:
        raise ValueError(
            f"{root / 'labels.npy'}: has {labels.shape[0]} labels, expected {5 * per_severity} "
            f"(5 severities x {per_severity}) or {per_severity}"
        )
    y = np.asarray(labels[lo : lo + per_severity], dtype=np.int64)
    k = NUM_CLASSES[dataset]
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{root / 'labels.npy'}: labels outside 0..{k - 1} for dataset {dataset!r}")
    return y


def load_cifar_c(
    root: str | Path,
    corruption: str,
    severity: int,
    n_examples: int | None = None,
    dataset: str = "cifar10",
    per_severity: int | None = None,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one corruption at one severity as ``(x NCHW float32 in [0,1], y int64)``.

    ``n_examples`` keeps the first ``n`` images of the severity block (as robustbench does);
    ``indices`` (positions inside the block) selects arbitrary images instead. ``per_severity``
    (10,000 in the public files) is inferred as a fifth of the file's length when not given.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, got {dataset!r}")
    known = CIFAR_C_CORRUPTIONS + CIFAR_C_EXTRA
    if corruption not in known:
        raise ValueError(f"unknown CIFAR-C corruption {corruption!r}; expected one of {list(known)}")
    if int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    severity = int(severity)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-C directory not found: {root}")
    path = root / f"{corruption}.npy"
    images = _open(path, f"CIFAR-C corruption file for {corruption!r}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected a uint8 array of shape (5 * n_per_severity, 32, 32, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if per_severity is None:
        if images.shape[0] == 0 or images.shape[0] % 5:
            raise ValueError(f"{path}: {images.shape[0]} images cannot be split into 5 severities")
        per_severity = images.shape[0] // 5
    if images.shape[0] != 5 * per_severity:
        raise ValueError(f"{path}: expected {5 * per_severity} images (5 severities), got {images.shape[0]}")
    y_all = cifar_c_labels(root, severity, dataset, per_severity)
    lo = (severity - 1) * per_severity
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= per_severity):
            raise ValueError(f"indices must lie in 0..{per_severity - 1}")
    else:
        n = per_severity if n_examples is None else int(n_examples)
        if not 0 < n <= per_severity:
            raise ValueError(f"n_examples must be in 1..{per_severity}, got {n_examples!r}")
        idx = np.arange(n)
    order = np.argsort(idx, kind="stable")  # read the memmap in increasing order
    raw = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
    raw[order] = images[lo + idx[order]]
    x = raw.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray(x), y_all[idx]
