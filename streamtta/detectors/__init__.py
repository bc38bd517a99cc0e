"""Detectors: OOD scoring (:mod:`streamtta.detectors.ood`) and shift monitoring
(:mod:`streamtta.detectors.shift`).

Polarity everywhere: higher OOD score = more out-of-distribution. What happens after a detection lives
elsewhere: alerts in :mod:`streamtta.alerts`, re-adaptation in :mod:`streamtta.readapt`.
"""
from streamtta.detectors.ood import *  # noqa: F401,F403
from streamtta.detectors.ood import __all__ as _ood_all
from streamtta.detectors.shift import *  # noqa: F401,F403
from streamtta.detectors.shift import __all__ as _shift_all

__all__ = [*_ood_all, *_shift_all]
