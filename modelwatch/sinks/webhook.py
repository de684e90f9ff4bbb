"""`webhook` sink: POSTs each event over HTTP(S), signed per Standard Webhooks (SPEC §5b).

Keys: `WebhookSink.OPTIONS`. A URL that carries a credential (a token in its query, a secret
path such as Slack's) comes from `url_env` or `url_file`; so do header values that are
credentials (`headers_env = { Authorization = "VARIABLE" }` or `headers_file`): the TOML
forms are refused. `secret_env` or `secret_file` hold the signing secrets.

Every request carries `webhook-id` (the event id, the same on every attempt),
`webhook-timestamp` (this attempt, in seconds) and, with a secret, `webhook-signature`: one
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per configured secret, so a secret can be
rotated by listing the new and the old one, space-separated.

Each attempt (connecting, through a proxy's CONNECT tunnel too, the TLS handshake, sending
the request, reading the whole answer) ends by `timeout_seconds`, whatever the receiver or
proxy does: every socket operation gets only the time left (`transport.deadline`), so a
receiver dripping its answer a byte at a time cannot stretch it. (Resolving the host name is
the resolver's business and not bounded by it.)

TLS and proxies: `ca_file`, `client_cert_file` / `client_key_file`, `server_name`,
`insecure_skip_verify` (`modelwatch.tls`); `proxy` / `proxy_env`, else `HTTPS_PROXY` /
`HTTP_PROXY` / `NO_PROXY` as curl reads them (`modelwatch.proxy`). The HTTP client is urllib3.

Outcome of a request: 2xx = delivered; 408, 429, 5xx, timeouts and connection errors (a
proxy that is down or answers CONNECT with 5xx included) = `SinkError` (retried, honouring
`Retry-After`); redirects are not followed and, like 410 and every other 4xx, are a
`PermanentSinkError`, as are a server certificate that is not trusted, a client certificate
the server refuses and a proxy's 407. One keep-alive connection per sink is reused; a
kept-alive connection the server closed while idle is reopened once, at once, within the same
deadline. Messages and `repr` name only the scheme, host and port of the URL, and never
contain the secrets, the URL or header values read from the environment or files, or
signatures (the sink's `Scrubber` removes them even from an answer that echoes them).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal

import urllib3
from urllib3.exceptions import HTTPError, ProxyError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from modelwatch import __version__
from modelwatch.config import SinkConfig
from modelwatch.credentials import credential_header
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.sinks.options import (
    ENV_NAME,
    PATH,
    Kind,
    Option,
    SinkOptions,
    Values,
    check_url,
    choice,
    network,
    secret_sources,
    table,
    url,
)
from modelwatch.sinks.transport import deadline, http_client
from modelwatch.tls import refusal

Verdict = Literal["delivered", "retry", "redirect", "permanent"]

_RESERVED_HEADERS = ("content-type", "content-length", "host", "user-agent", "transfer-encoding")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_BODY_LIMIT = 64 * 1024  # response bytes read to keep the connection reusable
_EXCERPT_CHARS = 200
# Resets on a reused connection usually mean the server closed it while it sat idle.
_STALE_CONNECTION = (
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    http.client.RemoteDisconnected,
)
_FAILURES = (HTTPError, OSError, http.client.HTTPException)  # what urllib3 may raise
_CONTENT_TYPES = {
    "structured": "application/cloudevents+json; charset=utf-8",
    "binary": "application/json",
}


def classify(status: int) -> Verdict:
    """What an HTTP status means for a delivery (SPEC §5b)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or 500 <= status < 600:
        return "retry"
    if 300 <= status < 400:
        return "redirect"
    if 400 <= status < 500:
        return "permanent"  # 410 gone, 400/401/403/404/422 and every other client error
    return "retry"  # 1xx as a final answer or > 599: the server misbehaves; it may recover


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` given by a `Retry-After` value (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" means UTC with no claim about the local zone
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return max(0.0, moment.timestamp() - now)


def signature_header(keys: tuple[bytes, ...], msg_id: str, timestamp: str, body: bytes) -> str:
    """`webhook-signature`: one `v1,<base64 HMAC-SHA256>` per key, space-separated."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()
        for key in keys
    )


def percent_encode(value: str) -> str:
    """A CloudEvents HTTP header value: space, `"`, `%` and non-printable-ASCII as %XX (UTF-8)."""
    return "".join(
        char if "!" <= char <= "~" and char not in '"%' else urllib.parse.quote(char, safe="")
        for char in value
    )


