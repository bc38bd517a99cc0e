"""Data providers: the pools of inputs a scenario draws from, and how one condition is rendered.

A provider holds the clean (or, for CIFAR-C, pre-corrupted) inputs of three pools -- :data:`KNOWN`
classes, :data:`HELDOUT` unknown classes and :data:`EXTERNAL` synthetic OOD inputs -- with their labels,
and renders a block of pool entries under one ``(domain, severity)`` condition.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import corruptions as _corr
from .. import sensors as _sens
from ..schedules import Condition
from .spec import Scenario, ScenarioError, SensorSpec

KNOWN, HELDOUT, EXTERNAL = 0, 1, 2
_EXTERNAL_POOL = 512


def _ext_images(source: str, n: int, channels: int, seed: int) -> np.ndarray:
    """Deterministic out-of-distribution images (N, C, 32, 32) in [0, 1]."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7]))
    if source == "uniform-noise":
        return rng.random((n, channels, 32, 32), dtype=np.float32)
    if source == "smooth-noise":
        import torch
        import torch.nn.functional as F

        low = torch.from_numpy(rng.random((n, channels, 4, 4), dtype=np.float32))
        up = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False)
        return up.clamp_(0.0, 1.0).numpy()
    if source == "patches":  # random crops of the two photos bundled with scikit-learn
        import torch
        import torch.nn.functional as F
        from sklearn.datasets import load_sample_images

        photos = [np.asarray(im, dtype=np.float32) / 255.0 for im in load_sample_images().images]
        out = np.empty((n, channels, 32, 32), dtype=np.float32)
        for i in range(n):
            im = photos[rng.integers(len(photos))]
            size = int(rng.integers(32, 129))
            r, c = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
            crop = torch.from_numpy(np.ascontiguousarray(im[r : r + size, c : c + size].transpose(2, 0, 1)))[None]
            crop = F.interpolate(crop, size=(32, 32), mode="area")[0].numpy()
            out[i] = crop.mean(axis=0, keepdims=True) if channels == 1 else crop
        return out
    raise ValueError(f"unknown image OOD source {source!r}")


class _Provider:
    """Pools of clean (or pre-corrupted) inputs and how to render one condition."""

    sample_shape: tuple[int, ...]
    pool_labels: dict[int, np.ndarray]

    def render(self, cond: Condition, pool: int, base: np.ndarray, domain_seed: np.random.SeedSequence,
               sample_seed: np.random.SeedSequence) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


class _DigitsProvider(_Provider):
    def __init__(self, known: list[int], unknown: list[int], ood_source: str, seed: int) -> None:
        from ..digits import load_digits_32

        d = load_digits_32()
        self.sample_shape = tuple(d.x_test.shape[1:])
        self.images: dict[int, np.ndarray] = {}
        self.pool_labels = {}
        for pool, classes in ((KNOWN, known), (HELDOUT, unknown)):
            sel = np.isin(d.y_test, classes)
            self.images[pool] = d.x_test[sel]
            self.pool_labels[pool] = d.y_test[sel].astype(np.int64)
        if ood_source != "heldout":
            self.images[EXTERNAL] = _ext_images(ood_source, _EXTERNAL_POOL, self.sample_shape[0], seed)
            self.pool_labels[EXTERNAL] = np.full(_EXTERNAL_POOL, -1, dtype=np.int64)

    def render(self, cond, pool, base, domain_seed, sample_seed):
        x = self.images[pool][base]
        domain, sev = cond
        if domain == "clean":
            return x.copy()
        return _corr.corrupt(x, domain, sev, np.random.default_rng(sample_seed))

    def describe(self) -> dict[str, Any]:
        return {"source": "sklearn digits, test split of load_digits_32(test_fraction=0.3, seed=0)",
                "pool_sizes": {str(k): int(len(v)) for k, v in self.pool_labels.items()}}


