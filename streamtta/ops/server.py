"""The operations HTTP endpoint of a worker: ``/metrics``, ``/healthz`` and ``/readyz`` on one port.

:class:`OpsServer` is a small :mod:`http.server` in a daemon thread. ``/metrics`` answers the Prometheus
text format, ``/healthz`` 200 while the process is alive, ``/readyz`` 200 when the ``ready`` callback
says so, else 503; both health answers are a JSON body. Port 0 picks a free port (:attr:`OpsServer.port`).

>>> srv = OpsServer("127.0.0.1", 0, lambda: b"x 1\\n", lambda: (False, {"reasons": ["idle"]})).start()
>>> import urllib.request, urllib.error
>>> urllib.request.urlopen(f"{srv.url}/metrics").read()
b'x 1\\n'
>>> try:
...     urllib.request.urlopen(f"{srv.url}/readyz")
... except urllib.error.HTTPError as e:
...     print(e.code, e.read())
503 b'{"reasons": ["idle"]}'
>>> srv.close()
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["OpsServer"]

log = logging.getLogger("streamtta.ops")


class OpsServer:
    """``/metrics`` (from ``metrics()``), ``/healthz`` and ``/readyz`` (from ``ready()``) on ``host:port``."""

    def __init__(self, host: str, port: int, metrics: Callable[[], bytes],
                 ready: Callable[[], tuple[bool, dict[str, Any]]], *, timeout_s: float = 10.0) -> None:
        #: seconds a connection may stay silent before it is closed (a client that connects and sends
        #: nothing would otherwise hold its handler thread for ever)
        self.timeout_s = float(timeout_s)
        self.host, self.requested_port = host, int(port)
        self.metrics, self.ready = metrics, ready
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OpsServer:
        """Bind and serve in a daemon thread (an ``OSError`` if the port is taken)."""
        handler = _handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.requested_port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="streamtta-ops-http", daemon=True)
        self._thread.start()
        log.info("metrics, health and readiness on %s", self.url)
        return self

    @property
    def port(self) -> int:
        """The bound port (the chosen one when 0 was asked for)."""
        return int(self._httpd.server_address[1]) if self._httpd is not None else self.requested_port

    @property
    def url(self) -> str:
        """``http://host:port``; a wildcard bind shows as ``localhost``."""
        host = "localhost" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def _handler(server: OpsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = server.timeout_s  # socket timeout of each connection (StreamRequestHandler)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            try:
                if path == "/metrics":
                    self._send(200, server.metrics(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"alive": true}', "application/json")
                elif path == "/readyz":
                    ok, details = server.ready()
                    self._send(200 if ok else 503, json.dumps(details).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")
            except Exception as e:  # noqa: BLE001 -- an endpoint error must not take the worker down
                log.warning("ops endpoint %s failed: %s", path, e)
                self._send(500, f"{type(e).__name__}: {e}\n".encode(), "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("ops http: " + format, *args)

    return Handler
