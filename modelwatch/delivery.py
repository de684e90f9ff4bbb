"""Delivering the outbox: one worker thread per sink, retries with backoff (SPEC §8).

A worker sends its sink's oldest due event whose unit has no earlier undelivered event on
that sink (so per unit, events go out in version order, and a unit whose event keeps failing
holds back only itself), and records the outcome. Retry timing is the pure function
`retry_delay`. An event goes to the dead letters when the sink says the failure is permanent
(`PermanentSinkError`), after `max_attempts`, or, for a failure the sink did not classify as
a transport error (`SinkError`) - a bug, a deterministic local error - after at most
`UNCLASSIFIED_ATTEMPTS`; `modelwatch redeliver` puts dead letters back, `modelwatch discard`
gives up on them for good.
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
from modelwatch.progress import Heartbeat
from modelwatch.sinks import Sink
from modelwatch.state import OutboxRow, Store

log = structlog.get_logger("modelwatch.delivery")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
RETRY_AFTER_CAP = 3600.0
UNCLASSIFIED_ATTEMPTS = 10


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
        transport = isinstance(exc, SinkError)
        error = str(exc) or type(exc).__name__
        if not transport:
            error = f"{type(exc).__name__}: {error}"
            limit = min(max_attempts or UNCLASSIFIED_ATTEMPTS, UNCLASSIFIED_ATTEMPTS)
        else:
            limit = max_attempts
        if limit and attempts >= limit:
            return Outcome(False, dead=True, error=f"{error} (after {attempts} attempts)")
        retry_after = exc.retry_after if isinstance(exc, SinkError) else None
        # Strictly later than now: a one-shot drain must not pick the same event again.
        delay = max(retry_delay(attempts, retry_after, rng), 0.001)
        return Outcome(False, next_attempt=now + delay, error=error)
    return Outcome(True)


class DeliveryWorker(threading.Thread):
    """Delivers one sink's outbox until stopped; `finish(deadline)` delivers what is due
    first (a stop delivers the last events within `shutdown_timeout_seconds`)."""

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
        self.heartbeat = Heartbeat(self.name, clock)
        self.sending_since: float | None = None  # set while a send is in progress
        self._finish_by: float | None = None  # monotonic deadline of a finishing stop
        self._rng = random.Random()
        self._log = log.bind(sink=sink.name)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def finish(self, deadline: float) -> None:
        """Deliver every event due now (nothing waiting for a retry), then stop; give up at
        `deadline` (monotonic)."""
        self._finish_by = deadline
        self.wake.set()

    def run(self) -> None:
        store = Store(self.db_path)
        try:
            with self.heartbeat.attached():
                while not self.stopping.is_set():
                    self.heartbeat.beat()
                    self.wake.clear()
                    pause = self._step(store)
                    if self._finish_by is not None and (
                        pause > 0 or self.clock.monotonic() >= self._finish_by
                    ):
                        return
                    # at most a second between heartbeats, even while idle or backing off
                    self.wake.wait(min(pause, 1.0))
        finally:
            store.close()
            self.sink.close()

    def _step(self, store: Store) -> float:
        """Deliver the next due event; return how long to sleep (0: look again at once)."""
        now = self.clock.time()
        try:
            row = store.outbox.next_due(self.sink.name, now)
            if row is None:
                wakeup = store.outbox.next_wakeup(self.sink.name)
                return 30.0 if wakeup is None else max(0.001, wakeup - now)
        except StateError as exc:
            self._log.error("outbox_read_failed", error=str(exc))
            return 5.0
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
        store.outbox.mark_delivered(row.sink, row.seq)
        ev.info("delivered", attempts=attempts)
        return
    store.outbox.mark_failed(
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
    """Try every due event of one sink once, per unit in order (for `modelwatch scan`).

    A failed event stays in the outbox and holds back the later events of its unit; other
    units go on. True only when every event was delivered (nothing failed, nothing went to
    the dead letters).
    """
    rng = random.Random()
    ok = True
    now = clock.time()
    while (row := store.outbox.next_due(sink.name, now)) is not None:
        outcome = attempt(sink, row, now=now, max_attempts=max_attempts, rng=rng)
        record(store, row, outcome, log.bind(sink=sink.name))
        ok = ok and outcome.delivered
    return ok
