"""Versions and events: what a settled, removed or overdue unit means (SPEC §2, §5, §11).

The registry compares a settled unit's fingerprint with the unit table:

* a fingerprint emitted since the unit's last removal: nothing (also across restarts);
* a fingerprint the unit had registered before it was removed: a restore, `registered`
  again with that fingerprint's version and `restored: true`;
* otherwise new: `rejected` when it has problems (no version consumed), else `registered`
  with the next version.

Each event is committed to the outbox, for every sink whose `event_types` includes it, in the
same transaction that records the outcome, with the fingerprint's description (SPEC §13).
Event ids follow SPEC §2 (`events.event_id`).

A shared root's units (SPEC §12) are decided the same way, on the local copy of what the
cluster backend stores (made equal to it first), and the new history and event are written
to the backend in the same local transaction (`cluster.ledger`): a backend that refuses
(another node wrote meanwhile) makes the registry decide again; one that cannot be reached,
or a lease that is not this node's, raises `Paused` and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from modelwatch.cluster.backend import Conflict
from modelwatch.cluster.coordinator import Acquired
from modelwatch.cluster.ledger import Ledger, Paused
from modelwatch.config import RootConfig
from modelwatch.errors import Problem
from modelwatch.events import REGISTERED, REJECTED, REMOVED, Event, make_event
from modelwatch.inspection import Inspection
from modelwatch.state import Store, UnitRecord
from modelwatch.units import Unit, describe

E = TypeVar("E", Event, Event | None)
_CONFLICT_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Route:
    """A sink's name and the event types it wants."""

    sink: str
    event_types: tuple[str, ...]


def unit_name(unit: Unit, root: RootConfig) -> str:
    """`data.name`: the path below the root, or for a depth-0 root its (configured) name."""
    return describe(root.unit_name) if unit.name == "." else unit.display_name


