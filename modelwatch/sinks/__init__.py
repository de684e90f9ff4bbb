"""The sink API: where events are delivered.

A sink is any object with a `name`, a `send(event)` that returns only once the event is
delivered, and a `close()`. `send` raises `SinkError` (retried later, optionally after
`retry_after` seconds) or `PermanentSinkError` (dead letter). Anything else it raises is
treated as a retryable failure. Sinks are constructed from their `[[sinks]]` table by a
factory `factory(config: SinkConfig) -> Sink`, which validates `config.options` and raises
`ConfigError` naming the key (`f"{config.key}.path: required"`).

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
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event

__all__ = [
    "PermanentSinkError",
    "Sink",
    "SinkError",
    "SinkFactory",
    "build_sink",
    "check_options",
    "load_factories",
]

ENTRY_POINT_GROUP = "modelwatch.sinks"


@runtime_checkable
class Sink(Protocol):
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
