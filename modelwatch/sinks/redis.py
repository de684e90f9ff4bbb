"""`redis` sink: appends each event to a Redis stream with XADD (SPEC §5b).

Keys: `RedisSink.OPTIONS`. The password comes from `password_env` / `password_file`, or with
the URL from `url_env` / `url_file`; a `url` in the TOML carries none (refused). A `rediss://`
URL speaks TLS as `ca_file`, `client_cert_file` / `client_key_file`, `server_name` and
`insecure_skip_verify` say (`modelwatch.tls`); redis-py's own `ssl_*` URL parameters are
refused, so that nothing but `insecure_skip_verify` turns verification off. The Redis
protocol is not proxied.

Each event is one stream entry::

    XADD <stream> [MAXLEN ~ <maxlen>] * id <event id> type <event type> subject <subject>
        event <CloudEvent JSON>

and is delivered when XADD returns. `maxlen` > 0 trims approximately (`~`: Redis drops whole
internal nodes only, so the stream keeps somewhat more than `maxlen` entries); 0 never trims.

Duplicates: Redis streams do not deduplicate, and the sink does nothing clever about it. An
event sent again (after a crash, a reply lost to a timeout, or `redeliver`) is appended again
with the same `id` field: delivery is at-least-once, and consumers deduplicate by the `id` field
(SPEC §8), for instance with `SET seen:<id> 1 NX EX 86400` before acting on an entry.

Failures: connection errors, timeouts and the replies BUSY, LOADING, READONLY (a replica),
MASTERDOWN, TRYAGAIN, CLUSTERDOWN, OOM, MISCONF and NOREPLICAS are `SinkError` (retried);
authentication and ACL errors (NOAUTH, WRONGPASS, NOPERM), a server certificate that is not
trusted, a client certificate the server refuses, WRONGTYPE (the key holds something
other than a stream), data the client refuses to send and every other error reply are
`PermanentSinkError`. A connection that fails is reopened once, at once, inside the same send
(a pooled connection may have been closed by the server or a proxy while idle); a timeout is
not, since the command may have run.

The sink keeps one connection pool, safe to use from any thread; `close()` disconnects it. The
password (and a URL read from the environment or a file) is scrubbed from every message, and
`repr` shows the URL without it.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, ClassVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    DataError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from modelwatch.config import SinkConfig
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.redis_tls import connection_options, speaks_tls
from modelwatch.sinks.options import (
    COUNT,
    NONEMPTY,
    Option,
    SinkOptions,
    Values,
    check_url,
    network,
    secret_sources,
    url,
)
from modelwatch.tls import refusal, refuse_unused, refuse_url_settings

_SCHEMES = ("redis", "rediss")
# error replies redis-py has no class for, by their first word
_RETRY_REPLIES = (
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "OOM",
    "MISCONF",
    "NOREPLICAS",
)
_REFUSED = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    DataError,  # a value the client will not send: the same next time
)
# checked after _REFUSED: AuthenticationError is a ConnectionError too
_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
    TryAgainError,
    ClusterDownError,
)
_WRONGTYPE_HINT = "the key exists and is not a stream; delete it or choose another `stream`"


class RedisSink:
    """Delivered when XADD returns."""

    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option(
            "url",
            url(*_SCHEMES, alternative="url_env, url_file, password_env or password_file"),
            "the server and database (`/0`); a password only from url_env / url_file",
            show="url",
        ),
        *secret_sources("url", "the URL, password included"),
        *secret_sources("password", "the password"),
        Option("stream", NONEMPTY, "the stream key events are appended to", "modelwatch:events"),
        Option("maxlen", COUNT, "trim the stream to about this many entries (0: never)", 0),
        *network(10.0),
        exclusive=[("password_env", "password_file")],
        one_required=[("url", "url_env", "url_file")],
    )

    def __init__(self, config: SinkConfig) -> None:
        values = self.OPTIONS.parse(config)
        self.name = config.name
        self._scrub = values.scrub
        url, self._origin, url_password = _url(values)
        password = values.secret("password")
        if url_password and password:
            source = "password_env" if "password_env" in values else "password_file"
            raise ConfigError(
                f"{config.key}.{source}: the URL has a password already; give one or the other"
            )
        self._password = url_password or password
        self._stream: str = values["stream"]
        self._maxlen: int = values["maxlen"]
        timeout: float = values["timeout_seconds"]
        if not speaks_tls(url):  # checked first: the keys' files do not matter then
            refuse_unused(config.key, values.tls_options(), url, "rediss://")
        self._tls = values.tls()
        extra: dict[str, Any] = {"password": password} if password else {}
        extra.update(connection_options(url, self._tls))
        try:
            self._pool = redis.ConnectionPool.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                protocol=2,  # RESP2 works with every Redis that has streams (>= 5.0, no HELLO)
                # reopen a failed connection once, at once; never repeat after a timeout
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                **extra,
            )
        except ValueError as exc:  # a bad query parameter; the message names it, not the URL
            raise ConfigError(f"{config.key}.url: {self._scrub(str(exc))}") from None
        self._client = redis.Redis(connection_pool=self._pool)

    def __repr__(self) -> str:
        return (
            f"RedisSink(name={self.name!r}, url={self._origin!r}, stream={self._stream!r}, "
            f"maxlen={self._maxlen!r})"
        )

    def network_summary(self) -> list[str]:
        """What the connection trusts, for `check-config` (paths only)."""
        lines = [f"route: {self._origin} directly (the Redis protocol is not proxied)"]
        if speaks_tls(self._origin):
            lines += self._tls.summary(urllib.parse.urlsplit(self._origin).hostname or "")
        return lines

    def send(self, event: Event) -> None:
        fields: dict[FieldT, EncodableT] = {
            "id": event.id,
            "type": event.type,
            "subject": event.subject,
            "event": event.to_json(),
        }
        try:
            self._client.xadd(self._stream, fields, maxlen=self._maxlen or None, approximate=True)
        except redis.RedisError as exc:
            raise self._failure(exc) from exc

    def close(self) -> None:
        self._client.close()
        self._pool.disconnect()

    def _failure(self, exc: redis.RedisError) -> SinkError:
        text = self._scrub(str(exc)) or type(exc).__name__
        message = f"{self._origin} stream {self._stream!r}: {text}"
        refused = refusal(exc, self._tls, urllib.parse.urlsplit(self._origin).hostname or "")
        if refused is not None:
            return PermanentSinkError(f"{self._origin}: {refused}")
        unauthenticated = isinstance(exc, AuthenticationError) or "unauthenticated" in text
        if unauthenticated and not self._password:
            return PermanentSinkError(
                f"{message} (the server requires a password: set password_env or password_file)"
            )
        if isinstance(exc, _REFUSED):
            return PermanentSinkError(message)
        if isinstance(exc, _TRANSIENT) or text.startswith(_RETRY_REPLIES):
            return SinkError(message)
        if text.startswith("WRONGTYPE"):
            return PermanentSinkError(f"{message} ({_WRONGTYPE_HINT})")
        if isinstance(exc, ResponseError):  # the server will answer the same way next time
            return PermanentSinkError(message)
        return SinkError(message)


# --- configuration -----------------------------------------------------------------------


def _url(values: Values) -> tuple[str, str, str | None]:
    """(url, what to show of it, the password in it) from `url`, `url_env` or `url_file`."""
    text = values.get("url")
    key = f"{values.key}.url"
    if text is None:
        key += "_env" if "url_env" in values else "_file"
        text = values.secret("url") or ""
    parts = check_url(key, text, _SCHEMES)
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"{key}: the path must be a database number such as /0")
    refuse_url_settings(key, text)
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password) if parts.password else None
    values.scrub.add(password or "")
    values.scrub.add(parts.password or "")  # as written in the URL, percent-encoded
    shown = f"{user}:***@" if password else (f"{user}@" if user else "")
    origin = f"{parts.scheme}://{shown}{parts.hostname}:{parts.port or 6379}{parts.path}"
    return text, origin, password
