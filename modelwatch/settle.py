"""When is a unit settled? A pure state machine fed with observations and times.

For each pending unit the `Settler` keeps the time of the first and last observed change and
the stat key of a "probe" scan. The protocol with its owner (the pipeline thread):

1. `observe(unit, t)` for every change event: the quiet period restarts and the probe is
   discarded.
2. `due(now)` lists units that need a scan now. A unit first needs a probe scan half-way
   through the quiet period (`last_change + settle/2`), then a final scan at its end
   (`last_change + settle`, and at least `settle/2` after the probe).
3. `scanned(unit, key, now)` with the scan's stat key answers `WAIT` or `STABLE`. A final scan
   that differs from the probe counts as a change at `now` (writers that produce no events:
   mmap, other NFS clients), and the differing scan becomes the new probe.
4. After `STABLE` the owner checks readiness (no in-progress files, format complete, marker)
   and calls `settled(unit, now)` (the unit stops being pending) or `not_ready(unit, now)`
   (check again one quiet period later, without needing a new event).
5. `overdue(now)` lists units pending longer than `max_wait` since their first change, once
   per pending episode.
6. While the owner checks a unit elsewhere (scans and inspection run on a pool), it marks the
   unit `busy`: `due` and `next_deadline` skip it until it is marked idle again.
7. `last_chance(now, gap)` (the daemon is stopping): every pending unit gets one more check,
   a probe scan now and a final scan `gap` later, whatever its quiet period. A final scan
   that differs answers `CHANGED`, and `not_ready` ends the unit's last chance: it is `done`
   and left pending for the next start.

No clocks, threads or I/O here: times are plain floats from a monotonic clock. Each unit's
next scan and its max-wait deadline sit in heaps (stale entries dropped as they surface), so a
turn of the owner's loop costs O(k log n) for the k units due, not O(n): a burst of a
thousand pending units must not make every turn walk all of them.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)

MAX_BACKOFF = 300.0


class Verdict(enum.Enum):
    WAIT = "wait"
    STABLE = "stable"
    CHANGED = "changed"  # a last-chance check saw the unit change: it stays pending


@dataclass(frozen=True, slots=True)
class Timing:
    settle_seconds: float
    max_wait_seconds: float


class Timers(NamedTuple):
    """What a pending unit waits for, in the owner's monotonic time (see `Settler.timers`).

    A tuple: one is made for every unit that changed in a turn of the settle loop."""

    first_change: float
    last_change: float  # or the last check that found it not ready: the quiet period restarts
    next_check: float  # when its next scan is due
    settle_seconds: float
    checking: bool  # being checked elsewhere now (busy)
    overdue: bool  # past max_wait: its `not_settled` was reported
    last_chance: bool  # the owner is stopping: this is its last check


@dataclass(slots=True)
class _Pending:
    first_change: float
    last_change: float
    probe: object = None
    probe_at: float = 0.0
    has_probe: bool = False
    overdue_reported: bool = False
    backoff: float = 0.0  # extra wait between re-checks of a unit stuck past max_wait
    busy: bool = False  # being checked by the owner's pool
    final_gap: float | None = None  # last chance (stopping): final scan this long after probe
    final_from: float = 0.0  # last chance: the probe is due from here
    done: bool = False  # last chance over; left pending
    stamp: int = 0  # which entry of the scan heap is this unit's current one


class Settler(Generic[K]):
    """Pending units and their timers. See the module docstring for the protocol."""

    def __init__(self, timing_for: Callable[[K], Timing]) -> None:
        self._timing_for = timing_for
        self._pending: dict[K, _Pending] = {}
        self._order = itertools.count()  # heap tie-breaker: units need not be comparable
        # (next scan, order, stamp, unit) and (max-wait deadline, order, first change, unit)
        self._scans: list[tuple[float, int, int, K]] = []
        self._waits: list[tuple[float, int, float, K]] = []

    def _schedule(self, unit: K, p: _Pending) -> None:
        """(Re)enter the unit's next scan; older entries of it go stale."""
        p.stamp += 1
        if not p.busy and not p.done:
            at = self._next_scan(unit, p)
            heapq.heappush(self._scans, (at, next(self._order), p.stamp, unit))

    def _schedule_wait(self, unit: K, p: _Pending) -> None:
        at = self._overdue_at(unit, p)
        if at is not None:
            heapq.heappush(self._waits, (at, next(self._order), p.first_change, unit))

    def _scan_entry_live(self, entry: tuple[float, int, int, K]) -> bool:
        p = self._pending.get(entry[3])
        return p is not None and p.stamp == entry[2] and not p.busy and not p.done

    def _wait_entry_live(self, entry: tuple[float, int, float, K]) -> bool:
        p = self._pending.get(entry[3])
        return (
            p is not None
            and p.first_change == entry[2]
            and not p.overdue_reported
            and p.final_gap is None
            and not p.busy
        )

    def retime(self) -> None:
        """Timings changed (a reload): enter every unit's times again."""
        self._scans, self._waits = [], []
        for unit, p in self._pending.items():
            self._schedule(unit, p)
            self._schedule_wait(unit, p)

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, unit: object) -> bool:
        return unit in self._pending

    def observe(self, unit: K, t: float) -> None:
        """A change happened inside `unit` at time `t`."""
        p = self._pending.get(unit)
        if p is None:
            p = self._pending[unit] = _Pending(first_change=t, last_change=t)
            self._schedule(unit, p)
            self._schedule_wait(unit, p)
            return
        p.last_change = max(p.last_change, t)
        p.has_probe = False
        p.probe = None
        p.backoff = 0.0
        self._schedule(unit, p)

    def first_change(self, unit: K) -> float:
        return self._pending[unit].first_change

    def timers(self, unit: K) -> Timers:
        """The pending `unit`'s times and flags, as `due` and `overdue` see them."""
        p = self._pending[unit]
        return Timers(
            first_change=p.first_change,
            last_change=p.last_change,
            next_check=self._next_scan(unit, p),
            settle_seconds=self._timing_for(unit).settle_seconds,
            checking=p.busy,
            overdue=p.overdue_reported,
            last_chance=p.final_gap is not None,
        )

    def _next_scan(self, unit: K, p: _Pending) -> float:
        if p.final_gap is not None:
            return p.probe_at + p.final_gap if p.has_probe else p.final_from
        half = self._timing_for(unit).settle_seconds / 2
        if not p.has_probe:
            return p.last_change + half
        return max(p.last_change + 2 * half, p.probe_at + half) + p.backoff

    def _overdue_at(self, unit: K, p: _Pending) -> float | None:
        if p.overdue_reported or p.final_gap is not None:
            return None
        return p.first_change + self._timing_for(unit).max_wait_seconds

    def next_deadline(self) -> float | None:
        """The earliest time at which `due` or `overdue` will return something."""
        while self._scans and not self._scan_entry_live(self._scans[0]):
            heapq.heappop(self._scans)
        while self._waits and not self._wait_entry_live(self._waits[0]):
            heapq.heappop(self._waits)
        times = [heap[0][0] for heap in (self._scans, self._waits) if heap]
        return min(times, default=None)

    def due(self, now: float, limit: int | None = None) -> list[K]:
        """Units that need a scan now, oldest deadline first (at most `limit` of them: the
        owner asks only for as many as it can check, so a turn stays cheap however many
        units are due)."""
        live: list[tuple[float, int, int, K]] = []
        while self._scans and self._scans[0][0] <= now and (limit is None or len(live) < limit):
            entry = heapq.heappop(self._scans)
            if self._scan_entry_live(entry):
                live.append(entry)
        for entry in live:  # still due until checked (busy) or changed
            heapq.heappush(self._scans, entry)
        return [entry[3] for entry in live]

    def set_busy(self, unit: K, busy: bool) -> None:
        """The owner started (True) or finished (False) checking `unit` elsewhere."""
        p = self._pending.get(unit)
        if p is not None and p.busy != busy:
            p.busy = busy
            if not busy:
                self._schedule(unit, p)
                self._schedule_wait(unit, p)

    def probe(self, unit: K) -> object | None:
        """The stat key of the unit's probe scan, when its next scan is the final one."""
        p = self._pending[unit]
        return p.probe if p.has_probe else None

    def is_busy(self, unit: K) -> bool:
        p = self._pending.get(unit)
        return p is not None and p.busy

    def last_chance(self, now: float, gap: float) -> None:
        """Stopping: every pending unit gets a probe scan now and a final one `gap` later."""
        for unit, p in self._pending.items():
            p.final_gap, p.final_from = gap, now
            p.has_probe, p.probe, p.backoff = False, None, 0.0
            self._schedule(unit, p)

    def in_last_chance(self) -> list[K]:
        """Pending units whose last chance is not over yet."""
        return [u for u, p in self._pending.items() if not p.done]

    def scanned(self, unit: K, key: object, now: float) -> Verdict:
        """Feed the stat key of a scan taken at `now`."""
        p = self._pending[unit]
        verdict = self._verdict(unit, p, key, now)
        self._schedule(unit, p)
        return verdict

    def _verdict(self, unit: K, p: _Pending, key: object, now: float) -> Verdict:
        if not p.has_probe:
            p.probe, p.probe_at, p.has_probe = key, now, True
            return Verdict.WAIT
        if key != p.probe and p.final_gap is not None:
            p.done = True
            return Verdict.CHANGED
        if key != p.probe:
            p.last_change = now
            p.probe, p.probe_at = key, now
            return Verdict.WAIT
        if now < self._next_scan(unit, p):
            return Verdict.WAIT
        return Verdict.STABLE

    def not_ready(self, unit: K, key: object, now: float) -> None:
        """Stable but not complete: look again one quiet period from now.

        Past `max_wait` the re-checks back off exponentially (up to `MAX_BACKOFF`): a unit that
        stays incomplete for hours must not cost a full completeness check every few seconds.
        """
        p = self._pending[unit]
        if p.final_gap is not None:
            p.done = True
            self._schedule(unit, p)
            return
        p.last_change = now
        p.probe, p.probe_at, p.has_probe = key, now, True
        if p.overdue_reported:
            settle = self._timing_for(unit).settle_seconds
            p.backoff = min(MAX_BACKOFF, max(settle, 2 * p.backoff))
        self._schedule(unit, p)

    def settled(self, unit: K, now: float) -> float:
        """The unit settled; returns seconds since its first observed change."""
        p = self._pending.pop(unit)
        return max(0.0, now - p.first_change)

    def forget(self, unit: K) -> None:
        self._pending.pop(unit, None)

    def overdue(self, now: float) -> list[K]:
        """Units past `max_wait` since their first change; each reported once per episode."""
        found = []
        while self._waits and self._waits[0][0] <= now:
            entry = heapq.heappop(self._waits)
            if self._wait_entry_live(entry):
                self._pending[entry[3]].overdue_reported = True
                found.append(entry[3])
        return found

    def pending(self) -> list[K]:
        return list(self._pending)