class _CifarProvider(_Provider):
    def __init__(self, root: Path, dataset: str, domains: list[str], known: list[int], unknown: list[int],
                 ood_source: str, seed: int) -> None:
        from ..cifar_c import cifar_c_labels, load_cifar_c

        self._load = load_cifar_c
        self.root, self.dataset = root, dataset.replace("-c", "")
        if not root.is_dir():
            raise FileNotFoundError(
                f"CIFAR-C directory not found: {root} (set data_dir in the scenario or pass data_dir=...)"
            )
        first = root / f"{domains[0]}.npy"
        if not first.is_file():
            raise FileNotFoundError(f"CIFAR-C corruption file not found: {first}")
        n_total = np.load(first, mmap_mode="r").shape[0]
        if n_total % 5:
            raise ValueError(f"{first}: {n_total} images cannot be split into 5 severities")
        self.per_severity = n_total // 5
        for d in domains:
            if not (root / f"{d}.npy").is_file():
                raise FileNotFoundError(f"CIFAR-C corruption file not found: {root / f'{d}.npy'}")
        y = cifar_c_labels(root, 1, self.dataset, self.per_severity)
        self.sample_shape = (3, 32, 32)
        self.positions: dict[int, np.ndarray] = {}
        self.pool_labels = {}
        for pool, classes in ((KNOWN, known), (HELDOUT, unknown)):
            sel = np.flatnonzero(np.isin(y, classes))
            self.positions[pool] = sel
            self.pool_labels[pool] = y[sel]
        self.external = None
        if ood_source != "heldout":
            self.external = _ext_images(ood_source, _EXTERNAL_POOL, 3, seed)
            self.pool_labels[EXTERNAL] = np.full(_EXTERNAL_POOL, -1, dtype=np.int64)

    def render(self, cond, pool, base, domain_seed, sample_seed):
        domain, sev = cond
        if pool == EXTERNAL:
            assert self.external is not None
            x = self.external[base]
            if domain in _corr.available_corruptions():
                return _corr.corrupt(x, domain, sev, np.random.default_rng(sample_seed))
            return x.copy()  # no in-house version of this corruption: OOD images stay clean
        x, _ = self._load(self.root, domain, sev, dataset=self.dataset, per_severity=self.per_severity,
                          indices=self.positions[pool][base])
        return x

    def describe(self) -> dict[str, Any]:
        return {"source": f"{self.dataset.upper()}-C files in {self.root}", "per_severity": self.per_severity,
                "pool_sizes": {str(k): int(len(v)) for k, v in self.pool_labels.items()}}


class _SensorProvider(_Provider):
    def __init__(self, spec: SensorSpec, known: list[int], unknown: list[int], ood_source: str, seed: int) -> None:
        split = _sens.load_river_split(spec.source, spec.test_fraction, spec.split_seed)
        self.spec = spec
        self.mean = split.x_train.mean(axis=0)
        self.std = split.x_train.std(axis=0)
        self.sample_shape = (split.x_test.shape[1],)
        self.rows: dict[int, np.ndarray] = {}
        self.pool_labels = {}
        for pool, classes in ((KNOWN, known), (HELDOUT, unknown)):
            sel = np.isin(split.y_test, classes)
            self.rows[pool] = split.x_test[sel]
            self.pool_labels[pool] = split.y_test[sel].astype(np.int64)
        if ood_source == "uniform-noise":
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE7]))
            lo, hi = split.x_train.min(axis=0), split.x_train.max(axis=0)
            self.rows[EXTERNAL] = (lo + (hi - lo) * rng.random((_EXTERNAL_POOL, len(lo)))).astype(np.float32)
            self.pool_labels[EXTERNAL] = np.full(_EXTERNAL_POOL, -1, dtype=np.int64)
        self.feature_names = split.feature_names
        self.class_names = split.class_names

    def render(self, cond, pool, base, domain_seed, sample_seed):
        domain, sev = cond
        return _sens.shift_features(self.rows[pool][base], domain, sev, self.mean, self.std, domain_seed, sample_seed)

    def describe(self) -> dict[str, Any]:
        return {"source": f"river {self.spec.source}, test split (test_fraction={self.spec.test_fraction}, "
                          f"seed={self.spec.split_seed})",
                "feature_names": list(self.feature_names), "class_names": list(self.class_names),
                "pool_sizes": {str(k): int(len(v)) for k, v in self.pool_labels.items()}}


def build_provider(sc: Scenario, seed: int, data_dir: str | os.PathLike[str] | None = None) -> _Provider:
    """The provider of ``sc``'s dataset; ``data_dir`` (then ``sc.data_dir``, then ``$STREAMTTA_DATA_DIR``)
    locates the CIFAR-C files."""
    known, unknown = sc.known(), list(sc.unknown_classes)
    if sc.dataset == "digits-c":
        return _DigitsProvider(known, unknown, sc.ood.source, seed)
    if sc.dataset in ("cifar10-c", "cifar100-c"):
        root = data_dir or sc.data_dir or os.environ.get("STREAMTTA_DATA_DIR")
        if root is None:
            raise ScenarioError(f"scenario {sc.name!r}: dataset {sc.dataset} needs data_dir (the CIFAR-C folder)")
        return _CifarProvider(Path(root).expanduser(), sc.dataset, sc.domain_list(), known, unknown, sc.ood.source, seed)
    assert sc.sensor is not None
    return _SensorProvider(sc.sensor, known, unknown, sc.ood.source, seed)
