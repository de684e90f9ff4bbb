"""`webhook` sink: POSTs each event over HTTP(S), signed per Standard Webhooks (SPEC §5b).

Keys: `url` (required, http or https), `secret_env` or `secret_file` (optional, not both),
`timeout_seconds = 15`, `mode = "structured"` (CloudEvents JSON body) or `"binary"` (`data`
as the body, attributes in `ce-*` headers), `headers = {}` (extra request headers).

Every request carries `webhook-id` (the event id, the same on every attempt),
`webhook-timestamp` (this attempt, in seconds) and, with a secret, `webhook-signature`: one
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per configured secret, so a secret can be
rotated by listing the new and the old one, space-separated.

Outcome of a request: 2xx = delivered; 408, 429, 5xx, timeouts and connection errors =
`SinkError` (retried, honouring `Retry-After`); redirects are not followed and, like 410 and
every other 4xx, are a `PermanentSinkError`. One keep-alive connection per sink is reused; a
kept-alive connection the server closed while idle is reopened once, at once. Messages and
`repr` name only the scheme, host and port of the URL (its path may itself be a credential)
and never contain the secrets or signatures.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import http.client
import json
import math
import os
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from modelwatch import __version__
from modelwatch.config import SinkConfig
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.sinks import check_options

Verdict = Literal["delivered", "retry", "redirect", "permanent"]

_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "secret_env": str,
    "secret_file": str,
    "timeout_seconds": (int, float),
    "mode": str,
    "headers": dict,
}
_RESERVED_HEADERS = ("content-type", "content-length", "host", "user-agent", "transfer-encoding")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_SENSITIVE_HEADER = re.compile(r"auth|cookie|token|key|secret|pass", re.IGNORECASE)
_BODY_LIMIT = 64 * 1024  # response bytes read to keep the connection reusable
_EXCERPT_CHARS = 200
# Resets on a reused connection usually mean the server closed it while it sat idle.
_STALE_CONNECTION = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
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


def _one_line(text: str, limit: int = _EXCERPT_CHARS) -> str:
    """`text` with runs of blanks and control characters as one space, shortened."""
    collapsed = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return collapsed if len(collapsed) <= limit else collapsed[:limit] + "..."


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    reason: str
    headers: Message
    excerpt: str


class WebhookSink:
    """Delivered when the server answers 2xx."""

    def __init__(self, config: SinkConfig) -> None:
        check_options(config, _OPTIONS, required=("url",))
        self.name = config.name
        self._scheme, self._host, self._port, self._target, self._origin = _parse_url(config)
        self._timeout = _timeout(config)
        self._mode = _mode(config)
        self._headers = _extra_headers(config)
        self._secrets = _read_secrets(config)
        self._keys = tuple(filter(None, map(_decode_secret, self._secrets)))
        self._redacted = self._secrets + tuple(
            value for name, value in self._headers.items() if _SENSITIVE_HEADER.search(name)
        )
        self._tls = ssl.create_default_context() if self._scheme == "https" else None
        self._conn: http.client.HTTPConnection | None = None

    def __repr__(self) -> str:
        return (
            f"WebhookSink(name={self.name!r}, url={self._origin + '/...'!r}, "
            f"mode={self._mode!r}, secrets={len(self._keys)})"
        )

    def send(self, event: Event) -> None:
        body, headers = self._encode(event)
        reply = self._exchange(event.id, body, headers)
        self._judge(reply)

    def close(self) -> None:
        self._disconnect()

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
            return self._attempt(event_id, body, headers, reopen=self._conn is not None)
        except TimeoutError as exc:
            self._disconnect()
            raise SinkError(f"{self._origin}: timed out after {self._timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            self._disconnect()
            detail = _one_line(str(exc)) or type(exc).__name__
            raise SinkError(f"{self._origin}: {detail}") from exc

    def _attempt(self, event_id: str, body: bytes, headers: dict[str, str], reopen: bool) -> _Reply:
        try:
            return self._round_trip(event_id, body, headers)
        except _STALE_CONNECTION:
            if not reopen:
                raise
            self._disconnect()
            return self._round_trip(event_id, body, headers)

    def _round_trip(self, event_id: str, body: bytes, headers: dict[str, str]) -> _Reply:
        timestamp = str(int(time.time()))
        signed = {**headers, "webhook-id": event_id, "webhook-timestamp": timestamp}
        signature = ""
        if self._keys:
            signature = signature_header(self._keys, event_id, timestamp, body)
            signed["webhook-signature"] = signature
        conn = self._connection()
        conn.request("POST", self._target, body=body, headers=signed)
        with conn.getresponse() as response:
            raw = self._drain(response)
            excerpt = _one_line(self._redact(raw.decode("utf-8", "replace"), signature))
            return _Reply(response.status, response.reason, response.headers, excerpt)

    def _drain(self, response: http.client.HTTPResponse) -> bytes:
        """The body's first bytes; the rest is read too, unless too large to be worth it."""
        head = response.read(_BODY_LIMIT)
        # unread bytes (or the final answer after an interim 1xx) would corrupt the next exchange
        if response.status < 200 or (not response.isclosed() and response.read(1)):
            self._disconnect()
        return head

    def _redact(self, text: str, signature: str) -> str:
        """`text` (an answer, which may echo the request) without secrets or signatures."""
        digests = [part.partition(",")[2] for part in signature.split()]
        for secret in (*self._redacted, *digests):
            # also as JSON with escaped slashes, the way some servers echo base64
            for form in (secret, secret.replace("/", "\\/")):
                text = text.replace(form, "***")
        return text

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._tls is not None:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._tls
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _judge(self, reply: _Reply) -> None:
        verdict = classify(reply.status)
        if verdict == "delivered":
            return
        what = f"{self._origin}: HTTP {reply.status} {_one_line(reply.reason)}".rstrip()
        if verdict == "redirect":
            location = _one_line(reply.headers.get("Location", "")) or "none given"
            raise PermanentSinkError(f"{what}: redirects are not followed (Location: {location})")
        if reply.excerpt:
            what = f"{what}: {reply.excerpt}"
        if verdict == "permanent":
            raise PermanentSinkError(what)
        retry_after = parse_retry_after(reply.headers.get("Retry-After"), time.time())
        raise SinkError(what, retry_after=retry_after)


