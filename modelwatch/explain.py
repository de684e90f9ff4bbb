"""`modelwatch explain PATH`: why a model is or is not registered (SPEC §3, §9).

`locate(config, path)` finds the unit a path names or lies in. What is known about it besides
the state store is an `Observation`, from one of two sources:

* `observe_live`: the running daemon's settle loop snapshot (`pending.Snapshot`), read by the
  daemon itself when asked over its control socket or on `/api/units/<path>`;
* `observe_fresh`: one check made now (`checks.diagnose`: the root's availability and the
  readiness checks the daemon runs), for when no daemon runs.

`report` joins either with the store into the JSON of `explain --format json` and
`/api/units/<path>`: the state (`STATES`), a one-line `summary` (the reason first), every
reason, versions, and per-sink delivery. `explain_text.render` prints it on one screen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelwatch import checks
from modelwatch.clock import Clock
from modelwatch.config import Config, RootConfig
from modelwatch.events import rfc3339
from modelwatch.manifest import Manifest, fingerprint
from modelwatch.pending import RootStatus, Snapshot, Waiting, reasons
from modelwatch.reasons import Reason
from modelwatch.registry import unit_name
from modelwatch.rules import RootRules
from modelwatch.state import Settlement, Store, UnitDelivery, UnitRecord
from modelwatch.units import Unit, describe
from modelwatch.units import locate as locate_in_root

STATES = (
    "pending",
    "registered",
    "rejected",
    "removed",
    "root_unavailable",
    "unknown",
    "not_a_unit",
)
SOURCES = {
    "daemon": "the running daemon",
    "check": "the state store and a fresh check",
}
_NEWER_FILES = (
    "these files differ from what the state store last recorded (or were never seen): "
    "they are settled once the daemon runs"
)


@dataclass(frozen=True, slots=True)
class NotAUnit:
    """`path` lies in `root` above its units (a directory that holds units)."""

    root: RootConfig
    path: str


def locate(config: Config, path: str) -> tuple[RootConfig, Unit] | NotAUnit | None:
    """The unit `path` is or lies in; `NotAUnit` above unit depth; None under no root.

    `path` is made absolute; when it is not under a root as given, it is compared again with
    symlinks resolved on both sides (a root configured through a symlink)."""
    given = os.path.abspath(path)
    for candidate in dict.fromkeys([given, os.path.realpath(given)]):
        for root in sorted(config.roots, key=lambda r: len(r.path), reverse=True):
            for base in dict.fromkeys([root.path, os.path.realpath(root.path)]):
                rel = os.path.relpath(candidate, base)
                if rel == ".." or rel.startswith(".." + os.sep):
                    continue
                where = locate_in_root(base, root.unit_depth, candidate, True)
                if where.unit is None:
                    return NotAUnit(root, candidate)
                return root, Unit(root.path, where.unit.name)
    return None


def answer_live(
    config: Config, store: Store, snapshot: Snapshot, path: str, clock: Clock
) -> dict[str, Any] | None:
    """The running daemon's report on `path`; None when it is under no root."""

    def observe(_root: RootConfig, unit: Unit) -> Observation:
        return observe_live(snapshot, unit, clock.monotonic())

    return _answer(config, store, path, clock, observe)


def answer_fresh(config: Config, store: Store, path: str, clock: Clock) -> dict[str, Any] | None:
    """The report on `path` from the store and a fresh check; None when under no root."""

    def observe(root: RootConfig, unit: Unit) -> Observation:
        return observe_fresh(config, store, root, unit, clock)

    return _answer(config, store, path, clock, observe)


def _answer(
    config: Config,
    store: Store,
    path: str,
    clock: Clock,
    observe: Callable[[RootConfig, Unit], Observation],
) -> dict[str, Any] | None:
    where = locate(config, path)
    if where is None or isinstance(where, NotAUnit):
        return None if where is None else not_a_unit(where)
    root, unit = where
    return report(config, store, root, unit, observe(root, unit), clock.time())


