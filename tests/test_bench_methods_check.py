"""``streamtta bench --methods``: every spec is checked before the first method runs."""
from __future__ import annotations

import pytest

import streamtta.bench
from streamtta.cli import main


@pytest.mark.parametrize("methods", ["source,nosuch", "source,align(alpha=0.3", "source,align(bogus=1)"])
def test_a_bad_spec_stops_the_bench_before_anything_runs(monkeypatch, capsys, methods):
    ran = []
    monkeypatch.setattr(streamtta.bench, "run_bench", lambda *a, **kw: ran.append(a) or 0)
    assert main(["bench", "simulations/digits-c-iid.toml", "--methods", methods, "--limit", "8"]) == 2
    assert ran == [] and "streamtta:" in capsys.readouterr().err


def test_commas_inside_parentheses_stay_one_method(monkeypatch):
    ran = []
    monkeypatch.setattr(streamtta.bench, "run_bench", lambda cfg, sc, methods, *a, **kw: ran.append(methods) or 0)
    assert main(["bench", "simulations/digits-c-iid.toml", "--methods", "source, align(alpha=0.3,warmup=false)"]) == 0
    assert ran == [["source", "align(alpha=0.3,warmup=false)"]]


def test_adaptbench_checks_every_spec_before_the_first_runs(monkeypatch, capsys):
    import streamtta.adaptbench as ab

    ran = []
    seeds = []
    monkeypatch.setattr(ab, "adapter_accuracy",
                        lambda sc, methods, fit, seed: ran.append(methods) or seeds.append(seed) or [])
    with pytest.raises(SystemExit) as e:
        ab.main(["simulations/heldout/heldout-sensor-ln-noniid.toml", "--methods", "source,nosuch"])
    assert e.value.code == 2 and ran == [] and "unknown term 'nosuch'" in capsys.readouterr().err
    assert ab.main(["simulations/heldout/heldout-sensor-ln-noniid.toml", "--methods",
                    "tent,ema-stats,align(alpha=0.3,warmup=false)"]) == 0
    assert ran == [["tent", "ema-stats", "align(alpha=0.3,warmup=false)"]] and seeds == [None]  # the scenario's own
    assert ab.main(["simulations/heldout/heldout-sensor-ln-noniid.toml", "--methods", "source", "--seed", "2"]) == 0
    assert seeds == [None, 2]
