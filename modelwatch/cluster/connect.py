"""The one place a cluster backend is built from `[cluster]`: URL, credentials, timeouts.

The URL comes from `url` (no credentials allowed in the file), the environment variable
named by `url_env`, or the file named by `url_file` (both read by `credentials.read_secret`,
and both may carry credentials: a Redis password, a NATS token or user and password). What
logs and `status` show of it has the credentials masked (`credentials.mask_url`), and the
backends scrub them from every message (`credentials.Scrubber`). The TLS options of SPEC §5b
will be read here as well.

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
    check_cluster_url(key, config.backend, url)
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


def connect(config: ClusterConfig, environ: Mapping[str, str] | None = None) -> Backend:
    """The configured backend (not connected yet). ConfigError for a bad URL or a missing
    client package."""
    url = backend_url(config, os.environ if environ is None else environ)
    timeout = operation_timeout(config.lease_seconds)
    shown, scrub = shown_url(url), Scrubber(url_secrets(url))
    try:
        if config.backend == "redis":
            from modelwatch.cluster.redis import RedisBackend

            return RedisBackend(
                url, shown=shown, prefix=config.prefix, timeout=timeout, scrub=scrub
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
        scrub=scrub,
    )
