"""Structured logs: :class:`JsonFormatter` writes one JSON object per log line, :func:`use_json_logs`
puts it on the root logger.

Each line has ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger`` and ``event`` -- the
record's ``event`` field when the caller gave one (``extra={"event": "commit"}``), else its message --
plus ``message`` when that differs from ``event``, every other ``extra`` field (``stream``,
``partition``, ``offsets``, ...) and ``exc`` for an exception. Secrets never show: the handler carries
the redaction filter (:func:`streamtta.config.install_redaction`) for the message and exception text,
and the extra fields go through :func:`streamtta.config.secrets.redact` with the same secret values.
At DEBUG (``-vv``) only streamtta's own loggers write their DEBUG lines; other libraries' loggers
(matplotlib's font search writes hundreds per run) are kept to INFO and up (:class:`OwnDebugFilter`).

>>> import logging
>>> rec = logging.LogRecord("streamtta.engine", logging.INFO, __file__, 1, "committed %s", ("t[0]@5",), None)
>>> rec.event, rec.partition, rec.created = "commit", 0, 0.0
>>> JsonFormatter().format(rec)
'{"time": "1970-01-01T00:00:00.000Z", "level": "INFO", "logger": "streamtta.engine", "event": "commit", "message": "committed t[0]@5", "partition": 0}'
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "OwnDebugFilter", "use_json_logs"]

#: attributes every LogRecord has: not extra fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
#: set on the handlers :func:`use_json_logs` (and the CLI's text set-up) install, so that a later call
#: replaces them and leaves other handlers (pytest's, an embedding application's) alone
HANDLER_MARK = "_streamtta_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        from streamtta.config.secrets import FILTER, redact

        message = record.getMessage()
        t = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.created % 1 * 1000):03d}Z",
            "level": record.levelname, "logger": record.name,
            "event": str(redact(getattr(record, "event", None), FILTER.values) or message)}
        if doc["event"] != message:
            doc["message"] = message
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and k != "event"
                 and not k.startswith("_")}
        doc.update(redact(extra, FILTER.values))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, default=str)


class OwnDebugFilter(logging.Filter):
    """Records below INFO pass only from the ``streamtta`` loggers.

    >>> f = OwnDebugFilter()
    >>> [f.filter(logging.LogRecord(n, lvl, "", 0, "", (), None)) for n, lvl in
    ...  [("streamtta.engine", logging.DEBUG), ("matplotlib.font_manager", logging.DEBUG), ("urllib3", logging.INFO)]]
    [True, False, True]
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or record.name == "streamtta" or record.name.startswith("streamtta.")


def use_json_logs(level: int = logging.INFO, stream: Any = None) -> logging.Handler:
    """Log JSON lines to ``stream`` (default stderr) from the root logger at ``level``: the handlers a
    previous call or the CLI installed are replaced, others are kept; the secret filter is installed, and
    below INFO only streamtta's own records are written (:class:`OwnDebugFilter`)."""
    from streamtta.config.secrets import install_redaction

    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, HANDLER_MARK, False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(OwnDebugFilter())
    setattr(handler, HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    install_redaction(handlers=[handler])
    return handler
