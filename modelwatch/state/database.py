"""The state database: one SQLite file in `state_dir` (WAL, `synchronous=FULL`).

`StateDir` owns the directory (0700, its files 0600, on every start, whatever modes it had:
an emptyDir is 0777) and the lock file that keeps a second daemon off the same state.
`Database` wraps one connection (every thread opens its own): transactions, savepoints and
schema migrations. The tables themselves are read and written by `units.UnitTable` and
`outbox.Outbox`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from modelwatch.errors import StateError

SCHEMA_VERSION = 5

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
#    skips a unit whose files still have that digest).
# 3: `removals` (how many `removed` events a unit had: part of later event ids, SPEC §2) and
#    each fingerprint's `epoch` (the removals count when it was last emitted: a fingerprint
#    from before a removal is a restore, SPEC §11); units removed under schema 2 count one
#    removal. `roots`: the device a root's units were last seen on and its availability.
#    The outbox names each row's unit (delivery is ordered per unit, SPEC §8) and keeps
#    discarded rows as the record of what was given up.
_SCHEMA_V3 = """
ALTER TABLE units ADD COLUMN removals INTEGER NOT NULL DEFAULT 0;
UPDATE units SET removals = 1 WHERE present = 0 AND registered_fp IS NOT NULL;
ALTER TABLE fingerprints ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE TABLE roots (
    path TEXT PRIMARY KEY,
    device INTEGER,
    state TEXT NOT NULL DEFAULT 'available',
    reason TEXT,
    observer TEXT,
    since REAL,
    updated REAL
);
ALTER TABLE outbox ADD COLUMN unit TEXT NOT NULL DEFAULT '';
UPDATE outbox SET unit = (SELECT e.unit FROM events e WHERE e.seq = outbox.seq);
CREATE INDEX outbox_unit ON outbox(sink, unit, seq);
"""

# 4: when each fingerprint settled and, for a rejected one, its errors (JSON): `explain` names
#    the rule a rejected unit broke after its event left the outbox.
_SCHEMA_V4 = """
ALTER TABLE fingerprints ADD COLUMN settled_at REAL;
ALTER TABLE fingerprints ADD COLUMN errors TEXT;
"""

# 5: each fingerprint's description (`modelwatch.description`, JSON): computed once, when the
#    fingerprint is new, and carried again by a restore's event (SPEC §13).
_MIGRATIONS = {
    1: _SCHEMA_V1,
    2: "ALTER TABLE units ADD COLUMN scan_digest BLOB",
    3: _SCHEMA_V3,
    4: _SCHEMA_V4,
    5: "ALTER TABLE fingerprints ADD COLUMN description TEXT",
}


def _owner_only(path: str, mode: int) -> None:
    """chmod `path` to `mode` unless it already has it (an existing state_dir may be 0777)."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StateError(f"state_dir {path}: cannot make it owner-only: {exc.strerror}") from exc


class StateDir:
    """The state directory: 0700, holds `state.db` (0600) and the daemon's lock."""

    FILES = ("state.db", "state.db-wal", "state.db-shm", "lock")

    def __init__(self, path: str) -> None:
        self.path = path
        self.db_path = os.path.join(path, "state.db")
        self._lock_fd: int | None = None
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state_dir {path}: cannot create: {exc.strerror}") from exc

    def secure(self) -> None:
        """Make the directory 0700 and every file in it 0600 (the lock holder does this)."""
        _owner_only(self.path, 0o700)
        for name in self.FILES:
            _owner_only(os.path.join(self.path, name), 0o600)

    def lock(self) -> None:
        """Take the exclusive lock, or raise StateError if another process holds it; then
        make the directory and its files owner-only."""
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
        self.secure()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class WriterQueue:
    """A reentrant lock that writers get in the order they asked for it.

    SQLite makes a writer that finds the database locked poll in growing sleeps (up to 100 ms
    each), and so does a plain lock in effect: the thread that just released it takes it again
    before a waiter wakes. A thread committing in quick succession (the settle loop in a
    burst) so starved the delivery threads for a whole burst: no event went out until the last
    one was committed. In this queue a waiting writer runs as soon as the writer before it
    commits. A waiter that is interrupted (a signal in the main thread) gives up its turn.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose holder may write
        self._abandoned: set[int] = set()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._next
            self._next += 1
            try:
                while self._serving != ticket:
                    self._cond.wait()
            except BaseException:
                self._abandoned.add(ticket)
                self._advance()
                raise
            self._owner, self._depth = me, 1

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._advance()

    def _advance(self) -> None:
        """Skip the turns of waiters that gave up; wake the others to look (lock held)."""
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


_WRITERS: dict[str, WriterQueue] = {}
_WRITERS_GUARD = threading.Lock()


def _writer_queue(db_path: str) -> WriterQueue:
    """The queue every connection of this process to `db_path` joins around a write (other
    processes, `discard` or `redeliver`, still meet SQLite's busy timeout)."""
    if db_path == ":memory:":  # a private database shares nothing
        return WriterQueue()
    with _WRITERS_GUARD:
        return _WRITERS.setdefault(os.path.realpath(db_path), WriterQueue())


class Database:
    """One connection to the state database (not shared between threads)."""

    def __init__(self, db_path: str, *, migrate: bool = True) -> None:
        """Open (and create) the database; `migrate=False` leaves an older schema as it is.

        Only the process holding the state directory's lock may migrate: a command run next
        to a daemon of the previous version (`status`, `redeliver`) must not change the tables
        under it. A new file is created 0600.
        """
        self.path = db_path
        self.version = 0
        self._depth = 0  # nesting of `transaction()`: 0 none, 1 the transaction, >1 savepoints
        self._writer = _writer_queue(db_path)
        try:
            if db_path != ":memory:" and not os.path.exists(db_path):
                os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # Owned by one thread at a time (it may be created by another before handing over).
            self._db = sqlite3.connect(
                db_path, timeout=30, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
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

    @classmethod
    def memory_copy(cls, db_path: str) -> Database:
        """A private in-memory copy (for `scan --dry-run`: decide as usual, record nothing)."""
        db = cls(":memory:")
        if os.path.exists(db_path):
            try:
                source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
                try:
                    source.backup(db._db)
                finally:
                    source.close()
                db._migrate(True)  # the copy has the file's schema, maybe an older one
            except (sqlite3.Error, StateError) as exc:
                db.close()
                raise StateError(f"{db_path}: {exc}") from exc
        return db

    def close(self) -> None:
        self._db.close()

    def _migrate(self, migrate: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state schema {version} is newer than this modelwatch ({SCHEMA_VERSION})"
            )
        if version and not migrate:
            self.version = version
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
        self.version = SCHEMA_VERSION

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; nested, a savepoint inside it.

        Writes nested inside an outer transaction (a batch of units settling together) are
        each undone alone when they raise, and commit with the outer one: one fsync for many
        units. A StateError from the outermost level means none of it was stored.
        """
        if self._depth:
            with self._savepoint() as db:
                yield db
            return
        with self._writer:
            yield from self._transaction()

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StateError(f"state store: {exc}") from exc

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        # SQLite rolls a whole transaction back by itself on some errors (disk full, I/O):
        # nothing may then be written outside it, one statement at a time.
        if not self._db.in_transaction:
            raise StateError("state store: the batch transaction was rolled back")
        name = f"sp{self._depth}"
        self._depth += 1
        try:
            self._db.execute(f"SAVEPOINT {name}")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute(f"ROLLBACK TO {name}")
                    self._db.execute(f"RELEASE {name}")
                raise
            self._db.execute(f"RELEASE {name}")
        except sqlite3.Error as exc:
            raise StateError(f"state store: {exc}") from exc
        finally:
            self._depth -= 1

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"state store: {exc}") from exc

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One write in its own transaction (or savepoint); returns the rows changed."""
        with self.transaction() as db:
            return db.execute(sql, args).rowcount
