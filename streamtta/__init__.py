"""streamtta: streaming continual / test-time adaptation engine.

Kafka in; adapted predictions, OOD scores and drift alerts out. OOD-score polarity everywhere:
higher = more out-of-distribution.

From Python, one stream, no broker: :class:`Pipeline` (``fit_source`` then ``process`` per batch); many
stream ids in one forward: :class:`GroupedPipeline` (built from a fitted pipeline).
Over Kafka or a replay: :class:`Engine` (one pipeline per partition or stream id), or the jobs
:func:`consume` and :func:`simulate`; :func:`load_config` reads the TOML configuration.
"""
from streamtta.version import __version__
from streamtta.adapters import build_adapter
from streamtta.alerts import Alert, AlertKind
from streamtta.config import Config, load_config
from streamtta.engine import Engine, Outputs
from streamtta.grouped import GroupedPipeline
from streamtta.pipeline import Pipeline
from streamtta.results import BatchResult
from streamtta.runner import build_pipeline, consume, simulate

__all__ = [
    "__version__", "Pipeline", "GroupedPipeline", "BatchResult", "build_adapter", "build_pipeline", "Config", "load_config",
    "Engine", "Outputs", "consume", "simulate", "Alert", "AlertKind",
]
