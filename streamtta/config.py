"""Engine configuration: pydantic models loaded from TOML, environment and CLI flags.

Precedence, lowest to highest: built-in defaults < TOML file (``--config``) < environment
(``STREAMTTA_`` prefix, nested fields joined by ``__``, e.g. ``STREAMTTA_ENGINE__BATCH_SIZE=32``)
< CLI flags (``--set engine.batch_size=32`` or the dedicated flags such as ``--batch-size``).

Every model forbids unknown keys, so a typo fails fast with the field's dotted name:

>>> from streamtta.config import load_config
>>> load_config(overrides={"engine": {"batch_size": 16}}).engine.batch_size
16
>>> try:
...     load_config(overrides={"engine": {"batch_sise": 16}})
... except ConfigError as e:
...     print(str(e).splitlines()[1].strip())
engine.batch_sise: Extra inputs are not permitted
"""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Scalar = str | int | float | bool


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field(s)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaConfig(Section):
    """Where records come from and where outputs go."""

    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers; unset = start the embedded Tansu broker (run/produce only).")
    topic: str = Field("streamtta.input", description="Input topic.")
    group_id: str = Field("streamtta", description="Consumer group id.")
    dlq_topic: str | None = Field(None, description="Dead-letter topic; default '<topic>.dlq'.")
    predictions_topic: str | None = Field(None, description="Predictions topic; default '<topic>.predictions'.")
    predictions: bool = Field(True, description="Produce one prediction record per input record.")
    alerts_topic: str | None = Field(None, description="Alerts topic; default '<topic>.alerts'.")
    partitions: int = Field(1, ge=1, description="Partitions used when streamtta creates the input topic.")
    poll_timeout_s: float = Field(1.0, gt=0, description="Max wait of one consume() call.")
    stop_at_end: bool = Field(False, description="Stop once every assigned partition reached its end (replays).")
    idle_timeout_s: float | None = Field(None, gt=0, description="Stop after this long without records.")
    max_pending_outputs: int = Field(50_000, ge=1, description="Pause consumption while more outputs wait for delivery.")
    consumer: dict[str, Scalar] = Field(default_factory=dict, description="Extra librdkafka consumer settings.")
    producer: dict[str, Scalar] = Field(default_factory=dict, description="Extra librdkafka producer settings.")

    def resolved_dlq_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    def resolved_predictions_topic(self) -> str:
        return self.predictions_topic or f"{self.topic}.predictions"

    def resolved_alerts_topic(self) -> str:
        return self.alerts_topic or f"{self.topic}.alerts"


class ModelConfig(Section):
    source: str | None = Field(None, description="Builtin name, checkpoint path, TorchScript file or 'module:factory'; "
                                                 "unset = the scenario's model, else 'digits-resnet'.")
    state_dict: str | None = Field(None, description="State dict for 'module:factory' models (loaded weights_only).")
    num_classes: int | None = Field(None, ge=2, description="Needed only for models without streamtta metadata.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")


class AdapterConfig(Section):
    spec: str = Field("default", description="Adapter spec, e.g. 'unmix-tns+tent+conf-drop', 'bn', 'source'; "
                                             "'default' = streamtta.adapters.DEFAULT_SPEC.")
    options: dict[str, Any] = Field(default_factory=dict, description="Overrides passed to build_adapter (lr, K, ...).")
    class_prior: bool = Field(True, description="Start class-statistics norms (cb-stats) from the source data's "
                                                "class statistics (needs a model with streamtta metadata).")


class ScorerConfig(Section):
    name: str = Field("default", description="OOD scorer: 'default' = streamtta.detectors.DEFAULT_SCORER, "
                                             "(contrast) or energy, msp, fusion, prototype, knn, mahalanobis.")
    calibrate: bool = Field(True, description="Calibrate the 95%-TPR threshold on the source hold-out.")
    options: dict[str, Any] = Field(default_factory=dict, description="Scorer options (e.g. per_class, k).")
    gate: str | None = Field("fusion", description="A second scorer whose OOD flags also keep samples out of "
                                                    "adaptation (a sample adapts only if neither scorer flags "
                                                    "it); 'none': the main scorer alone.")
    gate_options: dict[str, Any] = Field(default_factory=dict, description="Options of the gate scorer.")


