"""What the settle loop shows other threads: its pending units and roots, as an immutable
snapshot.

The settle loop alone owns pending units (`settle.Settler`). At the end of every turn in which
anything about them changed it replaces `SettleLoop.snapshot` with a new `Snapshot`; a reader
(the `explain` endpoint, the status page) takes that one reference and reads it at leisure:
no lock of the loop is ever taken, and nothing in a snapshot changes after it is published.

A `Waiting` entry holds the settler's own times for the unit (`settle.Timers`) and the reasons
its last check found (`findings`, with the time of that check). `reasons(waiting, roots, now)`
turns it into every reason the unit is not settled at `now`: the quiet period left comes from
the same times the settler schedules its scans by, so what is shown is what the daemon does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from modelwatch.reasons import Reason
from modelwatch.settle import Settler, Timers
from modelwatch.units import Unit, describe


@dataclass(frozen=True, slots=True)
class RootStatus:
    available: bool
    reason: str = ""


class Waiting(NamedTuple):
    """One pending unit as the settle loop last saw it (a tuple: made by the thousand in a
    burst of changes)."""

    unit: Unit
    timers: Timers
    findings: tuple[Reason, ...] = ()  # what its last check found
    checked_at: float | None = None  # when that check ended (monotonic); None: not checked yet


def _frozen(items: Mapping[str, RootStatus] | None = None) -> Mapping[str, RootStatus]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every pending unit and the last known state of each root, at `taken` (monotonic)."""

    taken: float = 0.0
    pending: Mapping[Unit, Waiting] = field(default_factory=lambda: MappingProxyType({}))
    roots: Mapping[str, RootStatus] = field(default_factory=_frozen)


def reasons(waiting: Waiting, roots: Mapping[str, RootStatus], now: float) -> tuple[Reason, ...]:
    """Every reason `waiting`'s unit is not settled at `now` (the loop's monotonic time)."""
    timers, found = waiting.timers, list(waiting.findings)
    out: list[Reason] = []
    root = roots.get(waiting.unit.root)
    if root is not None and root.available:  # back since the last check found it down
        found = [r for r in found if r.code != "root_unavailable"]
    elif root is not None and all(r.code != "root_unavailable" for r in found):
        out.append(root_unavailable(waiting.unit.root, root.reason))
    out += found  # what the last check found is the most telling, so it comes first
    down = any(r.code == "root_unavailable" for r in out)  # then nothing else counts yet
    if not down and (waiting.checked_at is None or timers.last_change > waiting.checked_at):
        out.append(quiet_period(timers, now))
    if timers.checking:
        out.append(Reason("checking", "being scanned or checked now"))
    return tuple(out)


def quiet_period(timers: Timers, now: float) -> Reason:
    """The quiet period as the settler counts it: from the last change (or the last check
    that found the unit not ready) to `settle_seconds` later, proven by two scans."""
    ago = max(0.0, now - timers.last_change)
    left = timers.last_change + timers.settle_seconds - now
    settle = f"{timers.settle_seconds:g} s"
    if left > 0:
        message = f"files changed {ago:.1f} s ago; settles after {settle} without changes"
        return Reason("quiet_period", f"{message} ({left:.1f} s left)")
    return Reason(
        "quiet_period",
        f"no change for {ago:.1f} s (settle_seconds {settle}); the scan that confirms it is due",
    )


def root_unavailable(root: str, why: str) -> Reason:
    return Reason("root_unavailable", f"root {describe(root)} unavailable: {why or 'unknown'}")


class Board:
    """The settle loop's side of `Snapshot`: it keeps what each unit's last check found, is
    told which units changed (`touch`), and `publish` builds the next snapshot from the
    settler, rebuilding only the entries of units touched since the last one. Used by the
    settle loop's thread only."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self._entries: dict[Unit, Waiting] = {}
        self._findings: dict[Unit, tuple[tuple[Reason, ...], float]] = {}
        self._dirty: set[Unit] = set()
        self._everything = False
        self._roots: Mapping[str, RootStatus] | None = None

    def touch(self, unit: Unit) -> None:
        """Something about `unit` changed: its entry is rebuilt at the next `publish`."""
        self._dirty.add(unit)

    def touch_all(self) -> None:
        self._everything = True

    def found(self, unit: Unit, reasons: tuple[Reason, ...], at: float) -> None:
        """`unit`'s check that ended at `at` found it not settled, for `reasons`."""
        self._findings[unit] = (reasons, at)
        self._dirty.add(unit)

    def findings(self, unit: Unit) -> tuple[Reason, ...]:
        return self._findings.get(unit, ((), 0.0))[0]

    def forget(self, unit: Unit) -> None:
        """`unit` is no longer pending (settled, or its root went away)."""
        self._findings.pop(unit, None)
        self._dirty.add(unit)

    def publish(
        self, settler: Settler[Unit], roots: Mapping[str, RootStatus], now: float
    ) -> Snapshot:
        """The snapshot at `now` (the previous one when nothing changed)."""
        if not self._dirty and not self._everything and roots is self._roots:
            return self.snapshot
        if self._everything:
            self._entries = {}
            self._dirty = set(settler.pending())
        for unit in self._dirty:
            if unit not in settler:
                self._entries.pop(unit, None)
                continue
            reasons, at = self._findings.get(unit, ((), None))
            self._entries[unit] = Waiting(unit, settler.timers(unit), reasons, at)
        self._dirty, self._everything, self._roots = set(), False, roots
        self.snapshot = Snapshot(now, MappingProxyType(dict(self._entries)), _frozen(roots))
        return self.snapshot