class Registry:
    def __init__(
        self, store: Store, routes: Sequence[Route], host: str, ledger: Ledger | None = None
    ) -> None:
        self.store = store
        self.routes = tuple(routes)
        self.host = host
        self.ledger = ledger

    def _sinks_for(self, event_type: str) -> list[str]:
        return [r.sink for r in self.routes if event_type in r.event_types]

    def settled(
        self,
        unit: Unit,
        root: RootConfig,
        found: Inspection,
        *,
        when: float,
        settled_after: float,
        scan_digest: bytes | None = None,
    ) -> Event | None:
        """The event for a settled unit, committed; None when nothing is new.

        `scan_digest` (of the scan `found` came from) is stored with the outcome: a reconcile
        that finds the same digest on disk knows the unit is unchanged without scanning it.
        """
        return self._shared(
            unit,
            lambda: self._settled(unit, root, found, when, settled_after, scan_digest),
        )

    def _settled(
        self,
        unit: Unit,
        root: RootConfig,
        found: Inspection,
        when: float,
        settled_after: float,
        scan_digest: bytes | None,
    ) -> Event | None:
        path, units = unit.display, self.store.units
        record = units.get(path)
        removals = record.removals if record is not None else 0
        known = units.fingerprint(path, found.fingerprint)
        if known is not None and known.epoch == removals:
            units.set_present(path, True, scan_digest)
            return None
        data = {**found.event_data(), "settled_after_seconds": round(settled_after, 3)}
        if known is not None and known.outcome == "registered":
            event_type, version = REGISTERED, known.version
            data["restored"] = True
        elif found.problems:
            event_type, version = REJECTED, None
            data["errors"] = [p.to_dict() for p in found.problems]
        else:
            event_type, version = REGISTERED, (record.last_version if record else 0) + 1
        data["version"] = version
        event = self._event(event_type, unit, root, when, data, removals)
        with self.store.transaction():
            units.record_settled(
                root=describe(unit.root),
                unit=path,
                fp=found.fingerprint,
                outcome="registered" if event_type == REGISTERED else "rejected",
                version=version,
                event_id=event.id,
                epoch=removals,
                format=found.format,
                model_type=found.model_type,
                scan_digest=scan_digest,
                errors=data.get("errors", ()),
                description=found.description.to_json() if found.description else None,
            )
            self.store.outbox.enqueue(event, self._sinks_for(event_type))
        return event

    def removed(self, unit: Unit, root: RootConfig, *, when: float) -> Event | None:
        """`removed` for a unit that had a registered version and was present; else None."""
        return self._shared(unit, lambda: self._removed(unit, root, when))

    def _removed(self, unit: Unit, root: RootConfig, when: float) -> Event | None:
        record = self.store.units.get(unit.display)
        if record is None or not record.present:
            return None
        registered = (
            self.store.units.fingerprint(record.path, record.registered_fp)
            if record.registered_fp is not None
            else None
        )
        # Nothing registered since the last removal (a later version was only rejected):
        # that removal was already told, and is not told twice.
        if registered is None or registered.epoch != record.removals:
            self.store.units.set_present(record.path, False)
            return None
        event = self._event(REMOVED, unit, root, when, _removed_data(record), record.removals)
        with self.store.transaction():
            self.store.units.record_removed(record.path)
            self.store.outbox.enqueue(event, self._sinks_for(REMOVED))
        return event

    def not_settled(
        self,
        unit: Unit,
        root: RootConfig,
        found: Inspection,
        *,
        when: float,
        waited: float,
        reason: str,
    ) -> Event:
        """`rejected` with code `not_settled`; records no fingerprint and no version."""
        return self._shared(
            unit, lambda: self._not_settled(unit, root, found, when, waited, reason)
        )

    def _not_settled(
        self,
        unit: Unit,
        root: RootConfig,
        found: Inspection,
        when: float,
        waited: float,
        reason: str,
    ) -> Event:
        problem = Problem("not_settled", f"not settled after {waited:.0f} s: {reason}")
        data = {**found.event_data(), "version": None, "settled_after_seconds": None}
        data["errors"] = [problem.to_dict()]
        record = self.store.units.get(unit.display)
        removals = record.removals if record is not None else 0
        event = self._event(REJECTED, unit, root, when, data, removals)
        self.store.outbox.enqueue(event, self._sinks_for(REJECTED))
        return event

    # -- shared roots ------------------------------------------------------------------------

    def _shared(self, unit: Unit, decide: Callable[[], E]) -> E:
        """`decide()`; for a shared root on the stored history, written to the backend in the
        same local transaction (decided again after a conflict)."""
        ledger = self.ledger
        if ledger is None or not ledger.shared(unit.root):
            return decide()
        path, units = unit.display, self.store.units
        for _attempt in range(_CONFLICT_RETRIES):
            stored = ledger.stored(unit.root, path)
            if stored.history is not None and units.unit_history(path) != stored.history:
                units.replace_history(describe(unit.root), path, stored.history)
            try:
                with self.store.transaction():
                    event = decide()
                    after = units.unit_history(path)
                    if event is not None or after != stored.history:
                        ledger.commit(unit.root, path, after, event)
            except Conflict:
                continue
            return event
        raise Paused(f"{path}: its history kept changing in the cluster backend")

    def take_over(self, acquired: Acquired) -> int:
        """Adopt what the backend stores for a root this node holds now, and queue again the
        events it lists as undelivered that this store lacks; returns how many."""
        if self.ledger is None:
            return 0
        return self._requeue(self.ledger.adopt(self.store, acquired))

    def release(self, root: str) -> None:
        """This node no longer holds `root`."""
        if self.ledger is not None:
            self.ledger.drop(root)

    def committed(self, events: Iterable[Event]) -> None:
        """These events' transaction committed (for shared roots: acknowledged once
        delivered)."""
        if self.ledger is not None:
            self.ledger.confirm(events)

    def sweep(self, now: float, *, force: bool = False) -> int:
        """Acknowledge delivered events of shared roots; queue again those only the backend
        has (their local commit failed). Returns how many were queued again."""
        if self.ledger is None:
            return 0
        return self._requeue(self.ledger.sweep(self.store, now, force=force))

    def _requeue(self, events: list[Event]) -> int:
        if events:
            with self.store.transaction():
                for event in events:
                    self.store.outbox.enqueue(event, self._sinks_for(event.type))
            self.committed(events)
        return len(events)

    def _event(
        self,
        event_type: str,
        unit: Unit,
        root: RootConfig,
        when: float,
        data: dict[str, Any],
        removals: int,
    ) -> Event:
        name = unit_name(unit, root)
        data["experiment_id"] = name if root.unit_depth == 1 else None
        data["host"] = self.host
        return make_event(
            event_type,
            root=describe(unit.root),
            unit_path=unit.display,
            subject=unit.display_name,
            name=name,
            when=when,
            data=data,
            removals=removals,
        )


def _removed_data(record: UnitRecord) -> dict[str, Any]:
    """A `removed` event's data: the last registered version and fingerprint, no files."""
    return {
        "model_type": record.registered_model_type,
        "format": record.registered_format,
        "version": record.registered_version,
        "fingerprint": record.registered_fp,
        "files": [],
        "file_count": 0,
        "total_bytes": 0,
        "metadata": None,
        "metadata_ignored": False,
        "metrics": [],
        "model": None,
        "settled_after_seconds": None,
    }
