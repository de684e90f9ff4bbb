"""Redis over TLS with a context from `modelwatch.tls`, for the redis sink and the cluster's
Redis backend: `redis.ConnectionPool.from_url(url, **connection_options(url, tls))`.

redis-py's own `SSLConnection` builds its context from loose options (some of which turn
verification off, and which `tls.refuse_url_settings` keeps out of URLs) and verifies only
the URL's host; this connection wraps its socket with the checked context and verifies
`server_name` when one is set.
"""

from __future__ import annotations

import socket
from typing import Any

import redis

from modelwatch.tls import ClientTls


class TlsConnection(redis.Connection):
    """A Redis connection whose socket speaks TLS as `tls` says."""

    def __init__(self, *, tls: ClientTls, **kwargs: Any) -> None:
        self._tls = tls
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        try:
            return self._tls.context.wrap_socket(
                sock, server_hostname=self._tls.server_name or self.host
            )
        except BaseException:
            sock.close()
            raise


def speaks_tls(url: str) -> bool:
    """Whether a Redis URL is `rediss://` (`redis://` and `unix://` are plain)."""
    return url.lower().startswith("rediss:")


def connection_options(url: str, tls: ClientTls) -> dict[str, Any]:
    """What `redis.ConnectionPool.from_url(url, ...)` takes to speak TLS as `tls` says
    (nothing for a plain URL)."""
    return {"connection_class": TlsConnection, "tls": tls} if speaks_tls(url) else {}
