"""Label-free objectives (one per file): TENT entropy, EATA weighted entropy."""
from streamtta.adapters.objectives.base import Objective
from streamtta.adapters.objectives.eata import WeightedEntropyObjective, default_e_margin
from streamtta.adapters.objectives.tent import EntropyObjective

__all__ = ["Objective", "EntropyObjective", "WeightedEntropyObjective", "default_e_margin"]
