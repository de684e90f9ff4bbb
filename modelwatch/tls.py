"""TLS for every network client: one vocabulary, one place that builds the context (SPEC §5b).

The webhook, NATS and Redis sinks and the `[cluster]` backend take the same keys:

* `ca_file`: a PEM bundle of CA certificates trusted *instead of* the system store;
* `client_cert_file` and `client_key_file`: the client certificate for mutual TLS. The key
  comes only from a file (the TOML cannot hold it); `client_key_file` may be left out when
  the certificate file holds the key as well;
* `server_name`: the name sent as SNI and verified against the server's certificate when it
  is not the host in the URL (a broker reached by IP address, or through a load balancer);
* `insecure_skip_verify = true`: no verification at all. Nothing else turns verification off,
  and this logs `tls_verification_disabled` (a warning) every time the client is built: at
  every start and reload.

`client_tls(key, options)` checks the files and builds the `ssl.SSLContext`; every problem is
a `ConfigError` naming the key (`sinks[1].ca_file: cannot read /etc/ca.pem: No such file or
directory`). Its result gives each client library what it takes (`context`, `server_name`)
and `check-config` what it prints (`trust()`, `identity()`: paths, never key material).
`refusal(exc, tls)` turns a certificate failure anywhere in an exception's chain into one
clear sentence; such failures are permanent, since retrying cannot change a certificate.

Where no TLS is spoken (`redis://`) the keys would do nothing: `refuse_unused` refuses them.
redis-py also reads TLS settings from a URL's query (`ssl_cert_reqs=none` turns verification
off): `refuse_url_settings` refuses those, so these keys are the only way to set TLS.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from modelwatch.credentials import warn_if_shared
from modelwatch.errors import ConfigError

log = structlog.get_logger("modelwatch.tls")

MAX_PEM_BYTES = 16 * 1024 * 1024  # a CA bundle larger than this is a mistake (or /dev/zero)
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
# TLS alerts a server sends when it refuses our certificate (or the lack of one)
_REFUSED_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


# the vocabulary, in the order messages and `check-config` name the keys
KEYS = ("ca_file", "client_cert_file", "client_key_file", "server_name", "insecure_skip_verify")


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The TLS keys of one client, as configured (paths already `~`-expanded)."""

    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    def given(self) -> list[str]:
        """The names of the keys set, in the vocabulary's order."""
        return [name for name in KEYS if getattr(self, name) not in (None, False)]


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A checked TLS configuration: `context` for the client library, `server_name` (None:
    the host of the URL) for SNI and verification."""

    key: str
    options: TlsOptions
    context: ssl.SSLContext

    @property
    def server_name(self) -> str | None:
        return self.options.server_name

    @property
    def verifies(self) -> bool:
        return not self.options.insecure_skip_verify

    def trust(self, host: str) -> str:
        """What the client trusts, for `check-config`: `host` is the name in the URL."""
        if not self.verifies:
            return "nothing: certificates are not verified (insecure_skip_verify)"
        store = (
            f"the CA certificates in {self.options.ca_file} (ca_file)"
            if self.options.ca_file
            else "the system's CA store"
        )
        return f"{store}, for the name {self.server_name or host}"

    def identity(self) -> str:
        """The client certificate presented, for `check-config` (paths only)."""
        cert, key = self.options.client_cert_file, self.options.client_key_file
        if cert is None:
            return "none"
        return f"{cert} (key {key})" if key else f"{cert} (key in the same file)"

    def summary(self, host: str, when: str = "") -> list[str]:
        """`check-config`'s lines for a client of `host` (`when` qualifies the trust line, as
        in " (when TLS is used)")."""
        return [f"trusts{when}: {self.trust(host)}", f"client certificate: {self.identity()}"]


def client_tls(key: str, options: TlsOptions) -> ClientTls:
    """The checked configuration and its context; `key` (`sinks[1]`, `cluster`) starts every
    error. Logs `tls_verification_disabled` when verification is off."""
    _check_combination(key, options)
    if options.insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "tls_verification_disabled",
            key=f"{key}.insecure_skip_verify",
            note="any server can pretend to be this one; set ca_file instead",
        )
    elif options.ca_file is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies; trusts nothing yet
        path = readable_file(f"{key}.ca_file", options.ca_file)
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError:
            raise ConfigError(f"{key}.ca_file: {path} holds no PEM CA certificate") from None
    else:
        context = ssl.create_default_context()
    if options.client_cert_file is not None:
        _load_identity(key, options, context)
    return ClientTls(key, options, context)


def _check_combination(key: str, options: TlsOptions) -> None:
    if options.insecure_skip_verify and options.ca_file is not None:
        raise ConfigError(
            f"{key}.insecure_skip_verify: give ca_file or insecure_skip_verify, not both"
        )
    if options.client_key_file is not None and options.client_cert_file is None:
        raise ConfigError(f"{key}.client_key_file: needs client_cert_file (the certificate)")
    if options.server_name is not None:
        check_server_name(f"{key}.server_name", options.server_name)


def check_server_name(key: str, name: str) -> str:
    """`name` if it is a DNS name or an IP address; else ConfigError starting with `key`."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(f"{key}: must be a DNS name or an IP address, got {name!r}") from None
    return name


