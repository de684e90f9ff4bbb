"""The settle loop: one thread owns every pending unit.

It takes `Change` and `Rescan` items from the queue the watchers fill, feeds the pure
`Settler`, scans units when the settler says so, and hands settled units to inspection and the
registry. A unit whose processing fails (state store full, a bug) stays pending and is tried
again one quiet period later; the loop itself never dies of a unit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

from modelwatch.clock import Clock
from modelwatch.config import Config, RootConfig
from modelwatch.errors import StateError, UnitUnavailable
from modelwatch.events import Event
from modelwatch.inspection import Inspection, inspect_unit, readiness
from modelwatch.manifest import (
    Manifest,
    PatternSet,
    fingerprint,
    pending_fingerprint,
    scan_digest,
    scan_unit,
)
from modelwatch.metadata import SchemaValidator
from modelwatch.registry import Registry, Route
from modelwatch.settle import Settler, Timing, Verdict
from modelwatch.state import UnitRecord
from modelwatch.units import Unit, describe, list_units, locate
from modelwatch.watch import Change, Rescan

log = structlog.get_logger("modelwatch.pipeline")

_BATCH = 5000
_COMMIT_BATCH = 256  # units settling at once whose outcomes share one transaction
_COMMIT_AFTER = 1.0  # seconds: a batch is committed once its first unit waited this long

# With content_digest = "sha256", a scan digest is remembered only for files unchanged this
# long: writes through a shared mapping to a page that is already dirty move no timestamp until
# it is written back (the kernel's default dirty expiry is 30 s), and only hashing sees them.
# (Without content digests, fingerprints are made of the same timestamps: nothing to guard.)
DIGEST_MIN_AGE = 60.0
# Part of every stored digest: a new way to fingerprint or inspect units changes it, and with
# it every stored digest, so units are looked at again.
_DIGEST_FORMAT = 1


class Ready:
    """Queue marker: everything queued before it (the initial rescans) has been handled."""

    def __init__(self) -> None:
        self.done = threading.Event()


class Reconfigure(Ready):
    """Queue item: switch to a reloaded config (applied by the settle thread, which owns it)."""

    def __init__(self, config: Config, routes: list[Route], schema: SchemaValidator | None) -> None:
        super().__init__()
        self.config = config
        self.routes = routes
        self.schema = schema


class RootRules:
    """A root's configuration with its patterns compiled once."""

    def __init__(self, root: RootConfig) -> None:
        self.config = root
        self.ignore = PatternSet(root.policy.ignore)
        self.in_progress = PatternSet(root.policy.in_progress)
        self.timing = Timing(root.policy.settle_seconds, root.policy.max_wait_seconds)
        # What a unit's fingerprint depends on besides its files: a digest stored under other
        # rules (a reload or restart changed them) never matches, so the unit is scanned again.
        policy = root.policy
        rules = (
            _DIGEST_FORMAT,
            policy.ignore,
            policy.in_progress,
            policy.content_digest,
            policy.max_files_per_unit,
        )
        self._key = hashlib.blake2b(repr(rules).encode(), digest_size=32).digest()

    def _keyed(self, digest: bytes | None) -> bytes | None:
        if digest is None:
            return None
        return hashlib.blake2b(digest, key=self._key, digest_size=16).digest()

    def digest(self, unit: Unit) -> bytes | None:
        """The unit's scan digest now, as stored (None: no shortcut, scan it)."""
        return self._keyed(
            scan_digest(
                unit.path,
                follow_top=unit.name == ".",
                ignore=self.ignore,
                max_files=self.config.policy.max_files_per_unit,
                watched_root=_above(unit),
            )
        )

    def to_store(self, manifest: Manifest, now: float) -> bytes | None:
        """The digest to remember with the fingerprint of `manifest` (scanned just before
        `now`, wall clock); with content digests, None while a file changed less than
        `DIGEST_MIN_AGE` ago."""
        young = manifest.newest_change_ns > (now - DIGEST_MIN_AGE) * 1e9
        if young and self.config.policy.content_digest != "none":
            return None
        return self._keyed(manifest.scan_digest)

    def scan(self, unit: Unit) -> Manifest:
        return scan_unit(
            unit.path,
            follow_top=unit.name == ".",
            ignore=self.ignore,
            in_progress=self.in_progress,
            max_files=self.config.policy.max_files_per_unit,
            watched_root=_above(unit),
        )


