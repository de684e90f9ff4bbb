"""Wiring the stages into a running daemon.

Threads: one observer per root (enqueue only), the settle loop (`Pipeline`), one delivery
worker per sink, an optional health server, and the caller's thread running the lifecycle
loop (`Daemon.serve`): it (re)starts watchers as roots come and go, schedules the periodic
reconcile, pings the systemd watchdog while every part is healthy, applies reloads, and stops
everything on request. Signal handlers (in `cli`) only set the flags this loop reads.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from modelwatch import reaper
from modelwatch.clock import Clock, SystemClock
from modelwatch.config import Config, RootConfig, SinkConfig
from modelwatch.delivery import DeliveryWorker
from modelwatch.errors import ModelwatchError
from modelwatch.events import Event
from modelwatch.health import HealthServer
from modelwatch.metadata import SchemaValidator
from modelwatch.metrics import Metrics
from modelwatch.notify import Notifier, pipeline_healthy
from modelwatch.pipeline import Pipeline, Ready, Reconfigure, Units
from modelwatch.registry import Registry, Route
from modelwatch.sinks import Sink, build_sink
from modelwatch.state import StateDir, Store
from modelwatch.watch import ObserverFactory, OverflowAlarm, Rescan, RootWatcher, make_observer

log = structlog.get_logger("modelwatch.daemon")

ROOT_CHECK_SECONDS = 1.0
# A thread whose heartbeat is older than this is wedged: the systemd watchdog is not pinged
# and /healthz fails. Longer than any sink timeout or single unit scan should take.
MAX_BEAT_AGE = 180.0  # default of Daemon.max_beat_age


def jittered(interval: float, rng: random.Random) -> float:
    """`interval` +-25%, so a fleet of nodes does not rescan shared storage in lockstep."""
    return interval * rng.uniform(0.75, 1.25)


def routes_for(config: Config) -> list[Route]:
    return [Route(s.name, s.event_types) for s in config.sinks]


def schema_for(config: Config) -> SchemaValidator | None:
    return SchemaValidator.from_file(config.metadata.schema) if config.metadata.schema else None


def build_sinks(config: Config) -> list[Sink]:
    return [build_sink(s) for s in config.sinks]


SinkFactory = Callable[[SinkConfig], Sink]


class Daemon:
    """A running modelwatch: `start()`, then `serve(stop_event)`, then `stop()`."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        sinks: Sequence[Sink] | None = None,
        sink_factory: SinkFactory = build_sink,
        host: str | None = None,
        environ: dict[str, str] | None = None,
        observer_factory: ObserverFactory = make_observer,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.host = host or socket.gethostname()
        self.sink_factory = sink_factory
        self.sinks = list(sinks) if sinks is not None else [sink_factory(s) for s in config.sinks]
        self.changes: queue.Queue[Any] = queue.Queue()
        self.state = StateDir(config.daemon.state_dir)
        self.ready = threading.Event()
        self.observer_factory = observer_factory
        self.watchers = [self._watcher(r) for r in config.roots]
        self.workers: list[DeliveryWorker] = []
        self.pipeline: Pipeline | None = None
        self.notifier = Notifier.from_environ(environ if environ is not None else os.environ)
        self.metrics = Metrics(sinks=[s.name for s in self.sinks], outbox=self._outbox_stats)
        self.health: HealthServer | None = None
        if config.daemon.health_listen:
            self.health = HealthServer(
                config.daemon.health_listen,
                alive=self.stale_parts,
                ready=self.ready,
                metrics=self.metrics,
            )
        self._store: Store | None = None
        self._metrics_store: Store | None = None
        self._alarm = OverflowAlarm(self._on_overflow)
        self._rng = random.Random()
        self._last_ping = 0.0
        self.max_beat_age = MAX_BEAT_AGE

    def _watcher(self, root: RootConfig) -> RootWatcher:
        return RootWatcher(root, self.changes, self.clock, self.observer_factory)

    # -- start -------------------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True) -> None:
        """Lock the state, start every thread, reconcile every root, then report ready."""
        schema = schema_for(self.config)
        self.state.lock()
        self._store = Store(self.state.db_path)
        self._store.retry_now()
        self._metrics_store = Store(self.state.db_path)
        if self.health is not None:
            self.health.start()  # /readyz answers 503 during the initial reconcile
        registry = Registry(self._store, routes_for(self.config), self.host)
        units = Units(self.config, registry, self.clock, schema)
        self.pipeline = Pipeline(units, self.changes, self.clock, self._on_event)
        for sink in self.sinks:
            self._start_worker(sink)
        self._alarm.install()
        for watcher in self.watchers:
            watcher.ensure()  # queues the initial Rescan of each existing root
            if not watcher.watching:  # a missing root: its units may have been removed
                self.changes.put(Rescan(watcher.root.path, reason="startup"))
            self.metrics.reconcile("startup")
        marker = Ready()
        self.changes.put(marker)
        self.pipeline.start()
        if wait_ready:
            marker.done.wait()
            self.ready.set()
            log.info("ready", roots=len(self.watchers), sinks=[s.name for s in self.sinks])
            self.notifier.ready(self._status())

    def _start_worker(self, sink: Sink) -> None:
        attempts = {s.name: s.max_attempts for s in self.config.sinks}
        worker = DeliveryWorker(
            sink,
            self.state.db_path,
            clock=self.clock,
            max_attempts=attempts.get(sink.name, 0),
            on_outcome=self.metrics.delivery,
        )
        self.workers.append(worker)
        worker.start()

    def _status(self) -> str:
        kinds = Counter(w.kind for w in self.watchers)
        roots = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no roots"
        return f"watching {len(self.watchers)} roots ({roots}), {len(self.workers)} sinks"

    # -- what the threads report ---------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Called by the settle thread after an event was committed to the outbox."""
        self.metrics.event(event.short_type)
        settled_after = event.data.get("settled_after_seconds")
        if isinstance(settled_after, (int, float)):
            self.metrics.settled(float(settled_after))
        for worker in self.workers:
            worker.wake.set()

    def _on_overflow(self) -> None:
        """Kernel events were lost: rescan every inotify root (called on a watchdog thread)."""
        log.warning("inotify_overflow", action="rescanning inotify roots")
        for watcher in self.watchers:
            if watcher.kind == "inotify":
                self.changes.put(Rescan(watcher.root.path, reason="overflow"))
                self.metrics.reconcile("overflow")

    def _outbox_stats(self) -> list[tuple[str, int, int]]:
        if self._metrics_store is None:
            return []
        return [(s.sink, s.pending, s.dead) for s in self._metrics_store.sink_stats()]

    def stale_parts(self) -> list[str]:
        """Names of dead or wedged parts; empty when the whole pipeline is healthy."""
        threads: list[Any] = [self.pipeline, *self.workers] if self.pipeline else []
        dead = [t.name for t in threads if not t.is_alive()]
        dead += [f"watch {w.root.path}" for w in self.watchers if not w.alive()]
        now = self.clock.monotonic()
        beats = {t.name: t.last_beat for t in threads if t not in self.workers}
        stale = pipeline_healthy(beats, now, self.max_beat_age)
        for worker in self.workers:
            # A sink may declare sends that legitimately take long (multi-GB uploads).
            allowed = max(self.max_beat_age, getattr(worker.sink, "max_send_seconds", 0.0))
            since = worker.sending_since
            beat_age = now - worker.last_beat
            if (since is not None and now - since > allowed) or (
                since is None and beat_age > self.max_beat_age
            ):
                stale.append(worker.name)
        return dead + stale

    # -- the lifecycle loop ----------------------------------------------------------------------

    def serve(
        self,
        stop: threading.Event,
        reload: Callable[[], Config | None] | None = None,
        reload_requested: threading.Event | None = None,
    ) -> None:
        """Run until `stop` is set: follow roots, periodic reconcile, watchdog, reloads.

        When `reload_requested` is set, `reload()` is called for the new config (None: keep).
        """
        next_reconcile = time.monotonic() + self._reconcile_interval()
        while not stop.wait(ROOT_CHECK_SECONDS):
            if reload_requested is not None and reload_requested.is_set():
                reload_requested.clear()
                self._reload(reload)
            if os.getpid() == 1:  # a container without an init: we are the reaper
                reaper.reap_orphans()
            for watcher in self.watchers:
                watcher.ensure()
            self.metrics.roots(Counter(w.kind for w in self.watchers))
            if time.monotonic() >= next_reconcile:
                for watcher in self.watchers:
                    self.changes.put(Rescan(watcher.root.path, reason="periodic"))
                    self.metrics.reconcile("periodic")
                next_reconcile = time.monotonic() + self._reconcile_interval()
            self._ping_watchdog()

    def _reconcile_interval(self) -> float:
        return jittered(self.config.daemon.reconcile_interval_seconds, self._rng)

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or time.monotonic() - self._last_ping < interval:
            return
        stale = self.stale_parts()
        if stale:
            log.error("pipeline_unhealthy", parts=stale, note="not pinging the watchdog")
            self.notifier.status("unhealthy: " + ", ".join(stale))
            return
        self.notifier.watchdog()
        self._last_ping = time.monotonic()

    # -- reload --------------------------------------------------------------------------------

    def _reload(self, load: Callable[[], Config | None] | None) -> None:
        self.notifier.reloading()
        try:
            new = load() if load is not None else None
            if new is not None:
                self.apply(new)
        except ModelwatchError as exc:
            log.error("reload_failed", error=str(exc), note="keeping the previous config")
            self.notifier.ready("reload failed, previous config kept: " + str(exc))
            return
        self.notifier.ready(self._status())

    def apply(self, new: Config) -> None:
        """Switch to `new` without a restart: roots and sinks added, removed or changed.

        Pending units of kept roots and undelivered events stay where they are. Raises
        ModelwatchError (and changes nothing) when the new config cannot be used.
        """
        if new.daemon.state_dir != self.config.daemon.state_dir:
            raise ModelwatchError("daemon.state_dir: changing it needs a restart")
        schema = schema_for(new)
        old_sinks = {s.name: s for s in self.config.sinks}
        changed = [s for s in new.sinks if old_sinks.get(s.name) != s]
        fresh = {s.name: self.sink_factory(s) for s in changed}  # may raise: nothing applied yet
        if self.pipeline is not None:
            step = Reconfigure(new, routes_for(new), schema)
            self.changes.put(step)
            step.done.wait()
        self._swap_workers(new, fresh)
        self._swap_watchers(new)
        self.config = new
        log.info("reloaded", roots=len(self.watchers), sinks=[w.sink.name for w in self.workers])

    def _swap_workers(self, new: Config, fresh: dict[str, Sink]) -> None:
        keep = {s.name for s in new.sinks} - set(fresh)
        for worker in [w for w in self.workers if w.sink.name not in keep]:
            worker.stop()
            worker.join(timeout=self.config.daemon.shutdown_timeout_seconds)
            self.workers.remove(worker)
        self.config = new  # max_attempts of new workers come from the new config
        for sink in fresh.values():
            self._start_worker(sink)
        self.sinks = [w.sink for w in self.workers]

    def _swap_watchers(self, new: Config) -> None:
        wanted = {r.path: r for r in new.roots}
        for watcher in list(self.watchers):
            if wanted.get(watcher.root.path) != watcher.root:
                watcher.stop()
                self.watchers.remove(watcher)
        kept = {w.root.path for w in self.watchers}
        for root in new.roots:
            if root.path not in kept:
                watcher = self._watcher(root)
                self.watchers.append(watcher)
                watcher.ensure()

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop intake, let in-flight deliveries finish within the shutdown timeout."""
        self.notifier.stopping()
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
        if self.health is not None:
            self.health.stop()
        for store in (self._store, self._metrics_store):
            if store is not None:
                store.close()
        self.state.unlock()
        log.info("stopped")
