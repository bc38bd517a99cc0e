"""Guards (one per file): SAR-style entropy-EMA reset, periodic reset, EMA-to-source, source fallback."""
from streamtta.adapters.guards.base import Guard
from streamtta.adapters.guards.ema_to_source import EMAToSource
from streamtta.adapters.guards.periodic import PeriodicReset
from streamtta.adapters.guards.sar_reset import LossEMAReset
from streamtta.adapters.guards.source_fallback import SourceFallback

__all__ = ["Guard", "EMAToSource", "PeriodicReset", "LossEMAReset", "SourceFallback"]
