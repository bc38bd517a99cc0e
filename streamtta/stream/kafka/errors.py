"""Errors of the Kafka layer: a failed offset commit, undelivered output records."""
from __future__ import annotations

__all__ = ["CommitError", "DeliveryError"]


class CommitError(RuntimeError):
    """A synchronous offset commit failed (the offsets were not stored)."""


class DeliveryError(RuntimeError):
    """One or more produced records were not delivered (or still queued after the flush timeout)."""
