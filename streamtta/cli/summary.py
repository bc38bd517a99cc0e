"""The run summary table printed at the end of ``run`` and ``simulate``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from streamtta.cli.common import console, json_logging


def print_summary(summary: dict[str, Any], stats: dict[str, Any], run_dir: Path | None) -> None:
    """One table: throughput, accuracy, OOD, shifts, alerts, latency, dead letters, calibration.

    ``stats["calibration"]`` (when present) says what the OOD scorer was calibrated on; a run without any
    calibration shows no OOD-flag figures (nothing could be flagged) but says how to calibrate instead."""
    from rich.table import Table

    calibration = stats.get("calibration")
    uncalibrated = isinstance(calibration, str) and calibration.startswith("none")
    t = Table(title="streamtta run summary", show_header=False)
    rows = [
        ("samples", stats.get("samples")),
        ("samples/s (end to end)", stats.get("samples_per_s")),
        ("samples/s after the first record", stats.get("steady_samples_per_s")),
        ("start-up: group join to first record (s)", stats.get("startup_s")),
        ("bare model forward samples/s", stats.get("bare_forward_samples_per_s")),
        ("bare adapter step samples/s", stats.get("bare_step_samples_per_s")),
        ("online accuracy, known classes (%)", fmt(summary.get("acc"))),
        ("OOD flagged (%)", None if uncalibrated else fmt(summary.get("ood_rate"))),
        ("OOD AUROC (%)", fmt(summary.get("auroc"))),
        ("open-set ACC_H (%)", None if uncalibrated else fmt(summary.get("acc_h"))),
        ("shifts detected / scheduled", ratio(summary.get("n_detected"), summary.get("n_changes"))),
        ("alerts", summary.get("n_alerts")),
        ("batch latency p50 / p99 ms", ratio(summary.get("latency_p50_ms"), summary.get("latency_p99_ms"))),
        ("dead letters", stats.get("dead_letters")),
        ("peak RSS MB", stats.get("peak_rss_mb")),
        ("calibration", calibration),
        ("results", str(run_dir) if run_dir else None),
    ]
    notes = []
    if uncalibrated:
        notes.append(f"[bold yellow]OOD flags:[/] {calibration}")
    if not stats.get("records") and stats.get("group_id"):
        notes.append(f"[bold yellow]Nothing consumed:[/] consumer group {stats['group_id']!r} has already read "
                     f"{stats.get('topic', 'the topic')!r} to its end (committed offsets); a new --group-id reads "
                     f"it again from the start")
    if json_logging():  # one JSON line with every figure, on the log stream
        import logging

        from rich.text import Text

        logging.getLogger("streamtta").info("run summary", extra={
            "event": "summary", "summary": summary, "stats": stats, "run_dir": str(run_dir),
            "notes": [Text.from_markup(n).plain for n in notes]})
        return
    for k, v in rows:
        if v is not None:
            t.add_row(k, str(v) if not (k == "calibration" and uncalibrated) else "none")
    out = console()
    out.print(t)
    for note in notes:
        out.print(note)


def fmt(v: Any) -> str | None:
    return None if v is None else f"{v:.2f}"


def ratio(a: Any, b: Any) -> str | None:
    return None if a is None or b is None else " / ".join(fmt(v) if isinstance(v, float) else str(v) for v in (a, b))
