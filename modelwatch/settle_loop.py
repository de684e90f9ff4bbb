"""The settle loop: one thread owns every pending unit and decides; a pool does the work.

It takes typed messages from its inbox: changes and rescans from the watchers, control
messages from the daemon (`Reconfigure`, `Flush`, `Stop`) and the results of the jobs it gave
the inspection pool (`checks`). It feeds the pure `Settler`, submits a scan when the settler
says one is due, an examination when a unit is stable, and commits outcomes through the
registry (everything settled in one turn of the loop shares one transaction). Nothing slow
runs here: a unit whose hashing takes an hour delays only itself, and reloads, stops and other
units' timers are handled within a turn (SPEC §8).

A stop is one more input (`Stop`): every pending unit gets its last chance (two scans
`stop_settle_seconds` apart, then the usual readiness checks); what settles is committed, the
rest is logged `unit_pending_at_stop` with its reason and found again by the next start.

Shared roots (SPEC §12) start paused: their changes and rescans are dropped until the
coordinator says this node holds the root (`Acquired`: the stored histories are adopted, the
undelivered events queued again, the root reconciled); `Released` pauses it again and drops
its pending units (the next holder finds them). While the backend fails, commits of a held
root raise `Paused`, and its units stay pending.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from modelwatch import checks
from modelwatch.checks import Context, Crashed, Examined, Overdue, Reconciled, Scanned, Settled
from modelwatch.clock import Clock
from modelwatch.cluster.backend import ClusterError
from modelwatch.cluster.coordinator import Acquired, Released
from modelwatch.config import Config
from modelwatch.errors import StateError
from modelwatch.events import Event
from modelwatch.metadata import SchemaValidator
from modelwatch.pending import Board, RootStatus, Snapshot, root_unavailable
from modelwatch.pool import Pool
from modelwatch.progress import Cancelled, Heartbeat
from modelwatch.reasons import Reason, summary
from modelwatch.registry import Registry, Route
from modelwatch.roots import Availability
from modelwatch.rules import RootRules
from modelwatch.settle import Settler, Verdict
from modelwatch.state import Store
from modelwatch.units import Unit, describe, locate
from modelwatch.watch import Change, Rescan

log = structlog.get_logger("modelwatch.settle")

_BATCH = 5000  # messages per turn: a flood of events must not starve the timers
COMMIT_BATCH = 256  # outcomes committed in one transaction at most
COMMIT_AFTER = 0.5  # seconds an outcome may wait for others to share its transaction
_ADOPT_RETRY_SECONDS = 5.0
ROOT_RETRY_SECONDS = 5.0  # how often an unavailable root is looked at again


@dataclass(slots=True)
class Flush:
    """Done once everything queued before it is handled, rescans included (the initial
    reconcile before READY)."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class Reconfigure:
    """Switch to a reloaded config (applied by the loop, which owns it)."""

    config: Config
    routes: list[Route]
    schema: SchemaValidator | None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class Stop:
    """Give every pending unit its last chance (two scans `gap` apart; None:
    `stop_settle_seconds`), commit, and end the loop by `deadline` (monotonic)."""

    deadline: float
    gap: float | None = None
    log_as: str = "unit_pending_at_stop"  # the log event of each unit left pending
    done: threading.Event = field(default_factory=threading.Event)


Message = (
    Change
    | Rescan
    | Flush
    | Reconfigure
    | Stop
    | Scanned
    | Examined
    | Overdue
    | Reconciled
    | Crashed
    | Acquired
    | Released
)
Inbox = queue.SimpleQueue[Message | None]  # C-level put/get: a burst is tens of thousands


@dataclass(slots=True)
class _Done:
    """A unit settled this turn, waiting for the turn's commit."""

    unit: Unit
    outcome: Settled
    settled_after: float


