"""The bench results file: JSON conversion, result entries, writing, reading and validation.

Bench JSON schema (``BENCH_SCHEMA_VERSION = 1``)
------------------------------------------------
One file per ``streamtta bench`` invocation, written by :func:`write_bench_json`::

    {
      "schema_version": 1,                    # int, BENCH_SCHEMA_VERSION
      "created_at": "2026-01-01T12:00:00Z",   # str, ISO-8601 UTC
      "command": "streamtta bench ...",       # str or null, the command line that produced the file
      "versions": {"streamtta": str, "torch": str, "numpy": str, "river": str,
                   "faiss": str, "python": str},         # null for a package that is not installed
      "results": [                            # one entry per scenario x method x seed
        {"scenario": str, "method": str, "seed": int,
         "metrics": {name: number | null},    # scalar entries of summarize(log); rates in percent
         "per_domain": {domain: {name: number | null}}}   # summarize(log)["per_domain"]
      ],
      "aggregate": [                          # one entry per scenario x method, order of first appearance
        {"scenario": str, "method": str, "n_seeds": int, "seeds": [int],
         "metrics_mean": {name: number | null},   # mean over the seeds where the metric is not null
         "metrics_std":  {name: number | null},   # sample std (ddof=1); null with fewer than 2 values
         "metrics_n":    {name: int},             # number of seeds with a non-null value
         "per_domain_mean": {domain: {name: number | null}}}
      ]
    }

Non-finite numbers are written as ``null`` (the file is strict JSON). Metric names and units are those of
:func:`streamtta.metrics.summarize`; :data:`streamtta.reports.METRICS` gives display labels and which
direction is better.
"""
from __future__ import annotations

import datetime as _dt
import enum
import importlib.metadata as _md
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import aggregate

BENCH_SCHEMA_VERSION = 1

_REQUIRED_TOP = ("schema_version", "created_at", "command", "versions", "results", "aggregate")
_REQUIRED_RESULT = ("scenario", "method", "seed", "metrics", "per_domain")
_REQUIRED_AGG = ("scenario", "method", "metrics_mean", "metrics_std", "n_seeds")
_VERSION_KEYS = ("streamtta", "torch", "numpy", "river", "faiss", "python")


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types, enums, paths and tuples to strict-JSON values (NaN/inf -> None).

    >>> to_jsonable({"a": np.float32(1.5), "b": [np.nan, np.int64(2)], "c": (1, 2)})
    {'a': 1.5, 'b': [None, 2], 'c': [1, 2]}
    """
    if isinstance(obj, Mapping):
        return {str(getattr(k, "value", k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "model_dump"):  # pydantic models (e.g. Alert)
        return to_jsonable(obj.model_dump(mode="json"))
    raise TypeError(f"cannot convert {type(obj).__name__} value {obj!r} to JSON")


def collect_versions() -> dict[str, str | None]:
    """Installed versions of streamtta, torch, numpy, river, faiss (any faiss wheel) and python."""

    def ver(*dists: str) -> str | None:
        for d in dists:
            try:
                return _md.version(d)
            except _md.PackageNotFoundError:
                continue
        return None

    return {
        "streamtta": ver("streamtta"),
        "torch": ver("torch"),
        "numpy": ver("numpy"),
        "river": ver("river"),
        "faiss": ver("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss"),
        "python": platform.python_version(),
    }


def make_result(scenario: str, method: str, seed: int, summary: Mapping[str, Any]) -> dict[str, Any]:
    """One ``results`` entry from a :func:`streamtta.metrics.summarize` output.

    ``metrics`` gets the scalar entries of ``summary`` (or ``summary["metrics"]`` when that is a dict),
    ``per_domain`` its ``per_domain`` entry; ``series`` and ``shift`` are left out.
    """
    if isinstance(summary.get("metrics"), Mapping):
        metrics = dict(summary["metrics"])
    else:
        metrics = {k: v for k, v in summary.items() if not isinstance(v, (Mapping, list, tuple))}
    return {
        "scenario": str(scenario),
        "method": str(method),
        "seed": int(seed),
        "metrics": to_jsonable(metrics),
        "per_domain": to_jsonable(summary.get("per_domain", {})),
    }


def validate_bench(doc: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing key or wrong schema version of a bench document."""
    missing = [k for k in _REQUIRED_TOP if k not in doc]
    if missing:
        raise ValueError(f"bench JSON is missing top-level keys {missing}")
    if doc["schema_version"] != BENCH_SCHEMA_VERSION:
        raise ValueError(f"bench JSON schema_version {doc['schema_version']!r} != {BENCH_SCHEMA_VERSION}")
    vmiss = [k for k in _VERSION_KEYS if k not in doc["versions"]]
    if vmiss:
        raise ValueError(f"bench JSON 'versions' is missing {vmiss}")
    for i, r in enumerate(doc["results"]):
        m = [k for k in _REQUIRED_RESULT if k not in r]
        if m:
            raise ValueError(f"bench JSON results[{i}] is missing {m}")
    for i, a in enumerate(doc["aggregate"]):
        m = [k for k in _REQUIRED_AGG if k not in a]
        if m:
            raise ValueError(f"bench JSON aggregate[{i}] is missing {m}")


def write_bench_json(
    path: str | Path,
    results: Sequence[Mapping[str, Any]],
    aggregated: Sequence[Mapping[str, Any]] | None = None,
    *,
    command: str | Sequence[str] | None = None,
    versions: Mapping[str, str | None] | None = None,
    created_at: str | None = None,
) -> dict[str, Any]:
    """Write the bench JSON (schema in the module docstring) and return the document.

    ``aggregated`` defaults to :func:`~streamtta.reports.aggregate` of ``results``; ``versions`` to
    :func:`collect_versions`; ``command`` may be an argv list (joined with spaces).
    """
    if command is not None and not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    doc = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "created_at": created_at or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "versions": dict(versions) if versions is not None else collect_versions(),
        "results": [dict(r) for r in results],
        "aggregate": [dict(a) for a in (aggregated if aggregated is not None else aggregate(results))],
    }
    doc = to_jsonable(doc)
    validate_bench(doc)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def read_bench_json(path: str | Path) -> dict[str, Any]:
    """Load and validate a bench JSON file."""
    doc = json.loads(Path(path).read_text())
    validate_bench(doc)
    return doc
