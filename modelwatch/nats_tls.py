"""Opening a nats-py connection that speaks TLS as `modelwatch.tls` says, for the nats sink
and the cluster's NATS backend.

nats-py upgrades to TLS when a server is `tls://` or announces that it requires TLS (so a
`nats://` URL of such a server uses these settings too), with our context and `server_name`
as the verified name. Two nats-py flaws are handled here:

* With a `tls://` URL it still connects in plain text to a server that does not offer TLS,
  and sends its CONNECT (token, password, credentials signature) in the clear: anyone
  between the daemon and the server can be that server. `TlsClient` refuses such a server
  when its INFO arrives, before anything is sent (`PlainTextRefused`), and upgrades to TLS
  where the server only offers it (`tls_available`); after the connect, the connection is
  checked once more to be encrypted.
* After a failed TLS handshake its `close()` never returns, so a client whose connect failed
  is closed with a bound (what is left of it is cancelled with its event loop's other tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import ParseResult

from nats.aio.client import Client

from modelwatch.tls import ClientTls

CLOSE_SECONDS = 1.0  # closing a connection that never opened


class PlainTextRefused(ConnectionError):
    """A `tls://` server answered without TLS."""


class TlsClient(Client):
    """nats-py's client that never speaks plain text to a `tls://` server (see above)."""

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = getattr(self, "_current_server", None)
        if initial_connection and server is not None and server.uri.scheme == "tls":
            if not (info.get("tls_required") or info.get("tls_available")):
                raise PlainTextRefused(_plain_text(server.uri))
            info["tls_required"] = True  # nats-py upgrades before its CONNECT
        await super()._process_info(info, initial_connection)


async def open_connection(
    client: TlsClient, tls: ClientTls, *, close_within: float = CLOSE_SECONDS, **options: Any
) -> None:
    """`client.connect(**options)` speaking TLS as `tls` says. A connect that fails (or is
    cancelled) raises what it raised, after closing the client or giving up on that after
    `close_within` seconds."""
    try:
        await client.connect(tls=tls.context, tls_hostname=tls.server_name, **options)
        _refuse_plain_text(client)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), close_within)
        raise


def _refuse_plain_text(client: Client) -> None:
    url = client.connected_url
    if url is not None and url.scheme == "tls" and not speaks_tls(client):
        raise PlainTextRefused(_plain_text(url))


def _plain_text(url: ParseResult) -> str:
    return (
        f"{url.hostname}:{url.port}: the server did not start TLS; a tls:// server is never "
        "used in plain text"
    )


def speaks_tls(client: Client) -> bool:
    """Whether the client's connection is encrypted (False when that cannot be told)."""
    writer = getattr(getattr(client, "_transport", None), "_io_writer", None)
    if writer is None:
        return False
    return writer.get_extra_info("ssl_object") is not None
