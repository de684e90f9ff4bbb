"""The unit table: versions, known fingerprints and roots (SPEC §2, §11).

A unit row holds its last version, the version registered now, whether it is present, how
many `removed` events it had (`removals`, part of later event ids) and the scan digest of
its files when its fingerprint was last found known. Each fingerprint a unit settled with is
kept with its outcome, version and `epoch`: the unit's `removals` when it was last emitted,
so the same files after a removal are a restore, not a repeat; and with its description
(JSON), computed once. A root row holds the device
its units were last seen on (an empty mount point on another device is not "every unit
removed") and the availability the daemon last saw.

`UnitHistory` is a unit's row and fingerprints as one value, without what only this node
knows (the scan digest): the unit of exchange with the cluster backend, which holds the
history of shared roots (SPEC §12) while this table keeps a copy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelwatch.state.database import Database


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
    removals: int = 0


@dataclass(frozen=True, slots=True)
class KnownFingerprint:
    """A fingerprint a unit settled with before."""

    outcome: str  # registered | rejected
    version: int | None
    epoch: int  # the unit's removals when this fingerprint was last emitted
    event_id: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """One fingerprint a unit settled with: its outcome, version, and when (wall time; None
    for one recorded before schema 4), with the errors of a rejection."""

    fingerprint: str
    outcome: str  # registered | rejected
    version: int | None
    event_id: str
    settled_at: float | None
    errors: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Registered:
    """The fingerprint a unit is registered with now, and what its `removed` event says."""

    fingerprint: str
    version: int
    format: str | None
    model_type: str | None


@dataclass(frozen=True, slots=True)
class Fingerprinted:
    """A fingerprint in a unit's history: what decides its events (`known`), and when it
    settled with which errors (what `explain` shows)."""

    known: KnownFingerprint
    settled_at: float | None = None
    errors: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class UnitHistory:
    """Everything the registry decides a unit's events from (SPEC §2 versions and ids)."""

    last_version: int
    removals: int
    present: bool
    registered: Registered | None
    fingerprints: Mapping[str, Fingerprinted]


@dataclass(frozen=True, slots=True)
class RootRecord:
    path: str
    device: int | None
    state: str  # available | unavailable
    reason: str | None
    observer: str | None  # inotify | polling | missing, as the daemon last reported
    since: float | None  # wall time the state began


