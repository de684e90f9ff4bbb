"""HTTP(S) for the webhook sink: urllib3's pooling and proxies, one deadline per attempt.

urllib3 brings what `http.client` lacks: proxies (requests to `http://` URLs forwarded,
`https://` ones tunnelled with CONNECT), TLS with our `ssl.SSLContext` (`modelwatch.tls`),
connection reuse. What it lacks in turn is a bound on a whole request: its timeouts apply
to each socket operation, so a server answering a byte at a time could stretch a request
without limit. The sockets made here give each blocking operation (connecting, every TLS
handshake, every read and write, the CONNECT exchange with a proxy included) only the time
left before the deadline of the current attempt, set with `with deadline(at):`; past it,
`TimeoutError`. Resolving a host name is the resolver's business and not bounded.

`http_client(tls, route)` is a urllib3 `PoolManager` (a `ProxyManager` with a proxy) whose
pools make such sockets; the deadline is a context variable, so it holds for the sockets
the calling thread uses inside the `with` block and for no other thread.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    InsecureRequestWarning,
    NameResolutionError,
    NewConnectionError,
)

from modelwatch.proxy import Route
from modelwatch.tls import ClientTls

_DEADLINE: ContextVar[float] = ContextVar("modelwatch_http_deadline", default=math.inf)


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Within the block, every socket operation of an `http_client` ends by `at`
    (`time.monotonic()` seconds)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _arm(sock: socket.socket) -> None:
    """Give the next blocking operation on `sock` only the time left before the deadline."""
    at = _DEADLINE.get()
    if at == math.inf:
        return
    left = at - time.monotonic()
    if left <= 0:
        raise TimeoutError("the attempt's deadline passed")
    sock.settimeout(left)


class _DeadlineSocket(socket.socket):
    """A TCP socket whose reads and writes end by the deadline (http.client uses these)."""

    __slots__ = ()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _arm(self)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        _arm(self)
        return super().recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        _arm(self)  # CPython's sendall keeps one timeout for the whole buffer
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart; its `sendall` loops over `send`, so `send` is armed too."""

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        _arm(self)
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        _arm(self)  # TLS inside TLS (an https:// proxy) reads the outer socket this way
        return super().recv(buflen, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        _arm(self)
        return super().send(data, flags)

    def do_handshake(self, block: bool = False) -> None:
        _arm(self)
        super().do_handshake(block)


def _connect(host: str, port: int, timeout: float | None) -> _DeadlineSocket:
    """A connected socket to the first address of `host` that answers before the deadline
    (or within `timeout`, outside of one)."""
    error: OSError = OSError(f"no address found for {host}")
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = _DeadlineSocket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            _arm(sock)
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


class _DeadlineConnect(HTTPConnection):
    """urllib3's connection, opening a deadline socket (errors as urllib3 reports them)."""

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            return _connect(self.host, self.port, timeout)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc


class _HTTPConnection(_DeadlineConnect):
    pass


class _HTTPSConnection(_DeadlineConnect, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def http_client(tls: ClientTls, route: Route) -> urllib3.PoolManager:
    """A pool manager for one sink: one kept-alive connection, TLS as `tls` says (the
    context gets deadline sockets), through `route`'s proxy if any."""
    context = tls.context
    context.sslsocket_class = _DeadlineSSLSocket
    options: dict[str, Any] = {
        "num_pools": 2,
        "maxsize": 1,
        "ssl_context": context,
        # urllib3 sets the context's verify mode from cert_reqs: say the same as the context
        "cert_reqs": "CERT_REQUIRED" if tls.verifies else "CERT_NONE",
        "server_hostname": tls.server_name,
    }
    if not tls.verifies:
        # urllib3 would warn at every request; modelwatch warned once per start already
        urllib3.disable_warnings(InsecureRequestWarning)
    manager: urllib3.PoolManager
    if route.proxy is None:
        manager = urllib3.PoolManager(**options)
    else:
        manager = urllib3.ProxyManager(
            route.proxy.url,
            proxy_headers=dict(route.proxy.headers),
            proxy_ssl_context=context,  # an https:// proxy is trusted as the sink says
            **options,
        )
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager
