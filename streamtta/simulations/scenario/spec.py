"""The scenario model: what a ``simulations/*.toml`` file may hold, validated field by field.

:class:`Scenario` and its sub-tables (:class:`OrderingSpec`, :class:`TransitionSpec`, :class:`OODSpec`,
:class:`SensorSpec`) are frozen pydantic models that reject unknown fields; cross-field checks (domains
valid for the dataset, class ranges, OOD source, ramp length) run in :meth:`Scenario._check`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import corruptions as _corr
from .. import sensors as _sens
from ..cifar_c import CIFAR_C_CORRUPTIONS, CIFAR_C_EXTRA
from ..schedules import Schedule, continual, mixed

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

