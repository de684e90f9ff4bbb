"""`nats` sink: publishes each event to NATS JetStream and waits for the ack (SPEC §5b).

Keys: `NatsSink.OPTIONS`. Servers with credentials in their URLs (`user:pass@`, a token as
`token@`) come from `url_env` / `url_file` (one URL, or several comma-separated, as in
`NATS_URL`); `servers` in the TOML carry none (refused). A token comes from `token_env` /
`token_file`, user credentials from `credentials_file` (a `.creds` file; needs the `nkeys`
package). TLS (`tls://` servers, or servers that require it): `ca_file`, `client_cert_file` /
`client_key_file`, `server_name`, `insecure_skip_verify` (`modelwatch.tls`); the NATS protocol
is not proxied.

Each event is one message on `subject`: the structured CloudEvent JSON as payload, headers
`Nats-Msg-Id` (the event id), `Content-Type: application/cloudevents+json`, `ce-id`, `ce-type`.
Delivered when JetStream acknowledges it; an ack flagged `duplicate` counts as delivered.

Duplicates: JetStream drops a message whose `Nats-Msg-Id` the stream stored within its duplicate
window (2 minutes by default), so an event redelivered after a crash or a lost ack is stored
once. Later redeliveries (a long outage, `redeliver` of a dead letter) are stored again: delivery
is at-least-once and consumers deduplicate by event id (SPEC §8).

Only a stream stores messages, and the sink creates none unless `create_stream = true` (then a
missing `stream` is created on `subject`: file storage, 2 minute duplicate window). Create it::

    nats stream add modelwatch --subjects modelwatch.events --storage file \\
        --dupe-window 2m --defaults

With `stream` set, the first connection checks that the stream exists and captures `subject`
(else `PermanentSinkError` saying how to fix it) and each publish expects that stream.

Failures: refused or lost connections, timeouts, "no responders" (JetStream down, or no stream
captures the subject yet) and JetStream 5xx are `SinkError` (retried); authorization and
permission violations, a missing or mismatched stream, an oversized message and other JetStream
4xx answers are `PermanentSinkError`, as are a server certificate that is not trusted and a client
certificate the server refuses; anything else nats-py raises is left unclassified (a bug:
dead-lettered after a few attempts). Messages and `repr` mask credentials in server URLs and
never contain the token or a URL read from the environment or a file.

nats-py is asyncio: the sink owns a private event loop, created in the thread that first calls
`send` and run only inside `send` and `close` (both from that thread). The connection is kept
between sends; as nobody answers the server's pings while the loop is idle, the server may drop
it, which the next send notices and repairs at once by reconnecting and publishing again (the
same `Nats-Msg-Id`, so harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import re
import urllib.parse
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from nats.aio.client import Client
from nats.errors import (
    AuthorizationError,
    BadSubjectError,
    Error,
    InvalidUserCredentialsError,
    MaxPayloadError,
    NoRespondersError,
    NoServersError,
)
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from modelwatch.config import SinkConfig
from modelwatch.credentials import mask_url, warn_if_shared
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.nats_tls import CLOSE_SECONDS, TlsClient, open_connection
from modelwatch.sinks.options import (
    BOOLEAN,
    PATH,
    STRING,
    Kind,
    Option,
    SinkOptions,
    Values,
    check_url,
    network,
    secret_sources,
    url,
)
from modelwatch.tls import refusal

T = TypeVar("T")

_SCHEMES = ("nats", "tls", "ws", "wss")
_SERVER = url(*_SCHEMES, alternative="url_env or url_file (or token_env, token_file)")
_SUBJECT = re.compile(r"[!-~]+")  # printable ASCII, no spaces; wildcards are refused separately
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DUPLICATE_WINDOW = 120.0
_WATCH_SECONDS = 0.02
_STREAM_NAME_IN_USE = 10058  # a concurrent create_stream won the race: check that stream
_REFUSED = ("authorization violation", "permissions violation", "user authentication")
_PERMANENT = (AuthorizationError, InvalidUserCredentialsError, BadSubjectError, MaxPayloadError)
# what nats-py raises for the transport and the server's answers; anything else is a bug
_TRANSPORT = (OSError, asyncio.TimeoutError, Error)


def _servers_option(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [_SERVER.check(key, value)]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: must be a URL or a non-empty array of URLs")
    return [_SERVER.check(f"{key}[{index}]", item) for index, item in enumerate(value)]


class _ConnectionLost(Exception):
    """The connection closed, or the server refused an operation, while a request waited."""


class NatsSink:
    """Delivered when JetStream acknowledges the message (an ack for a duplicate included)."""

    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option(
            "servers",
            Kind("URL or array of URLs (nats, tls, ws, wss)", _servers_option),
            "the servers; ones with credentials only from url_env / url_file",
            ["nats://127.0.0.1:4222"],
            show="url",
        ),
        *secret_sources("url", "the server URL(s), comma-separated"),
        Option("subject", STRING, "the subject events are published on", "modelwatch.events"),
        Option("stream", STRING, "the JetStream stream checked (or created) at connect", ""),
        Option("create_stream", BOOLEAN, "create `stream` if it is missing", False),
        *network(10.0),
        Option("credentials_file", PATH, "a NATS .creds file (needs the nkeys package)"),
        *secret_sources("token", "the token"),
        exclusive=[
            ("servers", "url_env", "url_file"),
            ("credentials_file", "token_env", "token_file"),
        ],
    )

    def __init__(self, config: SinkConfig) -> None:
        values = self.OPTIONS.parse(config)
        self.name = config.name
        self._scrub = values.scrub
        self._servers = _servers(values)
        self._subject = _subject(values)
        self._stream, self._create_stream = _stream(values)
        self._timeout: float = values["timeout_seconds"]
        self._credentials = _credentials_file(values)
        self._token = values.secret("token")
        self._tls = values.tls()
        self._host = urllib.parse.urlsplit(self._servers[0]).hostname or ""  # verified name
        self._shown = [mask_url(server) for server in self._servers]
        self._origin = ", ".join(self._shown)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._last_error: Exception | None = None
        self._refusal = ""  # a permission violation the server reported on this connection
        self._stream_checked = not self._stream

    def __repr__(self) -> str:
        return (
            f"NatsSink(name={self.name!r}, servers={self._shown!r}, "
            f"subject={self._subject!r}, stream={self._stream!r})"
        )

    def network_summary(self) -> list[str]:
        """What the connection trusts, for `check-config` (paths only)."""
        return [
            f"route: {self._origin} directly (the NATS protocol is not proxied)",
            *self._tls.summary(self._host, " (when TLS is used)"),
        ]

    def send(self, event: Event) -> None:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._deliver(event))

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.run_until_complete(self._disconnect(drain=True))
        finally:
            _shut_down(loop)

    # --- one delivery --------------------------------------------------------------------

    async def _deliver(self, event: Event) -> None:
        reopen = self._client is not None  # a kept connection may have been dropped while idle
        while True:
            try:
                return await self._publish(event)
            except _ConnectionLost as lost:
                await self._disconnect()
                if str(lost):  # the server refused: reconnecting cannot help
                    raise PermanentSinkError(f"{self._origin}: {self._scrub(str(lost))}") from None
                if not reopen:
                    raise SinkError(f"{self._origin}: connection lost before the ack") from None
                reopen = False
            except SinkError:
                raise
            except _TRANSPORT as exc:
                if self._client is not None and not self._client.is_connected:
                    await self._disconnect()
                raise self._failure(exc) from exc

    async def _publish(self, event: Event) -> None:
        headers = {
            "Nats-Msg-Id": event.id,
            "Content-Type": "application/cloudevents+json",
            "ce-id": event.id,
            "ce-type": event.type,
        }
        payload = event.to_json().encode()
        if self._client is not None and not self._client.is_connected:
            await self._disconnect()
        client = self._client or await self._connect()
        js = client.jetstream(timeout=self._timeout)
        if not self._stream_checked:
            await self._race(client, self._check_stream(js))
            self._stream_checked = True
        stream = self._stream or None
        publish = js.publish(self._subject, payload, stream=stream, headers=headers)
        await self._race(client, publish)

    async def _race(self, client: Client, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result, unless the connection closes or the server refuses something
        first (`_ConnectionLost`): nats-py would leave the request waiting for its timeout."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._watch(client))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()  # no-op once done
            watch.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
        if task.cancelled():
            raise _ConnectionLost(self._refusal)
        return task.result()

    async def _watch(self, client: Client) -> None:
        # polled, so that it needs no callback and covers refusals reported through error_cb
        while client.is_connected and not self._refusal:
            await asyncio.sleep(_WATCH_SECONDS)

    # --- the stream ----------------------------------------------------------------------

    async def _check_stream(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(self._stream)
        except NotFoundError:
            if not self._create_stream:
                raise PermanentSinkError(
                    f"{self._origin}: JetStream stream {self._stream!r} does not exist; create"
                    f" it with `nats stream add {self._stream} --subjects {self._subject}"
                    " --storage file --dupe-window 2m --defaults`, or set create_stream = true"
                ) from None
            await self._add_stream(js)
            return
        subjects = info.config.subjects or []
        if not any(subject_matches(pattern, self._subject) for pattern in subjects):
            raise PermanentSinkError(
                f"{self._origin}: JetStream stream {self._stream!r} does not capture subject"
                f" {self._subject!r} (its subjects: {', '.join(subjects) or 'none'}); add the"
                f" subject with `nats stream edit {self._stream}` or change `subject`"
            )

    async def _add_stream(self, js: JetStreamContext) -> None:
        try:
            await js.add_stream(
                name=self._stream,
                subjects=[self._subject],
                storage=StorageType.FILE,
                duplicate_window=_DUPLICATE_WINDOW,
            )
        except APIError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            self._create_stream = False
            await self._check_stream(js)

    # --- the connection ------------------------------------------------------------------

    async def _connect(self) -> Client:
        client = TlsClient()
        self._refusal = ""

        async def error(exc: Exception) -> None:
            self._last_error = exc
            if any(word in str(exc).lower() for word in _REFUSED):
                self._refusal = str(exc)

        whole_seconds = max(1, math.ceil(self._timeout))
        await asyncio.wait_for(
            open_connection(
                client,
                self._tls,
                close_within=min(self._timeout, CLOSE_SECONDS),
                servers=list(self._servers),
                name="modelwatch",
                allow_reconnect=False,  # a lost connection is reopened by the next send
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=whole_seconds,
                drain_timeout=whole_seconds,
                error_cb=error,
                user_credentials=self._credentials,
                token=self._token,
            ),
            self._timeout,
        )
        self._client = client
        return client

    async def _disconnect(self, *, drain: bool = False) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if drain and client.is_connected:
            # a drain that fails or times out still ends with the close below
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.drain(), self._timeout)
        if not client.is_closed:
            await client.close()

    # --- errors --------------------------------------------------------------------------

    def _failure(self, exc: Exception) -> SinkError:
        """The SinkError (retry) or PermanentSinkError for what nats-py raised."""
        where = self._origin
        if isinstance(exc, NoStreamResponseError):
            return SinkError(
                f"{where}: no JetStream stream answered on {self._subject!r} (is JetStream"
                " enabled, and does a stream capture the subject?)"
            )
        if isinstance(exc, NoRespondersError):
            return SinkError(f"{where}: JetStream is not enabled or not available")
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            return SinkError(f"{where}: no answer within {self._timeout:g} s")
        if isinstance(exc, APIError):
            text = f"{where}: JetStream refused: {exc.description} ({exc.err_code})"
            return SinkError(text) if (exc.code or 0) >= 500 else PermanentSinkError(text)
        cause = (self._last_error if isinstance(exc, NoServersError) else None) or exc
        refused_tls = refusal(cause, self._tls, self._host)
        if refused_tls is not None:
            return PermanentSinkError(f"{where}: {refused_tls}")
        detail = self._scrub(str(cause)) or type(cause).__name__
        refused = isinstance(cause, _PERMANENT) or any(w in detail.lower() for w in _REFUSED)
        text = f"{where}: {detail}"
        return PermanentSinkError(text) if refused else SinkError(text)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the NATS subject `pattern` (with `*` and `>` wildcards) captures `subject`."""
    wanted, given = pattern.split("."), subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(given) > index
        if index >= len(given) or part not in ("*", given[index]):
            return False
    return len(wanted) == len(given)


