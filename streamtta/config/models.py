"""The configuration models: one pydantic model per section, :class:`Config` for the whole.

Every model forbids unknown keys and validates assignments. :func:`streamtta.config.load_config`
resolves a :class:`Config` from defaults, a TOML file, the environment and overrides.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Scalar = str | int | float | bool


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
    security: dict[str, Scalar] = Field(
        default_factory=dict, description="librdkafka security settings (security.protocol, sasl.*, ssl.*) shared "
                                          "by every client: consumer, producers, admin and replay. Secrets in it "
                                          "are redacted in every file and log streamtta writes.")
    connect_timeout_s: float = Field(30.0, gt=0, description="Retry a broker that cannot be reached at start-up "
                                                             "this long (with backoff), then exit non-zero.")
    create_topics: bool = Field(False, description="Create missing input/output topics (the embedded broker "
                                                   "always does); otherwise a missing input topic is an error.")

    @field_validator("security", "consumer", "producer", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        """librdkafka names hold dots: ``{"sasl": {"password": "x"}}`` (a TOML table, or the environment's
        ``STREAMTTA_KAFKA__SECURITY__SASL__PASSWORD``) is the setting ``sasl.password``."""
        if not isinstance(v, dict):
            return v
        flat: dict[str, Any] = {}
        for k, val in v.items():
            if isinstance(val, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in cls._flatten(val).items()})
            else:
                flat[str(k)] = val
        return flat

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
    calibration: str | None = Field(None, description="Calibration data or file (npz/npy/csv/parquet, or a "
                                                      "'.calib.npz'); unset = the file next to the model, if any.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")


class AdapterConfig(Section):
    spec: str = Field("default", description="Adapter spec, e.g. 'unmix-tns+tent+conf-drop', 'bn', 'source'; "
                                             "'default' resolves per model: cb-stats+source-fallback with "
                                             "BatchNorm, align with LayerNorm/GroupNorm, else source.")
    options: dict[str, Any] = Field(default_factory=dict, description="Overrides passed to build_adapter (lr, K, ...).")
    class_prior: bool = Field(True, description="Start class-statistics norms (cb-stats) from the class statistics "
                                                "of the source data (a built-in model's own, or the calibration "
                                                "data; without labels the source model's predictions stand in).")


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
    detector: Literal["adwin", "page-hinkley", "kswin"] = Field(
        "page-hinkley", description="river change detector (the same default as ShiftMonitor's).")
    signals: list[str] = Field(
        default_factory=lambda: ["ood_rate", "id_entropy", "mean_score", "in_mean", "in_std", "in_hf"],
        description="Batch signals to watch: model (ood_rate, id_entropy, mean_score, low_score, unknown_hits) "
                    "and input (in_mean, in_std, in_hf).")
    novelty: bool = Field(True, description="Watch OOD samples for a persistent novel cluster.")
    cooldown_batches: int = Field(10, ge=0, description="Batches after a confirmed shift before the next one "
                                  "(the engine always passes this value; ShiftMonitor's own default, 8, applies "
                                  "only to a ShiftMonitor built directly).")
    readapt: bool = Field(True, description="Re-adapt on a confirmed shift: the batch holding the change point is "
                          "processed again in two parts; the meta-init restart is added for gradient specs on the bn norm "
                          "without ema-source when the model has a meta-init (readapt_options.restart=true/false "
                          "forces it).")
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
        "partition", description="Keep one adaptation state per partition or per stream id (many ids: see "
        "grouped.enabled).")
    checkpoint_dir: Path = Field(Path(".streamtta/checkpoints"), description="Atomic per-stream state checkpoints.")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint (and then commit) after at least N batches.")
    checkpoint_interval_s: float = Field(1.0, ge=0, description="... and at least this long after the last "
                                         "checkpoint (0 = every checkpoint_every batches). An empty poll, a "
                                         "rebalance and the end of a run checkpoint and commit at once.")
    max_record_bytes: int = Field(16 * 1024 * 1024, ge=64, description="Larger records are dead-lettered.")
    expected_shape: list[int] | None = Field(None, description="Reject payloads of another shape (default: model's).")
    feature_names: list[str] | None = Field(None, description="Feature order of JSON rows whose 'features' is an "
                                            "object (default: the calibration data's column names, else sorted "
                                            "by key name).")
    seed: int = Field(0, description="Seed of adapters, scenario streams and replays.")
    record_log: bool = Field(True, description="Keep per-batch records for metrics and plots.")
    state_store: Literal["local", "kafka"] = Field(
        "local", description="Where per-stream states are checkpointed: 'local' (engine.checkpoint_dir) or 'kafka' "
        "(compacted changelog topic '<topic>.<group_id>.state', restored by whichever worker gets the partition; "
        "checkpoint_dir stays a local cache).")
    max_states: int = Field(1024, ge=1, description="Per-stream states kept in memory (least recently used "
                                                   "ones are checkpointed and evicted, restored on demand).")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$",
                        description="Where the model, adapters and scorer indexes run: 'cpu', 'cuda', 'cuda:N' "
                                    "or 'auto' (CUDA when available, else CPU); CUDA without a usable GPU is an "
                                    "error when the pipeline is built. Results and checkpoints stay on the CPU.")


#: the default options of grouped mode's per-stream Page-Hinkley detectors: on the input signal (covariate) and
#: on the OOD flags (semantic); chosen on quickstart, digits-c-continual-openset and a digits-c switch fleet
_GROUPED_DETECTOR = {"delta": 0.02, "threshold": 10.0, "min_instances": 30}
_GROUPED_OOD_DETECTOR = {"delta": 0.02, "threshold": 20.0, "min_instances": 30}


class GroupedConfig(Section):
    """Many stream ids per state (``engine.state_key = "stream_id"``): :mod:`streamtta.grouped`."""

    enabled: bool = Field(False, description="With engine.state_key='stream_id': one state per partition serves all "
                          "its stream ids with one forward per batch, each id with its own BatchNorm statistics and "
                          "shift detector (for thousands of ids; adapter.spec is not used). Off: one full pipeline "
                          "per id.")
    max_streams: int = Field(10000, ge=1, description="Stream ids kept per partition; the least recently seen one "
                             "beyond this starts again from the source statistics.")
    alpha: float = Field(0.01, gt=0, le=1, description="Per-sample momentum of a stream's statistics (a memory of "
                         "about 1/alpha samples).")
    prior: float = Field(4.0, ge=0, description="Weight, in samples, of the source statistics in a new stream's.")
    layers: int | None = Field(4, ge=1, description="How many BatchNorm layers (in module order) keep per-stream "
                               "statistics; the later ones keep the source statistics (robust to streams whose "
                               "labels come in runs). Unset: all.")
    source_weight: float = Field(0.0, ge=0, lt=1, description="Share of the source statistics mixed into a stream's "
                                 "when normalising (alpha-BN style); 0: the stream's own.")
    detector: dict[str, Any] | None = Field(
        default_factory=lambda: dict(_GROUPED_DETECTOR),
        description="Per-stream Page-Hinkley (river's semantics: min_instances, delta, threshold, alpha) on each "
                    "sample's distance from its stream's statistics: covariate_shift alerts and re-adaptation; null: "
                    "off. monitor.enabled=false disables both detectors.")
    ood_detector: dict[str, Any] | None = Field(
        default_factory=lambda: dict(_GROUPED_OOD_DETECTOR),
        description="Per-stream Page-Hinkley on each sample's OOD flag: semantic_shift alerts; null: off.")
    cooldown_samples: int = Field(200, ge=0, description="Samples of a stream between two of its shift alerts.")

    @field_validator("detector", "ood_detector", mode="before")
    @classmethod
    def _null_string_turns_off(cls, v: Any) -> Any:
        # TOML (and so --set grouped.ood_detector=null) has no null: the strings null/none/off mean None
        return None if isinstance(v, str) and v.strip().lower() in ("null", "none", "off") else v

    @field_validator("detector", "ood_detector")
    @classmethod
    def _known_detector_options(cls, v: dict[str, Any] | None, info: Any) -> dict[str, Any] | None:
        unknown = sorted(set(v or {}) - {"min_instances", "delta", "threshold", "alpha"})
        if unknown:
            raise ValueError(f"unknown Page-Hinkley option(s) {unknown}; known: alpha, delta, min_instances, threshold")
        if v is None:
            return v
        from streamtta.detectors.shift.streams import _check_params

        base = _GROUPED_DETECTOR if info.field_name == "detector" else _GROUPED_OOD_DETECTOR
        v = {**base, **v}  # one option set (--set grouped.detector.threshold=5) keeps the others
        _check_params(v["min_instances"], v["delta"], v["threshold"], v.get("alpha", 1 - 0.0001), "up")
        return v


class RunConfig(Section):
    scenario: str = Field("quickstart", description="Scenario name (simulations/<name>.toml) or TOML path.")
    output_dir: Path = Field(Path("runs"), description="Each run writes runs/<timestamp>/.")
    rate: float | None = Field(None, gt=0, description="Replay rate in records/s; unset = as fast as possible.")
    replay: bool = Field(True, description="Replay the scenario into the input topic before consuming.")
    progress: bool = Field(True, description="Show progress bars.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object per line (time, level, event, logger, "
                            "stream, partition, offsets); json logs INFO and up (-vv: DEBUG).")


class MetricsConfig(Section):
    """The Prometheus exporter of a Kafka run (/metrics, /healthz, /readyz on one port)."""

    port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics, /healthz and /readyz on this "
                                                               "port; unset = no exporter; 0 = a free port.")
    host: str = Field("0.0.0.0", description="Address the exporter binds to.")
    stats_interval_ms: int = Field(1000, ge=100, description="librdkafka statistics interval (consumer lag, "
                                                             "broker state) while the exporter runs.")
    ready_max_poll_age_s: float = Field(30.0, gt=0, description="/readyz fails once the consumer has not been "
                                                                "polled (no statistics report) for this long.")


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
    grouped: GroupedConfig = Field(default_factory=GroupedConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # ``Config(**kwargs)``: keyword arguments, then the environment. A TOML file comes in through
        # :func:`streamtta.config.load_config`, which passes its own sources for each call.
        return (init_settings, env_settings)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())
