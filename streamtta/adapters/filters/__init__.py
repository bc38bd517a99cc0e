"""Sample filters (one per file), applied AND-wise after the OOD gate."""
from streamtta.adapters.filters.base import Filter
from streamtta.adapters.filters.conf_drop import ConfidenceDropFilter
from streamtta.adapters.filters.entropy_margin import EntropyMarginFilter
from streamtta.adapters.filters.redundancy import RedundancyFilter

__all__ = ["Filter", "ConfidenceDropFilter", "EntropyMarginFilter", "RedundancyFilter"]
