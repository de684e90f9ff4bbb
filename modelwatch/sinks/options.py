"""A sink's options, declared once: validation, `check-config` output, masking and the docs.

A sink type declares its keys as a `SinkOptions` of `Option`s (name, kind, default, how it
is shown, help) and sets it as the class attribute `OPTIONS`. From that one declaration:

* `OPTIONS.parse(config)` validates `config.options` (unknown keys with a hint, required and
  mutually exclusive keys, each value's kind) and returns the `Values`, defaults filled in;
  `Values.secret(name)` reads the secret named by `<name>_env` or `<name>_file` through the one
  reader (`modelwatch.credentials.read_secret`) and remembers it for the sink's `Scrubber`;
* `OPTIONS.shown(config)` is what `check-config` prints: every key with its effective value,
  URLs, header values and secrets masked;
* `OPTIONS.markdown()` is the sink's table of keys in the README (a test keeps them equal).

Groups of keys several sinks share are functions returning options: `secret_sources(name)`
(`<name>_env` and `<name>_file`) and `network(timeout)` (what every network sink takes:
`timeout_seconds` and the TLS keys of `modelwatch.tls`; with `proxies=True`, for sinks that
speak HTTP, also `proxy` / `proxy_env` of `modelwatch.proxy`). `Values.tls()` and
`Values.route(url)` turn those keys into what the client needs.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Literal

from modelwatch.config import SinkConfig, describe_value, toml_value
from modelwatch.credentials import MASK, Scrubber, mask_options, mask_url, read_secret
from modelwatch.credentials import url_credentials as _url_credentials
from modelwatch.errors import ConfigError
from modelwatch.proxy import Route, route
from modelwatch.tls import ClientTls, TlsOptions, check_server_name, client_tls

Show = Literal["plain", "url", "values", "secret"]
_MAX_SECONDS = 1_000_000_000  # as config.py: keeps deadline arithmetic finite


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Kind:
    """A type of value: its name in the docs and its check.

    `check(key, value)` returns the value to use or raises ConfigError starting with `key`.
    """

    name: str
    check: Callable[[str, Any], Any]


@dataclass(frozen=True, slots=True)
class Option:
    """One key of a `[[sinks]]` table.

    `default`: the value when the key is absent; None: optional without a value; REQUIRED.
    `show`: how `check-config` prints it: "plain", "url" (userinfo, query and fragment
    masked), "values" (a table whose values are masked) or "secret" (masked whole).
    """

    name: str
    kind: Kind
    help: str
    default: Any = None
    show: Show = "plain"


@dataclass(frozen=True, slots=True)
class Values(Mapping[str, Any]):
    """The parsed options of one sink, defaults filled in, and the secrets read so far."""

    key: str
    entries: Mapping[str, Any]
    scrub: Scrubber = field(default_factory=Scrubber)

    def __getitem__(self, name: str) -> Any:
        return self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def secret(self, name: str) -> str | None:
        """The secret from `<name>_env` or `<name>_file` (None if neither is set); it is added
        to `scrub`, so no message of the sink can show it."""
        for suffix, source in (("_env", "variable"), ("_file", "path")):
            where = self.entries.get(name + suffix)
            if where is not None:
                secret = read_secret(f"{self.key}.{name}{suffix}", **{source: where})
                self.scrub.add(secret)
                return secret
        return None

    def tls_options(self) -> TlsOptions:
        """The TLS keys of `network()` as given."""
        return TlsOptions(
            ca_file=self.entries.get("ca_file"),
            client_cert_file=self.entries.get("client_cert_file"),
            client_key_file=self.entries.get("client_key_file"),
            server_name=self.entries.get("server_name"),
            insecure_skip_verify=self.entries.get("insecure_skip_verify", False),
        )

    def tls(self) -> ClientTls:
        """The checked TLS settings of `network()`'s keys (ConfigError names the key)."""
        return client_tls(self.key, self.tls_options())

    def route(self, url: str) -> Route:
        """How requests to `url` travel: `proxy` / `proxy_env`, else the environment's proxy
        (credentials in it are added to `scrub`)."""
        found = route(
            self.key, url, proxy=self.entries.get("proxy"), proxy_env=self.entries.get("proxy_env")
        )
        for secret in found.proxy.secrets if found.proxy is not None else ():
            self.scrub.add(secret)
        return found

    def secret_table(self, name: str) -> dict[str, str]:
        """`{entry: secret}` from the tables `<name>_env` and `<name>_file`, each added to
        `scrub` (`headers_env = { Authorization = "VAR" }`)."""
        found: dict[str, str] = {}
        for suffix, source in (("_env", "variable"), ("_file", "path")):
            for entry, where in (self.entries.get(name + suffix) or {}).items():
                key = f"{self.key}.{name}{suffix}.{entry}"
                if entry in found:
                    raise ConfigError(f"{key}: also in {name}_env; give it in one of them")
                found[entry] = read_secret(key, **{source: where})
                self.scrub.add(found[entry])
        return found