# --- configuration -----------------------------------------------------------------------


def _header_name(key: str, name: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} is not a valid HTTP header name")
    lowered = name.lower()
    if lowered in _RESERVED_HEADERS or lowered.startswith(("webhook-", "ce-")):
        raise ConfigError(f"{key}.{name}: set by the webhook sink itself; cannot be overridden")


def _plain_header_name(key: str, name: str) -> None:
    _header_name(key, name)
    if credential_header(name):
        raise ConfigError(
            f"{key}.{name}: a credential header is not allowed in the config file; use"
            f' headers_env = {{ "{name}" = "VARIABLE" }} or headers_file'
        )


def _header_value(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
        # the value is not shown: it may well be a credential
        raise ConfigError(f"{key}: must be a string of printable ASCII characters")
    return value


_HEADER_TEXT = Kind("string", _header_value)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where requests go; only `origin` (scheme, host, port) is ever shown."""

    scheme: str
    host: str
    port: int
    path: str  # the request target: path and query, percent-encoded ASCII
    origin: str
    authorization: str | None = None  # Basic, from a user:password in url_env / url_file

    @property
    def url(self) -> str:
        return self.origin + self.path


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    reason: str  # scrubbed, like excerpt and location
    headers: Mapping[str, str]
    excerpt: str
    location: str


class WebhookSink:
    """Delivered when the server answers 2xx."""

    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option(
            "url",
            url("http", "https", alternative="url_env or url_file"),
            "where events are POSTed; one with a credential in it only from url_env / url_file",
            show="url",
        ),
        *secret_sources("url", "the URL"),
        *secret_sources("secret", "the signing secret (`whsec_...`; several, space-separated)"),
        *network(
            15.0, "one attempt's deadline: connecting, sending and the whole answer", proxies=True
        ),
        Option("mode", choice("structured", "binary"), "the CloudEvents HTTP mode", "structured"),
        Option(
            "headers",
            table(_HEADER_TEXT, _plain_header_name),
            "extra request headers; credentials only from headers_env / headers_file",
            {},
            show="values",
        ),
        Option(
            "headers_env",
            table(ENV_NAME, _header_name),
            "request headers whose values come from environment variables",
            {},
        ),
        Option(
            "headers_file",
            table(PATH, _header_name),
            "request headers whose values come from files",
            {},
        ),
        exclusive=[("secret_env", "secret_file"), ("proxy", "proxy_env")],
        one_required=[("url", "url_env", "url_file")],
    )

    def __init__(self, config: SinkConfig) -> None:
        values = self.OPTIONS.parse(config)
        self.name = config.name
        self._scrub = values.scrub
        self._target = _target(values)
        self._timeout: float = values["timeout_seconds"]
        self._mode: str = values["mode"]
        self._headers = _with_url_credentials(_headers(values), self._target, values.key)
        self._keys = _signing_keys(values)
        self._tls = values.tls()
        self._route = values.route(self._target.url)
        self._http = http_client(self._tls, self._route)
        self._idle = False  # whether a kept-alive connection waits in the pool

    def __repr__(self) -> str:
        return (
            f"WebhookSink(name={self.name!r}, url={self._target.origin + '/...'!r}, "
            f"mode={self._mode!r}, secrets={len(self._keys)})"
        )

    def send(self, event: Event) -> None:
        body, headers = self._encode(event)
        reply = self._exchange(event.id, body, headers)
        self._judge(reply)

    def close(self) -> None:
        self._disconnect()

    def network_summary(self) -> list[str]:
        """How requests travel, for `check-config` (paths and masked URLs only)."""
        lines = [f"route: {self._target.origin} via {self._route.shown}"]
        if self._target.scheme == "https":
            lines += self._tls.summary(self._target.host)
        return lines

    # --- the request ---------------------------------------------------------------------

    def _encode(self, event: Event) -> tuple[bytes, dict[str, str]]:
        headers = {
            **self._headers,
            "User-Agent": f"modelwatch/{__version__}",
            "Content-Type": _CONTENT_TYPES[self._mode],
        }
        if self._mode == "structured":
            return event.to_json().encode(), headers
        attributes = {
            k: v for k, v in event.to_dict().items() if k not in ("data", "datacontenttype")
        }
        headers.update({f"ce-{k}": percent_encode(str(v)) for k, v in attributes.items()})
        return json.dumps(dict(event.data), separators=(",", ":")).encode(), headers

    def _exchange(self, event_id: str, body: bytes, headers: dict[str, str]) -> _Reply:
        try:
            with deadline(time.monotonic() + self._timeout):
                return self._attempt(event_id, body, headers)
        except _FAILURES as exc:
            self._disconnect()
            raise self._failure(exc) from exc

    def _attempt(self, event_id: str, body: bytes, headers: dict[str, str]) -> _Reply:
        reused, self._idle = self._idle, False
        try:
            return self._round_trip(event_id, body, headers)
        except _FAILURES as exc:
            if not (reused and _stale(exc)):
                raise
            self._disconnect()
            return self._round_trip(event_id, body, headers)

    def _round_trip(self, event_id: str, body: bytes, headers: dict[str, str]) -> _Reply:
        timestamp = str(int(time.time()))
        signed = {**headers, "webhook-id": event_id, "webhook-timestamp": timestamp}
        digests: list[str] = []
        if self._keys:
            signed["webhook-signature"] = signature_header(self._keys, event_id, timestamp, body)
            digests = [part.partition(",")[2] for part in signed["webhook-signature"].split()]
        response = self._http.urlopen(
            "POST",
            self._target.url,
            body=body,
            headers=signed,
            redirect=False,
            retries=False,
            timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
            preload_content=False,
        )
        try:
            raw = self._drain(response)
        finally:
            response.release_conn()
        excerpt = self._scrub(raw.decode("utf-8", "replace"), *digests, limit=_EXCERPT_CHARS)
        reason = self._scrub(response.reason or "", *digests, limit=_EXCERPT_CHARS)
        location = self._scrub(response.headers.get("Location", ""), limit=_EXCERPT_CHARS)
        return _Reply(response.status, reason, response.headers, excerpt, location)

    def _drain(self, response: urllib3.BaseHTTPResponse) -> bytes:
        """The body's first bytes; the rest is read too, unless too large to be worth it."""
        head = response.read(_BODY_LIMIT, decode_content=False)
        # unread bytes (or the final answer after an interim 1xx) would corrupt the next exchange
        if response.status < 200 or response.read(1, decode_content=False):
            response.close()  # closes the connection too: the next send opens a new one
        else:
            self._idle = True
        return head

    def _disconnect(self) -> None:
        self._idle = False
        self._http.clear()  # closes every pooled connection

    def _failure(self, exc: Exception) -> SinkError:
        """The SinkError (retry) or PermanentSinkError for what urllib3 raised."""
        origin = self._target.origin
        if isinstance(exc, Urllib3Timeout | TimeoutError) and not _refused_connection(exc):
            return SinkError(
                f"{origin}: timed out after {self._timeout:g} s (connecting, sending and the"
                " whole answer)"
            )
        refused = refusal(exc, self._tls, self._target.host)
        if refused is not None:
            return PermanentSinkError(f"{origin}: {refused}")
        detail = self._scrub(_describe(exc)) or type(exc).__name__
        if isinstance(exc, ProxyError):
            where = f"{origin}: proxy {self._route.shown}: {detail}"
            # 407 (401 from some proxies): it wants other credentials; retrying cannot help
            denied = any(f" {code} " in f" {detail} " for code in ("401", "407"))
            return PermanentSinkError(where) if denied else SinkError(where)
        return SinkError(f"{origin}: {detail}")

    def _judge(self, reply: _Reply) -> None:
        verdict = classify(reply.status)
        if verdict == "delivered":
            return
        what = f"{self._target.origin}: HTTP {reply.status} {reply.reason}".rstrip()
        if verdict == "redirect":
            location = reply.location or "none given"
            raise PermanentSinkError(f"{what}: redirects are not followed (Location: {location})")
        if reply.excerpt:
            what = f"{what}: {reply.excerpt}"
        if verdict == "permanent":
            raise PermanentSinkError(what)
        retry_after = parse_retry_after(reply.headers.get("Retry-After"), time.time())
        raise SinkError(what, retry_after=retry_after)


def _stale(exc: BaseException | None) -> bool:
    """Whether `exc` is a reset of a kept-alive connection (the server closed it while idle)."""
    for _ in range(8):  # urllib3 nests the cause a level or two deep
        if exc is None or isinstance(exc, _STALE_CONNECTION):
            return exc is not None
        nested = [a for a in exc.args if isinstance(a, BaseException)]
        exc = nested[0] if nested else exc.__cause__
    return False


def _refused_connection(exc: BaseException) -> bool:
    # urllib3's NewConnectionError subclasses its ConnectTimeoutError: it is no timeout
    return isinstance(exc, urllib3.exceptions.NewConnectionError)


def _describe(exc: BaseException) -> str:
    """The innermost meaningful message of a urllib3 error (which nests the cause)."""
    nested = [a for a in exc.args if isinstance(a, BaseException)]
    if isinstance(exc, HTTPError) and nested:
        return _describe(nested[-1])
    return str(exc)


def _target(values: Values) -> _Target:
    """Where requests go, from `url` or the URL in `url_env` / `url_file`."""
    key = f"{values.key}.url"
    text = values.get("url")
    if text is None:
        text = values.secret("url") or ""
        key += "_env" if "url_env" in values else "_file"
    parts = check_url(key, text, ("http", "https"))
    if text != values.get("url"):  # from the environment or a file: every part may be secret
        values.scrub.add(parts.path if len(parts.path) > 1 else "")
        for _name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            values.scrub.add(value)
        values.scrub.add(parts.password or "")
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # the request line must be ASCII: percent-encode anything else, keep existing escapes
    target = urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")
    host = parts.hostname or ""
    shown_host = f"[{host}]" if ":" in host else host
    authorization = None
    if parts.username is not None or parts.password is not None:  # only from env or file
        userinfo = (
            f"{urllib.parse.unquote(parts.username or '')}:"
            f"{urllib.parse.unquote(parts.password or '')}"
        )
        authorization = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        values.scrub.add(authorization)
        values.scrub.add(authorization.removeprefix("Basic "))
    origin = f"{scheme}://{shown_host}:{port}"
    return _Target(scheme, host, port, target, origin, authorization)


def _with_url_credentials(headers: dict[str, str], target: _Target, key: str) -> dict[str, str]:
    """`headers` with the Basic authorization of the URL's user:password, if it has one."""
    if target.authorization is None:
        return headers
    if "authorization" in {name.lower() for name in headers}:
        raise ConfigError(
            f"{key}: the URL carries a user:password and an Authorization header is set too;"
            " give one of them"
        )
    return {**headers, "Authorization": target.authorization}


def _headers(values: Values) -> dict[str, str]:
    """`headers`, plus those from `headers_env` / `headers_file`; one source per header."""
    headers: dict[str, str] = dict(values["headers"])
    for name, value in values.secret_table("headers").items():
        source = "headers_env" if name in values["headers_env"] else "headers_file"
        where = f"{values.key}.{source}.{name}"
        if name.lower() in {other.lower() for other in headers}:
            raise ConfigError(f"{where}: this header is given twice")
        headers[name] = _header_value(where, value)
    return headers


def _signing_keys(values: Values) -> tuple[bytes, ...]:
    """The HMAC keys of the `whsec_` secrets (none without `secret_env`/`secret_file`)."""
    text = values.secret("secret")
    if text is None:
        return ()
    source = "secret_env" if "secret_env" in values else "secret_file"
    where = f"{values.key}.{source} ({values[source]})"
    secrets = text.split()
    keys = []
    for index, secret in enumerate(secrets, 1):
        values.scrub.add(secret)
        key = _decode_secret(secret)
        if key is None:
            raise ConfigError(
                f"{where}: secret {index} of {len(secrets)} is not a Standard Webhooks secret"
                " (whsec_ followed by base64); the value is not shown"
            )
        keys.append(key)
    return tuple(keys)


def _decode_secret(secret: str) -> bytes | None:
    """The HMAC key of a `whsec_<base64>` secret, or None if it is not one."""
    encoded = secret.removeprefix("whsec_")
    if encoded == secret or not encoded:
        return None
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return key or None