def _load_identity(key: str, options: TlsOptions, context: ssl.SSLContext) -> None:
    cert = readable_file(f"{key}.client_cert_file", options.client_cert_file or "")
    where = f"{key}.client_cert_file"
    private = None
    if options.client_key_file is not None:
        where = f"{key}.client_key_file"
        private = readable_file(where, options.client_key_file, secret=True)
    try:
        context.load_cert_chain(cert, private, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            f"{where}: the private key is protected by a passphrase; store it decrypted in a"
            " file only modelwatch can read (openssl pkey -in KEY -out PLAIN)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"{private} is not the key of the certificate in {cert}"
        elif private is None:
            problem = (
                f"{cert} must hold the certificate and its private key (or set client_key_file)"
            )
        else:
            problem = f"{cert} and {private} must be a PEM certificate and its private key"
        raise ConfigError(f"{where}: {problem}") from None


class _Encrypted(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted  # without a callback, OpenSSL would prompt on the terminal


def readable_file(where: str, path: str, *, secret: bool = False) -> str:
    """`path`, checked to be a readable regular file of sane size (a private key that group
    or others may read is warned about, as secrets are)."""
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(f"{where}: {path} is not a regular file")
            if status.st_size > MAX_PEM_BYTES:
                raise ConfigError(f"{where}: {path} is larger than {MAX_PEM_BYTES} bytes")
            if not file.read(1):
                raise ConfigError(f"{where}: {path} is empty")
            if secret:
                warn_if_shared(where, path, status)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def refuse_unused(key: str, options: TlsOptions, url: str, instead: str) -> None:
    """TLS keys next to `url`, which speaks no TLS, would silently do nothing: ConfigError
    naming the first key set (`instead`: the scheme that would use them)."""
    given = options.given()
    if given:
        scheme = urllib.parse.urlsplit(url).scheme
        raise ConfigError(f"{key}.{given[0]}: the URL is {scheme}:// (no TLS); use {instead}")


def refuse_url_settings(key: str, url: str) -> None:
    """TLS settings in the query of `url` (redis-py's `ssl_*` parameters) are refused: only
    the keys above set TLS, and only `insecure_skip_verify` turns verification off."""
    query = urllib.parse.urlsplit(url).query
    for name, _value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name.lower().startswith("ssl"):
            raise ConfigError(
                f"{key}: TLS settings in the URL ({name}=) are not used; set ca_file,"
                " client_cert_file, client_key_file, server_name or insecure_skip_verify"
            )


# --- failures -----------------------------------------------------------------------------


def refusal(exc: BaseException, tls: ClientTls | None, host: str) -> str | None:
    """A sentence saying which certificate was refused and how to fix it, when `exc` (or an
    exception in its chain, or its message, as some libraries flatten it) is a TLS
    certificate failure; None otherwise."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _untrusted(cause.verify_message or str(cause), tls, host)
        text = str(cause)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl.c")[0]
            return _untrusted(detail.strip(" )"), tls, host)
        alert = next((a for a in _REFUSED_ALERTS if f"ALERT_{a}" in text.upper()), None)
        if alert is not None:
            shown = alert.lower().replace("_", " ")
            presented = "" if tls is None else f" (we presented: {tls.identity()})"
            return (
                f"TLS: the server refused our client certificate ({shown}){presented}; set"
                " client_cert_file and client_key_file to a certificate its CA signed"
            )
    return None


def _untrusted(detail: str, tls: ClientTls | None, host: str) -> str:
    trusted = "the system's CA store" if tls is None else tls.trust(host)
    if "hostname mismatch" in detail.lower() or "ip address mismatch" in detail.lower():
        hint = "set server_name to a name the certificate carries"
    else:
        hint = "set ca_file to the CA that signed it"
    return f"TLS: the server's certificate is not trusted: {detail} (trusting {trusted}); {hint}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and exceptions given as its arguments (urllib3 wraps
    errors that way), each once."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < 32:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [a for a in current.args if isinstance(a, BaseException)]
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
