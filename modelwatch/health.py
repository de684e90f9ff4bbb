"""The health HTTP server behind `daemon.health_listen` ("HOST:PORT", "[::1]:PORT").

Contract:

* `HealthServer(listen, alive=..., ready=..., metrics=...)` binds at construction (a port
  that cannot be bound is a `ModelwatchError` naming `daemon.health_listen`); port 0 picks a
  free port, exposed as `.port`. `start()` serves from one thread named `health`; `stop()`
  closes the listening socket and every connection and joins that thread. Both are
  idempotent.
* `GET /healthz`: 200 `ok\\n` while `alive()` returns [], else 503 with each dead or stale part
  on a line of its own. `GET /readyz`: 200 once `ready` is set, else 503. `GET /metrics`:
  `metrics.render()` as `CONTENT_TYPE_LATEST`. Any other path is offered to `pages(path)`
  (the status page and its JSON, SPEC §9), which answers (status, content type, body) or
  None; None, or no `pages`, is 404. Only GET and HEAD (others 501); a request that is not
  HTTP is 400. Query strings are ignored. Requests are not logged.

Clients are untrusted (in a pod every container shares the network namespace, so the
training code can reach this port). The server never waits for one: a single thread runs
non-blocking sockets from a selector. At most `max_connections` are open; a new connection
beyond that closes the oldest. Each connection carries one request (`Connection: close`),
whose head (at most `MAX_HEAD` bytes) must arrive and whose answer must leave within
`request_seconds` of the connection being accepted; otherwise it is closed. So whatever
clients do (hold idle connections, trickle bytes, stop reading), a new probe is answered at
once, and `stop()` returns within `poll_interval` plus the time one answer takes to compute.
"""

from __future__ import annotations

import contextlib
import http
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from modelwatch.errors import ModelwatchError
from modelwatch.metrics import Metrics

log = structlog.get_logger("modelwatch.health")

REQUEST_SECONDS = 5.0
MAX_CONNECTIONS = 64
MAX_HEAD = 8 * 1024
TEXT = "text/plain; charset=utf-8"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_ACCEPTS_PER_TURN = 256  # then serve the others before accepting more


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


def _listen(listen: str) -> socket.socket:
    family, address = _resolve(listen)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ModelwatchError(
            f"daemon.health_listen: cannot listen on {listen}: {exc.strerror or exc}"
        ) from None
    sock.setblocking(False)
    return sock


def _one_line(text: str) -> str:
    """`text` on one printable line (part names may contain paths from the config)."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)


@dataclass(eq=False)
class _Client:
    """One accepted connection: what it sent so far, then the answer still to send."""

    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None


class HealthServer:
    """`/healthz`, `/readyz` and `/metrics` on `listen`; see the module docstring."""

    def __init__(
        self,
        listen: str,
        *,
        alive: Callable[[], Sequence[str]],
        ready: threading.Event,
        metrics: Metrics,
        pages: Callable[[str], tuple[int, str, bytes] | None] | None = None,
        poll_interval: float = 0.5,
        request_seconds: float = REQUEST_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._listener = _listen(listen)
        self._address = self._listener.getsockname()  # also known once the socket is closed
        self.listen = listen
        self._alive, self._ready, self._metrics = alive, ready, metrics
        self._pages = pages
        self._poll_interval = poll_interval  # the longest the loop sleeps without a wake-up
        self._request_seconds = request_seconds
        self._max_connections = max_connections
        self._clients: dict[socket.socket, _Client] = {}  # oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def host(self) -> str:
        return str(self._address[0])

    @property
    def port(self) -> int:
        """The bound port (the real one when `listen` asked for port 0)."""
        return int(self._address[1])

    def start(self) -> None:
        """Serve requests from a thread named `health`."""
        if self._thread is not None or self._closed:
            return
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()
        log.info("health_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop serving, close the socket and every connection, join the thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        if self._thread is not None:
            self._thread.join()
        for client in list(self._clients.values()):
            self._drop(client)
        self._selector.close()
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the loop ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            for key, _events in self._selector.select(self._wait()):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is not self._wake_reader:
                    self._service(key.data)
            self._expire(time.monotonic())

    def _wait(self) -> float:
        """Seconds until the loop must look again: the next deadline, at most poll_interval."""
        if not self._clients:
            return self._poll_interval
        first = min(client.deadline for client in self._clients.values())
        return max(0.0, min(self._poll_interval, first - time.monotonic()))

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:  # out of descriptors: make room, or let the next turn try
                if not self._clients:
                    self._stopping.wait(0.05)
                    return
                self._drop(next(iter(self._clients.values())))
                continue
            if len(self._clients) >= self._max_connections:
                self._drop(next(iter(self._clients.values())))  # the oldest
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + self._request_seconds)
            self._clients[sock] = client
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        if self._clients.pop(client.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()

    # --- one connection ---------------------------------------------------------------------

    def _service(self, client: _Client) -> None:
        try:
            if client.answer is None:
                self._receive(client)
            else:
                self._send(client, client.answer)
        except OSError:  # reset by the peer, or gone: nothing to answer
            self._drop(client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        if not data:
            self._drop(client)
            return
        client.received += data
        match = _END_OF_HEAD.search(client.received)
        if match is None and len(client.received) <= MAX_HEAD:
            return
        head = bytes(client.received[: match.start()]) if match else b""
        answer = self._answer(head) if match else _response(431, TEXT, b"request too large\n")
        client.answer = memoryview(answer)
        self._selector.modify(client.sock, selectors.EVENT_WRITE, client)
        self._send(client, client.answer)

    def _send(self, client: _Client, answer: memoryview) -> None:
        try:
            sent = client.sock.send(answer)
        except BlockingIOError:
            return
        client.answer = answer[sent:]
        if client.answer:
            return
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
            client.sock.recv(65536)  # unread input would turn the close into a reset
        self._drop(client)

    # --- routing ----------------------------------------------------------------------------

    def _answer(self, head: bytes) -> bytes:
        words = head.split(b"\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return _response(400, TEXT, b"bad request\n")
        method, target = words[0], words[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return _response(501, TEXT, b"not implemented\n")
        status, content_type, body = self._route(urlsplit(target).path)
        return _response(status, content_type, body, with_body=method == b"GET")

    def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return _healthz(self._alive)
        if path == "/readyz":
            if self._ready.is_set():
                return 200, TEXT, b"ready\n"
            return 503, TEXT, b"starting\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics.render()
        page = self._pages(path) if self._pages is not None else None
        return page if page is not None else (404, TEXT, b"not found\n")


def _healthz(alive: Callable[[], Sequence[str]]) -> tuple[int, str, bytes]:
    try:
        failing = list(alive())
    except Exception as exc:  # a broken check is a failed check, not a crashed server
        failing = [f"health check failed: {exc}"]
    if not failing:
        return 200, TEXT, b"ok\n"
    return 503, TEXT, "".join(_one_line(name) + "\n" for name in failing).encode()


def _response(status: int, content_type: str, body: bytes, *, with_body: bool = True) -> bytes:
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n"
        "Server: modelwatch\r\n\r\n"
    )
    return head.encode("latin-1") + (body if with_body else b"")
