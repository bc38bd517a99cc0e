"""Tabular sensor streams: river's bundled real datasets and river's synthetic drift generators.

Everything here works offline: only datasets whose files ship inside the installed ``river``
wheel are offered (nothing is downloaded).

>>> from streamtta.simulations.sensors import load_river_dataset
>>> X, y, features, classes = load_river_dataset("segment")
>>> X.shape, X.dtype.name, y.dtype.name, len(classes)
((2310, 18), 'float32', 'int64', 7)

Besides the real data it offers :func:`load_river_split` (the fixed train/test split the sensor models
train and replay on), :func:`shift_features` (tabular covariate shifts with five severities, the
sensor counterpart of the image corruptions) and :func:`river_concept_stream` (river's SEA / Agrawal
generators chained into a stream with known concept changes).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from streamtta.types import Sample

#: Real river datasets bundled offline: our name -> river class name.
RIVER_DATASETS: dict[str, str] = {
    "segment": "ImageSegments",
    "shuttle": "Shuttle",
    "phishing": "Phishing",
    "bananas": "Bananas",
}

_ALIASES = {"imagesegments": "segment", "image_segments": "segment", "image-segments": "segment"}


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in RIVER_DATASETS:
        raise ValueError(
            f"unknown river dataset {name!r}; available offline: {sorted(RIVER_DATASETS)}"
        )
    return key


@lru_cache(maxsize=8)
def _load_cached(key: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    from river import datasets

    ds = getattr(datasets, RIVER_DATASETS[key])()
    rows: list[list[float]] = []
    targets: list = []
    features: tuple[str, ...] | None = None
    for x, t in ds:
        if features is None:
            features = tuple(x.keys())
        rows.append([float(x[f]) for f in features])
        targets.append(t)
    if features is None:  # pragma: no cover - river ships non-empty files
        raise RuntimeError(f"river dataset {key!r} is empty")
    X = np.asarray(rows, dtype=np.float32)
    originals = sorted(set(targets))
    code = {v: i for i, v in enumerate(originals)}
    y = np.fromiter((code[t] for t in targets), dtype=np.int64, count=len(targets))
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y, features, tuple(str(v) for v in originals)


def load_river_dataset(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Load one of river's bundled real datasets as arrays.

    Returns ``(X, y, feature_names, class_names)`` with ``X`` float32 ``(N, F)`` in file order,
    ``y`` int64 ``(N,)`` where the original labels are mapped to ``0..C-1`` in their sorted order,
    and ``class_names[k]`` the original label (as a string) of class ``k``.

    Names: ``"segment"`` (ImageSegments, 2310 x 18, 7 classes), ``"shuttle"`` (49097 x 9, binary
    anomaly labels), ``"phishing"`` (1250 x 9, binary), ``"bananas"`` (5300 x 2, binary).
    """
    X, y, features, classes = _load_cached(_canonical(name))
    return X.copy(), y.copy(), list(features), list(classes)


# -- train / test split ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RiverSplit:
    """A fixed, stratified split of a river dataset (the model trains on ``train``, streams replay ``test``)."""

    x_train: np.ndarray  # (N, F) float32
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]


@lru_cache(maxsize=8)
def _split_cached(key: str, test_fraction: float, seed: int) -> RiverSplit:
    from sklearn.model_selection import train_test_split

    X, y, features, classes = _load_cached(key)
    xtr, xte, ytr, yte = train_test_split(
        np.asarray(X), np.asarray(y), test_size=test_fraction, random_state=seed, stratify=np.asarray(y)
    )
    for a in (xtr, xte, ytr, yte):
        a.setflags(write=False)
    return RiverSplit(xtr, ytr, xte, yte, features, classes)


def load_river_split(name: str, test_fraction: float = 0.3, seed: int = 0) -> RiverSplit:
    """Stratified train/test split of :func:`load_river_dataset` (cached; depends only on the arguments).

    >>> s = load_river_split("segment")
    >>> s.x_train.shape[1] == s.x_test.shape[1] == 18, len(s.y_test)
    (True, 693)
    """
    return _split_cached(_canonical(name), float(test_fraction), int(seed))


# -- sensor shifts (tabular "corruptions") --------------------------------------------------------
#: Covariate shifts for feature vectors, each with severities 1..5 (in units of the feature std).
SENSOR_SHIFTS: tuple[str, ...] = ("offset", "gain", "noise", "stuck")

SENSOR_SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "offset": (0.25, 0.5, 1.0, 1.5, 2.0),  # additive bias, x std, random sign per feature
    "gain": (0.1, 0.2, 0.35, 0.5, 0.75),  # (x - mean) scaled by 1 +/- g, random sign per feature
    "noise": (0.1, 0.2, 0.4, 0.7, 1.0),  # additive Gaussian noise, x std
    "stuck": (0.1, 0.2, 0.3, 0.4, 0.5),  # fraction of sensors frozen at one reading
}


