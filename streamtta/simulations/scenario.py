"""Simulation scenarios: a validated TOML description -> a reproducible, lazily generated stream.

A :class:`Scenario` says which data, which shifts and in which order; :func:`build_stream` turns it
(plus a seed) into a :class:`SimStream`. The stream plan (which image, which domain and severity, which
position is an unknown) is drawn up front as small integer arrays; the images themselves are corrupted
chunk by chunk only when iterated, so a 100k-sample stream never sits in memory at once.

>>> from streamtta.simulations.scenario import Scenario, build_stream
>>> sc = Scenario(name="demo", dataset="digits-c", model="digits-resnet", domains=["fog", "contrast"],
...               samples_per_domain=50, known_classes=list(range(8)), unknown_classes=[8, 9],
...               ood={"ratio": 0.2, "source": "heldout"})
>>> s = build_stream(sc, seed=0)
>>> len(s), s.change_points, int(s.is_unknown.sum())
(100, [50], 20)
>>> first = next(s.iter_samples())
>>> first.x.shape, first.domain, first.stream_id
((1, 32, 32), 'fog', 'demo:0')
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamtta.types import Sample

from . import corruptions as _corr
from . import sensors as _sens
from .cifar_c import CIFAR_C_CORRUPTIONS, CIFAR_C_EXTRA
from .orderings import make_order
from .schedules import Condition, Schedule, continual, mixed, ood_mask

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_CHUNK = 1024
#: Scenario files shipped with the repository (top-level ``simulations/``).
REPO_SCENARIO_DIR = Path(__file__).resolve().parents[2] / "simulations"

Severity = Annotated[int, Field(ge=1, le=5)]


class ScenarioError(ValueError):
    """A scenario file could not be read or validated; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderingSpec(_Strict):
    """Label order inside each domain segment."""

    kind: Literal["iid", "dirichlet", "sorted"] = "iid"
    delta: float = Field(0.1, ge=0.0, description="Dirichlet concentration; 0 = fully sorted")
    num_chunks: int | None = Field(None, ge=1, description="Dirichlet chunks; default = number of classes")


class TransitionSpec(_Strict):
    """How the stream moves from one domain segment to the next."""

    kind: Literal["abrupt", "ramp"] = "abrupt"
    length: int = Field(0, ge=0, description="ramp length in samples (kind = 'ramp')")

    @model_validator(mode="after")
    def _check(self) -> "TransitionSpec":
        if self.kind == "ramp" and self.length <= 0:
            raise ValueError("length: a 'ramp' transition needs length > 0")
        if self.kind == "abrupt" and self.length:
            raise ValueError("length: an 'abrupt' transition takes no length")
        return self


class OODSpec(_Strict):
    """Unknown samples injected at ``ratio`` inside ``[start, stop)``."""

    ratio: float = Field(0.0, ge=0.0, lt=1.0)
    source: Literal["heldout", "uniform-noise", "smooth-noise", "patches"] = "heldout"
    start: int = Field(0, ge=0)
    stop: int | None = Field(None, ge=1)


class SensorSpec(_Strict):
    """Which river dataset a ``sensor`` scenario replays (its fixed test split)."""

    source: Literal["segment", "shuttle", "phishing", "bananas"] = "segment"
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    split_seed: int = 0


def _num_classes(dataset: str, sensor: SensorSpec | None) -> int:
    if dataset in ("digits-c", "cifar10-c"):
        return 10
    if dataset == "cifar100-c":
        return 100
    src = (sensor or SensorSpec()).source
    return len(_sens.load_river_split(src).class_names)


def _domain_names(dataset: str) -> tuple[str, ...]:
    if dataset == "digits-c":
        return _corr.available_corruptions() + ("clean",)
    if dataset in ("cifar10-c", "cifar100-c"):
        return CIFAR_C_CORRUPTIONS + CIFAR_C_EXTRA
    return _sens.SENSOR_SHIFTS + ("clean",)


def _all_domains(dataset: str) -> list[str]:
    if dataset == "digits-c":
        return list(_corr.CORRUPTIONS)
    if dataset in ("cifar10-c", "cifar100-c"):
        return list(CIFAR_C_CORRUPTIONS)
    return list(_sens.SENSOR_SHIFTS)


