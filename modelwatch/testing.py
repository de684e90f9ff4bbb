"""Test helpers shipped with the package: a fake clock and an in-memory sink.

Use them to test code that plugs into modelwatch (a sink, a consumer of events) without mocks::

    clock = FakeClock()
    sink = MemorySink(SinkConfig(type="memory", name="memory", ...))
    sink.fail_next(2)          # the next two sends raise SinkError
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from modelwatch.config import EVENT_TYPES, SinkConfig
from modelwatch.errors import PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, Event, make_event


class FakeClock:
    """A clock that only moves when told to (`advance`)."""

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = start
        self._offset = wall - start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._mono + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._mono += seconds


def sink_config(
    type_: str = "memory",
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    **common: Any,
) -> SinkConfig:
    """A `SinkConfig` as the config loader would build it."""
    return SinkConfig(
        type=type_,
        name=name or type_,
        event_types=tuple(common.get("event_types", EVENT_TYPES)),
        max_attempts=int(common.get("max_attempts", 0)),
        options=MappingProxyType(dict(options or {})),
        key=str(common.get("key", "sinks[0]")),
    )


def sample_event(
    name: str = "resnet",
    version: int = 1,
    *,
    fingerprint: str | None = None,
    root: str = "/storage/models",
    event_type: str = REGISTERED,
) -> Event:
    """A well-formed event for testing a sink without a daemon (ONNX unit `root/name`)."""
    return make_event(
        event_type,
        root=root,
        unit_path=f"{root}/{name}",
        name=name,
        when=1_800_000_000.25,
        data={
            "fingerprint": fingerprint or f"sha256:{version:064x}",
            "version": version,
            "format": "onnx",
        },
    )


class MemorySink:
    """Keeps delivered events in `events`; can be told to fail."""

    def __init__(self, config: SinkConfig | None = None) -> None:
        self.name = config.name if config is not None else "memory"
        self.events: list[Event] = []
        self.attempts = 0
        self.closed = False
        self._failures: list[SinkError] = []
        self._lock = threading.Lock()
        self.delivered = threading.Condition(self._lock)

    def fail_next(
        self, count: int = 1, *, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        """Make the next `count` sends fail."""
        cls = PermanentSinkError if permanent else SinkError
        with self._lock:
            self._failures.extend(
                cls("scripted failure", retry_after=retry_after) for _ in range(count)
            )

    def send(self, event: Event) -> None:
        with self._lock:
            self.attempts += 1
            if self._failures:
                raise self._failures.pop(0)
            self.events.append(event)
            self.delivered.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Block until at least `count` events were delivered (or the timeout passes)."""
        with self._lock:
            self.delivered.wait_for(lambda: len(self.events) >= count, timeout)
            return list(self.events)

    def close(self) -> None:
        self.closed = True
