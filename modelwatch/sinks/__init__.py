"""The sink API: where events are delivered.

A sink is any object with a `name`, a `send(event)` that returns only once the event is
delivered, and a `close()` (the `Sink` protocol below says exactly what each promises). Sinks
are constructed from their `[[sinks]]` table by a factory `factory(config: SinkConfig) -> Sink`
(usually the sink class), which validates `config.options` and raises `ConfigError` naming the
key (`f"{config.key}.path: required"`). A factory may declare its keys once as the class
attribute `OPTIONS` (a `modelwatch.sinks.options.SinkOptions`): `OPTIONS.parse(config)` then
validates them and reads secrets, and `check-config` shows them with defaults filled in and
secrets masked. The built-in sinks all do; `check_options` is the short form for plugins
that only need type checks.

Factories are found through the entry-point group `modelwatch.sinks`; the entry-point name is
the `type` in the config. The built-in sinks register themselves the same way (see
pyproject.toml), so a third-party package does exactly what they do::

    [project.entry-points."modelwatch.sinks"]
    kafka = "my_package.sink:KafkaSink"
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from modelwatch.config import SinkConfig
from modelwatch.credentials import mask_options
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.sinks.options import SinkOptions

__all__ = [
    "PermanentSinkError",
    "Sink",
    "SinkError",
    "SinkFactory",
    "build_sink",
    "check_options",
    "load_factories",
    "network_summary",
    "shown_options",
]

ENTRY_POINT_GROUP = "modelwatch.sinks"


@runtime_checkable
class Sink(Protocol):
    """Where events go. One delivery worker thread calls `send` for one event at a time, in
    order, and finally `close`; a sink is never used from two threads at once.

    `send` returns only once the event is delivered, and otherwise raises:

    * `SinkError` for a failure of the transport that may pass (connection refused or lost,
      a timeout, an HTTP 5xx or 429, a broker that is not ready): retried without limit by
      default, after `retry_after` seconds when the receiver said so;
    * `PermanentSinkError` when retrying cannot help (refused credentials, a request the
      receiver rejects): the event goes to the dead letters at once.

    Anything else it raises counts as a bug or a deterministic local error: retried, but
    dead-lettered after `max_attempts` or 10 attempts, whichever comes first. Messages must
    not contain secrets (`modelwatch.credentials.Scrubber`): they are logged and stored.

    Liveness: a send that takes long (uploading a large model) calls
    `modelwatch.progress.progress()` as it goes (per file, per chunk); the worker is wedged
    only after 180 s without progress. A sink whose single steps can take longer without a
    chance to report (one huge file handed to a client library) may declare the optional
    class attribute `max_send_seconds`: a send is then wedged only past that.

    Optional: `network_summary()`, lines `check-config` prints under the sink (where it
    connects, through which proxy, what it trusts; paths and masked URLs only).
    """

    name: str

    def send(self, event: Event) -> None:
        """Deliver one event; return only when it is delivered."""
        ...

    def close(self) -> None:
        """Release connections and files. Called once, from the thread that used the sink."""
        ...


SinkFactory = Callable[[SinkConfig], Sink]


def load_factories() -> dict[str, SinkFactory]:
    """Every sink type installed, by entry-point name."""
    found: dict[str, SinkFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, _lazy(ep.name, ep.load))
    return found


def _lazy(name: str, load: Callable[[], Any]) -> SinkFactory:
    def factory(config: SinkConfig) -> Sink:
        try:
            target = load()
        except ImportError as exc:
            raise ConfigError(
                f"{config.key}.type: sink type {name!r} cannot be loaded: {exc}"
                f" (is its optional extra installed? pip install 'modelwatch[{name}]')"
            ) from exc
        sink: Sink = target(config)
        return sink

    return factory


def shown_options(config: SinkConfig) -> dict[str, Any]:
    """A sink's own keys as `check-config` prints them: from the type's `OPTIONS` when it
    declares them (defaults filled in, secrets masked), else as written, masked."""
    declared = _declared_options(config.type)
    if declared is None:
        return dict(mask_options(config.options))
    return declared.shown(config)


def _declared_options(sink_type: str) -> SinkOptions | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == sink_type:
            try:
                declared = getattr(ep.load(), "OPTIONS", None)
            except ImportError:
                return None
            return declared if isinstance(declared, SinkOptions) else None
    return None


def network_summary(sink: Sink) -> list[str]:
    """What `check-config` says about how `sink` connects (nothing for sinks that do not say)."""
    summary = getattr(sink, "network_summary", None)
    return [str(line) for line in summary()] if callable(summary) else []


def build_sink(config: SinkConfig, factories: Mapping[str, SinkFactory] | None = None) -> Sink:
    """Construct the sink for one `[[sinks]]` table, or raise ConfigError naming the key."""
    known = load_factories() if factories is None else factories
    factory = known.get(config.type)
    if factory is None:
        names = ", ".join(sorted(known)) or "none installed"
        raise ConfigError(f"{config.key}.type: unknown sink type {config.type!r} (known: {names})")
    return factory(config)


def check_options(
    config: SinkConfig,
    allowed: Mapping[str, type | tuple[type, ...]],
    required: tuple[str, ...] = (),
) -> None:
    """Validate a sink's own keys: unknown keys, required keys and value types."""
    for key, value in config.options.items():
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(
                f"{config.key}.{key}: unknown key for a {config.type} sink (valid: {valid})"
            )
        expected = allowed[key]
        if not isinstance(value, expected) or (
            isinstance(value, bool) and bool not in _types(expected)
        ):
            raise ConfigError(f"{config.key}.{key}: must be {_type_names(expected)}, got {value!r}")
    for key in required:
        if key not in config.options:
            raise ConfigError(f"{config.key}.{key}: required for a {config.type} sink")


def _types(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _type_names(expected: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(t, t.__name__) for t in _types(expected))
