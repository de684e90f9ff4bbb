"""The outbox: every committed event, once per sink that wants it, until delivered (SPEC §8).

An event row and one outbox row per interested sink are written in the transaction that
records the unit's outcome, before any sink sees the event. A delivery is recorded by
deleting that sink's row (the event row goes when no sink needs it any more). Rows are
`pending` (due at `next_attempt`), `dead` (given up until `redeliver`) or `discarded`
(given up for good by `modelwatch discard`; kept as the record).

Delivery is ordered per unit, not per sink: the next row for a sink is the oldest due one
whose unit has no earlier undelivered (pending or dead) row on that sink, so an event that
keeps failing holds back only later events of its own unit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from modelwatch.events import Event
from modelwatch.state.database import Database

# A row whose unit has an earlier undelivered row on the same sink waits for it.
_FREE = (
    "NOT EXISTS (SELECT 1 FROM outbox b WHERE b.sink = o.sink AND b.unit = o.unit"
    " AND b.seq < o.seq AND b.state IN ('pending', 'dead'))"
)
_NEXT_DUE = (
    "SELECT o.seq, o.attempts, o.next_attempt, e.body FROM outbox o"  # noqa: S608 (constants)
    " JOIN events e ON e.seq = o.seq WHERE o.sink = ? AND o.state = 'pending'"
    " AND o.next_attempt <= ? AND " + _FREE + " ORDER BY o.seq LIMIT 1"
)
_NEXT_WAKEUP = (
    "SELECT MIN(o.next_attempt) FROM outbox o WHERE o.sink = ?"  # noqa: S608 (constants)
    " AND o.state = 'pending' AND " + _FREE
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    sink: str
    seq: int
    attempts: int
    next_attempt: float
    event: Event


@dataclass(frozen=True, slots=True)
class SinkStats:
    sink: str
    pending: int
    dead: int
    oldest_pending: float | None  # creation time of the oldest pending event
    discarded: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sink: str
    event_id: str
    unit: str
    type: str
    attempts: int
    last_error: str | None
    state: str = "dead"  # or "pending", for rows listed by `discard`


@dataclass(frozen=True, slots=True)
class UnitDelivery:
    """One undelivered (or discarded) event of a unit on one sink, for `explain`."""

    sink: str
    event_id: str
    type: str
    state: str  # pending | dead | discarded
    attempts: int
    next_attempt: float  # wall time of the next attempt (pending)
    last_error: str | None
    created: float  # wall time the event was committed


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    def enqueue(self, event: Event, sinks: Sequence[str]) -> None:
        """Queue `event` for every sink in `sinks` (inside the caller's transaction)."""
        if not sinks:
            return
        with self.db.transaction() as db:
            cur = db.execute(
                "INSERT INTO events(id, unit, type, body, created) VALUES(?, ?, ?, ?, ?)",
                (event.id, event.unit_path, event.type, event.to_json(), time.time()),
            )
            db.executemany(
                "INSERT INTO outbox(sink, seq, unit) VALUES(?, ?, ?)",
                [(s, cur.lastrowid, event.unit_path) for s in sinks],
            )

    def next_due(self, sink: str, now: float) -> OutboxRow | None:
        """The oldest event due for `sink` at `now` whose unit has nothing earlier pending."""
        rows = self.db.query(_NEXT_DUE, (sink, now))
        if not rows:
            return None
        seq, attempts, next_attempt, body = rows[0]
        return OutboxRow(sink, seq, attempts, next_attempt, Event.from_json(body))

    def next_wakeup(self, sink: str) -> float | None:
        """When the next event of `sink` that is not held back by its unit becomes due."""
        rows = self.db.query(_NEXT_WAKEUP, (sink,))
        return rows[0][0] if rows else None

    def mark_delivered(self, sink: str, seq: int) -> None:
        with self.db.transaction() as db:
            db.execute(
                "DELETE FROM outbox WHERE sink = ? AND seq = ? AND state = 'pending'", (sink, seq)
            )
            _drop_orphan_event(db, seq)

    def mark_failed(
        self, sink: str, seq: int, *, attempts: int, next_attempt: float, error: str, dead: bool
    ) -> None:
        """Record a failed attempt (a row discarded meanwhile stays discarded)."""
        self.db.execute(
            "UPDATE outbox SET attempts = ?, next_attempt = ?, last_error = ?, state = ?"
            " WHERE sink = ? AND seq = ? AND state = 'pending'",
            (attempts, next_attempt, error[:2000], "dead" if dead else "pending", sink, seq),
        )

    def retry_now(self) -> None:
        """Make every pending event due now (on start: the sink may have been fixed)."""
        self.db.execute("UPDATE outbox SET next_attempt = 0 WHERE state = 'pending'")

    def redeliver(self, sink: str | None = None, event_id: str | None = None) -> int:
        """Move dead letters back to pending; returns how many."""
        sql = (
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt = 0"
            " WHERE state = 'dead'"
        )
        args: list[Any] = []
        if sink is not None:
            sql += " AND sink = ?"
            args.append(sink)
        if event_id is not None:
            sql += " AND seq IN (SELECT seq FROM events WHERE id = ?)"
            args.append(event_id)
        return self.db.execute(sql, args)

    def discard(
        self, sink: str, *, event_id: str | None = None, unit: str | None = None
    ) -> list[DeadLetter]:
        """Give up for good on undelivered events of `sink`; returns what was discarded.

        `event_id`: that event, dead or pending. `unit`: its dead letters and its pending
        events that already failed at least once (events not tried yet, held back behind
        them, are what the discard lets through).
        """
        where, args = ["o.sink = ?", "o.state IN ('pending', 'dead')"], [sink]
        if event_id is not None:
            where.append("e.id = ?")
            args.append(event_id)
        if unit is not None:
            where += ["e.unit = ?", "(o.state = 'dead' OR o.attempts > 0)"]
            args.append(unit)
        with self.db.transaction() as db:
            found = self._letters(" AND ".join(where), args)
            db.executemany(
                "UPDATE outbox SET state = 'discarded' WHERE sink = ? AND seq IN"
                " (SELECT seq FROM events WHERE id = ?)",
                [(sink, letter.event_id) for letter in found],
            )
        return found

    def sink_stats(self) -> list[SinkStats]:
        rows = self.db.query(
            "SELECT o.sink, SUM(o.state = 'pending'), SUM(o.state = 'dead'),"
            " MIN(CASE WHEN o.state = 'pending' THEN e.created END), SUM(o.state = 'discarded')"
            " FROM outbox o JOIN events e ON e.seq = o.seq GROUP BY o.sink ORDER BY o.sink"
        )
        return [
            SinkStats(s, int(p or 0), int(d or 0), oldest, int(x or 0))
            for s, p, d, oldest, x in rows
        ]

    def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        where, args = "o.state = 'dead'", []
        if sink is not None:
            where += " AND o.sink = ?"
            args.append(sink)
        return self._letters(where, args)

    def _letters(self, where: str, args: Sequence[Any]) -> list[DeadLetter]:
        rows = self.db.query(
            "SELECT o.sink, e.id, e.unit, e.type, o.attempts, o.last_error, o.state"  # noqa: S608
            f" FROM outbox o JOIN events e ON e.seq = o.seq WHERE {where} ORDER BY o.seq",
            args,
        )
        return [DeadLetter(*row) for row in rows]

    def for_unit(self, unit: str) -> list[UnitDelivery]:
        """Every event of `unit` not delivered to some sink (and every one discarded), by sink
        and then in commit order. Delivered events leave no row: absence means delivered."""
        rows = self.db.query(
            "SELECT o.sink, e.id, e.type, o.state, o.attempts, o.next_attempt, o.last_error,"
            " e.created FROM outbox o JOIN events e ON e.seq = o.seq WHERE e.unit = ?"
            " ORDER BY o.sink, o.seq",
            (unit,),
        )
        return [UnitDelivery(*row) for row in rows]

    def sinks(self) -> list[str]:
        """Every sink name that has rows (any state)."""
        return [row[0] for row in self.db.query("SELECT DISTINCT sink FROM outbox ORDER BY sink")]

    def undelivered(self, event_ids: Collection[str]) -> set[str]:
        """Which of `event_ids` some sink here still waits for (a pending or dead row)."""
        return self._ids(
            "SELECT DISTINCT e.id FROM events e JOIN outbox o ON o.seq = e.seq"
            " WHERE o.state IN ('pending', 'dead') AND e.id IN ",
            event_ids,
        )

    def known(self, event_ids: Collection[str]) -> set[str]:
        """Which of `event_ids` this outbox has (undelivered, dead or discarded: an event
        delivered to every sink is gone from it)."""
        return self._ids("SELECT DISTINCT id FROM events WHERE id IN ", event_ids)

    def _ids(self, select: str, event_ids: Collection[str]) -> set[str]:
        found: set[str] = set()
        ids = list(event_ids)
        for start in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = "(" + ", ".join("?" * len(chunk)) + ")"
            found.update(row[0] for row in self.db.query(select + marks, chunk))
        return found

    def has_event(self, event_id: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM events WHERE id = ? LIMIT 1", (event_id,)))


def _drop_orphan_event(db: sqlite3.Connection, seq: int) -> None:
    db.execute(
        "DELETE FROM events WHERE seq = ? AND NOT EXISTS (SELECT 1 FROM outbox WHERE seq = ?)",
        (seq, seq),
    )
