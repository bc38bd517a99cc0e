"""streamtta: streaming continual / test-time adaptation engine.

Kafka in; adapted predictions, OOD scores and drift alerts out. OOD-score polarity everywhere:
higher = more out-of-distribution.
"""
__version__ = "0.1.0"
