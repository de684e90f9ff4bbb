"""A recording HTTP/1.1 server on 127.0.0.1 for webhook tests (real sockets, scripted replies;
HTTPS when given a server-side `ssl.SSLContext`)."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """What the server answers to the next request."""

    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    echo_credentials: bool = False  # answer with the request's signature and authorization
    drip: float = 0.0  # seconds between the bytes of the answer (a slow, never silent server)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    client_port: int
    client_cert: str = ""  # the common name of the client's certificate, over mutual TLS


class Receiver(ThreadingHTTPServer):
    # The daemon's connections are cut at shutdown; their handler threads must not linger.
    daemon_threads = False

    """A recording HTTP/1.1 server; `script(...)` queues replies (then 204 for ever)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tls = tls
        self.requests: list[Received] = []
        self.replies: list[Reply] = []
        self.refusals: list[tuple[bytes, Reply]] = []
        self.idle_timeout: float | None = None
        self.connections_opened = 0
        self.connections_closed = 0
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def server_bind(self) -> None:  # skip HTTPServer's reverse DNS lookup
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server_port}/hooks/models"

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        if self.tls is None:
            return conn, address
        # the handshake happens on the first read, in the handler's thread
        return self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), address

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def refuse(self, marker: bytes, reply: Reply) -> None:
        """Answer `reply` to every request whose body contains `marker` (one unit's events),
        for ever, before any scripted reply."""
        with self._lock:
            self.refusals.append((marker, reply))

    def record(self, request: Received) -> Reply:
        with self._lock:
            self.requests.append(request)
            for marker, reply in self.refusals:
                if marker in request.body:
                    return reply
            return self.replies.pop(0) if self.replies else Reply()

    def opened(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections_opened += 1
            self._open.add(conn)

    def closed(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections_closed += 1
            self._open.discard(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer (the timeout tests) is expected, not news."""

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        with self._lock:
            still_open = list(self._open)
        for conn in still_open:  # wake handlers blocked on a kept-alive connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()  # joins the handler threads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Receiver

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed(self.connection)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Received(
            self.command, self.path, headers, body, self.client_address[1], self._client_cert()
        )
        reply = self.server.record(request)
        if reply.delay:
            self.server.stopping.wait(reply.delay)
        content = reply.body
        if reply.echo_credentials:
            echoed = {k: headers.get(k, "") for k in ("webhook-signature", "authorization")}
            content = json.dumps(echoed).encode()
        try:
            if reply.drip:
                self._drip(reply, content)
                return
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
        except OSError:
            self.close_connection = True

    def _client_cert(self) -> str:
        if not isinstance(self.connection, ssl.SSLSocket):
            return ""
        peer = self.connection.getpeercert() or {}
        names = [
            value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"
        ]
        return names[0] if names else ""

    def _drip(self, reply: Reply, content: bytes) -> None:
        """Send the answer one byte per `reply.drip` seconds, until done or stopped."""
        head = f"HTTP/1.1 {reply.status} OK\r\nContent-Length: {len(content)}\r\n\r\n"
        self.close_connection = True
        for byte in head.encode() + content:
            if self.server.stopping.wait(reply.drip):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextlib.contextmanager
def running_receiver(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A started Receiver (HTTPS with `tls`), stopped and joined on exit."""
    server = Receiver(tls)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="receiver"
    )
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join()
