"""Secrets: where they come from, and keeping them out of every output (SPEC §10).

Secrets (webhook keys, tokens, passwords, URLs that carry them) come from the environment or a
file, never from the TOML, and never appear in logs, events, `status` or `check-config`. This
module is the one place that knows how:

* `read_secret(key, variable=...)` / `read_secret(key, path=...)`: the one reader. Problems are
  a `ConfigError` naming the key and where the secret was looked for, never its value. A file
  that group or others may read is warned about (`secret_file_readable`).
* `url_credentials(url)`: what in a URL is a credential (`user@`, `user:pass@`, a token in the
  query), so that the config can refuse it where it would sit in the TOML.
* `credential_header(name)`: whether an HTTP header carries a credential (`Authorization`,
  `X-Api-Key`, `Cookie`, ...).
* `mask_url(url)` and `mask_options(options)`: values fit to print (userinfo, query values and
  fragments as `***`; secret-looking keys and header values as `***`).
* `Scrubber(secrets)`: the one scrubber. It turns text that may quote a secret (an error
  message, a server's answer echoing our request) into one printable line without them.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from modelwatch.errors import ConfigError

log = structlog.get_logger("modelwatch.credentials")

MASK = "***"
MAX_SECRET_BYTES = 64 * 1024  # a secret file larger than this is a mistake (or /dev/zero)
MESSAGE_CHARS = 500  # scrubbed text is shortened to this, with "..." marking the cut

# What makes a query parameter, an option key or a header name a credential: one of its words
# (split at anything not a letter or digit) is a short word, or contains a long one.
_SHORT_WORDS = frozenset(  # code: Azure
    {"auth", "code", "jwt", "key", "pat", "pw", "pwd", "sas", "sig"}
)
_LONG_WORDS = (
    "apikey",
    "authent",
    "authoriz",
    "bearer",
    "cookie",
    "credential",
    "passphrase",
    "passw",
    "secret",
    "session",
    "signature",
    "token",
)
_NAME_WORDS = re.compile(r"[^a-z0-9]+")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")
_BLANKS = re.compile(r"\s+")


# --- reading --------------------------------------------------------------------------------


def read_secret(
    key: str,
    *,
    variable: str | None = None,
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The secret in the environment `variable` or the file at `path` (give exactly one),
    without surrounding whitespace. `key` (`sinks[1].secret_env`) starts every error."""
    if variable is not None:
        value = (os.environ if environ is None else environ).get(variable, "").strip()
        if not value:
            raise ConfigError(f"{key}: environment variable {variable!r} is not set or empty")
        return value
    if path is None:
        raise TypeError("read_secret needs a variable or a path")
    return _read_file(key, os.path.expanduser(path))


def _read_file(key: str, path: str) -> str:
    try:
        with open(path, "rb") as file:
            warn_if_shared(key, path, os.fstat(file.fileno()))
            data = file.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"{key}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return text


def warn_if_shared(key: str, path: str, status: os.stat_result) -> None:
    """Log `secret_file_readable` when group or others may read the secret file."""
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        log.warning(
            "secret_file_readable",
            key=key,
            path=path,
            mode=f"{mode:04o}",
            note="group or others may read this secret; chmod 600 it",
        )


# --- recognising ----------------------------------------------------------------------------


def credential_name(name: str) -> bool:
    """Whether a key, query parameter or header name says it holds a credential
    (`api_key`, `X-Auth-Token`, `accessToken`, `sig`; not `author`, `design`, `passive`)."""
    words = _NAME_WORDS.split(name.lower())
    return any(word in _SHORT_WORDS or any(w in word for w in _LONG_WORDS) for word in words)


def credential_header(name: str) -> bool:
    """Whether the HTTP header `name` carries a credential (Authorization, X-Api-Key, ...)."""
    return credential_name(name)


def url_credentials(url: str) -> str | None:
    """What in `url` is a credential, described for an error message (None: nothing)."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        return "a user or password in the URL (user@, user:password@)"
    for name, _value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if credential_name(name):
            return f"a credential in the URL query ({name}=)"
    return None


# --- masking --------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """`url` fit to print: the password (or a lone user, which may be a token), every query
    value and the fragment as `***`; scheme, host, port and path as they are."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = "&".join(
        f"{pair.partition('=')[0]}={MASK}" if "=" in pair else MASK
        for pair in parts.query.split("&")
        if pair
    )
    fragment = MASK if parts.fragment else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def mask_options(value: Any) -> Any:
    """A copy of a sink's options fit to print, for sinks that declare none: values of
    secret-looking keys and of every `headers` table as `***`, URLs masked (`mask_url`)."""
    if isinstance(value, Mapping):
        return {k: _mask_entry(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_options(item) for item in value]
    if isinstance(value, str):
        return _URL_IN_TEXT.sub(lambda match: mask_url(match[0]), value)
    return value


def _mask_entry(name: str, value: Any) -> Any:
    if name.lower().endswith(("_env", "_file")):  # these name where a secret lives
        return mask_options(value)
    if credential_name(name):
        return MASK
    if name.lower() == "headers" and isinstance(value, Mapping):
        return dict.fromkeys(value, MASK)
    return mask_options(value)


# --- scrubbing ------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """`text` as one printable line: control characters and runs of blanks become one space."""
    printable = "".join(char if char.isprintable() else " " for char in text)
    return _BLANKS.sub(" ", printable).strip()


class Scrubber:
    """Removes known secrets and URL credentials from text, leaving one printable line.

    Each secret is also removed in the forms a server may echo it back in: percent-encoded,
    and JSON-escaped (with `\\/` for `/`, as some servers write base64); and so is each of
    its words of `PART_CHARS` or more, so a server quoting only the token of
    `Bearer <token>` does not reveal it.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._forms: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Scrub `secret` too (a value read after construction)."""
        self._forms = sorted({*self._forms, *_forms(secret)}, key=len, reverse=True)

    def __call__(self, text: str, *extra: str, limit: int = MESSAGE_CHARS) -> str:
        """`text` without the secrets (nor the `extra` ones, e.g. this request's signature),
        with URL credentials masked, on one line of at most `limit` characters."""
        extra_forms = sorted({form for secret in extra for form in _forms(secret)}, key=len)
        for form in [*reversed(extra_forms), *self._forms]:
            text = text.replace(form, MASK)
        text = one_line(_URL_IN_TEXT.sub(lambda match: mask_url(match[0]), text))
        return text if len(text) <= limit else text[:limit] + "..."


PART_CHARS = 8  # a secret's words this long are scrubbed alone too ("Bearer" is not)


def _forms(secret: str) -> set[str]:
    words = secret.split()
    parts = [secret, *(w for w in words if len(w) >= PART_CHARS)] if len(words) > 1 else [secret]
    return {form for part in parts if part for form in _encodings(part)}


def _encodings(secret: str) -> set[str]:
    escaped = json.dumps(secret)[1:-1]
    return {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret, safe=""),
        escaped,
        escaped.replace("/", "\\/"),
    }


# --- the daemon's own memory ------------------------------------------------------------------

_PR_SET_DUMPABLE = 4


def not_dumpable() -> bool:
    """Make this process non-dumpable (Linux `prctl(PR_SET_DUMPABLE, 0)`): processes of the
    same user, such as a command sink's child, can then read neither its environment
    (`/proc/PID/environ`, where `*_env` secrets live) nor its memory, and it leaves no core
    dump holding them. Children start dumpable again (execve resets it). False where that
    cannot be done (another OS); nothing else changes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
