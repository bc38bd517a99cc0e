"""Shift monitoring: river drift detectors on batch signals, the OOD-burst rule and the onset locator.

* :class:`ShiftMonitor` (:mod:`~streamtta.detectors.shift.monitor`): river ADWIN / PageHinkley / KSWIN
  on batch signals, with confirmation, typing and cooldown;
* :func:`batch_signals`, :func:`input_signals` (:mod:`~streamtta.detectors.shift.signals`);
* :func:`make_detector`, :class:`ReplayDetector` (:mod:`~streamtta.detectors.shift.detectors`): river
  detectors by name, saved as plain data;
* :class:`OODBurstRule` (:mod:`~streamtta.detectors.shift.burst`): a sustained high OOD rate;
* :class:`OnsetLocator` (:mod:`~streamtta.detectors.shift.onset`): where inside a batch the stream changed;
* :class:`StreamPageHinkley` (:mod:`~streamtta.detectors.shift.streams`): river's Page-Hinkley, one detector
  per stream id, vectorised (grouped pipelines).
"""
from streamtta.detectors.shift.burst import OODBurstRule
from streamtta.detectors.shift.detectors import DETECTORS, ReplayDetector, make_detector
from streamtta.detectors.shift.monitor import ShiftMonitor
from streamtta.detectors.shift.onset import Onset, OnsetLocator
from streamtta.detectors.shift.signals import batch_signals, input_signals
from streamtta.detectors.shift.streams import StreamPageHinkley

__all__ = ["ShiftMonitor", "OODBurstRule", "batch_signals", "input_signals", "make_detector",
           "DETECTORS", "ReplayDetector", "Onset", "OnsetLocator", "StreamPageHinkley"]
