"""Delivery decisions: which failures retry for ever, which go to the dead letters, and which
event a worker sends next (SPEC §8)."""

from __future__ import annotations

import random
from pathlib import Path

from modelwatch.delivery import UNCLASSIFIED_ATTEMPTS, attempt, drain, record
from modelwatch.errors import SinkError
from modelwatch.events import Event
from modelwatch.state import OutboxRow, StateDir, Store
from modelwatch.testing import FakeClock, MemorySink, sample_event


class Broken:
    """A sink with a bug (or a deterministic local error): it raises something unclassified."""

    name = "broken"

    def send(self, event: Event) -> None:
        raise OSError(36, "File name too long")

    def close(self) -> None:
        pass


class Down:
    """A sink whose server is down: a transport failure, retried for ever."""

    name = "down"

    def send(self, event: Event) -> None:
        raise SinkError("connection refused")

    def close(self) -> None:
        pass


def _row(attempts: int) -> OutboxRow:
    return OutboxRow("s", 1, attempts, 0.0, sample_event())


def test_an_unclassified_failure_is_dead_lettered_after_ten_attempts() -> None:
    """A bug in a sink is not retried for ever: dead after 10 attempts (or max_attempts)."""
    rng = random.Random(0)
    nine = attempt(Broken(), _row(UNCLASSIFIED_ATTEMPTS - 2), now=0, max_attempts=0, rng=rng)
    assert not nine.dead and "OSError" in nine.error
    tenth = attempt(Broken(), _row(UNCLASSIFIED_ATTEMPTS - 1), now=0, max_attempts=0, rng=rng)
    assert tenth.dead and "after 10 attempts" in tenth.error
    assert attempt(Broken(), _row(2), now=0, max_attempts=3, rng=rng).dead


def test_a_transport_failure_retries_without_limit_by_default() -> None:
    """Connection refused, timeouts, 5xx: still retried after a thousand attempts."""
    outcome = attempt(Down(), _row(1000), now=0, max_attempts=0, rng=random.Random(0))
    assert not outcome.dead and outcome.next_attempt > 0
    assert attempt(Down(), _row(4), now=0, max_attempts=5, rng=random.Random(0)).dead


def test_a_failing_unit_holds_back_only_its_own_later_events(tmp_path: Path) -> None:
    """Unit a's v1 keeps failing: b's events go out, a's v2 waits; once a's v1 is
    delivered, a's v2 follows."""
    store = Store(StateDir(str(tmp_path)).db_path)
    try:
        events = [
            sample_event("a", 1),
            sample_event("a", 2),
            sample_event("b", 1),
            sample_event("b", 2),
        ]
        for event in events:
            store.outbox.enqueue(event, ["memory"])
        sink, clock = MemorySink(), FakeClock()
        sink.fail_next(1, retry_after=60)
        assert not drain(sink, store, max_attempts=0, clock=clock)
        assert [(e.subject, e.data["version"]) for e in sink.events] == [("b", 1), ("b", 2)]
        assert store.outbox.next_wakeup("memory") == clock.time() + 60
        clock.advance(60)
        assert drain(sink, store, max_attempts=0, clock=clock)
        assert [(e.subject, e.data["version"]) for e in sink.events[2:]] == [("a", 1), ("a", 2)]
    finally:
        store.close()


def test_a_discarded_event_stays_discarded_when_its_attempt_ends(tmp_path: Path) -> None:
    """`discard` during an attempt in flight: the attempt's failure does not bring the event
    back to pending, and the unit's next event flows."""
    store = Store(StateDir(str(tmp_path)).db_path)
    try:
        store.outbox.enqueue(sample_event("a", 1), ["s"])
        store.outbox.enqueue(sample_event("a", 2), ["s"])
        row = store.outbox.next_due("s", 0)
        assert row is not None
        (gone,) = store.outbox.discard("s", event_id=row.event.id)
        failed = attempt(Down(), row, now=0, max_attempts=0, rng=random.Random(0))
        record(store, row, failed, _Quiet())
        nxt = store.outbox.next_due("s", 10_000)
        assert nxt is not None and nxt.event.data["version"] == 2
        assert gone.state == "pending" and gone.event_id == row.event.id
    finally:
        store.close()


class _Quiet:
    def bind(self, **_: object) -> _Quiet:
        return self

    def info(self, *_: object, **__: object) -> None:
        pass

    warning = error = info
