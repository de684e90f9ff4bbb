"""The network transport sinks share: HTTP(S) connections bounded by one deadline.

`http.client` applies a socket timeout to each read and write, so a server that answers one
byte at a time can stretch a request without limit. A `DeadlineConnection` is an
`http.client.HTTPConnection` (TLS when given an `ssl.SSLContext`) whose sockets give each
blocking operation (connecting, the TLS handshake, every read and write) only the time left
before `deadline`, set per attempt with `set_deadline`; past it, `TimeoutError`. Resolving
the host name is the resolver's business and not bounded.

Used by the webhook sink. The TLS and proxy settings every network sink shares (`ca_file`,
client certificates, `server_name`, proxies) belong here, next to `tls_context`.
"""

from __future__ import annotations

import http.client
import math
import socket
import ssl
import time
from typing import Any


def tls_context() -> ssl.SSLContext:
    """The system's default client context, making deadline-bounded TLS sockets."""
    context = ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


def _arm(sock: socket.socket, deadline: float) -> None:
    """Give the next blocking operation on `sock` only the time left before `deadline`."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the attempt's deadline passed")
    sock.settimeout(left)


class _DeadlineSocket(socket.socket):
    """A TCP socket whose reads and writes end by `deadline` (http.client uses only these)."""

    deadline = math.inf

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _arm(self, self.deadline)  # CPython's sendall keeps one timeout for the whole buffer
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart; its `sendall` loops over `send`, so `send` is armed too."""

    deadline = math.inf

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self, self.deadline)
        return super().send(data, flags)

    def do_handshake(self, block: bool = False) -> None:
        _arm(self, self.deadline)
        super().do_handshake(block)


class DeadlineConnection(http.client.HTTPConnection):
    """An HTTP(S) connection whose every socket operation ends by the attempt's deadline."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port)
        self._tls = tls
        self.deadline = math.inf

    def set_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if isinstance(self.sock, _DeadlineSocket | _DeadlineSSLSocket):
            self.sock.deadline = deadline

    def connect(self) -> None:
        sock = _connect(self.host, self.port, self.deadline)
        if self._tls is None:
            self.sock = sock
            return
        try:
            wrapped = self._tls.wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        if not isinstance(wrapped, _DeadlineSSLSocket):  # pragma: no cover - tls_context()
            raise TypeError("the TLS context must come from tls_context()")
        wrapped.deadline = self.deadline
        self.sock = wrapped
        wrapped.do_handshake()


def _connect(host: str, port: int, deadline: float) -> _DeadlineSocket:
    """A connected socket to the first address of `host` that answers before `deadline`."""
    error: OSError = OSError(f"no address found for {host}")
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            _arm(sock, deadline)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error
