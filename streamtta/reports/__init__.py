"""Bench reports: aggregation over seeds, JSON results file, rich/markdown tables and PNG plots.

* :mod:`.aggregate` -- mean and sample std over seeds per scenario x method;
* :mod:`.bench_json` -- the bench JSON file (schema in its docstring), result entries, JSON conversion;
* :mod:`.tables` -- metric display labels (:data:`METRICS`), rich console table, markdown table;
* :mod:`.plots` -- run timeline, bench bars and accuracy-around-shifts PNGs.

>>> res = [make_result("s", "tent", seed, {"acc": a, "per_domain": {}, "series": {}})
...        for seed, a in [(0, 80.0), (1, 82.0)]]
>>> agg = aggregate(res)
>>> agg[0]["metrics_mean"]["acc"], agg[0]["metrics_std"]["acc"]
(81.0, 1.4142135623730951)
>>> print(bench_markdown(agg, metrics=("acc",)).splitlines()[2])
| s | tent | 2 | 81.0 ± 1.4 |
"""
from __future__ import annotations

from .aggregate import aggregate
from .bench_json import (
    BENCH_SCHEMA_VERSION,
    collect_versions,
    make_result,
    read_bench_json,
    to_jsonable,
    validate_bench,
    write_bench_json,
)
from .plots import ALERT_COLOURS, plot_bench, plot_run, plot_shift_recovery, run_title, shift_windows
from .tables import DEFAULT_TABLE_METRICS, METRICS, bench_markdown, print_bench_table

__all__ = [
    "ALERT_COLOURS", "BENCH_SCHEMA_VERSION", "DEFAULT_TABLE_METRICS", "METRICS", "aggregate", "bench_markdown",
    "collect_versions", "make_result", "plot_bench", "plot_run", "plot_shift_recovery", "print_bench_table",
    "read_bench_json", "run_title", "shift_windows", "to_jsonable", "validate_bench", "write_bench_json",
]
