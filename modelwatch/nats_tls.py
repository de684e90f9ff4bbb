"""Opening a nats-py connection that speaks TLS as `modelwatch.tls` says, for the nats sink
and the cluster's NATS backend.

nats-py upgrades to TLS when a server is `tls://` or announces that it requires TLS (so a
`nats://` URL of such a server uses these settings too), with our context and `server_name`
as the verified name. Two nats-py flaws are handled here:

* With a `tls://` URL, or TLS keys set (`ca_file`, a client certificate, ...), it still
  connects in plain text to a server that does not offer TLS,
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
    """nats-py's client that never speaks plain text to a `tls://` server, nor to any server
    once TLS keys are set (see above)."""

    tls_keys: tuple[str, ...] = ()  # the TLS keys set (open_connection): TLS is required

    def _requires_tls(self, scheme: str) -> bool:
        return scheme == "tls" or bool(self.tls_keys)

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = getattr(self, "_current_server", None)
        if initial_connection and server is not None and self._requires_tls(server.uri.scheme):
            if not (info.get("tls_required") or info.get("tls_available")):
                raise PlainTextRefused(self._plain_text(server.uri))
            info["tls_required"] = True  # nats-py upgrades before its CONNECT
        await super()._process_info(info, initial_connection)

    def refuse_plain_text(self) -> None:
        """After the connect: the connection is encrypted wherever TLS is required."""
        url = self.connected_url
        if url is not None and self._requires_tls(url.scheme) and not speaks_tls(self):
            raise PlainTextRefused(self._plain_text(url))

    def _plain_text(self, url: ParseResult) -> str:
        why = (
            "a tls:// server"
            if url.scheme == "tls"
            else f"with {', '.join(self.tls_keys)} set, a server"
        )
        where = f"{url.hostname}:{url.port}"
        return f"{where}: the server did not start TLS; {why} is never used in plain text"


async def open_connection(
    client: TlsClient, tls: ClientTls, *, close_within: float = CLOSE_SECONDS, **options: Any
) -> None:
    """`client.connect(**options)` speaking TLS as `tls` says. A connect that fails (or is
    cancelled) raises what it raised, after closing the client or giving up on that after
    `close_within` seconds."""
    client.tls_keys = tuple(tls.options.given())
    try:
        await client.connect(tls=tls.context, tls_hostname=tls.server_name, **options)
        client.refuse_plain_text()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), close_within)
        raise


def speaks_tls(client: Client) -> bool:
    """Whether the client's connection is encrypted (False when that cannot be told)."""
    writer = getattr(getattr(client, "_transport", None), "_io_writer", None)
    if writer is None:
        return False
    return writer.get_extra_info("ssl_object") is not None