@dataclass(frozen=True, slots=True)
class Observation:
    """What a source knows about a unit besides the store."""

    source: str  # a key of SOURCES
    root: RootStatus | None  # None: not known
    pending: bool
    reasons: tuple[Reason, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)  # of a pending unit
    on_disk: str = "present"  # present | empty | missing


def observe_live(snapshot: Snapshot, unit: Unit, now: float) -> Observation:
    """What the daemon's settle loop published about `unit` (`now`: its monotonic clock)."""
    root = snapshot.roots.get(unit.root)
    waiting = snapshot.pending.get(unit)
    if waiting is None:
        return Observation("daemon", root, False, on_disk=_on_disk(unit))
    why = reasons(waiting, snapshot.roots, now)
    return Observation("daemon", root, True, why, _details(waiting, now))


def _details(waiting: Waiting, now: float) -> dict[str, Any]:
    t = waiting.timers
    checked = None if waiting.checked_at is None else round(now - waiting.checked_at, 1)
    return {
        "pending_seconds": round(now - t.first_change, 1),
        "last_change_seconds_ago": round(now - t.last_change, 1),
        "checked_seconds_ago": checked,
        "next_check_in_seconds": round(max(0.0, t.next_check - now), 1),
        "settle_seconds": t.settle_seconds,
        "checking": t.checking,
        "overdue": t.overdue,
        "last_chance": t.last_chance,
    }


def _on_disk(unit: Unit) -> str:
    """present, empty or missing: one directory listing, no deeper (cheap on any tree)."""
    try:
        with os.scandir(unit.path) as entries:
            return "present" if next(entries, None) is not None else "empty"
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError:
        return "present"  # unreadable: the reasons say so when it is pending


def observe_fresh(
    config: Config, store: Store, root: RootConfig, unit: Unit, clock: Clock
) -> Observation:
    """One check of `unit` now, compared with what the store last recorded: files the store
    recorded are settled whatever their age; others are pending, with every reason the
    check found (none: they settle once the daemon runs)."""
    rules = RootRules(root)
    known = store.units.root(describe(root.path))
    ctx = checks.Context(rules, config.metadata, None, known.device if known else None, clock)
    found = checks.diagnose(ctx, unit)
    status = RootStatus(found.availability.available, found.availability.reason)
    manifest, record = found.manifest, store.units.get(unit.display)
    if manifest is None:  # the root is unavailable
        return Observation("check", status, True, found.reasons)
    if not manifest.exists or manifest.empty:
        on_disk = "missing" if not manifest.exists else "empty"
        if record is None or not record.present or record.registered_fp is None:
            return Observation("check", status, False, on_disk=on_disk)
        gone = f"unit {on_disk}; its removed event follows once the daemon runs"
        return Observation("check", status, True, (Reason("no_daemon", gone),), on_disk=on_disk)
    if record is not None and record.present and _recorded(rules, store, record, manifest):
        return Observation("check", status, False)
    why = found.reasons or (Reason("no_daemon", _NEWER_FILES),)
    return Observation("check", status, True, why, _newest(manifest, clock))


def _newest(manifest: Manifest | None, clock: Clock) -> dict[str, Any]:
    if manifest is None or not manifest.entries:
        return {}
    newest = max(e.mtime_ns for e in manifest.entries) / 1e9
    return {"last_change_seconds_ago": round(max(0.0, clock.time() - newest), 1)}


def _recorded(rules: RootRules, store: Store, record: UnitRecord, manifest: Manifest) -> bool:
    """Whether the files scanned are those the store last recorded the unit with: the scan
    digest stored with its fingerprint matches, or (without content digests, which only
    settling computes) the fingerprint is the latest one."""
    if record.scan_digest is not None and rules.keyed(manifest.scan_digest) == record.scan_digest:
        return True
    if rules.config.policy.content_digest != "none":
        return False
    history = store.units.history(record.path)
    return bool(history) and history[-1].fingerprint == fingerprint(manifest.entries)


