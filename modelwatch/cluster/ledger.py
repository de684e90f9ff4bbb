"""The ledger: the shared versions of the roots this node holds, as the registry uses them.

Only the settle loop's thread uses it (the registry commits through it; the settle loop
feeds it `Acquired` / `Released` and calls `sweep` each turn), so its cache of stored
histories is always what this node last read or wrote.

The protocol for a shared root (SPEC §12):

* **Take over** (`adopt`): the local store's copy of every unit the backend knows is made
  equal to the backend's; units only the local store knows (a fleet turning the cluster on,
  or a backend that lost its data) are written to the backend first-writer-wins. Events the
  backend lists as undelivered that this store does not have are handed back to be queued
  again, with their ids: delivered by this node whatever happened to the old holder.
* Every event handed back (by `adopt` or `sweep`) and every event committed stays
  *unconfirmed* until `confirm` says it is in the local outbox; one never confirmed is handed
  back again by the next `sweep`, so an event is never acknowledged before it was queued.
* **Commit** (`commit`): the registry decides on the local copy, then writes the unit's new
  history and the event's id and body to the backend as one compare-and-set (expected: the
  revision this node last saw), inside its local transaction. A `Conflict` (someone wrote
  meanwhile) updates the cache and the registry decides again; a lease that is not writable
  or a failing backend raise `Paused`: the unit stays pending, nothing is registered.
* **Acknowledge** (`sweep`): once this store delivered an event to every sink, its id leaves
  the unit's undelivered list and its body is dropped. An event committed to the backend
  whose local commit failed is queued here again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from modelwatch.cluster.backend import (
    Backend,
    BackendUnavailable,
    ClusterError,
    Conflict,
    Lease,
    LeaseLost,
    Stored,
    Write,
)
from modelwatch.cluster.codec import decode_event, encode_event
from modelwatch.cluster.coordinator import Acquired
from modelwatch.events import Event
from modelwatch.state import Store, UnitHistory
from modelwatch.units import describe

log = structlog.get_logger("modelwatch.cluster")

SWEEP_SECONDS = 1.0
NOTHING = Stored(0, None)


class Paused(ClusterError):
    """A shared root cannot register now (its lease is not this node's, or the backend is
    failing): the unit stays pending and is tried again."""


class Leases(Protocol):
    """What the ledger asks the coordinator."""

    def writable(self, root: str) -> Lease | None: ...

    def report_failure(self, root: str, error: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Unconfirmed:
    root: str
    unit: str
    event: Event


class Ledger:
    """See the module docstring. `roots`: the shared roots (paths) of this daemon."""

    def __init__(self, backend: Backend, leases: Leases, roots: Collection[str]) -> None:
        self.backend = backend
        self.leases = leases
        self.roots = frozenset(roots)
        self._held: dict[str, dict[str, Stored]] = {}
        self._unconfirmed: dict[str, _Unconfirmed] = {}
        self._awaiting: dict[str, tuple[str, str]] = {}  # event id -> (root, unit)
        self._next_sweep = 0.0

    def shared(self, root: str) -> bool:
        return root in self.roots

    def stored(self, root: str, unit: str) -> Stored:
        """What the backend has for `unit`, as this node last saw it."""
        return self._held.get(root, {}).get(unit, NOTHING)

    # -- taking over and letting go --------------------------------------------------------

    def adopt(self, store: Store, acquired: Acquired) -> list[Event]:
        """Take over `acquired.root` (see the module docstring); returns the undelivered
        events this store does not have, to be queued again."""
        root, shown = acquired.root, describe(acquired.root)
        units = dict(acquired.units)
        local = store.units.unit_histories(root=shown)
        with store.transaction():
            for unit, stored in units.items():
                if stored.history is not None and local.get(unit) != stored.history:
                    store.units.replace_history(shown, unit, stored.history)
        self._held[root] = units
        self._seed(root, {u: h for u, h in local.items() if units.get(u, NOTHING).history is None})
        return self._undelivered(store, root, units, acquired.bodies)

    def _seed(self, root: str, only_here: Mapping[str, UnitHistory]) -> None:
        """Write histories the backend lacks, first writer wins; on a conflict the stored
        one is kept (and copied here by the registry on the unit's next commit)."""
        if not only_here:
            return
        log.warning(
            "cluster_seeding",
            root=describe(root),
            units=len(only_here),
            note="units known here and not in the cluster backend are written to it",
        )
        for unit, history in sorted(only_here.items()):
            try:
                self._write(root, unit, history, self.stored(root, unit).undelivered, None)
            except Conflict:
                continue
            except Paused:
                return  # the next commit of each unit writes it

    def _undelivered(
        self, store: Store, root: str, units: Mapping[str, Stored], bodies: Mapping[str, bytes]
    ) -> list[Event]:
        ids = [(unit, i) for unit, stored in sorted(units.items()) for i in stored.undelivered]
        known = store.outbox.known([i for _unit, i in ids])
        again: list[Event] = []
        for unit, event_id in ids:
            body = bodies.get(event_id)
            if event_id in known or body is None:
                if body is None and event_id not in known:  # nothing can be sent: acknowledged
                    log.error("cluster_event_missing", unit=unit, event_id=event_id)
                self._awaiting[event_id] = (root, unit)
                continue
            try:
                event = decode_event(body, f"event {event_id}")
            except ClusterError as exc:
                log.error("cluster_event_unreadable", unit=unit, event_id=event_id, error=str(exc))
                self._awaiting[event_id] = (root, unit)
                continue
            self._unconfirmed[event_id] = _Unconfirmed(root, unit, event)
            again.append(event)
        return again

    def drop(self, root: str) -> None:
        """This node no longer holds `root`: forget its cache and what it was waiting for
        (the next holder delivers those events again)."""
        self._held.pop(root, None)
        self._awaiting = {i: w for i, w in self._awaiting.items() if w[0] != root}
        self._unconfirmed = {i: u for i, u in self._unconfirmed.items() if u.root != root}

    # -- committing --------------------------------------------------------------------------

    def commit(
        self, root: str, unit: str, history: UnitHistory | None, event: Event | None
    ) -> None:
        """Write `unit`'s new history (and `event`) to the backend; see the module docstring."""
        undelivered = self.stored(root, unit).undelivered
        if event is not None and event.id not in undelivered:
            undelivered = (*undelivered, event.id)
        self._write(root, unit, history, undelivered, event)
        if event is not None:
            self._unconfirmed[event.id] = _Unconfirmed(root, unit, event)

    def confirm(self, events: Iterable[Event]) -> None:
        """These events are in the local outbox now (their transaction committed): they are
        acknowledged once delivered."""
        for event in events:
            found = self._unconfirmed.pop(event.id, None)
            if found is not None:
                self._awaiting[event.id] = (found.root, found.unit)

    def _write(
        self,
        root: str,
        unit: str,
        history: UnitHistory | None,
        undelivered: tuple[str, ...],
        event: Event | None,
        forget: tuple[str, ...] = (),
    ) -> None:
        lease = self.leases.writable(root)
        if lease is None or root not in self._held:
            raise Paused(f"{describe(root)}: not held by this node, or its backend is failing")
        body = (event.id, encode_event(event)) if event is not None else None
        stored = self.stored(root, unit)
        write = Write(unit, stored.revision, history, undelivered, body, forget)
        try:
            revision = self.backend.commit(lease, write)
        except Conflict as exc:
            self._held[root][unit] = exc.current or NOTHING
            raise
        except LeaseLost as exc:
            raise Paused(str(exc)) from exc
        except BackendUnavailable as exc:
            self.leases.report_failure(root, str(exc))
            raise Paused(str(exc)) from exc
        self._held[root][unit] = Stored(revision, history, undelivered)

    # -- acknowledging ------------------------------------------------------------------------

    def sweep(self, store: Store, now: float, *, force: bool = False) -> list[Event]:
        """At most once a second (or now with `force`): acknowledge what was delivered;
        returns events committed to the backend that this store lacks, to queue again."""
        if now < self._next_sweep and not force:
            return []
        self._next_sweep = now + SWEEP_SECONDS
        again = self._lost_locally(store)
        self._acknowledge(store)
        return again

    def _lost_locally(self, store: Store) -> list[Event]:
        """Events committed to the backend and not (yet) to this store: those whose local
        commit failed, or whose queueing again did. They stay unconfirmed until queued."""
        if not self._unconfirmed:
            return []
        known = store.outbox.known(list(self._unconfirmed))
        self.confirm([u.event for i, u in self._unconfirmed.items() if i in known])
        return [u.event for u in self._unconfirmed.values()]

    def _acknowledge(self, store: Store) -> None:
        if not self._awaiting:
            return
        waiting = store.outbox.undelivered(list(self._awaiting))
        delivered: dict[tuple[str, str], list[str]] = {}
        for event_id, where in self._awaiting.items():
            if event_id not in waiting:
                delivered.setdefault(where, []).append(event_id)
        for (root, unit), ids in delivered.items():
            stored = self.stored(root, unit)
            left = tuple(i for i in stored.undelivered if i not in ids)
            try:
                self._write(root, unit, stored.history, left, None, tuple(ids))
            except Conflict:
                continue  # the cache has what is stored now; acknowledged next time
            except Paused:
                return
            for event_id in ids:
                self._awaiting.pop(event_id, None)
