"""Simulation scenarios: a validated TOML description -> a reproducible, lazily generated stream.

A :class:`Scenario` says which data, which shifts and in which order; :func:`build_stream` turns it
(plus a seed) into a :class:`SimStream`. The stream plan (which image, which domain and severity, which
position is an unknown) is drawn up front as small integer arrays; the images themselves are corrupted
chunk by chunk only when iterated, so a 100k-sample stream never sits in memory at once.

* :mod:`.spec` -- the :class:`Scenario` model and its validation;
* :mod:`.files` -- reading scenario TOML files, finding them by name;
* :mod:`.providers` -- the input pools of each dataset and how a condition is rendered;
* :mod:`.simstream` -- :class:`SimStream` and :func:`build_stream`.

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

from .files import REPO_SCENARIO_DIR, find_scenario, list_scenarios, load_scenario, parse_scenario
from .providers import EXTERNAL, HELDOUT, KNOWN, build_provider
from .simstream import DEFAULT_CHUNK, SimStream, build_stream
from .spec import OODSpec, OrderingSpec, Scenario, ScenarioError, SensorSpec, Severity, TransitionSpec

__all__ = [
    "DEFAULT_CHUNK", "EXTERNAL", "HELDOUT", "KNOWN", "OODSpec", "OrderingSpec", "REPO_SCENARIO_DIR", "Scenario",
    "ScenarioError", "SensorSpec", "Severity", "SimStream", "TransitionSpec", "build_provider", "build_stream",
    "find_scenario", "list_scenarios", "load_scenario", "parse_scenario",
]