class Scenario(_Strict):
    """One simulation scenario (what a ``simulations/*.toml`` file holds)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    dataset: Literal["digits-c", "cifar10-c", "cifar100-c", "sensor"]
    model: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="built-in checkpoint name")
    data_dir: str | None = Field(None, description="CIFAR-C folder (cifar*-c only)")
    sensor: SensorSpec | None = None
    known_classes: list[int] | None = Field(None, description="default: every class not unknown")
    unknown_classes: list[int] = Field(default_factory=list)
    setting: Literal["continual", "mixed"] = "continual"
    domains: list[str] | Literal["all"] = "all"
    severity: Severity | list[Severity] = 5
    samples_per_domain: int | None = Field(None, ge=1)
    n_samples: int | None = Field(None, ge=1)
    ordering: OrderingSpec = OrderingSpec()
    transition: TransitionSpec = TransitionSpec()
    ood: OODSpec = OODSpec()
    reset_each_domain: bool = Field(False, description="engine hint: reset the adapter at every domain start")
    batch_size: int = Field(64, ge=1, description="engine hint")
    seed: int = 0

    @field_validator("severity")
    @classmethod
    def _nonempty(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("the severity list is empty")
        return v

    @field_validator("domains")
    @classmethod
    def _domains_nonempty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("the domains list is empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Scenario":
        ds = self.dataset
        if ds == "sensor" and self.sensor is None:
            object.__setattr__(self, "sensor", SensorSpec())
        if ds != "sensor" and self.sensor is not None:
            raise ValueError(f"sensor: the [sensor] table is only valid with dataset = 'sensor' (got dataset {ds!r})")
        if not ds.startswith("cifar") and self.data_dir is not None:
            raise ValueError(f"data_dir: only used by cifar10-c / cifar100-c (got dataset {ds!r})")
        if isinstance(self.domains, list):
            valid = _domain_names(ds)
            bad = [d for d in self.domains if d not in valid]
            if bad:
                raise ValueError(f"domains: unknown domain(s) {bad} for dataset {ds!r}; valid: {list(valid)}")
        k = _num_classes(ds, self.sensor)
        for fname in ("known_classes", "unknown_classes"):
            vals = getattr(self, fname) or []
            bad = [c for c in vals if not 0 <= c < k]
            if bad:
                raise ValueError(f"{fname}: class(es) {bad} outside 0..{k - 1} for dataset {ds!r}")
            if len(set(vals)) != len(vals):
                raise ValueError(f"{fname}: duplicate classes in {vals}")
        overlap = set(self.known_classes or []) & set(self.unknown_classes)
        if overlap:
            raise ValueError(f"unknown_classes: overlap with known_classes: {sorted(overlap)}")
        if self.known_classes is not None and not self.known_classes:
            raise ValueError("known_classes: is empty")
        if self.ood.ratio > 0 and self.ood.source == "heldout" and not self.unknown_classes:
            raise ValueError("ood.source: 'heldout' with ood.ratio > 0 needs unknown_classes")
        if ds == "sensor" and self.ood.source not in ("heldout", "uniform-noise"):
            raise ValueError(f"ood.source: {self.ood.source!r} is for images; sensor streams take 'heldout' or 'uniform-noise'")
        if self.samples_per_domain is None and self.n_samples is None:
            raise ValueError("samples_per_domain: set samples_per_domain or n_samples")
        if self.setting == "mixed" and self.transition.kind != "abrupt":
            raise ValueError("transition.kind: a 'mixed' setting has a single segment, so no ramp")
        if self.setting == "continual" and self.transition.kind == "ramp" and self.transition.length > self._spd():
            raise ValueError(f"transition.length: {self.transition.length} exceeds samples_per_domain ({self._spd()})")
        if self.ood.stop is not None and self.ood.stop <= self.ood.start:
            raise ValueError(f"ood.stop: must be > ood.start ({self.ood.start}), got {self.ood.stop}")
        return self

    # -- derived -------------------------------------------------------------------------------
    def domain_list(self) -> list[str]:
        return _all_domains(self.dataset) if self.domains == "all" else list(self.domains)

    def severities(self) -> list[int]:
        return [self.severity] if isinstance(self.severity, int) else list(self.severity)

    def known(self) -> list[int]:
        if self.known_classes is not None:
            return sorted(self.known_classes)
        k = _num_classes(self.dataset, self.sensor)
        return [c for c in range(k) if c not in set(self.unknown_classes)]

    def _spd(self) -> int:
        """Samples per (domain, severity) segment; from n_samples when not given."""
        if self.samples_per_domain is not None:
            return self.samples_per_domain
        per_pass = sum(1 if d == "clean" else len(self.severities()) for d in self.domain_list())
        return max(1, -(-int(self.n_samples or 1) // per_pass))

    def schedule(self) -> Schedule:
        """The domain / severity schedule this scenario describes."""
        domains, sevs = self.domain_list(), self.severities()
        if self.setting == "mixed":
            n = self.n_samples or self.samples_per_domain * len(domains) * len(sevs)  # type: ignore[operator]
            return mixed(domains, sevs, n)
        ramp = self.transition.length if self.transition.kind == "ramp" else 0
        return continual(domains, sevs, self._spd(), self.n_samples, ramp)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


# -- loading ---------------------------------------------------------------------------------------
def _is_tag(part: Any) -> bool:
    """Union-member / validator tags that pydantic puts into error locations."""
    return isinstance(part, str) and ("[" in part or part.startswith(("constrained-", "function-")) or part in ("int", "str", "float", "bool", "list"))


def _format_errors(err: ValidationError) -> str:
    lines: list[str] = []
    errors = [(".".join(str(p) for p in e["loc"] if not _is_tag(p)), e) for e in err.errors()]
    for loc, e in errors:
        # in a union (e.g. ``severity``: int or list of ints) drop the "wrong type" complaint of the
        # branch that does not apply when the other branch reports a real problem
        if e["type"].endswith("_type") and any(
            o is not e and (lo == loc or lo.startswith(loc + ".")) for lo, o in errors
        ):
            continue
        msg = str(e["msg"])
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not allowed)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not loc and ": " in msg:  # model-level checks start their message with the field name
                loc, msg = msg.split(": ", 1)
        elif e["type"] != "missing" and not isinstance(e.get("input"), dict):
            msg += f" (got {e['input']!r})"
        line = f"  {loc or '<scenario>'}: {msg}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def parse_scenario(data: dict[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a scenario mapping; errors name ``source`` and every bad field."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(f"invalid scenario {source}:\n{_format_errors(err)}") from None


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate a scenario TOML file.

    >>> from streamtta.simulations.scenario import REPO_SCENARIO_DIR, load_scenario
    >>> load_scenario(REPO_SCENARIO_DIR / "quickstart.toml").name
    'quickstart'
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"scenario file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"invalid TOML in scenario {p}: {err}") from None
    return parse_scenario(data, str(p))


def list_scenarios(directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """Scenario files in ``directory`` (default: the repository's ``simulations/``)."""
    d = Path(directory) if directory is not None else REPO_SCENARIO_DIR
    return sorted(d.glob("*.toml")) if d.is_dir() else []


def find_scenario(name_or_path: str | os.PathLike[str]) -> Scenario:
    """Load a scenario by path, or by name from ``./simulations/`` then the repository's folder."""
    p = Path(name_or_path)
    if p.is_file():
        return load_scenario(p)
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    for d in (Path.cwd() / "simulations", REPO_SCENARIO_DIR):
        cand = d / f"{stem}.toml"
        if cand.is_file():
            return load_scenario(cand)
    known = sorted({q.stem for q in list_scenarios()})
    raise ScenarioError(f"no scenario {str(name_or_path)!r}; built-in scenarios: {known}")


# -- data providers ---------------------------------------------------------------------------------
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
        from .digits import load_digits_32

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
        from .cifar_c import cifar_c_labels, load_cifar_c

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


# -- the stream --------------------------------------------------------------------------------------
def _epoch_draw(pool_size: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` indices from ``range(pool_size)``: whole random permutations back to back, the last cut."""
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    if pool_size == 0:
        raise ValueError("cannot draw samples from an empty pool (no test samples of the requested classes)")
    reps = -(-m // pool_size)
    return np.concatenate([rng.permutation(pool_size) for _ in range(reps)])[:m].astype(np.int64)


def _int_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SimStream:
    """A replayable simulated stream; build it with :func:`build_stream`.

    Per-sample ground truth is available up front as arrays (``labels``, ``domains``, ``severities``,
    ``is_unknown``); the inputs are generated lazily by :meth:`iter_samples` / :meth:`materialize`.
    ``labels`` holds the true class (unknown digits keep their digit, ``is_unknown`` marks them);
    ``-1`` only for synthetic OOD inputs that have no class (their ``Sample.label`` is ``None``).
    """

    def __init__(self, scenario: Scenario, seed: int, provider: _Provider, schedule: Schedule,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        self.scenario, self.seed, self.provider, self.schedule = scenario, int(seed), provider, schedule
        self.chunk_size = int(chunk_size)
        self.stream_id = f"{scenario.name}:{self.seed}"
        n = len(schedule)
        self.conditions, self.cond_id, self.segment_id = schedule.assign(self.seed)
        ood = scenario.ood
        self.is_unknown = ood_mask(n, ood.ratio, self.seed, ood.start, ood.stop) if ood.ratio > 0 else np.zeros(n, bool)
        self.pool = np.where(self.is_unknown, HELDOUT if ood.source == "heldout" else EXTERNAL, KNOWN).astype(np.int64)
        self.base = np.zeros(n, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xBA5E]))
        known_labels = provider.pool_labels[KNOWN]
        order = scenario.ordering
        starts = schedule.starts() + [n]
        for k in range(len(schedule.segments)):
            lo, hi = starts[k], starts[k + 1]
            pos = lo + np.flatnonzero(~self.is_unknown[lo:hi])
            drawn = _epoch_draw(len(known_labels), len(pos), rng)
            perm = make_order(known_labels[drawn], order.kind, _int_seed(self.seed, 0x0DE, k), order.delta, order.num_chunks)
            self.base[pos] = drawn[perm]
        unk = np.flatnonzero(self.is_unknown)
        if len(unk):
            upool = int(self.pool[unk[0]])
            self.base[unk] = _epoch_draw(len(provider.pool_labels[upool]), len(unk), rng)
        self.labels = np.empty(n, dtype=np.int64)
        for p in (KNOWN, HELDOUT, EXTERNAL):
            sel = self.pool == p
            if sel.any():
                self.labels[sel] = provider.pool_labels[p][self.base[sel]]
        dom_names = [c[0] for c in self.conditions]
        self.severities = np.array([c[1] for c in self.conditions], dtype=np.int64)[self.cond_id]
        self.domains: list[str] = [dom_names[i] for i in self.cond_id.tolist()]
        for a in (self.cond_id, self.segment_id, self.is_unknown, self.pool, self.base, self.labels, self.severities):
            a.setflags(write=False)

    # -- ground truth ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.cond_id)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.provider.sample_shape)

    @property
    def domain_names(self) -> list[str]:
        """Distinct domains in order of first appearance."""
        return list(dict.fromkeys(c[0] for c in self.conditions))

    @property
    def segment_starts(self) -> list[int]:
        """First index of every schedule segment (where ``reset_each_domain`` resets)."""
        return [s for s, seg in zip(self.schedule.starts(), self.schedule.segments) if seg.n > 0]

    def shifts(self) -> list[dict[str, Any]]:
        """Every scheduled shift: covariate (domain change) and semantic (unknowns start / stop)."""
        out = self.schedule.shifts()
        ood, n = self.scenario.ood, len(self)
        if ood.ratio > 0:
            if 0 < ood.start < n:
                out.append({"index": ood.start, "kind": "semantic", "from": "known", "to": f"unknown:{ood.source}@{ood.ratio}",
                            "transition": "abrupt", "length": 0})
            if ood.stop is not None and ood.stop < n:
                out.append({"index": ood.stop, "kind": "semantic", "from": f"unknown:{ood.source}@{ood.ratio}", "to": "known",
                            "transition": "abrupt", "length": 0})
        return sorted(out, key=lambda d: d["index"])

    @property
    def change_points(self) -> list[int]:
        """Sample indices where a scheduled shift (covariate or semantic) begins."""
        return sorted({s["index"] for s in self.shifts()})

    def fingerprint(self) -> str:
        """SHA-256 of the stream plan (which input, condition and unknown flag at every position)."""
        h = hashlib.sha256()
        for a in (self.cond_id, self.pool, self.base, self.labels, self.is_unknown.astype(np.int8)):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([list(c) for c in self.conditions]).encode())
        h.update(str(self.chunk_size).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: scenario, seed, schedule, shifts, counts and a plan fingerprint."""
        lab = self.labels[~self.is_unknown]
        return {
            "stream_id": self.stream_id,
            "name": self.scenario.name,
            "seed": self.seed,
            "dataset": self.scenario.dataset,
            "model": self.scenario.model,
            "n_samples": len(self),
            "sample_shape": list(self.sample_shape),
            "scenario": self.scenario.model_dump(mode="json"),
            "schedule": self.schedule.to_dict(),
            "segment_starts": self.segment_starts,
            "change_points": self.change_points,
            "shifts": self.shifts(),
            "domain_counts": dict(Counter(self.domains)),
            "n_unknown": int(self.is_unknown.sum()),
            "known_class_counts": {str(k): int(v) for k, v in sorted(Counter(lab.tolist()).items())},
            "data": self.provider.describe(),
            "chunk_size": self.chunk_size,
            "fingerprint": self.fingerprint(),
        }

    # -- inputs ------------------------------------------------------------------------------------
    def _render_chunk(self, c: int) -> np.ndarray:
        lo, hi = c * self.chunk_size, min(len(self), (c + 1) * self.chunk_size)
        out = np.empty((hi - lo,) + self.sample_shape, dtype=np.float32)
        keys = self.cond_id[lo:hi] * 3 + self.pool[lo:hi]
        for key in np.unique(keys).tolist():
            sel = np.flatnonzero(keys == key)
            cid, pool = divmod(int(key), 3)
            out[sel] = self.provider.render(
                self.conditions[cid], pool, self.base[lo + sel],
                np.random.SeedSequence([self.seed, 0xD0, cid]),
                np.random.SeedSequence([self.seed, 0x5A, c, cid, pool]),
            )
        return out

    def iter_chunks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_index, x)`` blocks (generation chunks clipped to ``[start, stop)``)."""
        n = len(self)
        stop = n if stop is None else max(0, min(int(stop), n))
        start = max(0, int(start))
        if start >= stop:
            return
        for c in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            lo = c * self.chunk_size
            x = self._render_chunk(c)
            a, b = max(start, lo) - lo, min(stop, lo + len(x)) - lo
            yield lo + a, x[a:b]

    def materialize(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of positions ``[start, stop)`` as arrays (same values as :meth:`iter_samples`)."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        parts = [x for _, x in self.iter_chunks(start, stop)]
        x = np.concatenate(parts) if parts else np.zeros((0,) + self.sample_shape, dtype=np.float32)
        return x, self.labels[start:stop].copy()

    def iter_samples(self, start: int = 0, stop: int | None = None) -> Iterator[Sample]:
        """Yield one :class:`~streamtta.types.Sample` per position, generated lazily chunk by chunk."""
        for lo, x in self.iter_chunks(start, stop):
            for j in range(len(x)):
                t = lo + j
                label = int(self.labels[t])
                yield Sample(
                    x=x[j], stream_id=self.stream_id, label=label if label >= 0 else None,
                    event_time=float(t), domain=self.domains[t], is_unknown=bool(self.is_unknown[t]),
                    meta={"index": t, "severity": int(self.severities[t]), "segment": int(self.segment_id[t])},
                )

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_samples()

    def __repr__(self) -> str:
        return f"SimStream({self.stream_id!r}, n={len(self)}, domains={len(self.domain_names)}, change_points={len(self.change_points)})"


def build_stream(scenario: Scenario | str | os.PathLike[str], seed: int | None = None, data_dir: str | os.PathLike[str] | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> SimStream:
    """Build the stream of ``scenario`` (a :class:`Scenario`, a TOML path or a built-in name).

    ``seed`` defaults to ``scenario.seed``; ``data_dir`` overrides ``scenario.data_dir`` (CIFAR-C,
    also read from ``$STREAMTTA_DATA_DIR``). The noise drawn for a sample depends on ``chunk_size``,
    so keep the default to reproduce a recorded stream.
    """
    sc = scenario if isinstance(scenario, Scenario) else find_scenario(scenario)
    seed = sc.seed if seed is None else int(seed)
    known, unknown = sc.known(), list(sc.unknown_classes)
    if sc.dataset == "digits-c":
        provider: _Provider = _DigitsProvider(known, unknown, sc.ood.source, seed)
    elif sc.dataset in ("cifar10-c", "cifar100-c"):
        root = data_dir or sc.data_dir or os.environ.get("STREAMTTA_DATA_DIR")
        if root is None:
            raise ScenarioError(f"scenario {sc.name!r}: dataset {sc.dataset} needs data_dir (the CIFAR-C folder)")
        provider = _CifarProvider(Path(root).expanduser(), sc.dataset, sc.domain_list(), known, unknown, sc.ood.source, seed)
    else:
        assert sc.sensor is not None
        provider = _SensorProvider(sc.sensor, known, unknown, sc.ood.source, seed)
    return SimStream(sc, seed, provider, sc.schedule(), chunk_size)
