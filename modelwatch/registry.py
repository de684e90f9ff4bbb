"""Versions and events: what a settled, removed or overdue unit means (SPEC §2, §5).

The registry compares a settled unit's fingerprint with the state store: a fingerprint the unit
already had (registered or rejected) emits nothing; a new one is `rejected` when it has
problems (no version consumed) or `registered` with the next version. Each event is committed
to the store's outbox, for every sink whose `event_types` includes it, in the same transaction
that records the outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelwatch.errors import Problem
from modelwatch.events import REGISTERED, REJECTED, REMOVED, Event, make_event
from modelwatch.inspection import Inspection
from modelwatch.state import Store
from modelwatch.units import Unit, describe


@dataclass(frozen=True, slots=True)
class Route:
    """A sink's name and the event types it wants."""

    sink: str
    event_types: tuple[str, ...]


class Registry:
    def __init__(self, store: Store, routes: Sequence[Route], host: str) -> None:
        self.store = store
        self.routes = tuple(routes)
        self.host = host

    def _sinks_for(self, event_type: str) -> list[str]:
        return [r.sink for r in self.routes if event_type in r.event_types]

    def _base(self, unit: Unit, depth: int) -> dict[str, Any]:
        return {
            "experiment_id": unit.display_name if depth == 1 else None,
            "host": self.host,
        }

    def settled(
        self,
        unit: Unit,
        depth: int,
        found: Inspection,
        *,
        when: float,
        settled_after: float,
        scan_digest: bytes | None = None,
    ) -> Event | None:
        """The event for a settled unit, committed; None when its fingerprint is known.

        `scan_digest` (of the scan `found` came from) is stored with the outcome: a reconcile
        that finds the same digest on disk knows the unit is unchanged without scanning it.
        """
        path = unit.display
        if self.store.knows(path, found.fingerprint):
            self.store.set_present(path, True, scan_digest)
            return None
        record = self.store.unit(path)
        data = {**self._base(unit, depth), **found.event_data()}
        data["settled_after_seconds"] = round(settled_after, 3)
        if found.problems:
            event_type, outcome = REJECTED, "rejected"
            data["version"] = None
            data["errors"] = [p.to_dict() for p in found.problems]
        else:
            event_type, outcome = REGISTERED, "registered"
            data["version"] = (record.last_version if record else 0) + 1
        event = self._event(event_type, unit, when, data)
        self.store.record_settled(
            root=describe(unit.root),
            event=event,
            outcome=outcome,
            sinks=self._sinks_for(event_type),
            scan_digest=scan_digest,
        )
        return event

    def removed(self, unit: Unit, depth: int, *, when: float) -> Event | None:
        """`removed` for a unit that had a registered version and was present; else None."""
        record = self.store.unit(unit.display)
        if record is None or not record.present:
            return None
        if record.registered_fp is None:
            self.store.set_present(record.path, False)
            return None
        data = {
            **self._base(unit, depth),
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
            "settled_after_seconds": None,
        }
        event = self._event(REMOVED, unit, when, data)
        self.store.record_event(event, self._sinks_for(REMOVED), removed=True)
        return event

    def not_settled(
        self,
        unit: Unit,
        depth: int,
        found: Inspection,
        *,
        when: float,
        waited: float,
        reason: str,
    ) -> Event:
        """`rejected` with code `not_settled`; records no fingerprint and no version."""
        data = {**self._base(unit, depth), **found.event_data()}
        data["version"] = None
        data["settled_after_seconds"] = None
        problem = Problem("not_settled", f"not settled after {waited:.0f} s: {reason}")
        data["errors"] = [problem.to_dict()]
        event = self._event(REJECTED, unit, when, data)
        self.store.record_event(event, self._sinks_for(REJECTED))
        return event

    @staticmethod
    def _event(event_type: str, unit: Unit, when: float, data: dict[str, Any]) -> Event:
        return make_event(
            event_type,
            root=describe(unit.root),
            unit_path=unit.display,
            name=unit.display_name,
            when=when,
            data=data,
        )
