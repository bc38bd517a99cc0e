"""Shift monitoring: river drift detectors on batch signals, the OOD-burst rule and the onset locator.

* :class:`ShiftMonitor` (river ADWIN / PageHinkley / KSWIN on batch signals) and :func:`batch_signals`,
  :func:`input_signals`;
* :class:`OODBurstRule` (a sustained high OOD rate);
* :class:`OnsetLocator` (where inside a batch the stream changed).
"""
from streamtta.detectors.shift.monitor import OODBurstRule, ShiftMonitor, batch_signals, input_signals, make_detector
from streamtta.detectors.shift.onset import Onset, OnsetLocator

__all__ = ["ShiftMonitor", "OODBurstRule", "batch_signals", "input_signals", "make_detector",
           "Onset", "OnsetLocator"]
