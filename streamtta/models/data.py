"""Clean source data of the built-in datasets, split exactly as the source models saw it.

Two datasets ship offline: ``"digits"`` (scikit-learn handwriting, 1x32x32 images in [0, 1]) and
``"segment"`` (river ImageSegments, 18 raw features, 7 classes). The train/test split is fixed by
``(test_fraction, seed)``; the *holdout* is a stratified slice of the known-class train split,
kept out of training so OOD thresholds can be calibrated on clean in-distribution data that is
neither training nor test data.

>>> split = load_dataset_split("digits")
>>> split.x_train.shape[1:], split.num_classes, split.kind
((1, 32, 32), 10, 'image')
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from streamtta.models.checkpoint import ModelMeta

#: Built-in datasets: name -> kind (``"image"`` or ``"tabular"``).
DATASETS: dict[str, str] = {"digits": "image", "segment": "tabular"}
_ALIASES = {"imagesegments": "segment", "image_segments": "segment", "image-segments": "segment"}


@dataclass(frozen=True)
class DatasetSplit:
    """Clean train/test arrays of one dataset; ``y`` are dataset class ids ``0..C-1``."""

    name: str
    kind: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def canonical_dataset(name: str) -> str:
    """Lower-cased built-in dataset name (``"Segment"`` -> ``"segment"``); errors name the options."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown source dataset {name!r}; built-in datasets: {sorted(DATASETS)}")
    return key


def load_dataset_split(name: str, test_fraction: float = 0.3, seed: int = 0) -> DatasetSplit:
    """The clean, stratified train/test split of a built-in dataset (deterministic in ``seed``)."""
    key = canonical_dataset(name)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if key == "digits":
        from streamtta.simulations.digits import NUM_CLASSES, load_digits_32

        d = load_digits_32(test_fraction=test_fraction, seed=seed)
        names = [str(i) for i in range(NUM_CLASSES)]
        return DatasetSplit(key, "image", d.x_train, d.y_train, d.x_test, d.y_test, names)
    from sklearn.model_selection import train_test_split

    from streamtta.simulations.sensors import load_river_dataset

    x, y, _features, class_names = load_river_dataset(key)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    idx_tr, idx_te = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    return DatasetSplit(key, "tabular", x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], list(class_names))


def holdout_indices(y_train: np.ndarray, known_classes: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the known-class rows of the train split into ``(fit_idx, holdout_idx)`` (stratified).

    Indices point into ``y_train``; ``holdout_idx`` comes in a seeded random order, so its first
    ``n`` entries are a fair subsample.
    """
    known_idx = np.flatnonzero(np.isin(y_train, np.asarray(list(known_classes))))
    if fraction <= 0.0:
        return known_idx, np.zeros(0, dtype=np.int64)
    if not fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    from sklearn.model_selection import train_test_split

    fit_idx, hold_idx = train_test_split(
        known_idx, test_size=fraction, random_state=seed, stratify=y_train[known_idx]
    )
    return np.sort(fit_idx), np.asarray(hold_idx, dtype=np.int64)


def indices_digest(idx: np.ndarray) -> str:
    """Short fingerprint of an index array (recorded in checkpoints to detect split drift)."""
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def _to_torch(x: np.ndarray, y: np.ndarray, meta: "ModelMeta", as_index: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y = np.asarray(y, dtype=np.int64)
    if as_index:
        index = meta.class_index()
        y = np.fromiter((index.get(int(c), -1) for c in y), dtype=np.int64, count=len(y))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(y))


def _meta_split(meta: "ModelMeta") -> tuple[DatasetSplit, np.ndarray, np.ndarray]:
    split = load_dataset_split(meta.dataset, meta.data_split.test_fraction, meta.data_split.seed)
    fit_idx, hold_idx = holdout_indices(split.y_train, meta.classes, meta.data_split.holdout_fraction, meta.data_split.seed)
    recorded = meta.data_split.holdout_digest
    if recorded is not None and indices_digest(hold_idx) != recorded:
        raise RuntimeError(
            f"the holdout split recomputed for {meta.name!r} (digest {indices_digest(hold_idx)}) differs from the "
            f"one recorded at training time ({recorded}); a different scikit-learn version may split differently"
        )
    return split, fit_idx, hold_idx


def load_source_train(meta: "ModelMeta", *, as_index: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean known-class rows the model was trained on, ``(x float32, y int64)``.

    ``y`` holds dataset class ids (the ids of ``meta.classes``, like ``Sample.label`` in streams);
    ``as_index=True`` gives model output indices instead (targets for ``cross_entropy``).
    """
    split, fit_idx, _ = _meta_split(meta)
    return _to_torch(split.x_train[fit_idx], split.y_train[fit_idx], meta, as_index)


def source_holdout(meta: "ModelMeta", n: int | None = None, *, as_index: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean in-distribution rows never used for training (for OOD-threshold calibration).

    Returns ``(x, y)``; ``y`` as in :func:`load_source_train`. ``n`` takes a seeded random subset.
    """
    split, _, hold_idx = _meta_split(meta)
    if len(hold_idx) == 0:
        raise ValueError(f"model {meta.name!r} was trained without a holdout (holdout_fraction=0)")
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        hold_idx = hold_idx[:n]
    return _to_torch(split.x_train[hold_idx], split.y_train[hold_idx], meta, as_index)


def load_source_test(
    meta: "ModelMeta", *, include_unknown: bool = False, as_index: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean test split (known classes; with ``include_unknown`` also the unknown classes).

    ``y`` holds dataset class ids; with ``as_index=True`` model output indices, and ``-1`` for
    unknown-class rows.
    """
    split = load_dataset_split(meta.dataset, meta.data_split.test_fraction, meta.data_split.seed)
    keep = np.isin(split.y_test, meta.classes)
    if include_unknown:
        keep |= np.isin(split.y_test, meta.unknown_classes)
    return _to_torch(split.x_test[keep], split.y_test[keep], meta, as_index)