class SettleLoop(threading.Thread):
    """See the module docstring."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        inbox: Inbox,
        clock: Clock,
        on_event: Callable[[Event], None],
        pool: Pool,
        schema: SchemaValidator | None = None,
        shared: Collection[str] = (),
    ) -> None:
        """`shared`: the shared roots (paths); they start paused (see the module docstring)."""
        super().__init__(name="settle", daemon=True)
        self.pool = pool
        self.config = config
        self.registry = registry
        self.inbox = inbox
        self.clock = clock
        self.on_event = on_event
        self.schema = schema
        self.rules = {r.path: RootRules(r) for r in config.roots}
        self.settler: Settler[Unit] = Settler(lambda u: self.rules[u.root].timing)
        self.heartbeat = Heartbeat("settle", clock)
        self.roots: dict[str, RootStatus] = {}  # replaced whole, read by other threads
        self.board = Board()  # why each pending unit waits; publishes `snapshot`
        # shared roots this node does not hold now, and why; replaced whole, read by others
        self.paused: dict[str, str] = dict.fromkeys(shared, "waiting for the cluster lease")
        self._adopting: dict[str, tuple[Acquired, float]] = {}  # takeovers to try again
        self._tokens: dict[Unit, int] = {}
        self._counter = itertools.count(1)
        self._reconciling: dict[int, str] = {}  # token -> root of reconciles in flight
        self._startup: set[int] = set()  # tokens of the start's reconciles
        self._past_start = False  # the start's Flush was handled
        self._flushes: list[tuple[Flush, set[int]]] = []
        self._overdue: list[Unit] = []
        self._done: list[_Done] = []
        self._done_since = 0.0
        self._roots_looked_at = 0.0
        self._devices: dict[str, int | None] = {}
        self._stopping: Stop | None = None
        self._finished = threading.Event()

    @property
    def store(self) -> Store:
        return self.registry.store

    @property
    def snapshot(self) -> Snapshot:
        """Pending units and roots as of the end of the last turn (immutable; any thread)."""
        return self.board.snapshot

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        with self.heartbeat.attached():
            while not self._finished.is_set():
                self.heartbeat.beat()
                try:
                    self.step(None)
                except Exception:  # a bug must not stop every unit; it is logged and retried
                    log.exception("settle_loop_error")
                    self._finished.wait(1.0)

    def step(self, timeout: float | None = 0.0) -> None:
        """One turn: handle queued messages (waiting up to `timeout` for the first; None:
        until the next timer at most), submit what is due, commit what settled.

        Outcomes are committed together: when no message is waiting any more, or once
        `COMMIT_BATCH` units or `COMMIT_AFTER` seconds have piled up (a burst of a thousand
        models costs a few fsyncs, not a thousand)."""
        self._take(timeout)
        now = self.clock.monotonic()
        self._schedule(now)
        if self._done and (
            self.inbox.empty()
            or len(self._done) >= COMMIT_BATCH
            or now - self._done_since >= COMMIT_AFTER
            or self._stopping is not None
        ):
            self._commit(now)
        self._sweep(now)
        self.board.publish(self.settler, self.roots, now)
        if self._stopping is not None:
            self._maybe_finish(self._stopping, now)

    def _timeout(self) -> float:
        """How long to wait for a message: until the next timer, at most a second. Units due
        while the pool is full wait for a result to come back (a message), not in a spin."""
        deadline = self.settler.next_deadline()
        if self._stopping is not None:
            deadline = min(deadline or self._stopping.deadline, self._stopping.deadline)
        if deadline is None:
            return 1.0
        left = deadline - self.clock.monotonic()
        if left <= 0 and self.pool.capacity() == 0:
            return 1.0
        return min(1.0, max(0.0, left))

    def _take(self, timeout: float | None) -> None:
        """Handle what is queued; when nothing is, wait for the first message up to
        `timeout` (None: until the next timer, at most a second)."""
        try:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                wait = self._timeout() if timeout is None else timeout
                if wait <= 0 or self._done:  # outcomes waiting: commit them first
                    return
                item = self.inbox.get(timeout=wait)
            for _ in range(_BATCH):
                if item is not None:
                    self.handle(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return

    # -- messages ------------------------------------------------------------------------------

    def handle(self, item: Message) -> None:
        if isinstance(item, Change):
            self._changed(item)
        elif isinstance(item, Scanned):
            self._scanned(item)
        elif isinstance(item, Examined):
            self._examined(item)
        elif isinstance(item, Reconciled):
            self._reconciled(item)
        elif isinstance(item, Overdue):
            self._overdue_checked(item)
        elif isinstance(item, Crashed):
            self._crashed(item)
        elif isinstance(item, Rescan):
            self._rescan(item)
        elif isinstance(item, Flush):
            self._flush(item)
        elif isinstance(item, Reconfigure):
            self._reconfigure(item)
        elif isinstance(item, Stop):
            self._begin_stop(item)
        elif isinstance(item, Acquired):
            self._acquired(item)
        elif isinstance(item, Released):
            self._released(item)

    def _changed(self, change: Change) -> None:
        if change.root not in self.rules or change.root in self.paused or self._stopping:
            return
        self._observe_path(change.root, change.path, change.is_dir, change.at)
        if change.dest is not None:
            self._observe_path(change.root, change.dest, change.is_dir, change.at)

    def _observe_path(self, root: str, path: str, is_dir: bool, at: float) -> None:
        rules = self.rules[root]
        where = locate(root, rules.config.unit_depth, path, is_dir)
        if where.unit is not None:
            if where.rel_in_unit and rules.ignore.matches_any_part(where.rel_in_unit):
                return
            self.observe(where.unit, at)
        elif where.above is not None:
            self._rescan(Rescan(root, where.above, reason="root_changed"))
        elif rules.config.root_marker and path == os.path.join(root, rules.config.root_marker):
            self._rescan(Rescan(root, reason="root_changed"))  # the root comes or goes
        else:
            log.debug("path_above_unit_depth", path=describe(path))

    def observe(self, unit: Unit, at: float) -> None:
        """A change inside `unit`: (re)start its quiet period; results of checks already
        under way are stale."""
        self.settler.observe(unit, at)
        self._tokens[unit] = next(self._counter)
        self.board.touch(unit)

    def _current(self, unit: Unit, token: int) -> bool:
        """Finish a job's bookkeeping; True when its result still counts."""
        self.settler.set_busy(unit, False)
        self.board.touch(unit)
        return unit in self.settler and self._tokens.get(unit) == token

    def _scanned(self, result: Scanned) -> None:
        unit = result.unit
        if not self._current(unit, result.token):
            return
        now = self.clock.monotonic()
        verdict = self.settler.scanned(unit, result.manifest.stat_key, now)
        if verdict is Verdict.STABLE:
            self._submit_unit(unit, checks.examine, result.manifest)
        elif verdict is Verdict.CHANGED:
            changed = Reason("changed_at_stop", "files changed during the last check at stop")
            self.board.found(unit, (changed,), now)

    def _examined(self, result: Examined) -> None:
        unit, outcome = result.unit, result.outcome
        if not self._current(unit, result.token):
            return
        now = self.clock.monotonic()
        # From a final check: its scan (equal to the probe) is fed as any final scan; the
        # examination counts only if that makes the unit stable.
        if result.key is not None and self.settler.scanned(unit, result.key, now) is not (
            Verdict.STABLE
        ):
            return
        self._root_state(unit.root, result.availability)
        if isinstance(outcome, Settled):
            settled_after = self.settler.settled(unit, now)
            self._forget(unit)
            if not self._done:
                self._done_since = now
            self._done.append(_Done(unit, outcome, settled_after))
            return
        reasons: tuple[Reason, ...]
        if isinstance(outcome, checks.RootDown):
            reasons = (root_unavailable(unit.root, outcome.reason),)
            self.settler.not_ready(unit, None, now)
        elif isinstance(outcome, checks.Retry):
            reasons = (Reason("unit_unavailable", outcome.reason),)
            self.settler.not_ready(unit, None, now)
        else:
            reasons = outcome.reasons
            self.settler.not_ready(unit, outcome.key, now)
        self.board.found(unit, reasons, now)
        log.info(
            "unit_not_ready",
            unit=unit.display,
            reason=summary(reasons),
            codes=[r.code for r in reasons],
        )

    def _overdue_checked(self, result: Overdue) -> None:
        unit = result.unit
        if not self._current(unit, result.token) or result.found is None:
            return
        waited = self.clock.monotonic() - self.settler.first_change(unit)
        reason = summary(result.reasons) or "files still changing"
        try:
            event = self.registry.not_settled(
                unit,
                self.rules[unit.root].config,
                result.found,
                when=self.clock.time(),
                waited=waited,
                reason=reason,
            )
        except (StateError, ClusterError) as exc:
            log.error("state_write_failed", unit=unit.display, error=str(exc))
            return
        self.registry.committed([event])
        log.warning("unit_not_settled", unit=unit.display, event_id=event.id, reason=reason)
        self.on_event(event)

    def _crashed(self, result: Crashed) -> None:
        if result.unit is None:
            self._reconcile_finished(result.token)
            if not isinstance(result.error, Cancelled):
                log.error("reconcile_failed", root=describe(result.root), exc_info=result.error)
            return
        unit = result.unit
        if not self._current(unit, result.token):
            return
        if not isinstance(result.error, Cancelled):
            log.error("unit_failed", unit=unit.display, exc_info=result.error)
        now = self.clock.monotonic()
        failed = Reason("check_failed", f"checking it failed: {result.error!r}")
        self.board.found(unit, (failed,), now)
        self.settler.not_ready(unit, None, now)  # retried, episode kept

    # -- reconcile -------------------------------------------------------------------------------

    def _rescan(self, rescan: Rescan) -> None:
        """Submit a reconcile of the root (below `rescan.below`)."""
        if rescan.root not in self.rules or rescan.root in self.paused or self._stopping:
            return
        root, below, token = rescan.root, rescan.below, next(self._counter)
        skip = frozenset(self.settler.pending())
        ctx = self._context(root)
        self._reconciling[token] = root
        if not self._past_start:  # queued at the start, before its Flush: the start's reconcile
            self._startup.add(token)

        def job(store: Store) -> Reconciled:
            return checks.reconcile(ctx, store, root, below, token, skip)

        def failed(exc: BaseException) -> Crashed:
            return Crashed(None, root, token, exc)

        self.pool.submit(job, budget=None, on_error=failed)

    def _reconciled(self, result: Reconciled) -> None:
        startup = result.token in self._startup
        self._startup.discard(result.token)
        root = result.root
        if root not in self.rules or root in self.paused or self._stopping is not None:
            self._reconcile_finished(result.token)
            return
        self._root_state(root, result.availability, reconciled=True)
        now = self.clock.monotonic()
        for unit in result.changed:
            if unit not in self.settler:
                self.observe(unit, now)
        for unit in result.gone:
            if unit in self.settler:
                continue
            if startup:  # vanished while the daemon was down: removed before it is ready
                self._done.append(_Done(unit, checks.Settled(None), 0.0))
            else:  # it may be coming back (a directory swapped by renames): settled as usual
                self.observe(unit, now)
        try:
            self.store.units.set_scan_digests(result.healed)
        except StateError as exc:  # only a shortcut is lost: the next pass scans again
            log.warning("state_write_failed", error=str(exc))
        if startup and self._done:
            self._commit(now)
        self._reconcile_finished(result.token)

    def _reconcile_finished(self, token: int) -> None:
        self._reconciling.pop(token, None)
        waiting = []
        for flush, tokens in self._flushes:
            tokens.discard(token)
            if tokens:
                waiting.append((flush, tokens))
            else:
                flush.done.set()
        self._flushes = waiting

    def _flush(self, flush: Flush) -> None:
        self._past_start = True  # reconciles asked for from now on are not the start's
        if self._reconciling:
            self._flushes.append((flush, set(self._reconciling)))
        else:
            flush.done.set()

    def _root_state(self, root: str, availability: Availability, reconciled: bool = False) -> None:
        """Record what a check found about `root`: availability, and the device its units are
        on (an empty mount point on another device is then seen for what it is). A root found
        available again is reconciled, unless the check was that reconcile (`reconciled`)."""
        status = RootStatus(availability.available, availability.reason)
        previous = self.roots.get(root)
        device_changed = (
            availability.available
            and availability.holds_units
            and availability.device is not None
            and self._devices.get(root) != availability.device
        )
        if previous == status and not device_changed:
            return
        self.roots = {**self.roots, root: status}
        if not availability.available:
            log.warning("root_unavailable", root=describe(root), reason=availability.reason)
        elif previous is not None and not previous.available:
            log.info("root_available", root=describe(root))
            if not reconciled:  # back: what changed while it was away is found now
                self._rescan(Rescan(root, reason="root_changed"))
        if device_changed:
            self._devices[root] = availability.device
        try:
            self.store.units.set_root(
                describe(root),
                state="available" if availability.available else "unavailable",
                reason=availability.reason or None,
                device=availability.device if device_changed else None,
            )
        except StateError as exc:
            log.warning("state_write_failed", error=str(exc))

    def known_device(self, root: str) -> int | None:
        if root not in self._devices:
            record = self.store.units.root(describe(root))
            self._devices[root] = record.device if record is not None else None
        return self._devices[root]

    # -- scheduling ----------------------------------------------------------------------------

    def _context(self, root: str) -> Context:
        return Context(
            self.rules[root], self.config.metadata, self.schema, self.known_device(root), self.clock
        )

    def _submit_unit(self, unit: Unit, job: Callable[..., Any], *args: Any) -> None:
        """Run `job(ctx, unit, token, *args)` on the pool; the unit is busy until it returns."""
        token, ctx = self._tokens[unit], self._context(unit.root)
        self.settler.set_busy(unit, True)
        self.board.touch(unit)

        def run(store: Store) -> Any:
            return job(replace(ctx, store=store), unit, token, *args)

        def failed(exc: BaseException) -> Crashed:
            return Crashed(unit, unit.root, token, exc)

        self.pool.submit(
            run, budget=ctx.rules.config.policy.inspect_timeout_seconds, on_error=failed
        )

    def _schedule(self, now: float) -> None:
        if self._stopping is not None and now >= self._stopping.deadline:
            return
        capacity = self.pool.capacity()
        overdue = self.settler.overdue(now)
        for unit in overdue:
            self.board.touch(unit)
        self._overdue.extend(overdue)
        while self._overdue and capacity > 0:
            unit = self._overdue.pop(0)
            if unit in self.settler and not self.settler.is_busy(unit):
                self._submit_unit(unit, checks.overdue)
                capacity -= 1
        for unit in self.settler.due(now, limit=capacity):
            probe = self.settler.probe(unit)
            if probe is None:
                self._submit_unit(unit, checks.scan)
            else:  # its final scan, and the examination in the same job if nothing changed
                self._submit_unit(unit, checks.final_check, probe)

    # -- committing ----------------------------------------------------------------------------

    def _commit(self, now: float) -> None:
        """Commit every outcome settled this turn in one transaction (one fsync for a burst),
        then hand the events on."""
        if not self._done:
            return
        done, self._done = self._done, []
        events: list[tuple[Unit, Event]] = []
        failed: list[_Done] = []
        try:
            with self.store.transaction():
                for item in done:
                    try:
                        event = self._record(item)
                    except Exception as exc:  # state store full, or a bug: this unit only
                        self._failed(item, exc, now)
                        failed.append(item)
                        continue
                    if event is not None:
                        events.append((item.unit, event))
        except StateError as exc:  # the commit itself failed: none of the batch is stored
            for item in done:
                if item not in failed:
                    self._failed(item, exc, now)
            return
        self.registry.committed(event for _unit, event in events)
        for unit, event in events:
            log.info(
                "unit_" + event.short_type,
                unit=unit.display,
                event_id=event.id,
                version=event.data.get("version"),
                fingerprint=event.data["fingerprint"],
            )
            self.on_event(event)

    def _record(self, item: _Done) -> Event | None:
        unit, found = item.unit, item.outcome.found
        root = self.rules[unit.root].config
        if found is None:
            return self.registry.removed(unit, root, when=self.clock.time())
        return self.registry.settled(
            unit,
            root,
            found,
            when=self.clock.time(),
            settled_after=item.settled_after,
            scan_digest=item.outcome.scan_digest,
        )

    def _failed(self, item: _Done, exc: Exception, now: float) -> None:
        if isinstance(exc, StateError):
            log.error("state_write_failed", unit=item.unit.display, error=str(exc))
        elif isinstance(exc, ClusterError):  # the shared root pauses; the unit waits
            log.warning("unit_paused", unit=item.unit.display, reason=str(exc))
        else:
            log.error("unit_failed", unit=item.unit.display, exc_info=exc)
        if item.unit.root not in self.rules:  # its root was removed by a reload meanwhile
            return
        # Pending again, its episode kept: retried one quiet period from now.
        self.observe(item.unit, now - item.settled_after)
        self.observe(item.unit, now)
        if isinstance(exc, ClusterError):
            self.board.found(item.unit, (Reason("cluster_paused", str(exc)),), now)

    def _forget(self, unit: Unit) -> None:
        self._tokens.pop(unit, None)
        self.board.forget(unit)

    # -- shared roots --------------------------------------------------------------------------

    def _acquired(self, acquired: Acquired) -> None:
        """This node holds a shared root now: adopt its stored histories, queue again what
        the old holder may not have delivered, then reconcile it."""
        root = acquired.root
        if root not in self.rules or self._stopping is not None:
            return
        try:
            again = self.registry.take_over(acquired)
        except (StateError, ClusterError) as exc:  # the root stays paused; tried again
            log.error("takeover_failed", root=describe(root), error=str(exc))
            self._adopting[root] = (acquired, self.clock.monotonic() + _ADOPT_RETRY_SECONDS)
            return
        self._adopting.pop(root, None)
        self.paused = {r: why for r, why in self.paused.items() if r != root}
        log.info("shared_root_held", root=describe(root), redelivered=again)
        self._rescan(Rescan(root, reason="takeover"))

    def _released(self, released: Released) -> None:
        """Another node registers the root now: drop what is pending of it here."""
        root = released.root
        self.paused = {**self.paused, root: f"standby: {released.reason}"}
        for unit in self.settler.pending():
            if unit.root == root:
                self.settler.forget(unit)
                self._forget(unit)
        self._done = [d for d in self._done if d.unit.root != root]
        self._overdue = [u for u in self._overdue if u.root != root]
        self._adopting.pop(root, None)
        self.registry.release(root)

    def _look_at_unavailable_roots(self, now: float) -> None:
        """Reconcile each unavailable root every ROOT_RETRY_SECONDS: a root that comes back
        without an event (an NFS server back, permissions restored) is found and reconciled;
        one still unavailable costs its availability check."""
        if now < self._roots_looked_at + ROOT_RETRY_SECONDS:
            return
        self._roots_looked_at = now
        busy = set(self._reconciling.values())
        for root, status in self.roots.items():
            if not status.available and root not in busy:
                self._rescan(Rescan(root, reason="root_changed"))

    def _sweep(self, now: float) -> None:
        self._look_at_unavailable_roots(now)
        for acquired, at in list(self._adopting.values()):
            if now >= at:
                self._acquired(acquired)
        try:
            self.registry.sweep(now)
        except (StateError, ClusterError) as exc:  # tried again at the next sweep
            log.warning("cluster_sweep_failed", error=str(exc))

    # -- reload and stop -----------------------------------------------------------------------

    def _reconfigure(self, change: Reconfigure) -> None:
        old = self.rules
        self.config, self.schema = change.config, change.schema
        self.registry.routes = tuple(change.routes)
        self.rules = {
            r.path: old[r.path] if r.path in old and old[r.path].config == r else RootRules(r)
            for r in change.config.roots
        }
        for unit in self.settler.pending():
            if unit.root not in self.rules:
                self.settler.forget(unit)
                self._forget(unit)
        # settled this turn under a root no longer configured: not recorded (the root's
        # units are not watched any more); the other roots' outcomes are committed as usual
        self._done = [d for d in self._done if d.unit.root in self.rules]
        self._overdue = [u for u in self._overdue if u.root in self.rules]
        self.roots = {root: s for root, s in self.roots.items() if root in self.rules}
        self.settler.retime()  # settle_seconds and max_wait_seconds may have changed
        self.board.touch_all()
        change.done.set()

    def _begin_stop(self, stop: Stop) -> None:
        self._stopping = stop
        pending = self.settler.pending()
        if pending:
            log.info("last_chance", units=len(pending), note="checking pending units once more")
        gap = self.config.daemon.stop_settle_seconds if stop.gap is None else stop.gap
        self.settler.last_chance(self.clock.monotonic(), gap)
        self.board.touch_all()

    def abandon(self) -> None:
        """End the loop at its next turn, last chances or not (a stop past its deadline)."""
        self._finished.set()

    @property
    def finished(self) -> bool:
        """True once a `Stop` was carried out."""
        return self._finished.is_set()

    def _maybe_finish(self, stop: Stop, now: float) -> None:
        if self.settler.in_last_chance() and now < stop.deadline:
            return
        for unit in self.settler.pending():
            found = summary(self.board.findings(unit))
            reason = found or "still being checked at the shutdown deadline"
            log.warning(stop.log_as, unit=unit.display, reason=reason)
        self._finished.set()
        stop.done.set()
