"""The durable state store: unit versions, known fingerprints and a per-sink outbox (SPEC §8).

One SQLite database in `state_dir` (WAL, `synchronous=FULL`). A settled unit's outcome, its
event and one outbox row per interested sink are written in ONE transaction, before any sink
sees the event; a delivery is recorded only after the sink succeeded, by deleting that sink's
outbox row (the event row goes when no sink needs it any more).

`Store` wraps one connection; every thread opens its own. `StateDir` owns the directory
(created 0700) and the lock file that keeps a second daemon off the same state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from modelwatch.errors import StateError
from modelwatch.events import Event

SCHEMA_VERSION = 2

_SCHEMA_V1 = """
CREATE TABLE units (
    path TEXT PRIMARY KEY,
    root TEXT NOT NULL,
    last_version INTEGER NOT NULL DEFAULT 0,
    registered_fp TEXT,
    registered_version INTEGER,
    registered_format TEXT,
    registered_model_type TEXT,
    present INTEGER NOT NULL DEFAULT 1,
    updated REAL NOT NULL
);
CREATE INDEX units_root ON units(root);
CREATE TABLE fingerprints (
    unit TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    outcome TEXT NOT NULL,
    version INTEGER,
    event_id TEXT NOT NULL,
    PRIMARY KEY (unit, fingerprint)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    unit TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE outbox (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (sink, seq)
);
"""

# 2: the scan digest of a unit's files when its fingerprint was last found known (reconcile
# skips a unit whose files still have that digest).
_MIGRATIONS = {1: _SCHEMA_V1, 2: "ALTER TABLE units ADD COLUMN scan_digest BLOB"}


class StateDir:
    """The state directory: created 0700, holds `state.db` and the daemon's lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db_path = os.path.join(path, "state.db")
        self._lock_fd: int | None = None
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state_dir {path}: cannot create: {exc.strerror}") from exc

    def lock(self) -> None:
        """Take the exclusive lock, or raise StateError if another process holds it."""
        lock_path = os.path.join(self.path, "lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"state_dir {self.path}: cannot open lock: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"state_dir {self.path} is in use by another modelwatch process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@dataclass(frozen=True, slots=True)
class UnitRecord:
    path: str
    root: str
    last_version: int
    registered_fp: str | None
    registered_version: int | None
    registered_format: str | None
    registered_model_type: str | None
    present: bool
    scan_digest: bytes | None = None


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


class Store:
    """One connection to the state database (not shared between threads)."""

    def __init__(self, db_path: str, *, migrate: bool = True) -> None:
        """Open (and create) the store; `migrate=False` leaves an older schema as it is.

        Only the process holding the state directory's lock may migrate: a read-only command
        (`status`, `redeliver`) run next to a daemon of the previous version must not change
        the tables under it.
        """
        self._in_batch = False
        self._version = 0
        try:
            # Owned by one thread at a time (it may be created by another before handing over).
            self._db = sqlite3.connect(
                db_path, timeout=30, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StateError(f"{db_path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate(migrate)
        except (sqlite3.Error, StateError) as exc:
            self._db.close()
            if isinstance(exc, StateError):
                raise
            raise StateError(f"{db_path}: {exc}") from exc
        self.path = db_path

    @classmethod
    def memory_copy(cls, db_path: str) -> Store:
        """A private in-memory copy (for `scan --dry-run`: decide as usual, record nothing)."""
        store = cls(":memory:")
        if os.path.exists(db_path):
            try:
                source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
                try:
                    source.backup(store._db)
                finally:
                    source.close()
                store._migrate(True)  # the copy has the file's schema, maybe an older one
            except (sqlite3.Error, StateError) as exc:
                store.close()
                raise StateError(f"{db_path}: {exc}") from exc
        return store

    def close(self) -> None:
        self._db.close()

    def _migrate(self, migrate: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state schema {version} is newer than this modelwatch ({SCHEMA_VERSION})"
            )
        if version and not migrate:
            self._version = version
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction() as db:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
        self._version = SCHEMA_VERSION

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside into one transaction (one fsync for many units).

        Each write inside is a savepoint: a failing one is undone alone and raises as usual;
        the rest commit together at the end, or (StateError from here) none of them does.
        """
        if self._in_batch:
            yield
            return
        with self._transaction():
            self._in_batch = True
            try:
                yield
            finally:
                self._in_batch = False

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._in_batch:
            with self._savepoint() as db:
                yield db
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StateError(f"state store: {exc}") from exc

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        # SQLite rolls a whole transaction back by itself on some errors (disk full, I/O):
        # nothing may then be written outside the batch, one statement at a time.
        if not self._db.in_transaction:
            raise StateError("state store: the batch transaction was rolled back")
        try:
            self._db.execute("SAVEPOINT unit")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK TO unit")
                    self._db.execute("RELEASE unit")
                raise
            self._db.execute("RELEASE unit")
        except sqlite3.Error as exc:
            raise StateError(f"state store: {exc}") from exc

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state store: {exc}") from exc

    # -- units and fingerprints ------------------------------------------------------------

    def unit(self, path: str) -> UnitRecord | None:
        rows = self._units("WHERE path = ?", (path,))
        return rows[0] if rows else None

    def units(self, root: str | None = None) -> list[UnitRecord]:
        if root is None:
            return self._units()
        return self._units("WHERE root = ?", (root,))

    def _units(self, where: str = "", args: Sequence[Any] = ()) -> list[UnitRecord]:
        digest = "scan_digest" if self._version >= 2 else "NULL"  # a schema 1 store, unmigrated
        columns = (
            "path, root, last_version, registered_fp, registered_version, registered_format,"
            f" registered_model_type, present, {digest}"
        )
        sql = f"SELECT {columns} FROM units {where} ORDER BY path"  # noqa: S608 (constants; values bound)
        return [_unit_record(row) for row in self._query(sql, args)]

    def knows(self, unit_path: str, fp: str) -> bool:
        sql = "SELECT 1 FROM fingerprints WHERE unit = ? AND fingerprint = ?"
        return bool(self._query(sql, (unit_path, fp)))

    def record_settled(
        self,
        *,
        root: str,
        event: Event,
        outcome: str,
        sinks: Sequence[str],
        scan_digest: bytes | None = None,
    ) -> None:
        """Record a settled fingerprint (registered or rejected) with its event, atomically.

        `scan_digest`: that of the scan the fingerprint came from (None: no shortcut).
        """
        data = event.data
        unit, fp, version = event.unit_path, str(data["fingerprint"]), data.get("version")
        with self._transaction() as db:
            db.execute(
                "INSERT INTO units(path, root, updated, scan_digest) VALUES(?, ?, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET present = 1, updated = excluded.updated,"
                " scan_digest = excluded.scan_digest",
                (unit, root, time.time(), scan_digest),
            )
            if outcome == "registered":
                db.execute(
                    "UPDATE units SET last_version = ?, registered_fp = ?, registered_version = ?,"
                    " registered_format = ?, registered_model_type = ? WHERE path = ?",
                    (version, fp, version, data.get("format"), data.get("model_type"), unit),
                )
            db.execute(
                "INSERT OR IGNORE INTO fingerprints VALUES(?, ?, ?, ?, ?)",
                (unit, fp, outcome, version, event.id),
            )
            self._enqueue(db, event, sinks)

    def record_event(self, event: Event, sinks: Sequence[str], *, removed: bool = False) -> None:
        """Queue an event that changes no version (removed, not_settled), atomically."""
        with self._transaction() as db:
            if removed:
                db.execute(
                    "UPDATE units SET present = 0, scan_digest = NULL, updated = ? WHERE path = ?",
                    (time.time(), event.unit_path),
                )
            self._enqueue(db, event, sinks)

    def set_present(self, unit_path: str, present: bool, scan_digest: bytes | None = None) -> None:
        """Mark a unit present or not; `scan_digest` replaces the stored one (None clears)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE units SET present = ?, scan_digest = ?, updated = ? WHERE path = ?",
                (int(present), scan_digest, time.time(), unit_path),
            )

    def set_scan_digests(self, digests: Sequence[tuple[str, bytes | None]]) -> None:
        """Store (unit path, scan digest) pairs of units found unchanged, in one transaction."""
        if digests:
            with self._transaction() as db:
                db.executemany(
                    "UPDATE units SET scan_digest = ? WHERE path = ?",
                    [(digest, path) for path, digest in digests],
                )

    @staticmethod
    def _enqueue(db: sqlite3.Connection, event: Event, sinks: Sequence[str]) -> None:
        if not sinks:
            return
        cur = db.execute(
            "INSERT INTO events(id, unit, type, body, created) VALUES(?, ?, ?, ?, ?)",
            (event.id, event.unit_path, event.type, event.to_json(), time.time()),
        )
        db.executemany(
            "INSERT INTO outbox(sink, seq) VALUES(?, ?)", [(s, cur.lastrowid) for s in sinks]
        )

    # -- outbox ------------------------------------------------------------------------------

    def next_pending(self, sink: str) -> OutboxRow | None:
        """The oldest undelivered event for `sink` (delivery is strictly in order)."""
        rows = self._query(
            "SELECT o.seq, o.attempts, o.next_attempt, e.body FROM outbox o"
            " JOIN events e ON e.seq = o.seq WHERE o.sink = ? AND o.state = 'pending'"
            # a unit with a dead letter waits for it (redeliver keeps version order)
            " AND NOT EXISTS (SELECT 1 FROM outbox d JOIN events de ON de.seq = d.seq"
            "  WHERE d.sink = o.sink AND d.state = 'dead' AND de.unit = e.unit AND d.seq < o.seq)"
            " ORDER BY o.seq LIMIT 1",
            (sink,),
        )
        if not rows:
            return None
        seq, attempts, next_attempt, body = rows[0]
        return OutboxRow(sink, seq, attempts, next_attempt, Event.from_json(body))

    def mark_delivered(self, sink: str, seq: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE sink = ? AND seq = ?", (sink, seq))
            db.execute(
                "DELETE FROM events WHERE seq = ? AND NOT EXISTS"
                " (SELECT 1 FROM outbox WHERE seq = ?)",
                (seq, seq),
            )

    def mark_failed(
        self, sink: str, seq: int, *, attempts: int, next_attempt: float, error: str, dead: bool
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = ?, next_attempt = ?, last_error = ?, state = ?"
                " WHERE sink = ? AND seq = ?",
                (attempts, next_attempt, error[:2000], "dead" if dead else "pending", sink, seq),
            )

    def retry_now(self) -> None:
        """Make every pending event due now (on start: the sink may have been fixed)."""
        with self._transaction() as db:
            db.execute("UPDATE outbox SET next_attempt = 0 WHERE state = 'pending'")

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
        with self._transaction() as db:
            return db.execute(sql, args).rowcount

    def sink_stats(self) -> list[SinkStats]:
        rows = self._query(
            "SELECT o.sink, SUM(o.state = 'pending'), SUM(o.state = 'dead'),"
            " MIN(CASE WHEN o.state = 'pending' THEN e.created END)"
            " FROM outbox o JOIN events e ON e.seq = o.seq GROUP BY o.sink ORDER BY o.sink"
        )
        return [SinkStats(s, int(p or 0), int(d or 0), oldest) for s, p, d, oldest in rows]

    def dead_letters(self, sink: str | None = None) -> list[tuple[str, str, str | None]]:
        """(sink, event id, last error) of every dead letter."""
        sql = (
            "SELECT o.sink, e.id, o.last_error FROM outbox o JOIN events e ON e.seq = o.seq"
            " WHERE o.state = 'dead'"
        )
        args: tuple[str, ...] = ()
        if sink is not None:
            sql += " AND o.sink = ?"
            args = (sink,)
        return [tuple(r) for r in self._query(sql + " ORDER BY o.seq", args)]


def _unit_record(row: Sequence[Any]) -> UnitRecord:
    path, root, last, fp, version, fmt, model_type, present, digest = row
    return UnitRecord(path, root, last, fp, version, fmt, model_type, bool(present), digest)