# --- configuration -----------------------------------------------------------------------


def _parse_url(config: SinkConfig) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, request target, origin) from `url`.

    Only the origin (scheme, host, port) is ever shown: the path may itself be a credential.
    """
    where = f"{config.key}.url"
    parts = urllib.parse.urlsplit(str(config.options["url"]))
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: credentials in the URL are not supported; use headers")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where}: invalid port") from None
    if not parts.hostname or any(ord(c) <= 32 or ord(c) == 127 for c in parts.geturl()):
        raise ConfigError(f"{where}: must name a host and contain no spaces or control characters")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # the request line must be ASCII: percent-encode anything else, keep existing escapes
    target = urllib.parse.quote(target, safe="!#$%&'()*+,/:;=?@[]~")
    return scheme, parts.hostname, port, target, f"{scheme}://{parts.netloc}"


def _timeout(config: SinkConfig) -> float:
    value = config.options.get("timeout_seconds", 15)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{config.key}.timeout_seconds: must be > 0, got {value!r}")
    return float(value)


def _mode(config: SinkConfig) -> str:
    mode = config.options.get("mode", "structured")
    if mode not in _CONTENT_TYPES:
        raise ConfigError(f'{config.key}.mode: must be "structured" or "binary", got {mode!r}')
    return str(mode)


def _extra_headers(config: SinkConfig) -> dict[str, str]:
    headers: dict[str, Any] = config.options.get("headers", {})
    for name, value in headers.items():
        where = f"{config.key}.headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{config.key}.headers: {name!r} is not a valid HTTP header name")
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS or lowered.startswith(("webhook-", "ce-")):
            raise ConfigError(f"{where}: set by the webhook sink itself; cannot be overridden")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            # the value is not shown: it may well be a credential
            raise ConfigError(f"{where}: must be a string of printable ASCII characters")
    return dict(headers)


def _read_secrets(config: SinkConfig) -> tuple[str, ...]:
    """The configured `whsec_` secrets (none without `secret_env`/`secret_file`)."""
    options = config.options
    if "secret_env" in options and "secret_file" in options:
        raise ConfigError(f"{config.key}.secret_file: give secret_env or secret_file, not both")
    if "secret_env" in options:
        return _secrets_from_env(f"{config.key}.secret_env", str(options["secret_env"]))
    if "secret_file" in options:
        return _secrets_from_file(f"{config.key}.secret_file", str(options["secret_file"]))
    return ()


def _secrets_from_env(where: str, variable: str) -> tuple[str, ...]:
    text = os.environ.get(variable, "") if variable else ""
    if not text.strip():
        raise ConfigError(f"{where}: environment variable {variable!r} is not set or empty")
    return _check_secrets(text, f"{where} ({variable})")


def _secrets_from_file(where: str, path: str) -> tuple[str, ...]:
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read {path}: {reason}") from None
    if not text.strip():
        raise ConfigError(f"{where}: {path} is empty")
    return _check_secrets(text, f"{where} ({path})")


def _check_secrets(text: str, where: str) -> tuple[str, ...]:
    secrets = tuple(text.split())
    for index, secret in enumerate(secrets, 1):
        if _decode_secret(secret) is None:
            raise ConfigError(
                f"{where}: secret {index} of {len(secrets)} is not a Standard Webhooks secret"
                " (whsec_ followed by base64); the value is not shown"
            )
    return secrets


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
