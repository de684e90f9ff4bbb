"""Liveness from progress: each long-running thread owns a `Heartbeat`; health reads them.

A thread is healthy while it makes progress, not while it turns a loop: hashing a 500 GB
model or uploading it is progress and never makes the daemon unhealthy; a thread that makes
no progress for `max_age` seconds is wedged (SPEC §9).

Long work reports progress with `progress()`, called from inside loops (per chunk hashed,
per batch of directory entries, per file uploaded) without passing anything down: it stamps
the heartbeat of the current thread, if it has one. The same call enforces the current job's
budget: past its deadline, or once the job is cancelled (the daemon is stopping), it raises
`OverBudget` / `Cancelled`, so work of a hostile unit ends as a precise outcome instead of
holding a worker forever.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from modelwatch.clock import Clock
from modelwatch.errors import ModelwatchError


class OverBudget(ModelwatchError):
    """The current job ran past its time budget."""


class Cancelled(ModelwatchError):
    """The current job was cancelled (the daemon is stopping)."""


@dataclass(slots=True)
class _Job:
    deadline: float | None
    budget: float | None
    cancelled: threading.Event | None


class Heartbeat:
    """The last moment a thread made progress, on an injected clock."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.last = clock.monotonic()
        self._job: _Job | None = None

    def beat(self) -> None:
        self.last = self.clock.monotonic()

    def age(self, now: float) -> float:
        return now - self.last

    @contextlib.contextmanager
    def job(
        self, *, budget: float | None = None, cancelled: threading.Event | None = None
    ) -> Iterator[None]:
        """Run a job on this thread: `progress()` inside it beats and checks its budget."""
        self.beat()
        deadline = None if budget is None else self.clock.monotonic() + budget
        self._job = _Job(deadline, budget, cancelled)
        _local.heartbeat = self
        try:
            yield
        finally:
            self._job = None
            _local.heartbeat = None
            self.beat()

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """`progress()` on this thread beats this heartbeat (no budget)."""
        _local.heartbeat = self
        try:
            yield
        finally:
            _local.heartbeat = None

    def check(self) -> None:
        self.beat()
        job = self._job
        if job is None:
            return
        if job.cancelled is not None and job.cancelled.is_set():
            raise Cancelled("stopping")
        if job.deadline is not None and self.last > job.deadline:
            raise OverBudget(f"took longer than {job.budget:g} s")


class _Local(threading.local):
    heartbeat: Heartbeat | None = None


_local = _Local()


def progress() -> None:
    """Report progress from long work on the current thread (a no-op without a heartbeat).

    Raises `OverBudget` past the current job's deadline and `Cancelled` once it is cancelled.
    """
    heartbeat = _local.heartbeat
    if heartbeat is not None:
        heartbeat.check()


def wedged(heartbeats: Iterable[Heartbeat], now: float, max_age: float) -> list[str]:
    """Names of the heartbeats without progress for more than `max_age` seconds."""
    return [h.name for h in heartbeats if h.age(now) > max_age]
