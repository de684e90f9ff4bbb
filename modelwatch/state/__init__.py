"""The durable state store (SPEC §8): the database, the unit table and the outbox.

A settled unit's outcome, its event and one outbox row per interested sink are written in ONE
transaction (`Store.transaction()`), before any sink sees the event; a delivery is recorded
only after the sink succeeded. Every thread opens its own `Store` (one SQLite connection).

    Store
    ├── db      Database   connection, transactions and savepoints, schema migrations
    ├── units   UnitTable  versions, known fingerprints, removals, roots
    └── outbox  Outbox     per-sink delivery queue, dead letters, discards
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from modelwatch.state.database import SCHEMA_VERSION, Database, StateDir
from modelwatch.state.outbox import DeadLetter, Outbox, OutboxRow, SinkStats, UnitDelivery
from modelwatch.state.units import (
    Fingerprinted,
    KnownFingerprint,
    Registered,
    RootRecord,
    Settlement,
    UnitHistory,
    UnitRecord,
    UnitTable,
)

__all__ = [
    "SCHEMA_VERSION",
    "Database",
    "DeadLetter",
    "Fingerprinted",
    "KnownFingerprint",
    "Outbox",
    "OutboxRow",
    "Registered",
    "RootRecord",
    "Settlement",
    "SinkStats",
    "StateDir",
    "Store",
    "UnitDelivery",
    "UnitHistory",
    "UnitRecord",
    "UnitTable",
]


class Store:
    """One connection to the state database and the tables behind it."""

    def __init__(self, db_path: str, *, migrate: bool = True, db: Database | None = None) -> None:
        """Open `db_path` (`migrate=False`: read an older schema as it is; see `Database`)."""
        self.db = db if db is not None else Database(db_path, migrate=migrate)
        self.units = UnitTable(self.db)
        self.outbox = Outbox(self.db)

    @classmethod
    def memory_copy(cls, db_path: str) -> Store:
        """A private in-memory copy (for `scan --dry-run`: decide as usual, record nothing)."""
        return cls(":memory:", db=Database.memory_copy(db_path))

    @property
    def path(self) -> str:
        return self.db.path

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group writes: one transaction, each nested write a savepoint (see `Database`)."""
        with self.db.transaction() as db:
            yield db

    def close(self) -> None:
        self.db.close()
