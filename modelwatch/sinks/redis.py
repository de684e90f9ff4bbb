"""`redis` sink: appends each event to a Redis stream with XADD (SPEC §5b).

Keys: `url` (required; `redis://` or `rediss://`, host, port and optional `/db`), `password_env`
(the environment variable holding the password), `stream = "modelwatch:events"`, `maxlen = 0`,
`timeout_seconds = 10`.

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
authentication and ACL errors (NOAUTH, WRONGPASS, NOPERM), WRONGTYPE (the key holds something
other than a stream) and every other error reply are `PermanentSinkError`. A connection that
fails is reopened once, at once, inside the same send (a pooled connection may have been closed
by the server or a proxy while idle); a timeout is not, since the command may have run.

The sink keeps one connection pool, safe to use from any thread; `close()` disconnects it. A
password may be given in the URL, but `password_env` keeps it out of the config file; either
way it is masked in every message and in `repr`.
"""

from __future__ import annotations

import math
import os
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
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
from modelwatch.sinks import check_options

_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "password_env": str,
    "stream": str,
    "maxlen": int,
    "timeout_seconds": (int, float),
}
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

    def __init__(self, config: SinkConfig) -> None:
        check_options(config, _OPTIONS, required=("url",))
        self.name = config.name
        url, self._origin, url_password = _url(config)
        env_password = _password_from_env(config)
        if url_password and env_password:
            raise ConfigError(
                f"{config.key}.password_env: the url has a password already; give one or the other"
            )
        self._password = url_password or env_password
        self._stream = _stream(config)
        self._maxlen = _maxlen(config)
        timeout = _timeout(config)
        extra = {"password": env_password} if env_password else {}
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
            raise ConfigError(f"{config.key}.url: {exc}") from None
        self._client = redis.Redis(connection_pool=self._pool)

    def __repr__(self) -> str:
        return (
            f"RedisSink(name={self.name!r}, url={self._origin!r}, stream={self._stream!r}, "
            f"maxlen={self._maxlen!r})"
        )

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
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        message = f"{self._origin} stream {self._stream!r}: {text}"
        unauthenticated = isinstance(exc, AuthenticationError) or "unauthenticated" in text
        if unauthenticated and not self._password:
            return PermanentSinkError(
                f"{message} (the server requires a password: set password_env)"
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


def _url(config: SinkConfig) -> tuple[str, str, str | None]:
    """(url, what to show of it, the password from the URL or `password_env`)."""
    where = f"{config.key}.url"
    url = str(config.options["url"])
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError(f"{where}: invalid port") from None
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ConfigError(f"{where}: must be a redis:// or rediss:// URL naming a host")
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ConfigError(f"{where}: the path must be a database number such as /0")
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password) if parts.password else None
    shown = f"{user}:***@" if password else (f"{user}@" if user else "")
    origin = f"{parts.scheme}://{shown}{parts.hostname}:{port}{parts.path}"
    return url, origin, password


def _password_from_env(config: SinkConfig) -> str | None:
    if "password_env" not in config.options:
        return None
    variable = str(config.options["password_env"])
    password = os.environ.get(variable, "") if variable else ""
    if not password:
        raise ConfigError(
            f"{config.key}.password_env: environment variable {variable!r} is not set or empty"
        )
    return password


def _stream(config: SinkConfig) -> str:
    stream = str(config.options.get("stream", "modelwatch:events"))
    if not stream:
        raise ConfigError(f"{config.key}.stream: must not be empty")
    return stream


def _maxlen(config: SinkConfig) -> int:
    value = int(config.options.get("maxlen", 0))
    if value < 0:
        raise ConfigError(f"{config.key}.maxlen: must be >= 0 (0 = no trimming), got {value}")
    return value


def _timeout(config: SinkConfig) -> float:
    value = config.options.get("timeout_seconds", 10)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{config.key}.timeout_seconds: must be > 0, got {value!r}")
    return float(value)
