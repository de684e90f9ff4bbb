"""Wiring the stages into a running daemon, and the one-shot `scan`.

Threads: one observer per root (enqueue only), the settle loop (`Pipeline`), one delivery
worker per sink, and the caller's thread running the lifecycle loop (`Daemon.serve`): it
(re)starts watchers as roots come and go and stops everything on request. Signal handlers (in
`cli`) only set the flags this loop reads.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from modelwatch import reaper
from modelwatch.clock import Clock, SystemClock
from modelwatch.config import Config
from modelwatch.delivery import DeliveryWorker, drain
from modelwatch.events import Event
from modelwatch.inspection import readiness
from modelwatch.manifest import Manifest
from modelwatch.metadata import SchemaValidator
from modelwatch.pipeline import Pipeline, Ready, Units
from modelwatch.registry import Registry, Route
from modelwatch.sinks import Sink, build_sink
from modelwatch.state import StateDir, Store
from modelwatch.units import Unit
from modelwatch.watch import OverflowAlarm, Rescan, RootWatcher

log = structlog.get_logger("modelwatch.daemon")

ROOT_CHECK_SECONDS = 1.0


def jittered(interval: float, rng: random.Random) -> float:
    """`interval` +-25%, so a fleet of nodes does not rescan shared storage in lockstep."""
    return interval * rng.uniform(0.75, 1.25)


def _routes(config: Config) -> list[Route]:
    return [Route(s.name, s.event_types) for s in config.sinks]


def _schema(config: Config) -> SchemaValidator | None:
    return SchemaValidator.from_file(config.metadata.schema) if config.metadata.schema else None


def build_sinks(config: Config) -> list[Sink]:
    return [build_sink(s) for s in config.sinks]


class Daemon:
    """A running modelwatch: `start()`, then `serve(stop_event)` or `stop()`."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        sinks: Sequence[Sink] | None = None,
        host: str | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.host = host or socket.gethostname()
        self.sinks = list(sinks) if sinks is not None else build_sinks(config)
        self.changes: queue.Queue[Any] = queue.Queue()
        self.state = StateDir(config.daemon.state_dir)
        self.ready = threading.Event()
        self.watchers = [RootWatcher(r, self.changes, self.clock) for r in config.roots]
        self.workers: list[DeliveryWorker] = []
        self.pipeline: Pipeline | None = None
        self._store: Store | None = None
        self._alarm = OverflowAlarm(self._on_overflow)
        self._rng = random.Random()

    def start(self, *, wait_ready: bool = True) -> None:
        """Lock the state, start every thread, reconcile every root, then report ready."""
        schema = _schema(self.config)
        self.state.lock()
        self._store = Store(self.state.db_path)
        self._store.retry_now()
        registry = Registry(self._store, _routes(self.config), self.host)
        units = Units(self.config, registry, self.clock, schema)
        self.pipeline = Pipeline(units, self.changes, self.clock, self._wake_workers)
        attempts = {s.name: s.max_attempts for s in self.config.sinks}
        self.workers = [
            DeliveryWorker(
                sink, self.state.db_path, max_attempts=attempts.get(sink.name, 0), clock=self.clock
            )
            for sink in self.sinks
        ]
        for worker in self.workers:
            worker.start()
        self._alarm.install()
        for watcher in self.watchers:
            watcher.ensure()  # queues the initial Rescan of each existing root
        marker = Ready()
        self.changes.put(marker)
        self.pipeline.start()
        if wait_ready:
            marker.done.wait()
            self.ready.set()
            log.info("ready", roots=len(self.watchers), sinks=[s.name for s in self.sinks])

    def _wake_workers(self, _event: Event) -> None:
        for worker in self.workers:
            worker.wake.set()

    def _on_overflow(self) -> None:
        """Kernel events were lost: rescan every inotify root (called on a watchdog thread)."""
        log.warning("inotify_overflow", action="rescanning inotify roots")
        for watcher in self.watchers:
            if watcher.kind == "inotify":
                self.changes.put(Rescan(watcher.root.path, reason="overflow"))

    def serve(self, stop: threading.Event) -> None:
        """The lifecycle loop, until `stop` is set: follow roots, periodic reconcile."""
        interval = self.config.daemon.reconcile_interval_seconds
        next_reconcile = time.monotonic() + jittered(interval, self._rng)
        while not stop.wait(ROOT_CHECK_SECONDS):
            if os.getpid() == 1:  # a container without an init: we are the reaper
                reaper.reap_orphans()
            for watcher in self.watchers:
                watcher.ensure()
            if time.monotonic() >= next_reconcile:
                for watcher in self.watchers:
                    self.changes.put(Rescan(watcher.root.path, reason="periodic"))
                next_reconcile = time.monotonic() + jittered(interval, self._rng)

    def stop(self) -> None:
        """Stop intake, let in-flight deliveries finish within the shutdown timeout."""
        self._alarm.remove()
        for watcher in self.watchers:
            watcher.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
            self.pipeline.join(timeout=5)
        deadline = time.monotonic() + self.config.daemon.shutdown_timeout_seconds
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning(
                    "delivery_abandoned",
                    sink=worker.sink.name,
                    note="left in the outbox; delivered after restart",
                )
        if self._store is not None:
            self._store.close()
        self.state.unlock()
        log.info("stopped")


def scan_once(
    config: Config,
    *,
    dry_run: bool,
    clock: Clock | None = None,
    sinks: Sequence[Sink] | None = None,
    print_event: Any = None,
) -> bool:
    """`modelwatch scan`: one reconcile pass, stability over two scans, deliver, return.

    Returns False when some delivery failed (the events stay in the outbox).
    """
    clock = clock or SystemClock()
    state = StateDir(config.daemon.state_dir)
    if dry_run:
        store = Store.memory_copy(state.db_path)
    else:
        state.lock()
        store = Store(state.db_path)
    try:
        registry = Registry(store, _routes(config), socket.gethostname())
        units = Units(config, registry, clock, _schema(config))
        events = _scan_pass(units)
        if dry_run:
            for event in events:
                (print_event or _print)(event)
            return True
        built = list(sinks) if sinks is not None else build_sinks(config)
        attempts = {s.name: s.max_attempts for s in config.sinks}
        ok = True
        for sink in built:
            ok = drain(sink, store, max_attempts=attempts.get(sink.name, 0), clock=clock) and ok
            sink.close()
        return ok
    finally:
        store.close()
        state.unlock()


def _print(event: Event) -> None:
    print(event.to_json(), flush=True)


def _scan_pass(units: Units) -> list[Event]:
    """Scan every unit twice, `settle_seconds` apart; settle those that did not change."""
    first: dict[Unit, Manifest] = {}
    for root, rules in units.rules.items():
        for unit in units.candidates(root):
            first[unit] = rules.scan(unit)
    wait = max((r.timing.settle_seconds for r in units.rules.values()), default=0.0)
    if first:
        time.sleep(wait)
    events: list[Event] = []
    for unit, before in first.items():
        rules = units.rules[unit.root]
        after = rules.scan(unit)
        reason = "changed during the scan" if after.stat_key != before.stat_key else None
        if reason is None and after.exists:
            reason = readiness(unit.path, after, rules.config.policy)
        if reason is not None:
            log.info("unit_skipped", unit=unit.display, reason=reason)
            continue
        event = units.settle(unit, after, wait)
        if event is not None:
            events.append(event)
    return events
