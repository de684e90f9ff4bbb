"""Which HTTP proxy a request goes through (SPEC §5b): the environment as curl reads it, or
the sink's own.

* A sink's `proxy` (a URL without credentials) or `proxy_env` (the name of an environment
  variable holding a URL, credentials allowed: `http://user:password@proxy:3128`) replaces
  the environment's proxy for that sink.
* Otherwise, as curl and Python's `requests` read them: `https_proxy` / `HTTPS_PROXY` for
  `https://` URLs, `http_proxy` / `HTTP_PROXY` for `http://` ones, then `all_proxy` /
  `ALL_PROXY`; the lowercase name wins when both are set. A value without a scheme means
  `http://`.
* `no_proxy` / `NO_PROXY` (either way) lists hosts reached directly, whichever proxy was
  chosen: `*` (every host), a domain name (`example.com` also covers `a.example.com`; a
  leading `.` is ignored), an IP address or a CIDR block (`10.0.0.0/8`), each optionally with
  `:port`; separated by commas or spaces.

Proxies are `http://` (or `https://`: TLS to the proxy, verified with the sink's TLS
settings); `https://` targets are tunnelled with CONNECT, `http://` ones forwarded. Only
HTTP(S) is proxied: the NATS and Redis protocols connect directly.

`route(key, url, proxy=..., proxy_env=...)` returns the `Route` (a `Proxy` or None, and why),
or raises `ConfigError` naming the key or the variable. Credentials in a proxy URL become a
`Proxy-Authorization` header; `Proxy.shown` has them masked and `Proxy.secrets` lists them
for the sink's scrubber.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelwatch.credentials import read_secret
from modelwatch.errors import ConfigError

_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy to send requests through: `url` has no credentials; `headers` carries them."""

    url: str
    source: str  # where it was configured: "proxy", "proxy_env (VAR)", "HTTPS_PROXY"
    headers: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        user = "***@" if self.headers else ""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{user}{rest} (from {self.source})"


@dataclass(frozen=True, slots=True)
class Route:
    """How requests to one URL travel: through `proxy`, or directly (`proxy` None) because
    of `reason`."""

    proxy: Proxy | None
    reason: str = ""

    @property
    def shown(self) -> str:
        return self.proxy.shown if self.proxy is not None else f"direct ({self.reason})"


def route(
    key: str,
    url: str,
    *,
    proxy: str | None = None,
    proxy_env: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Route:
    """The route of requests to `url` (an http:// or https:// URL) for the sink `key`."""
    env = os.environ if environ is None else environ
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    if proxy is not None:
        chosen, source = proxy, "proxy"
    elif proxy_env is not None:
        chosen = read_secret(f"{key}.proxy_env", variable=proxy_env, environ=env)
        source = f"proxy_env ({proxy_env})"
    else:
        found = _from_environment(scheme, env)
        if found is None:
            return Route(None, f"no {scheme}_proxy, {scheme.upper()}_PROXY or ALL_PROXY set")
        source, chosen = found
    where = f"{key}.{source}" if source == "proxy" else f"{key} (proxy from {source})"
    parsed = parse_proxy(where, chosen, source)  # checked even when NO_PROXY skips it
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if bypassed(no_proxy, host, port):
        return Route(None, f"NO_PROXY covers {host}")
    return Route(parsed)


def _from_environment(scheme: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def parse_proxy(where: str, text: str, source: str) -> Proxy:
    """The `Proxy` at `text` (`http://[user:password@]host[:port]`); `where` starts errors,
    which never quote the URL (it may carry a password)."""
    if "://" not in text:
        text = "http://" + text  # as curl and requests read a bare host:port
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(f"{where}: not a valid proxy URL") from None
    if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
        raise ConfigError(
            f"{where}: must be an http:// or https:// proxy URL naming a host"
            f" (got a {parts.scheme or 'schemeless'} URL)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: a proxy URL has no path, query or fragment")
    host = parts.hostname
    shown_host = f"[{host}]" if ":" in host else host
    url = (
        f"{parts.scheme.lower()}://{shown_host}:{port or (443 if parts.scheme == 'https' else 80)}"
    )
    if parts.username is None and parts.password is None:
        return Proxy(url, source)
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    secrets = tuple(s for s in (password, parts.password or "", token) if s)
    return Proxy(url, source, {"Proxy-Authorization": f"Basic {token}"}, secrets)


def bypassed(no_proxy: str, host: str, port: int) -> bool:
    """Whether `NO_PROXY`-style `no_proxy` says to reach `host`:`port` directly."""
    address = _address(host)
    for entry in no_proxy.replace(" ", ",").lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        name, wanted_port = _split_port(entry)
        if not name or (wanted_port is not None and wanted_port != port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    """(`host`, port) from `host`, `host:port`, `[v6]:port`, a bare IPv6 address or a CIDR."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None