class UnitTable:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, path: str) -> UnitRecord | None:
        rows = self._select("WHERE path = ?", (path,))
        return rows[0] if rows else None

    def all(self, root: str | None = None) -> list[UnitRecord]:
        if root is None:
            return self._select()
        return self._select("WHERE root = ?", (root,))

    def _select(self, where: str = "", args: Sequence[Any] = ()) -> list[UnitRecord]:
        version = self.db.version  # a store of an older schema is read as it is
        digest = "scan_digest" if version >= 2 else "NULL"
        removals = "removals" if version >= 3 else "0"
        columns = (
            "path, root, last_version, registered_fp, registered_version, registered_format,"
            f" registered_model_type, present, {digest}, {removals}"
        )
        sql = f"SELECT {columns} FROM units {where} ORDER BY path"  # noqa: S608 (constants; values bound)
        return [_unit_record(row) for row in self.db.query(sql, args)]

    def fingerprint(self, unit: str, fp: str) -> KnownFingerprint | None:
        epoch = "epoch" if self.db.version >= 3 else "0"
        rows = self.db.query(
            f"SELECT outcome, version, {epoch}, event_id FROM fingerprints"  # noqa: S608
            " WHERE unit = ? AND fingerprint = ?",
            (unit, fp),
        )
        return KnownFingerprint(*rows[0]) if rows else None

    def history(self, unit: str) -> list[Settlement]:
        """Every fingerprint `unit` settled with, oldest first (the last is its latest)."""
        when, errors = ("settled_at", "errors") if self.db.version >= 4 else ("NULL", "NULL")
        rows = self.db.query(
            f"SELECT fingerprint, outcome, version, event_id, {when}, {errors}"  # noqa: S608
            " FROM fingerprints WHERE unit = ? ORDER BY settled_at IS NOT NULL, settled_at,"
            " version, rowid",
            (unit,),
        )
        return [
            Settlement(fp, outcome, version, event_id, at, _errors(errors))
            for fp, outcome, version, event_id, at, errors in rows
        ]

    def description(self, unit: str, fp: str) -> str | None:
        """The description stored with a fingerprint of the unit (JSON), if any."""
        if self.db.version < 5:
            return None
        rows = self.db.query(
            "SELECT description FROM fingerprints WHERE unit = ? AND fingerprint = ?", (unit, fp)
        )
        return rows[0][0] if rows else None

    def fingerprint_facts(self, unit: str, fp: str) -> tuple[bool, str | None]:
        """(`is_current`, `description`) of a fingerprint, in one query (asked once for every
        unit a pool worker examines)."""
        description = "f.description" if self.db.version >= 5 else "NULL"
        rows = self.db.query(
            f"SELECT f.epoch = u.removals, {description} FROM fingerprints f"  # noqa: S608
            " JOIN units u ON u.path = f.unit WHERE f.unit = ? AND f.fingerprint = ?",
            (unit, fp),
        )
        return (bool(rows[0][0]), rows[0][1]) if rows else (False, None)

    def is_current(self, unit: str, fp: str) -> bool:
        """True when `fp` was emitted since the unit's last removal: settling with it again
        emits nothing."""
        rows = self.db.query(
            "SELECT 1 FROM fingerprints f JOIN units u ON u.path = f.unit"
            " WHERE f.unit = ? AND f.fingerprint = ? AND f.epoch = u.removals",
            (unit, fp),
        )
        return bool(rows)

    def record_settled(
        self,
        *,
        root: str,
        unit: str,
        fp: str,
        outcome: str,
        version: int | None,
        event_id: str,
        epoch: int,
        format: str | None = None,
        model_type: str | None = None,
        scan_digest: bytes | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        description: str | None = None,
    ) -> None:
        """Record a settled fingerprint (registered or rejected, with its `errors`) and its
        description (None keeps the one stored); the unit is present."""
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO units(path, root, updated, scan_digest) VALUES(?, ?, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET present = 1, updated = excluded.updated,"
                " scan_digest = excluded.scan_digest",
                (unit, root, time.time(), scan_digest),
            )
            if outcome == "registered":
                db.execute(
                    "UPDATE units SET last_version = MAX(last_version, ?), registered_fp = ?,"
                    " registered_version = ?, registered_format = ?, registered_model_type = ?"
                    " WHERE path = ?",
                    (version, fp, version, format, model_type, unit),
                )
            db.execute(
                "INSERT INTO fingerprints(unit, fingerprint, outcome, version, event_id, epoch,"
                " settled_at, errors, description) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(unit, fingerprint) DO UPDATE SET"
                " outcome = excluded.outcome, version = excluded.version,"
                " event_id = excluded.event_id, epoch = excluded.epoch,"
                " settled_at = excluded.settled_at, errors = excluded.errors,"
                " description = COALESCE(excluded.description, description)",
                (
                    unit,
                    fp,
                    outcome,
                    version,
                    event_id,
                    epoch,
                    time.time(),
                    _json(errors),
                    description,
                ),
            )

    def unit_history(self, unit: str) -> UnitHistory | None:
        """The unit's history, or None when the table does not know it."""
        return self.unit_histories(unit=unit).get(unit)

    def unit_histories(
        self, *, root: str | None = None, unit: str | None = None
    ) -> dict[str, UnitHistory]:
        """The history of every unit of `root` (or of the one `unit`), by unit path."""
        records = self._select("WHERE path = ?", (unit,)) if unit is not None else self.all(root)
        if not records:
            return {}
        epoch = "f.epoch" if self.db.version >= 3 else "0"
        when, errors = ("f.settled_at", "f.errors") if self.db.version >= 4 else ("NULL", "NULL")
        where, args = ("f.unit = ?", (unit,)) if unit is not None else ("u.root = ?", (root,))
        rows = self.db.query(
            f"SELECT f.unit, f.fingerprint, f.outcome, f.version, {epoch}, f.event_id, {when},"  # noqa: S608
            f" {errors} FROM fingerprints f JOIN units u ON u.path = f.unit WHERE {where}",
            args,
        )
        known: dict[str, dict[str, Fingerprinted]] = {}
        for path, fp, outcome, version, fp_epoch, event_id, at, text in rows:
            seen = KnownFingerprint(outcome, version, fp_epoch, event_id)
            known.setdefault(path, {})[fp] = Fingerprinted(seen, at, _errors(text))
        return {r.path: _history(r, known.get(r.path, {})) for r in records}

    def replace_history(self, root: str, unit: str, history: UnitHistory) -> None:
        """Make the table say what `history` says about `unit` (its scan digest is dropped:
        the files are checked again)."""
        registered = history.registered
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO units(path, root, last_version, registered_fp, registered_version,"
                " registered_format, registered_model_type, present, updated, scan_digest,"
                " removals) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT(path) DO"
                " UPDATE SET root = excluded.root, last_version = excluded.last_version,"
                " registered_fp = excluded.registered_fp,"
                " registered_version = excluded.registered_version,"
                " registered_format = excluded.registered_format,"
                " registered_model_type = excluded.registered_model_type,"
                " present = excluded.present, updated = excluded.updated, scan_digest = NULL,"
                " removals = excluded.removals",
                (
                    unit,
                    root,
                    history.last_version,
                    registered.fingerprint if registered else None,
                    registered.version if registered else None,
                    registered.format if registered else None,
                    registered.model_type if registered else None,
                    int(history.present),
                    time.time(),
                    history.removals,
                ),
            )
            db.execute("DELETE FROM fingerprints WHERE unit = ?", (unit,))
            db.executemany(
                "INSERT INTO fingerprints(unit, fingerprint, outcome, version, event_id, epoch,"
                " settled_at, errors) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        unit,
                        fp,
                        f.known.outcome,
                        f.known.version,
                        f.known.event_id,
                        f.known.epoch,
                        f.settled_at,
                        _json(f.errors),
                    )
                    for fp, f in history.fingerprints.items()
                ],
            )

    def record_removed(self, unit: str) -> None:
        """The unit's `removed` event was emitted: absent, one more removal."""
        self.db.execute(
            "UPDATE units SET present = 0, scan_digest = NULL, removals = removals + 1,"
            " updated = ? WHERE path = ?",
            (time.time(), unit),
        )

    def set_present(self, unit: str, present: bool, scan_digest: bytes | None = None) -> None:
        """Mark a unit present or not; `scan_digest` replaces the stored one (None clears)."""
        self.db.execute(
            "UPDATE units SET present = ?, scan_digest = ?, updated = ? WHERE path = ?",
            (int(present), scan_digest, time.time(), unit),
        )

    def set_scan_digests(self, digests: Sequence[tuple[str, bytes | None]]) -> None:
        """Store (unit path, scan digest) pairs of units found unchanged, in one transaction."""
        if digests:
            with self.db.transaction() as db:
                db.executemany(
                    "UPDATE units SET scan_digest = ? WHERE path = ?",
                    [(digest, path) for path, digest in digests],
                )

    # -- roots -------------------------------------------------------------------------------

    def roots(self) -> list[RootRecord]:
        if self.db.version < 3:
            return []
        rows = self.db.query(
            "SELECT path, device, state, reason, observer, since FROM roots ORDER BY path"
        )
        return [RootRecord(*row) for row in rows]

    def root(self, path: str) -> RootRecord | None:
        return next((r for r in self.roots() if r.path == path), None)

    def set_root(
        self,
        path: str,
        *,
        state: str,
        reason: str | None = None,
        observer: str | None = None,
        device: int | None = None,
    ) -> None:
        """Record a root's availability (and the device its units are seen on, when given).

        `since` moves only when the state changes.
        """
        now = time.time()
        self.db.execute(
            "INSERT INTO roots(path, device, state, reason, observer, since, updated)"
            " VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
            " device = COALESCE(excluded.device, device),"
            " since = CASE WHEN state = excluded.state THEN since ELSE excluded.since END,"
            " state = excluded.state, reason = excluded.reason,"
            " observer = COALESCE(excluded.observer, observer), updated = excluded.updated",
            (path, device, state, reason, observer, now, now),
        )

    def set_observer(self, path: str, observer: str) -> bool:
        """Record how a root is watched (`status`); False when the root has no row yet."""
        return self.db.execute("UPDATE roots SET observer = ? WHERE path = ?", (observer, path)) > 0


def _json(errors: Sequence[Mapping[str, Any]]) -> str | None:
    return json.dumps(list(errors), ensure_ascii=False) if errors else None


def _errors(text: str | None) -> tuple[Mapping[str, Any], ...]:
    if not text:
        return ()
    try:
        loaded = json.loads(text)
    except ValueError:  # written by this module; a damaged row is shown as no errors
        return ()
    return tuple(e for e in loaded if isinstance(e, dict)) if isinstance(loaded, list) else ()


def _history(record: UnitRecord, known: Mapping[str, Fingerprinted]) -> UnitHistory:
    registered = None
    if record.registered_fp is not None and record.registered_version is not None:
        registered = Registered(
            record.registered_fp,
            record.registered_version,
            record.registered_format,
            record.registered_model_type,
        )
    return UnitHistory(record.last_version, record.removals, record.present, registered, known)


def _unit_record(row: Sequence[Any]) -> UnitRecord:
    path, root, last, fp, version, fmt, model_type, present, digest, removals = row
    return UnitRecord(
        path, root, last, fp, version, fmt, model_type, bool(present), digest, removals
    )