class SinkOptions:
    """The keys of one sink type; see the module docstring."""

    def __init__(
        self,
        *options: Option | Iterable[Option],
        exclusive: Sequence[Sequence[str]] = (),
        one_required: Sequence[Sequence[str]] = (),
    ) -> None:
        """`exclusive`: groups of keys of which at most one may be given; `one_required`:
        groups of which exactly one must be given (both are checked in the order declared)."""
        flat = [o for item in options for o in ([item] if isinstance(item, Option) else item)]
        self.options: dict[str, Option] = {o.name: o for o in flat}
        if len(self.options) != len(flat):
            raise ValueError("an option is declared twice")
        self.exclusive = tuple(tuple(g) for g in (*exclusive, *one_required))
        self.one_required = tuple(tuple(g) for g in one_required)
        unknown = {n for g in self.exclusive for n in g} - set(self.options)
        if unknown:
            raise ValueError(f"groups name undeclared options: {sorted(unknown)}")

    # --- validation -----------------------------------------------------------------------

    def parse(self, config: SinkConfig) -> Values:
        """Validate `config.options`; raise ConfigError naming the first key that is wrong."""
        given = dict(config.options)
        values = {
            name: self._option(config, name).kind.check(f"{config.key}.{name}", value)
            for name, value in given.items()
        }
        self._check_groups(config, given)
        for option in self.options.values():
            if option.name in given:
                continue
            if option.default is REQUIRED:
                raise ConfigError(f"{config.key}.{option.name}: required for a {config.type} sink")
            if option.default is not None and not self._replaced(option.name, given):
                values[option.name] = option.default
        return Values(config.key, values)

    def _option(self, config: SinkConfig, name: str) -> Option:
        option = self.options.get(name)
        if option is not None:
            return option
        close = get_close_matches(name, list(self.options), n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = f"valid: {', '.join(self.options)}" if self.options else "it takes none"
        raise ConfigError(f"{config.key}.{name}: unknown key for a {config.type} sink ({hint})")

    def _check_groups(self, config: SinkConfig, given: Mapping[str, Any]) -> None:
        for group in self.exclusive:
            present = [name for name in group if name in given]
            if len(present) > 1:
                raise ConfigError(
                    f"{config.key}.{present[1]}: give one of {_alternatives(group)}, not both"
                )
        for group in self.one_required:
            if not any(name in given for name in group):
                raise ConfigError(
                    f"{config.key}.{group[0]}: required for a {config.type} sink"
                    f" (or {_alternatives(group[1:])})"
                )

    def _replaced(self, name: str, given: Mapping[str, Any]) -> bool:
        """Whether another key of `name`'s exclusive group was given instead of it."""
        return any(name in g and any(other in given for other in g) for g in self.exclusive)

    # --- check-config -----------------------------------------------------------------------

    def shown(self, config: SinkConfig) -> dict[str, Any]:
        """Every key with its effective value as `check-config` prints it, secrets masked."""
        items: dict[str, Any] = {}
        for option in self.options.values():
            if option.name in config.options:
                items[option.name] = _masked(option.show, config.options[option.name])
            elif option.default not in (None, REQUIRED) and not self._replaced(
                option.name, config.options
            ):
                items[option.name] = option.default
        extra = {k: v for k, v in config.options.items() if k not in self.options}
        return {**items, **mask_options(extra)}

    # --- the README -------------------------------------------------------------------------

    def markdown(self) -> str:
        """The table of keys for the README."""
        if not self.options:
            return "No keys of its own."
        rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        rows += [
            f"| `{o.name}` | {o.kind.name} | {self._default_text(o)} | {o.help} |"
            for o in self.options.values()
        ]
        return "\n".join(rows)

    def _default_text(self, option: Option) -> str:
        for group in self.one_required:
            if option.name == group[0]:
                return "required, or " + " or ".join(f"`{name}`" for name in group[1:])
            if option.name in group:
                return "—"
        if option.default is REQUIRED:
            return "required"
        if option.default is None:
            return "—"
        return f"`{toml_value(option.default)}`"


def _alternatives(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _masked(show: Show, value: Any) -> Any:
    if show == "secret":
        return MASK
    if show == "values" and isinstance(value, Mapping):
        return dict.fromkeys(value, MASK)
    if show == "url":
        return [mask_url(v) for v in value] if isinstance(value, list) else mask_url(str(value))
    if isinstance(value, (str, list)):  # a URL inside text (a command's argument) is masked
        return mask_options(value)
    return value


# --- kinds ------------------------------------------------------------------------------------


def _type_error(key: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: must be {wanted}, got {describe_value(value)}")


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(key, "a string", value)
    if "\x00" in value:
        raise ConfigError(f"{key}: must not contain NUL characters")
    return value


def _nonempty(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text.strip():
        raise ConfigError(f"{key}: must not be empty")
    return text


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(key, "a number", value)
    if not math.isfinite(value) or value <= 0 or value > _MAX_SECONDS:
        raise ConfigError(f"{key}: must be > 0 and <= {_MAX_SECONDS}, got {value!r}")
    return float(value)


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, "an integer", value)
    if value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")
    return value


def _env_name(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text or "=" in text:
        raise ConfigError(f"{key}: must be the name of an environment variable, got {text!r}")
    return text


def _path(key: str, value: Any) -> str:
    return os.path.expanduser(_nonempty(key, value))


def _server_name(key: str, value: Any) -> str:
    return check_server_name(key, _nonempty(key, value))


STRING = Kind("string", _string)
NONEMPTY = Kind("string", _nonempty)
BOOLEAN = Kind("boolean", _boolean)
SECONDS = Kind("seconds (> 0)", _seconds)
COUNT = Kind("integer (>= 0)", _count)
ENV_NAME = Kind("environment variable name", _env_name)
PATH = Kind("file path", _path)
SERVER_NAME = Kind("DNS name or IP address", _server_name)


def array(item: Kind, *, nonempty: bool = False) -> Kind:
    """An array whose items are `item`s (`argv`, `pass_env`)."""

    def check(key: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _type_error(key, "an array", value)
        if nonempty and not value:
            raise ConfigError(f"{key}: must not be empty")
        return [item.check(f"{key}[{index}]", entry) for index, entry in enumerate(value)]

    return Kind(f"array of {item.name}s", check)


def table(item: Kind, name_check: Callable[[str, str], None] | None = None) -> Kind:
    """A table of `item`s; `name_check(key, name)` vets each entry's name."""

    def check(key: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(key, "a table", value)
        if name_check is not None:
            for name in value:
                name_check(key, name)
        return {name: item.check(f"{key}.{name}", entry) for name, entry in value.items()}

    return Kind(f"table of {item.name}s", check)


def choice(*allowed: str) -> Kind:
    """One of `allowed` (exactly as written)."""

    def check(key: str, value: Any) -> str:
        text = _string(key, value)
        if text not in allowed:
            raise ConfigError(
                f"{key}: must be one of {', '.join(map(repr, allowed))}, got {text!r}"
            )
        return text

    return Kind(" or ".join(f'`"{a}"`' for a in allowed), check)


def url(*schemes: str, alternative: str) -> Kind:
    """A URL with one of `schemes` and a host, without credentials: those are refused with
    `alternative` named as the way to give them (`url_env or url_file`)."""

    def check(key: str, value: Any) -> str:
        text = _string(key, value)
        check_url(key, text, schemes)
        found = _url_credentials(text)
        if found is not None:
            raise ConfigError(
                f"{key}: {found} is not allowed in the config file; use {alternative}"
            )
        return text

    return Kind(f"URL ({', '.join(schemes)})", check)


def check_url(key: str, text: str, schemes: Sequence[str]) -> urllib.parse.SplitResult:
    """The parts of `text`, a URL with one of `schemes`, a host and a valid port. Messages
    never quote the URL: it may carry a secret."""
    wanted = ", ".join(f"{s}://" for s in schemes)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # an unbalanced "[" in the host
        raise ConfigError(f"{key}: must be a URL ({wanted}) naming a host") from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ConfigError(f"{key}: must be a URL ({wanted}) naming a host")
    try:
        port_ok = parts.port != 0
    except ValueError:
        port_ok = False
    if not port_ok:
        raise ConfigError(f"{key}: the URL has an invalid port")
    if any(ord(c) <= 32 or ord(c) == 127 for c in text):
        raise ConfigError(f"{key}: the URL must not contain spaces or control characters")
    return parts


# --- shared groups ----------------------------------------------------------------------------


def secret_sources(name: str, what: str) -> tuple[Option, Option]:
    """`<name>_env` and `<name>_file`: where the secret `what` comes from."""
    return (
        Option(f"{name}_env", ENV_NAME, f"the environment variable holding {what}"),
        Option(f"{name}_file", PATH, f"a file holding {what}"),
    )


def network(
    timeout: float,
    waits: str = "how long one attempt waits for the server",
    *,
    proxies: bool = False,
) -> tuple[Option, ...]:
    """What every network sink takes: `timeout_seconds` (`waits` says what it bounds) and the
    TLS keys; with `proxies` (sinks speaking HTTP) also `proxy` and `proxy_env`, which a
    sink declares mutually exclusive."""
    return (
        Option("timeout_seconds", SECONDS, waits, timeout),
        *tls_keys(),
        *(proxy_keys() if proxies else ()),
    )


def tls_keys() -> tuple[Option, ...]:
    """`ca_file`, `client_cert_file`, `client_key_file`, `server_name`,
    `insecure_skip_verify` (see `modelwatch.tls`)."""
    return (
        Option("ca_file", PATH, "PEM CA certificates trusted instead of the system store"),
        Option("client_cert_file", PATH, "the client certificate (PEM) for mutual TLS"),
        Option(
            "client_key_file",
            PATH,
            "its private key (PEM, not encrypted); not needed when client_cert_file holds it",
        ),
        Option(
            "server_name",
            SERVER_NAME,
            "the name the server's certificate must carry (and SNI), if not the URL's host",
        ),
        Option(
            "insecure_skip_verify",
            BOOLEAN,
            "accept any certificate; a warning is logged at every start",
            False,
        ),
    )


def proxy_keys() -> tuple[Option, ...]:
    """`proxy` and `proxy_env` (see `modelwatch.proxy`)."""
    return (
        Option(
            "proxy",
            url("http", "https", alternative="proxy_env"),
            "the HTTP proxy instead of HTTPS_PROXY / HTTP_PROXY; one with a password only"
            " from proxy_env",
            show="url",
        ),
        Option("proxy_env", ENV_NAME, "the environment variable holding the proxy URL"),
    )
