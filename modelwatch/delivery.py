"""Delivering the outbox: one worker thread per sink, retries with backoff (SPEC §8).

A worker reads its sink's outbox strictly in commit order (so per unit, events go out in
version order), sends the oldest undelivered event, and records the outcome. Retry timing is
the pure function `retry_delay`; permanent errors and `max_attempts` move an event to the dead
letters, which `modelwatch redeliver` puts back.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from modelwatch.clock import Clock
from modelwatch.errors import PermanentSinkError, SinkError, StateError
from modelwatch.sinks import Sink
from modelwatch.state import OutboxRow, Store

log = structlog.get_logger("modelwatch.delivery")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
RETRY_AFTER_CAP = 3600.0


def retry_delay(
    attempts: int,
    retry_after: float | None,
    rng: random.Random,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
) -> float:
    """Seconds to wait after the `attempts`-th failure: full jitter, or the receiver's hint."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, RETRY_AFTER_CAP)
    return rng.uniform(0, min(cap, base * 2 ** min(attempts - 1, 30)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one attempt: delivered, or when to try again, or dead."""

    delivered: bool
    dead: bool = False
    next_attempt: float = 0.0
    error: str = ""

    @property
    def name(self) -> str:
        """delivered | dead | failed (the metrics' `outcome` label)."""
        return "delivered" if self.delivered else "dead" if self.dead else "failed"


def attempt(
    sink: Sink, row: OutboxRow, *, now: float, max_attempts: int, rng: random.Random
) -> Outcome:
    """Send one event and classify the result (the sink call is the only I/O)."""
    try:
        sink.send(row.event)
    except PermanentSinkError as exc:
        return Outcome(False, dead=True, error=str(exc) or type(exc).__name__)
    except Exception as exc:
        attempts = row.attempts + 1
        retry_after = exc.retry_after if isinstance(exc, SinkError) else None
        error = str(exc) or type(exc).__name__
        if max_attempts and attempts >= max_attempts:
            return Outcome(False, dead=True, error=f"{error} (after {attempts} attempts)")
        delay = retry_delay(attempts, retry_after, rng)
        return Outcome(False, next_attempt=now + delay, error=error)
    return Outcome(True)


class DeliveryWorker(threading.Thread):
    """Delivers one sink's outbox until stopped."""

    def __init__(
        self,
        sink: Sink,
        db_path: str,
        *,
        max_attempts: int,
        clock: Clock,
        on_outcome: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(name=f"deliver-{sink.name}", daemon=True)
        self.sink = sink
        self.db_path = db_path
        self.max_attempts = max_attempts
        self.clock = clock
        self.on_outcome = on_outcome
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.last_beat = clock.monotonic()
        self.sending_since: float | None = None  # set while a send is in progress
        self._rng = random.Random()
        self._log = log.bind(sink=sink.name)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        store = Store(self.db_path)
        try:
            while not self.stopping.is_set():
                self.last_beat = self.clock.monotonic()
                self.wake.clear()
                # at most a second between heartbeats, even while idle or backing off
                self.wake.wait(min(self._step(store), 1.0))
        finally:
            store.close()
            self.sink.close()

    def _step(self, store: Store) -> float:
        """Deliver what is due; return how long to sleep."""
        try:
            row = store.next_pending(self.sink.name)
        except StateError as exc:
            self._log.error("outbox_read_failed", error=str(exc))
            return 5.0
        if row is None:
            return 30.0
        now = self.clock.time()
        if row.next_attempt > now:
            return row.next_attempt - now
        self.sending_since = self.clock.monotonic()
        try:
            outcome = attempt(
                self.sink, row, now=now, max_attempts=self.max_attempts, rng=self._rng
            )
        finally:
            self.sending_since = None
        self._record(store, row, outcome)
        return 0.0

    def _record(self, store: Store, row: OutboxRow, outcome: Outcome) -> None:
        try:
            record(store, row, outcome, self._log)
        except StateError as exc:
            # Not recorded: the event stays pending and is sent again (at-least-once).
            self._log.error("delivery_not_recorded", event_id=row.event.id, error=str(exc))
            self.stopping.wait(1.0)
        if self.on_outcome is not None:
            self.on_outcome(self.sink.name, outcome.name)


def record(store: Store, row: OutboxRow, outcome: Outcome, logger: Any) -> None:
    """Write an attempt's outcome to the outbox and log it (unit, event id, attempts)."""
    ev = logger.bind(event_id=row.event.id, unit=row.event.unit_path, type=row.event.short_type)
    attempts = row.attempts + 1
    if outcome.delivered:
        store.mark_delivered(row.sink, row.seq)
        ev.info("delivered", attempts=attempts)
        return
    store.mark_failed(
        row.sink,
        row.seq,
        attempts=attempts,
        next_attempt=outcome.next_attempt,
        error=outcome.error,
        dead=outcome.dead,
    )
    level = ev.error if outcome.dead else ev.warning
    level("delivery_" + outcome.name, error=outcome.error, attempts=attempts)


def drain(sink: Sink, store: Store, *, max_attempts: int, clock: Clock) -> bool:
    """Deliver every due event of one sink once, in order (for `modelwatch scan`).

    Stops at the first failure, leaving it and later events in the outbox. True only when
    every event was delivered (nothing failed, nothing went to the dead letters).
    """
    rng = random.Random()
    ok = True
    while (row := store.next_pending(sink.name)) is not None:
        now = clock.time()
        outcome = attempt(sink, row, now=now, max_attempts=max_attempts, rng=rng)
        record(store, row, outcome, log.bind(sink=sink.name))
        if outcome.delivered:
            continue
        if not outcome.dead:
            return False
        ok = False
    return ok
