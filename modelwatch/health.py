"""The health HTTP server behind `daemon.health_listen` ("HOST:PORT", "[::1]:PORT").

Contract:

* `HealthServer(listen, alive=..., ready=..., metrics=...)` binds at construction (a port
  that cannot be bound is a `ModelwatchError` naming `daemon.health_listen`); port 0 picks a
  free port, exposed as `.port`. `start()` serves from a thread named `health`; `stop()`
  shuts down, closes the socket and joins every thread it started. Both are idempotent.
* `GET /healthz`: 200 `ok\\n` while `alive()` returns [], else 503 with each dead or stale part
  on a line of its own. `GET /readyz`: 200 once `ready` is set, else 503. `GET /metrics`:
  `metrics.render()` as `CONTENT_TYPE_LATEST`. Other paths 404; only GET and HEAD (others
  501). Query strings are ignored.
* Requests are not logged, and a slow client is cut off after `REQUEST_TIMEOUT` seconds, so
  it cannot hold `stop()` up for longer than that.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from modelwatch.errors import ModelwatchError
from modelwatch.metrics import Metrics

log = structlog.get_logger("modelwatch.health")

REQUEST_TIMEOUT = 5.0
TEXT = "text/plain; charset=utf-8"


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port" (already validated by `config`)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _resolve(listen: str) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except (OSError, UnicodeError) as exc:
        raise ModelwatchError(f"daemon.health_listen: cannot resolve {listen!r}: {exc}") from None
    family, _type, _proto, _name, address = infos[0]
    return family, address


def _one_line(text: str) -> str:
    """`text` on one printable line (part names may contain paths from the config)."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # request threads are joined by server_close()

    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[Any, ...],
        alive: Callable[[], Sequence[str]],
        ready: threading.Event,
        metrics: Metrics,
    ) -> None:
        self.address_family = family
        self.alive, self.ready, self.metrics = alive, ready, metrics
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would also do a reverse DNS lookup (getfqdn) we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr. A client that went away is normal
        # (a probe timed out); anything else is a bug worth one log line.
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.error("health_request_failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT
    server_version = "modelwatch"

    def do_GET(self) -> None:
        self._respond(*self._route(), body=True)

    def do_HEAD(self) -> None:
        self._respond(*self._route(), body=False)

    def _route(self) -> tuple[int, str, bytes]:
        app = cast(_Server, self.server)
        path = urlsplit(self.path).path
        if path == "/healthz":
            return _healthz(app.alive)
        if path == "/readyz":
            if app.ready.is_set():
                return 200, TEXT, b"ready\n"
            return 503, TEXT, b"starting\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, app.metrics.render()
        return 404, TEXT, b"not found\n"

    def _respond(self, status: int, content_type: str, payload: bytes, *, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests (and malformed ones) are not logged: probes would flood the journal."""


def _healthz(alive: Callable[[], Sequence[str]]) -> tuple[int, str, bytes]:
    try:
        failing = list(alive())
    except Exception as exc:  # a broken check is a failed check, not a crashed server
        failing = [f"health check failed: {exc}"]
    if not failing:
        return 200, TEXT, b"ok\n"
    return 503, TEXT, "".join(_one_line(name) + "\n" for name in failing).encode()


class HealthServer:
    """`/healthz`, `/readyz` and `/metrics` on `listen`; see the module docstring."""

    def __init__(
        self,
        listen: str,
        *,
        alive: Callable[[], Sequence[str]],
        ready: threading.Event,
        metrics: Metrics,
        poll_interval: float = 0.5,
    ) -> None:
        family, address = _resolve(listen)
        try:
            self._server = _Server(family, address, alive, ready, metrics)
        except OSError as exc:
            raise ModelwatchError(
                f"daemon.health_listen: cannot listen on {listen}: {exc.strerror or exc}"
            ) from None
        self.listen = listen
        self._poll_interval = poll_interval  # how long stop() may wait for the serving loop
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when `listen` asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve requests from a thread named `health`."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self._poll_interval},
            name="health",
        )
        self._thread.daemon = True
        self._thread.start()
        log.info("health_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop serving, close the socket, join the server and request threads."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
