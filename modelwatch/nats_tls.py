"""Opening a nats-py connection that speaks TLS as `modelwatch.tls` says, for the nats sink
and the cluster's NATS backend.

nats-py upgrades to TLS when a server is `tls://` or announces that it requires TLS (so a
`nats://` URL of such a server uses these settings too), with our context and `server_name`
as the verified name. One nats-py flaw is handled here: after a failed TLS handshake its
`close()` never returns, so a client whose connect failed is closed with a bound (what is
left of it is cancelled with its event loop's other tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client

from modelwatch.tls import ClientTls

CLOSE_SECONDS = 1.0  # closing a connection that never opened


async def open_connection(
    client: Client, tls: ClientTls, *, close_within: float = CLOSE_SECONDS, **options: Any
) -> None:
    """`client.connect(**options)` speaking TLS as `tls` says. A connect that fails (or is
    cancelled) raises what it raised, after closing the client or giving up on that after
    `close_within` seconds."""
    try:
        await client.connect(tls=tls.context, tls_hostname=tls.server_name, **options)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), close_within)
        raise