def shift_features(
    x: np.ndarray,
    name: str,
    severity: int,
    mean: np.ndarray,
    std: np.ndarray,
    domain_seed: int | np.random.SeedSequence | None = 0,
    sample_seed: int | np.random.SeedSequence | None = 0,
) -> np.ndarray:
    """Apply sensor shift ``name`` at ``severity`` to rows ``x`` (N, F).

    ``mean`` / ``std`` are per-feature reference statistics (the training split). ``domain_seed`` fixes
    what stays constant during a domain (bias signs, gain signs, which sensors are stuck and their
    value); ``sample_seed`` drives per-row noise. ``"clean"`` or ``severity == 0`` returns a copy.

    >>> import numpy as np
    >>> x = np.zeros((3, 4), np.float32)
    >>> y = shift_features(x, "offset", 5, mean=np.zeros(4), std=np.ones(4), domain_seed=1)
    >>> np.abs(y).tolist() == [[2.0] * 4] * 3
    True
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected rows of shape (N, F), got {x.shape}")
    if name == "clean" or severity == 0:
        return x.copy()
    if name not in SENSOR_SEVERITY_PARAMS:
        raise ValueError(f"unknown sensor shift {name!r}; available: {list(SENSOR_SHIFTS)} or 'clean'")
    if int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r} (shift {name!r})")
    a = SENSOR_SEVERITY_PARAMS[name][int(severity) - 1]
    f = x.shape[1]
    mean = np.asarray(mean, dtype=np.float32).reshape(f)
    std = np.where(np.asarray(std, dtype=np.float32).reshape(f) > 0, std, 1.0).astype(np.float32)
    drng = np.random.default_rng(domain_seed)
    if name == "offset":
        sign = drng.choice([-1.0, 1.0], size=f).astype(np.float32)
        return x + a * std * sign
    if name == "gain":
        sign = drng.choice([-1.0, 1.0], size=f).astype(np.float32)
        return mean + (x - mean) * (1.0 + a * sign)
    if name == "noise":
        srng = np.random.default_rng(sample_seed)
        return x + (a * std * srng.standard_normal(x.shape)).astype(np.float32)
    # stuck: a fixed subset of sensors reports one constant value for the whole domain
    k = max(1, int(round(a * f)))
    cols = drng.choice(f, size=k, replace=False)
    value = mean[cols] + std[cols] * drng.standard_normal(k).astype(np.float32)
    out = x.copy()
    out[:, cols] = value
    return out


# -- river synthetic concept-drift streams --------------------------------------------------------
_SYNTH = {"sea": ("SEA", "variant", 4), "agrawal": ("Agrawal", "classification_function", 10)}


@dataclass(frozen=True)
class ConceptStream:
    """A finite synthetic stream with known concept changes."""

    x: np.ndarray  # (N, F) float32
    y: np.ndarray  # (N,) int64
    concept: np.ndarray  # (N,) int64: generator variant of each row
    change_points: tuple[int, ...]  # first index of each transition
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def iter_samples(self, stream_id: str = "concept-stream") -> Iterator[Sample]:
        """One :class:`~streamtta.types.Sample` per row; ``domain`` is ``"concept-<k>"``."""
        for t in range(len(self.y)):
            yield Sample(x=self.x[t], stream_id=stream_id, label=int(self.y[t]), event_time=float(t),
                         domain=f"concept-{int(self.concept[t])}", is_unknown=False, meta={"index": t})


def river_concept_stream(
    kind: str = "sea",
    concepts: tuple[int, ...] = (0, 1, 2, 3),
    samples_per_concept: int = 2000,
    width: int = 0,
    seed: int = 0,
) -> ConceptStream:
    """Concept drift from river generators (``"sea"`` variants 0-3, ``"agrawal"`` functions 0-9).

    Concept ``concepts[k]`` holds the segment ``[k * samples_per_concept, (k+1) * samples_per_concept)``.
    With ``width`` > 0 each change is gradual, like river's ``ConceptDriftStream``: over the first
    ``width`` samples of a segment, a row comes from the new concept with probability rising linearly.
    These are *real* concept drifts (P(y|x) changes); the inputs' distribution stays the same.

    >>> s = river_concept_stream("sea", concepts=(0, 2), samples_per_concept=50, seed=1)
    >>> s.x.shape, s.change_points, sorted(set(s.concept.tolist()))
    ((100, 3), (50,), [0, 2])
    """
    from river.datasets import synth

    if kind not in _SYNTH:
        raise ValueError(f"unknown synthetic stream {kind!r}; available: {sorted(_SYNTH)}")
    cls_name, arg, n_variants = _SYNTH[kind]
    for c in concepts:
        if not 0 <= int(c) < n_variants:
            raise ValueError(f"{kind} concept must be in 0..{n_variants - 1}, got {c!r}")
    if samples_per_concept <= 0 or not 0 <= width <= samples_per_concept:
        raise ValueError(f"need samples_per_concept > 0 and 0 <= width <= samples_per_concept, got {samples_per_concept}, {width}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EA]))
    concept = np.repeat(np.asarray(concepts, dtype=np.int64), samples_per_concept)
    cps = []
    for k in range(1, len(concepts)):
        start = k * samples_per_concept
        if concepts[k] == concepts[k - 1]:
            continue
        cps.append(start)
        if width:
            j = np.arange(width)
            old = rng.random(width) >= (j + 1) / (width + 1)
            concept[start : start + width] = np.where(old, concepts[k - 1], concepts[k])
    # one generator per concept, all seeded from ``seed`` so the input stream is reproducible
    gens = {c: iter(getattr(synth, cls_name)(**{arg: int(c)}, seed=int(seed) * 1000 + int(c))) for c in set(concept.tolist())}
    rows, ys, features = [], [], None
    for c in concept.tolist():
        xd, t = next(gens[c])
        if features is None:
            features = tuple(str(k) for k in xd)
        rows.append(list(xd.values()))
        ys.append(int(t))
    return ConceptStream(
        np.asarray(rows, dtype=np.float32), np.asarray(ys, dtype=np.int64), concept, tuple(cps), features or ()
    )
