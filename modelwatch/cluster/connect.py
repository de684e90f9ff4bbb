"""The one place a cluster backend is built from `[cluster]`: URL, credentials, timeouts.

The URL comes from `url` (no credentials allowed in the file), the environment variable
named by `url_env`, or the file named by `url_file` (both may carry credentials: a Redis
password, a NATS token or user and password). What logs and `status` show of it has the
credentials masked. The TLS options of SPEC §5b will be read here as well.

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
from modelwatch.errors import ConfigError

MAX_URL_FILE_BYTES = 64 * 1024


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
        url = environ.get(config.url_env, "").strip()
        if not url:
            raise ConfigError(f"{key}: environment variable {config.url_env!r} is not set or empty")
    else:
        key = "cluster.url_file"
        url = _read_file(key, config.url_file)
    check_cluster_url(key, config.backend, url)
    return url


def _read_file(key: str, path: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_URL_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_URL_FILE_BYTES:
        raise ConfigError(f"{key}: {path} is larger than {MAX_URL_FILE_BYTES} bytes")
    try:
        url = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not url:
        raise ConfigError(f"{key}: {path} is empty")
    return url


def shown_url(url: str) -> str:
    """`url` fit for logs: user and password masked, query and fragment left out."""
    shown = []
    for one in url.split(","):
        parts = urllib.parse.urlsplit(one.strip())
        host = parts.netloc.rpartition("@")[2]
        user = "***@" if "@" in parts.netloc else ""
        shown.append(f"{parts.scheme}://{user}{host}{parts.path}")
    return ",".join(shown)


def url_secrets(url: str) -> list[str]:
    """The credentials in `url` (user, password, query values), longest first, to scrub."""
    found: list[str] = []
    for one in url.split(","):
        parts = urllib.parse.urlsplit(one.strip())
        found += [parts.username or "", parts.password or ""]
        found += [value for _name, value in urllib.parse.parse_qsl(parts.query)]
        found += [urllib.parse.unquote(s) for s in found]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def connect(config: ClusterConfig, environ: Mapping[str, str] | None = None) -> Backend:
    """The configured backend (not connected yet). ConfigError for a bad URL or a missing
    client package."""
    url = backend_url(config, os.environ if environ is None else environ)
    timeout = operation_timeout(config.lease_seconds)
    shown, scrub = shown_url(url), url_secrets(url)
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
