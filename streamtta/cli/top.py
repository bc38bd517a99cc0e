"""``streamtta top``: a live view of a running worker's ``/metrics`` (rich), without Grafana.

Every ``--interval`` seconds it scrapes the worker and shows throughput (records/s from the counters'
increase), consumer lag per partition, the OOD rate, step and batch latency p50/p99 (estimated from the
histogram buckets), states held, shifts and re-adaptations, and alerts by kind (in the last interval
and in total). ``--once`` scrapes twice, ``--interval`` apart, prints one frame and exits (1 when the
worker cannot be reached or its address answers no streamtta metrics); without it, Ctrl-C (or SIGTERM)
ends the view with exit code 0. The figures come from
:func:`streamtta.ops.scrape.summarize`. Behind a proxy with HTTP basic auth, put the credentials in the
URL (``--url http://user:password@host:9100``): they are sent as an ``Authorization`` header and never
shown.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from streamtta.ops.scrape import Snapshot, fetch, metrics_url, summarize

DEFAULT_URL = "http://localhost:9100"


def add_parser(sub: Any) -> None:
    t = sub.add_parser("top", help="live view of a running worker's metrics (throughput, lag, OOD rate, alerts)")
    t.add_argument("--url", default=DEFAULT_URL, help=f"the worker's metrics address (default {DEFAULT_URL}; "
                                                       "user:password@ in it: HTTP basic auth)")
    t.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes (default 2)")
    t.add_argument("--once", action="store_true", help="print one frame (two scrapes, --interval apart) and exit")
    t.set_defaults(func=cmd_top)


def _num(v: float | None, fmt: str = "{:,.1f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _ms(v: float | None) -> str:
    return _num(None if v is None else v * 1e3, "{:,.1f} ms")


def render(url: str, s: dict[str, Any], error: str | None = None) -> Any:
    """The frame of one summary (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"streamtta top  {metrics_url(url)}  {time.strftime('%H:%M:%S')}", style="bold")
    if error is not None:
        return Group(head, Text(f"cannot scrape: {error}", style="red"))
    rss = s["rss_bytes"]
    counts = Text(f"states {_num(s['states'], '{:.0f}')}   shifts {_num(s['shifts'], '{:.0f}')}   re-adaptations "
                f"{_num(s['readaptations'], '{:.0f}')}   adapter resets {_num(s['resets'], '{:.0f}')}   memory "
                f"{_num(None if rss is None else rss / 2**20, '{:,.0f} MiB')}")
    flow = Table(title="throughput", title_justify="left")
    for col in ("records", "total", "per s"):
        flow.add_column(col, justify="right" if col != "records" else "left")
    for outcome, total in s["records"].items():
        flow.add_row(outcome.replace("_", "-"), _num(total, "{:,.0f}"), _num(s["rates"][outcome]))
    ood = Table(title="OOD", title_justify="left")
    for col in ("last batch", "window", "flagged"):
        ood.add_column(col, justify="right")
    ood.add_row(_num(s["ood_ratio"], "{:.1%}"), _num(s["ood_fraction"], "{:.1%}"), _num(s["ood_total"], "{:,.0f}"))
    lat = Table(title="latency", title_justify="left")
    for col in ("", "p50", "p99"):
        lat.add_column(col, justify="right" if col else "left")
    for name, q in s["latency"].items():
        lat.add_row(name, _ms(q["p50"]), _ms(q["p99"]))
    lag = Table(title="consumer lag", title_justify="left")
    lag.add_column("partition")
    lag.add_column("records behind", justify="right")
    for (topic, part), v in s["lag"].items():
        lag.add_row(f"{topic}[{part}]", _num(v, "{:,.0f}"))
    if not s["lag"]:
        lag.add_row("(none reported)", "")
    alerts = Table(title="alerts", title_justify="left")
    for col in ("kind", "last interval", "total"):
        alerts.add_column(col, justify="left" if col == "kind" else "right")
    for kind, a in s["alerts"].items():
        alerts.add_row(kind, _num(a["recent"], "{:,.0f}"), _num(a["total"], "{:,.0f}"))
    if not s["alerts"]:
        alerts.add_row("(none)", "", "")
    return Group(head, counts, flow, ood, lat, lag, alerts)


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from streamtta.signals import Interrupted

    console = Console()
    if args.once:
        try:
            prev = fetch(args.url)
            time.sleep(max(args.interval, 0.0))
            cur = fetch(args.url)
        except (OSError, ValueError) as e:
            console.print(render(args.url, {}, error=str(e)))
            return 1
        console.print(render(args.url, summarize(prev, cur)))
        return 0
    prev: Snapshot | None = None
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                try:
                    cur = fetch(args.url)
                    live.update(render(args.url, summarize(prev, cur)), refresh=True)
                    prev = cur
                except (OSError, ValueError) as e:
                    live.update(render(args.url, {}, error=str(e)), refresh=True)
                time.sleep(max(args.interval, 0.1))
        except (KeyboardInterrupt, Interrupted):  # the CLI turns SIGINT/SIGTERM into Interrupted: quitting the view
            return 0