def _shut_down(loop: asyncio.AbstractEventLoop) -> None:
    """Finish the loop's leftover tasks and executor threads, then close it."""
    try:
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


async def _cancel_leftovers() -> None:
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


# --- configuration -----------------------------------------------------------------------


def _servers(values: Values) -> tuple[str, ...]:
    """`servers`, or the comma-separated URLs of `url_env` / `url_file` (which may carry
    credentials: every part of them is scrubbed from messages)."""
    text = values.secret("url")
    if text is None:
        return tuple(values["servers"])
    key = f"{values.key}.url_{'env' if 'url_env' in values else 'file'}"
    servers = tuple(server.strip() for server in text.split(",") if server.strip())
    for server in servers:
        parts = check_url(key, server, _SCHEMES)
        # a user with a password is a name; a user alone is a token (nats://TOKEN@host)
        secret = parts.password if parts.password is not None else parts.username
        for part in (server, secret or ""):
            values.scrub.add(part)
            values.scrub.add(urllib.parse.unquote(part))
    return servers


def _subject(values: Values) -> str:
    subject: str = values["subject"]
    tokens = subject.split(".")
    if not _SUBJECT.fullmatch(subject) or "" in tokens or {"*", ">"} & set(tokens):
        raise ConfigError(
            f"{values.key}.subject: must be dot-separated tokens of printable ASCII without"
            f" spaces or wildcards, got {subject!r}"
        )
    return subject


def _stream(values: Values) -> tuple[str, bool]:
    stream: str = values["stream"]
    create: bool = values["create_stream"]
    if stream and not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(
            f"{values.key}.stream: must be letters, digits, '-' and '_', got {stream!r}"
        )
    if create and not stream:
        raise ConfigError(f"{values.key}.create_stream: needs `stream` (the name to create)")
    return stream, create


def _credentials_file(values: Values) -> str | None:
    """The `.creds` file, checked readable (and private) now rather than at the first send."""
    path = values.get("credentials_file")
    if path is None:
        return None
    where = f"{values.key}.credentials_file"
    try:
        with open(path, "rb") as file:
            warn_if_shared(where, path, os.fstat(file.fileno()))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if importlib.util.find_spec("nkeys") is None:
        raise ConfigError(f"{where}: needs the nkeys package (pip install nkeys)")
    return str(path)
