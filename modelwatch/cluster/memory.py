"""`MemoryBackend`: the backend contract in one process, on an injected clock.

For tests that drive several nodes' settle loops on a fake clock (and for trying the
protocol out): leases expire when the clock says so, every write is a compare-and-set, and
`down = True` makes every call fail as an unreachable backend would. The Redis and NATS
backends pass the same contract tests (tests/test_cluster_backend.py).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from modelwatch.clock import Clock
from modelwatch.cluster.backend import (
    BackendUnavailable,
    Busy,
    Conflict,
    Lease,
    LeaseLost,
    Stored,
    Write,
)


@dataclass(slots=True)
class _Held:
    node: str
    token: str
    expires: float
    revision: int


class MemoryBackend:
    name = "memory"
    shown = "memory"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.down = False
        self._lock = threading.Lock()
        self._leases: dict[str, _Held] = {}
        self._units: dict[str, dict[str, Stored]] = {}
        self._events: dict[str, dict[str, bytes]] = {}
        self._revision = 0

    def _enter(self) -> None:
        if self.down:
            raise BackendUnavailable("memory: down")

    def _live(self, root: str) -> _Held | None:
        held = self._leases.get(root)
        if held is not None and held.expires <= self.clock.monotonic():
            del self._leases[root]
            return None
        return held

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    def acquire(self, root: str, node: str, seconds: float) -> Lease | Busy:
        with self._lock:
            self._enter()
            held = self._live(root)
            if held is not None:
                return Busy(held.node, held.expires - self.clock.monotonic())
            token, revision = secrets.token_hex(8), self._next()
            self._leases[root] = _Held(node, token, self.clock.monotonic() + seconds, revision)
            return Lease(root, node, token, seconds, revision)

    def renew(self, lease: Lease) -> Lease:
        with self._lock:
            self._enter()
            held = self._live(lease.root)
            if held is None or held.token != lease.token:
                raise LeaseLost(f"{lease.root}: held by {held.node if held else 'nobody'}")
            held.expires = self.clock.monotonic() + lease.seconds
            held.revision = self._next()
            return Lease(lease.root, lease.node, lease.token, lease.seconds, held.revision)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._enter()
            held = self._live(lease.root)
            if held is not None and held.token == lease.token:
                del self._leases[lease.root]

    def holder(self, root: str) -> str | None:
        with self._lock:
            self._enter()
            held = self._live(root)
            return held.node if held else None

    def load(self, root: str) -> dict[str, Stored]:
        with self._lock:
            self._enter()
            return dict(self._units.get(root, {}))

    def commit(self, lease: Lease, write: Write) -> int:
        with self._lock:
            self._enter()
            held = self._live(lease.root)
            if held is None or held.token != lease.token:
                raise LeaseLost(f"{lease.root}: the lease is not ours")
            units = self._units.setdefault(lease.root, {})
            current = units.get(write.unit)
            if (current.revision if current else 0) != write.revision:
                raise Conflict(write.unit, current)
            revision = self._next()
            units[write.unit] = Stored(revision, write.history, write.undelivered)
            bodies = self._events.setdefault(lease.root, {})
            if write.event is not None:
                bodies[write.event[0]] = write.event[1]
            for event_id in write.forget:
                bodies.pop(event_id, None)
            return revision

    def events(self, root: str, ids: Collection[str]) -> Mapping[str, bytes]:
        with self._lock:
            self._enter()
            bodies = self._events.get(root, {})
            return {i: bodies[i] for i in ids if i in bodies}

    def seed(self, root: str, units: Mapping[str, Stored], bodies: Mapping[str, bytes]) -> None:
        """Start from what another backend stores for `root` (a dry run's copy)."""
        with self._lock:
            self._units[root] = dict(units)
            self._events[root] = dict(bodies)
            self._revision = max([self._revision, *(s.revision for s in units.values())])

    def stored_events(self, root: str) -> set[str]:
        """Ids of every event body stored for `root` (for tests)."""
        with self._lock:
            return set(self._events.get(root, {}))

    def close(self) -> None:
        pass
