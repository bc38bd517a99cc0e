"""Simulated test streams: data sources, corruptions, label orderings, shift schedules, scenarios.

* :mod:`.digits` -- clean scikit-learn digits as 1x32x32 images (source training / test split);
* :mod:`.corruptions` -- CIFAR-10-C-style image corruptions with five severities;
* :mod:`.cifar_c` -- loader for the public CIFAR-10-C / CIFAR-100-C ``.npy`` files;
* :mod:`.sensors` -- river's bundled real datasets, tabular sensor shifts, river concept-drift streams;
* :mod:`.orderings` -- i.i.d. / sorted / Dirichlet (label-correlated) sample orders;
* :mod:`.schedules` -- domain and severity schedules with known change points, OOD injection;
* :mod:`.scenario` -- TOML scenarios (``simulations/*.toml``) and :class:`SimStream`.

>>> from streamtta.simulations import build_stream
>>> stream = build_stream("quickstart")
>>> len(stream), stream.change_points
(4000, [2000])
"""
from __future__ import annotations

from .cifar_c import CIFAR_C_CORRUPTIONS, load_cifar_c
from .corruptions import CORRUPTIONS, corrupt
from .orderings import dirichlet_chunks, dirichlet_order, iid_order, make_order, sorted_order
from .scenario import (
    Scenario,
    ScenarioError,
    SimStream,
    build_stream,
    find_scenario,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from .schedules import GRADUAL_SEVERITIES, Schedule, Segment, abrupt, continual, mixed, ood_mask
from .sensors import SENSOR_SHIFTS, load_river_dataset, load_river_split, river_concept_stream, shift_features

__all__ = [
    "CIFAR_C_CORRUPTIONS", "CORRUPTIONS", "GRADUAL_SEVERITIES", "SENSOR_SHIFTS", "Scenario", "ScenarioError",
    "Schedule", "Segment", "SimStream", "abrupt", "build_stream", "continual", "corrupt", "dirichlet_chunks",
    "dirichlet_order", "find_scenario", "iid_order", "list_scenarios", "load_cifar_c", "load_river_dataset",
    "load_river_split", "load_scenario", "make_order", "mixed", "ood_mask", "parse_scenario",
    "river_concept_stream", "shift_features", "sorted_order",
]
