"""The one place a cluster backend is built from `[cluster]`: URL, credentials, TLS, timeouts.

The URL comes from `url` (no credentials allowed in the file), the environment variable
named by `url_env`, or the file named by `url_file` (both read by `credentials.read_secret`,
and both may carry credentials: a Redis password, a NATS token or user and password). What
logs and `status` show of it has the credentials masked (`credentials.mask_url`), and the
backends scrub them from every message (`credentials.Scrubber`).

TLS speaks the shared vocabulary of SPEC §5b (`modelwatch.tls`): `client_tls("cluster",
...)` checks the files (a `ConfigError` naming `cluster.ca_file`, ...) and logs
`tls_verification_disabled` when `insecure_skip_verify` is set, each time a backend is built,
so at every start. Redis speaks TLS for `rediss://` URLs, NATS for `tls://` servers and
servers that require it. A certificate refused either way is reported in the words of
`tls.refusal` (which key to set). Neither protocol goes through a proxy.

Building a backend opens no connection: the first operation does (and every operation after
a failure reconnects), so a backend that is down at start is a paused shared root, not a
failed start.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping

from modelwatch.cluster.backend import Backend
from modelwatch.config import ClusterConfig, check_cluster_url
from modelwatch.credentials import Scrubber, mask_url, read_secret
from modelwatch.errors import ConfigError
from modelwatch.tls import ClientTls, client_tls


def operation_timeout(lease_seconds: float) -> float:
    """How long one backend operation may take: short against the lease, so a holder whose
    backend stopped answering notices (and retries) several times before its fence."""
    return min(2.0, lease_seconds / 4)


def backend_url(config: ClusterConfig, environ: Mapping[str, str]) -> str:
    """The backend's URL, read from where `[cluster]` says; ConfigError names the key."""
    if config.url:
        return config.url
    if config.url_env:
        key = "cluster.url_env"
        url = read_secret(key, variable=config.url_env, environ=environ)
    else:
        key = "cluster.url_file"
        url = read_secret(key, path=config.url_file)
    check_cluster_url(key, config, url)
    return url


def shown_url(url: str) -> str:
    """`url` fit for logs and `status` (each server's credentials masked)."""
    return ",".join(mask_url(one.strip()) for one in url.split(","))


def url_secrets(url: str) -> list[str]:
    """The credentials in `url` (users, passwords, query values), to scrub from messages."""
    found: list[str] = []
    for one in url.split(","):
        parts = urllib.parse.urlsplit(one.strip())
        found += [parts.username or "", parts.password or ""]
        found += [value for _name, value in urllib.parse.parse_qsl(parts.query)]
    return [urllib.parse.unquote(s) for s in found if s]


def network_summary(config: ClusterConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """What `check-config` prints under `[cluster]`: where the backend is, what it trusts,
    which client certificate it presents (paths only). The backend is built and closed as
    `connect` builds it, so every check of `connect` is made (no connection is opened)."""
    url, tls = _endpoint(config, environ)
    _build(config, url, tls).close()
    host = urllib.parse.urlsplit(url.split(",")[0].strip()).hostname or ""
    protocol = "Redis" if config.backend == "redis" else "NATS"
    lines = [f"route: {shown_url(url)} directly (the {protocol} protocol is not proxied)"]
    if config.backend == "nats":
        return lines + tls.summary(host, " (when TLS is used)")
    return lines + (tls.summary(host) if url.lower().startswith("rediss:") else [])


def _endpoint(config: ClusterConfig, environ: Mapping[str, str] | None) -> tuple[str, ClientTls]:
    """The URL and the checked TLS settings (ConfigError names the key)."""
    url = backend_url(config, os.environ if environ is None else environ)
    return url, client_tls("cluster", config.tls)


def connect(config: ClusterConfig, environ: Mapping[str, str] | None = None) -> Backend:
    """The configured backend (not connected yet). ConfigError for a bad URL, a TLS file
    that cannot be used, or a missing client package."""
    return _build(config, *_endpoint(config, environ))


def _build(config: ClusterConfig, url: str, tls: ClientTls) -> Backend:
    timeout = operation_timeout(config.lease_seconds)
    shown, scrub = shown_url(url), Scrubber(url_secrets(url))
    try:
        if config.backend == "redis":
            from modelwatch.cluster.redis import RedisBackend

            return RedisBackend(
                url, shown=shown, prefix=config.prefix, timeout=timeout, tls=tls, scrub=scrub
            )
        from modelwatch.cluster.nats import NatsBackend
    except ImportError as exc:
        package = "redis" if config.backend == "redis" else "nats"
        raise ConfigError(
            f"cluster.backend: {config.backend} needs the {exc.name or package} package "
            f"(pip install 'modelwatch[{package}]')"
        ) from None
    servers = [one.strip() for one in url.split(",")]
    return NatsBackend(
        servers,
        shown=shown,
        prefix=config.prefix,
        timeout=timeout,
        lease_seconds=config.lease_seconds,
        tls=tls,
        scrub=scrub,
    )