class MonitorConfig(Section):
    enabled: bool = Field(True, description="Watch batch-level signals for shifts.")
    detector: Literal["adwin", "page-hinkley", "kswin"] = Field("page-hinkley", description="river change detector.")
    signals: list[str] = Field(
        default_factory=lambda: ["ood_rate", "id_entropy", "mean_score", "in_mean", "in_std", "in_hf"],
        description="Batch signals to watch: model (ood_rate, id_entropy, mean_score, low_score, unknown_hits) "
                    "and input (in_mean, in_std, in_hf).")
    novelty: bool = Field(True, description="Watch OOD samples for a persistent novel cluster.")
    cooldown_batches: int = Field(10, ge=0, description="Batches after a confirmed shift before the next one.")
    readapt: bool = Field(True, description="Re-adapt on a confirmed shift: the batch holding the change point is "
                          "processed again in two parts; readapt_options.restart=true adds the meta-init restart.")
    readapt_options: dict[str, Any] = Field(default_factory=dict,
                                            description="ReAdapter settings (split_onset, restart, steps, lr, "
                                                        "decay_batches, ...).")
    hold_batches: int = Field(1, ge=0, le=8, description="With readapt: hold each batch's predictions until N "
                              "more batches of its partition (or stream) are processed, so that a shift confirmed "
                              "up to N batches late can still re-process the batch it began in; 0 = no hold. "
                              "Alerts are not held.")
    hold_max_s: float = Field(1.0, gt=0, description="Held predictions go out at the latest this long after their "
                              "batch was processed, or at once when a poll brings nothing.")
    burst: dict[str, Any] | None = Field(default_factory=dict, description="OOD-burst rule options (level, "
                                         "n_batches); null disables the rule.")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra ShiftMonitor options.")

    @field_validator("readapt_options")
    @classmethod
    def _known_readapt_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        import inspect

        from streamtta.readapt import ReAdapter

        known = set(inspect.signature(ReAdapter.__init__).parameters) - {"self", "meta_init"}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown re-adapter option(s) {unknown}; known: {sorted(known)}")
        return v


class AlertsConfig(Section):
    jsonl: bool = Field(True, description="Append alerts to <output>/alerts.jsonl.")
    kafka: bool = Field(True, description="Produce alerts to the alerts topic.")
    cooldown_batches: int = Field(10, ge=0, description="Batches between two alerts of one kind group.")


class EngineConfig(Section):
    batch_size: int = Field(64, ge=1, le=65536, description="Records per consume() call and adapter step.")
    state_key: Literal["partition", "stream_id"] = Field(
        "partition", description="Keep one adaptation state per partition or per stream id.")
    checkpoint_dir: Path = Field(Path(".streamtta/checkpoints"), description="Atomic per-stream state checkpoints.")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint (and then commit) every N batches.")
    max_record_bytes: int = Field(16 * 1024 * 1024, ge=64, description="Larger records are dead-lettered.")
    expected_shape: list[int] | None = Field(None, description="Reject payloads of another shape (default: model's).")
    seed: int = Field(0, description="Seed of adapters, scenario streams and replays.")
    record_log: bool = Field(True, description="Keep per-batch records for metrics and plots.")


class RunConfig(Section):
    scenario: str = Field("quickstart", description="Scenario name (simulations/<name>.toml) or TOML path.")
    output_dir: Path = Field(Path("runs"), description="Each run writes runs/<timestamp>/.")
    rate: float | None = Field(None, gt=0, description="Replay rate in records/s; unset = as fast as possible.")
    replay: bool = Field(True, description="Replay the scenario into the input topic before consuming.")
    progress: bool = Field(True, description="Show progress bars.")


class Config(BaseSettings):
    """The whole engine configuration."""

    model_config = SettingsConfigDict(env_prefix="STREAMTTA_", env_nested_delimiter="__", extra="forbid",
                                      validate_assignment=True, nested_model_default_partial_update=True)

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs = CLI flags (highest), then environment, then the TOML file given to load_config().
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


_TOML_PATH: list[Path | None] = [None]


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _TOML_PATH[0]
        return read_toml(path) if path is not None else {}


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from e


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})" if e["type"] != "extra_forbidden"
                     else f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                env: bool = True) -> Config:
    """Resolve the configuration: defaults < TOML ``path`` < environment < ``overrides``."""
    _TOML_PATH[0] = Path(path) if path is not None else None
    saved = None
    if not env:
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("STREAMTTA_")}
    try:
        return Config(**(overrides or {}))
    except ValidationError as e:
        origin = ", ".join(x for x in [f"file {path}" if path else "", "environment STREAMTTA_*" if env else "",
                                       "command line" if overrides else ""] if x)
        raise ConfigError(_format_errors(e, origin or "defaults")) from None
    finally:
        _TOML_PATH[0] = None
        if saved:
            os.environ.update(saved)


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """Turn ``["engine.batch_size=32", "adapter.options.lr=1e-4"]`` into a nested dict.

    Values are parsed as TOML scalars/arrays/inline tables when possible, else kept as strings.

    >>> parse_set_option(["engine.batch_size=32", "kafka.topic=images"])
    {'engine': {'batch_size': 32}, 'kafka': {'topic': 'images'}}
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if len(parts) < 2:
            raise ConfigError(f"--set key must be dotted like 'engine.batch_size', got {key!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        set_nested(out, parts, value)
    return out


def set_nested(d: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"conflicting --set for {'.'.join(parts)}")
    d[parts[-1]] = value


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def reference_markdown() -> str:
    """The configuration reference table of the README, generated from the models above."""
    lines = ["| field | default | description |", "|---|---|---|"]
    for section, finfo in Config.model_fields.items():
        model = finfo.annotation
        for name, f in model.model_fields.items():  # type: ignore[union-attr]
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
            shown = "unset" if default is None else json.dumps(default, default=str)
            lines.append(f"| `{section}.{name}` | `{shown}` | {f.description or ''} |")
    return "\n".join(lines)