def report(
    config: Config, store: Store, root: RootConfig, unit: Unit, seen: Observation, now: float
) -> dict[str, Any]:
    """The JSON of `explain` (`now`: wall time)."""
    record = store.units.get(unit.display)
    history = store.units.history(unit.display)
    state = _state(seen, record, history)
    errors = [dict(e) for e in history[-1].errors] if state == "rejected" else []
    return {
        "path": unit.display,
        "root": describe(root.path),
        "name": unit_name(unit, root),
        "state": state,
        "summary": _summary(state, seen, record, errors),
        "reasons": [r.to_dict() for r in seen.reasons],
        "errors": errors,
        "answered_by": seen.source,
        "pending": dict(seen.details) if seen.pending else None,
        "root_state": None if seen.root is None else _root(seen.root),
        "version": record.registered_version if record else None,
        "fingerprint": record.registered_fp if record else None,
        "versions": [_version(s) for s in history],
        "delivery": _delivery(config, store.outbox.for_unit(unit.display), now),
    }


def not_a_unit(where: NotAUnit) -> dict[str, Any]:
    depth = where.root.unit_depth
    below = "one level" if depth == 1 else f"{depth} levels"
    return {
        "path": describe(where.path),
        "root": describe(where.root.path),
        "state": "not_a_unit",
        "summary": f"not a model unit: the units of {describe(where.root.path)} are the "
        f"directories {below} below it",
        "reasons": [],
    }


def _state(seen: Observation, record: UnitRecord | None, history: Sequence[Settlement]) -> str:
    if seen.root is not None and not seen.root.available:
        return "root_unavailable"
    if seen.pending:
        return "pending"
    if record is None or not history:
        return "unknown"
    if not record.present:
        return "removed"
    return history[-1].outcome


def _summary(
    state: str, seen: Observation, record: UnitRecord | None, errors: list[dict[str, Any]]
) -> str:
    if seen.reasons and state in ("pending", "root_unavailable"):
        more = len(seen.reasons) - 1
        return seen.reasons[0].message + (f" (and {more} more)" if more else "")
    if state == "registered" and record is not None:
        return f"registered as version {record.registered_version}"
    if state == "rejected":
        return "rejected: " + "; ".join(_error_line(e) for e in errors[:3])
    if state == "removed":
        last = record.registered_version if record else None
        return "removed" + (f" (its last registered version was {last})" if last else "")
    if seen.on_disk != "present":
        return f"nothing registered: the directory is {seen.on_disk}"
    return "nothing registered and nothing pending: no change seen here yet"


def _error_line(error: Mapping[str, Any]) -> str:
    where = str(error.get("file") or "")
    if where and error.get("line"):
        where += f":{error['line']}:{error.get('column') or 1}"
    pointer = f" (at {error['pointer']})" if error.get("pointer") else ""
    return f"{error.get('code')}: {where + ': ' if where else ''}{error.get('message')}{pointer}"


def _root(status: RootStatus) -> dict[str, Any]:
    return {"available": status.available, "reason": status.reason or None}


def _version(s: Settlement) -> dict[str, Any]:
    return {
        "version": s.version,
        "outcome": s.outcome,
        "fingerprint": s.fingerprint,
        "event_id": s.event_id,
        "settled_at": None if s.settled_at is None else rfc3339(s.settled_at),
        "errors": [e.get("code") for e in s.errors],
    }


def _delivery(config: Config, rows: Sequence[UnitDelivery], now: float) -> list[dict[str, Any]]:
    """Per sink: delivered (nothing left), or its undelivered / discarded events."""
    sinks = list(dict.fromkeys([s.name for s in config.sinks] + [r.sink for r in rows]))
    out = []
    for sink in sinks:
        events = [_event_row(r, now) for r in rows if r.sink == sink]
        undelivered = any(e["state"] in ("pending", "dead") for e in events)
        out.append({"sink": sink, "delivered": not undelivered, "events": events})
    return out


def _event_row(row: UnitDelivery, now: float) -> dict[str, Any]:
    return {
        "event_id": row.event_id,
        "type": row.type.rsplit(".", 1)[-1],
        "state": row.state,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "age_seconds": round(max(0.0, now - row.created), 1),
        "next_attempt_in_seconds": (
            round(max(0.0, row.next_attempt - now), 1) if row.state == "pending" else None
        ),
    }