def _above(unit: Unit) -> str | None:
    """The root, for a unit more than one level below it (see `scan_unit`)."""
    return unit.root if os.sep in unit.name else None


class Units:
    """Scanning, inspecting and registering units of the configured roots."""

    def __init__(
        self, config: Config, registry: Registry, clock: Clock, schema: SchemaValidator | None
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.schema = schema
        self.rules = {r.path: RootRules(r) for r in config.roots}

    def reconfigure(self, change: Reconfigure) -> list[str]:
        """Apply a reloaded config; returns the roots no longer watched."""
        old = self.rules
        self.config, self.schema = change.config, change.schema
        self.registry.routes = tuple(change.routes)
        self.rules = {
            r.path: old[r.path] if r.path in old and old[r.path].config == r else RootRules(r)
            for r in change.config.roots
        }
        return [path for path in old if path not in self.rules]

    def candidates(
        self, root: str, below: str = "", records: list[UnitRecord] | None = None
    ) -> list[Unit]:
        """Units on disk under `root` plus units the store believes are present there.

        The store keys units by their display path; a record that matches a unit found on
        disk is that unit (names that are not UTF-8 cannot be rebuilt from the display form).
        """
        rules = self.rules[root]
        found = set(list_units(root, rules.config.unit_depth, below))
        on_disk = {unit.display for unit in found}
        prefix = describe(os.path.join(root, below)) if below else describe(root)
        if records is None:
            records = self.registry.store.units(describe(root))
        for record in records:
            inside = record.path == prefix or record.path.startswith(prefix + "/")
            if record.present and inside and record.path not in on_disk:
                gone = os.path.relpath(record.path, describe(root))
                found.add(Unit(root, gone))  # relpath gives "." for a depth-0 root
        return sorted(found)

    def settle(self, unit: Unit, manifest: Manifest, settled_after: float) -> Event | None:
        """Register (or reject, or remove) a unit that is stable now."""
        found = self.inspect(unit, manifest)
        digest = self.rules[unit.root].to_store(manifest, self.clock.time())
        return self.record(unit, found, settled_after, digest)

    def inspect(self, unit: Unit, manifest: Manifest) -> Inspection | None:
        """What a stable unit holds; None when it is gone.

        A unit directory with no files left counts as gone: it is not a model.
        """
        if not manifest.exists or manifest.empty:
            return None
        policy = self.rules[unit.root].config.policy
        return inspect_unit(unit.path, manifest, policy, self.config.metadata, self.schema)

    def record(
        self,
        unit: Unit,
        found: Inspection | None,
        settled_after: float,
        scan_digest: bytes | None,
    ) -> Event | None:
        """Commit the outcome of `inspect` (no event when nothing is new)."""
        depth = self.rules[unit.root].config.unit_depth
        if found is None:
            return self.registry.removed(unit, depth, when=self.clock.time())
        return self.registry.settled(
            unit,
            depth,
            found,
            when=self.clock.time(),
            settled_after=settled_after,
            scan_digest=scan_digest,
        )


class Pipeline(threading.Thread):
    """The settle loop thread (see the module docstring)."""

    def __init__(
        self,
        units: Units,
        changes: queue.Queue[Any],
        clock: Clock,
        on_event: Callable[[Event], None],
    ) -> None:
        super().__init__(name="settle", daemon=True)
        self.units = units
        self.changes = changes
        self.clock = clock
        self.on_event = on_event
        self.settler: Settler[Unit] = Settler(lambda u: units.rules[u.root].timing)
        self.stopping = threading.Event()
        self.last_beat = clock.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.changes.put(None)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.last_beat = self.clock.monotonic()
            try:
                self._take(self._timeout())
                self.process_due(self.clock.monotonic())
            except Exception:  # a bug must not stop every unit; it is logged and retried
                log.exception("pipeline_error")
                self.stopping.wait(1.0)

    def _timeout(self) -> float:
        deadline = self.settler.next_deadline()
        if deadline is None:
            return 1.0
        return min(1.0, max(0.0, deadline - self.clock.monotonic()))

    def _take(self, timeout: float) -> None:
        """Handle one queued item (waiting up to `timeout`), then up to a batch more.

        The batch bound keeps a flood of events from starving the timers.
        """
        try:
            item = self.changes.get(timeout=timeout) if timeout > 0 else self.changes.get_nowait()
            for _ in range(_BATCH):
                if item is not None:
                    self.handle(item)
                    item = None
                item = self.changes.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            self.handle(item)
            return

    def handle(self, item: Change | Rescan | Ready) -> None:
        if isinstance(item, Reconfigure):
            for root in self.units.reconfigure(item):
                for unit in self.settler.pending():
                    if unit.root == root:
                        self.settler.forget(unit)
            item.done.set()
        elif isinstance(item, Ready):
            item.done.set()
        elif isinstance(item, Rescan):
            self.reconcile(item.root, item.below)
        elif item.root in self.units.rules:
            self._observe_path(item.root, item.path, item.is_dir, item.at)
            if item.dest is not None:
                self._observe_path(item.root, item.dest, item.is_dir, item.at)

    def _observe_path(self, root: str, path: str, is_dir: bool, at: float) -> None:
        rules = self.units.rules[root]
        where = locate(root, rules.config.unit_depth, path, is_dir)
        if where.unit is not None:
            if where.rel_in_unit and rules.ignore.matches_any_part(where.rel_in_unit):
                return
            self.settler.observe(where.unit, at)
        elif where.above is not None:
            self.reconcile(root, where.above)
        else:
            log.debug("path_above_unit_depth", path=describe(path))

    def reconcile(self, root: str, below: str = "") -> None:
        """Make every unit that may have changed pending.

        A unit whose files still have the scan digest stored when its fingerprint was last
        recorded or found known costs one stat walk; otherwise it is scanned, and an unchanged
        one (stat fingerprint known) gets its digest stored for the next pass.
        """
        if root not in self.units.rules:
            return
        rules = self.units.rules[root]
        now = self.clock.monotonic()
        store = self.units.registry.store
        records = store.units(describe(root))
        known = {r.path: r.scan_digest for r in records if r.present}
        healed: list[tuple[str, bytes | None]] = []
        for unit in self.units.candidates(root, below, records):
            if unit in self.settler:
                continue
            try:
                stored = known.get(unit.display)
                if stored is not None and rules.digest(unit) == stored:
                    continue  # nothing on disk changed since its fingerprint was known
                manifest = rules.scan(unit)
                unchanged = manifest.exists and not self._maybe_changed(unit, manifest)
            except Exception:  # the unit is settled the slow way rather than skipped
                log.exception("reconcile_failed", unit=unit.display)
                unchanged = False
            if not unchanged:
                self.settler.observe(unit, now)
            elif (digest := rules.to_store(manifest, self.clock.time())) is not None:
                healed.append((unit.display, digest))
        try:
            store.set_scan_digests(healed)
        except StateError as exc:  # only a shortcut is lost: the next pass scans again
            log.warning("state_write_failed", error=str(exc))

    def _maybe_changed(self, unit: Unit, manifest: Manifest) -> bool:
        policy = self.units.rules[unit.root].config.policy
        if policy.content_digest != "none" or manifest.in_progress:
            return True  # the content fingerprint is only computed when the unit settles
        return not self.units.registry.store.knows(unit.display, fingerprint(manifest.entries))

    def process_due(self, now: float) -> None:
        """Check every unit due now; the outcomes of those that settled are committed
        together (one transaction per `_COMMIT_BATCH` units, or per `_COMMIT_AFTER` seconds
        of checking), scans and inspection outside it, so a burst of models costs one fsync
        instead of one per model."""
        stable: list[_Stable] = []
        first = 0.0  # when the batch's first unit was ready to commit
        try:
            for unit in self.settler.due(now):
                item = self._check(unit, now)
                if item is not None:
                    stable.append(item)
                    if len(stable) == 1:
                        first = self.clock.monotonic()
                full = len(stable) >= _COMMIT_BATCH
                if stable and (full or self.clock.monotonic() - first >= _COMMIT_AFTER):
                    self._commit(stable, now)  # slow inspections (hashing) hold no event back
                    stable = []
        finally:  # a bug in one unit's check must not strand the units already settled
            self._commit(stable, now)
        for unit in self.settler.overdue(now):
            self._overdue(unit, now)

    def _check(self, unit: Unit, now: float) -> _Stable | None:
        rules = self.units.rules[unit.root]
        manifest = rules.scan(unit)
        if self.settler.scanned(unit, manifest.stat_key, now) is Verdict.WAIT:
            return None
        reason = readiness(unit.path, manifest, rules.config.policy) if manifest.exists else None
        if reason is not None:
            log.info("unit_not_ready", unit=unit.display, reason=reason)
            self.settler.not_ready(unit, manifest.stat_key, now)
            return None
        item = _Stable(unit, self.settler.first_change(unit), self.settler.settled(unit, now))
        try:
            item.found = self.units.inspect(unit, manifest)
        except UnitUnavailable as exc:  # gone or swapped since the scan, or ESTALE: later
            log.info("unit_not_ready", unit=unit.display, reason=str(exc))
            self._retry(item, now)
            return None
        except Exception:  # a bug: the unit is never dropped
            log.exception("unit_failed", unit=unit.display)
            self._retry(item, now)
            return None
        item.scan_digest = rules.to_store(manifest, self.clock.time())
        return item

    def _retry(self, item: _Stable, now: float) -> None:
        """Make a settled unit pending again: its episode kept, retried next quiet period."""
        self.settler.observe(item.unit, item.first_change)
        self.settler.observe(item.unit, now)

    def _commit(self, stable: list[_Stable], now: float) -> None:
        if not stable:
            return
        done: list[tuple[Unit, Event]] = []
        failed: list[_Stable] = []
        try:
            with self.units.registry.store.batch():
                for item in stable:
                    try:
                        event = self.units.record(
                            item.unit, item.found, item.settled_after, item.scan_digest
                        )
                    except Exception as exc:  # state store full, or a bug
                        self._failed(item, exc, now)
                        failed.append(item)
                        continue
                    if event is not None:
                        done.append((item.unit, event))
        except StateError as exc:  # the commit itself failed: none of the batch is stored
            for item in stable:
                if item not in failed:
                    self._failed(item, exc, now)
            return
        for unit, event in done:
            log.info(
                "unit_" + event.short_type,
                unit=unit.display,
                event_id=event.id,
                version=event.data.get("version"),
                fingerprint=event.data["fingerprint"],
            )
            self.on_event(event)

    def _failed(self, item: _Stable, exc: Exception, now: float) -> None:
        if isinstance(exc, StateError):
            log.error("state_write_failed", unit=item.unit.display, error=str(exc))
        else:
            log.error("unit_failed", unit=item.unit.display, exc_info=exc)
        self._retry(item, now)

    def _overdue(self, unit: Unit, now: float) -> None:
        rules = self.units.rules[unit.root]
        manifest = rules.scan(unit)
        if not manifest.exists or manifest.empty:
            return
        policy = rules.config.policy
        reason = readiness(unit.path, manifest, policy) or "files still changing"
        try:
            found = inspect_unit(
                unit.path, manifest, policy, self.units.config.metadata, self.units.schema
            )
        except UnitUnavailable as exc:  # reported at its next overdue check
            log.info("unit_not_ready", unit=unit.display, reason=str(exc))
            return
        # In-progress names count here, so a later rejection of the same files gets its own id.
        found = dataclasses.replace(found, fingerprint=pending_fingerprint(manifest))
        waited = now - self.settler.first_change(unit)
        try:
            event = self.units.registry.not_settled(
                unit,
                rules.config.unit_depth,
                found,
                when=self.clock.time(),
                waited=waited,
                reason=reason,
            )
        except Exception as exc:
            log.error("state_write_failed", unit=unit.display, error=str(exc))
            return
        log.warning("unit_not_settled", unit=unit.display, event_id=event.id, reason=reason)
        self.on_event(event)


@dataclasses.dataclass(slots=True)
class _Stable:
    """A unit that settled in this pass, on its way to the store."""

    unit: Unit
    first_change: float
    settled_after: float
    found: Inspection | None = None
    scan_digest: bytes | None = None
