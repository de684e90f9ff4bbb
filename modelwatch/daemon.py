"""Wiring the stages into a running daemon.

Threads: one observer per root (enqueue only), the settle loop, the inspection pool, one
delivery worker per sink, an optional health server, the control socket (`explain` asks
there), with shared roots the cluster coordinator, and the caller's thread running the
lifecycle loop (`Daemon.serve`): it (re)starts watchers as roots come and go (a shared root
only while this node holds its lease), schedules the periodic reconcile, pings the systemd
watchdog while every part makes progress, applies reloads, and stops everything on request.
Signal handlers (in `cli`) only set the flags this loop reads. Every "when" here is read from
the injected clock.
"""

from __future__ import annotations

import os
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
from modelwatch.cluster.backend import Backend
from modelwatch.cluster.connect import connect
from modelwatch.cluster.coordinator import Coordinator
from modelwatch.cluster.ledger import Ledger
from modelwatch.cluster.sharing import shared_roots
from modelwatch.config import Config, RootConfig, SinkConfig
from modelwatch.control import ControlServer
from modelwatch.delivery import DeliveryWorker
from modelwatch.errors import ModelwatchError, StateError
from modelwatch.events import Event
from modelwatch.health import HealthServer
from modelwatch.metrics import REJECTION_CODES, ClusterRoot, Metrics
from modelwatch.notify import Notifier
from modelwatch.pending import Snapshot
from modelwatch.pool import InspectionPool
from modelwatch.progress import Heartbeat, wedged
from modelwatch.settle_loop import Flush, Inbox, Reconfigure, SettleLoop, Stop
from modelwatch.sinks import Sink, build_sink
from modelwatch.stages import Stages, build_stages, routes_for, schema_for
from modelwatch.state import StateDir, Store
from modelwatch.units import describe
from modelwatch.views import Views
from modelwatch.watch import ObserverFactory, OverflowAlarm, Rescan, RootWatcher, make_observer

log = structlog.get_logger("modelwatch.daemon")

ROOT_CHECK_SECONDS = 1.0
# A part without progress for this long is wedged: the systemd watchdog is not pinged and
# /healthz fails. Long work (hashing, uploading) reports progress, so this only has to be
# longer than any single step of work that reports none (one system call, one small read).
MAX_BEAT_AGE = 180.0  # default of Daemon.max_beat_age
# While the initial reconcile runs, systemd is asked for this much more start time at a time.
EXTEND_START_SECONDS = 30.0
RELOAD_WAIT_SECONDS = 30.0

SinkFactory = Callable[[SinkConfig], Sink]


def jittered(interval: float, rng: random.Random) -> float:
    """`interval` +-25%, so a fleet of nodes does not rescan shared storage in lockstep."""
    return interval * rng.uniform(0.75, 1.25)


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
        backend: Backend | None = None,
    ) -> None:
        """`backend`: the cluster backend to use instead of the configured one (tests)."""
        self.config = config
        self.clock = clock or SystemClock()
        self.host = host or config.cluster.node_id or socket.gethostname()
        self.shared = frozenset(shared_roots(config))
        self.backend = backend
        if self.backend is None and self.shared:
            self.backend = connect(config.cluster, environ)
        self.coordinator: Coordinator | None = None
        self.sink_factory = sink_factory
        self.sinks = list(sinks) if sinks is not None else [sink_factory(s) for s in config.sinks]
        self.inbox: Inbox = Inbox()
        self.state = StateDir(config.daemon.state_dir)
        self.ready = threading.Event()
        self.observer_factory = observer_factory
        self.watchers = [self._watcher(r) for r in config.roots]
        self.workers: list[DeliveryWorker] = []
        self.stages: Stages | None = None
        self.notifier = Notifier.from_environ(environ if environ is not None else os.environ)
        self.metrics = Metrics(sinks=[s.name for s in self.sinks], outbox=self._outbox_stats)
        self.metrics.refresh = self._refresh_metrics
        self.health: HealthServer | None = None
        if config.daemon.health_listen:
            self.health = HealthServer(
                config.daemon.health_listen,
                alive=self.stale_parts,
                ready=self.ready,
                metrics=self.metrics,
                pages=self._pages,
            )
        self._metrics_store: Store | None = None
        self._observer_store: Store | None = None  # the main thread's, for `_record_observers`
        self._observers_recorded: dict[str, str] = {}
        self.control: ControlServer | None = None
        self.views = Views(
            config=lambda: self.config,
            snapshot=self._snapshot,
            observers=lambda: {w.root.path: w.kind for w in list(self.watchers)},
            clock=self.clock,
            host=self.host,
        )
        self._alarm = OverflowAlarm(self._on_overflow)
        self._rng = random.Random()
        self._last_ping: float | None = None
        self.max_beat_age = MAX_BEAT_AGE

    @property
    def loop(self) -> SettleLoop | None:
        return self.stages.loop if self.stages is not None else None

    def _watcher(self, root: RootConfig) -> RootWatcher:
        return RootWatcher(root, self.inbox, self.clock, self.observer_factory)

    # -- start -------------------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True, stop: threading.Event | None = None) -> None:
        """Lock the state, start every thread, reconcile every root, then report ready; a
        `stop` set meanwhile (SIGTERM during a long initial reconcile) ends the wait, not
        ready, so the stop is carried out within its timeout."""
        schema = schema_for(self.config)
        self.state.lock()
        store = Store(self.state.db_path)
        store.outbox.retry_now()
        self._metrics_store = Store(self.state.db_path)
        if self.health is not None:
            self.health.start()  # /readyz answers 503 during the initial reconcile
        self.stages = build_stages(
            self.config,
            store,
            clock=self.clock,
            host=self.host,
            on_event=self._on_event,
            schema=schema,
            workers=self.config.daemon.inspect_workers,
            inbox=self.inbox,
            ledger=self._cluster(),
        )
        if isinstance(self.stages.pool, InspectionPool):
            self.stages.pool.start()
        self._start_control()
        for sink in self.sinks:
            self._start_worker(sink)
        self._alarm.install()
        if self.coordinator is not None:
            self.coordinator.turn()  # shared roots held from the start are ready with the rest
            self.coordinator.start()
        for watcher in self.watchers:
            if not self._watches(watcher.root.path):
                continue  # a standby does not scan a shared root
            watcher.ensure()  # queues the initial Rescan of each existing root
            if not watcher.watching:  # a missing root: it is reported unavailable
                self.inbox.put(Rescan(watcher.root.path, reason="startup"))
            self.metrics.reconcile("startup")
        initial = Flush()
        self.inbox.put(initial)
        self.stages.loop.start()
        if wait_ready:
            if not self._wait_initial_reconcile(initial, stop or threading.Event()):
                log.info("stopping_before_ready", note="the initial reconcile was not finished")
                return
            self.ready.set()
            log.info("ready", roots=len(self.watchers), sinks=[s.name for s in self.sinks])
            self.notifier.ready(self._status())

    def _start_control(self) -> None:
        """The control socket `explain` asks; without it `explain` answers from the store."""
        control = ControlServer(self.state.path, self.state.db_path, self.views.answer)
        try:
            control.start()
        except OSError as exc:
            log.warning("control_socket_failed", path=control.path, error=str(exc))
            return
        self.control = control

    def _snapshot(self) -> Snapshot:
        return self.loop.snapshot if self.loop is not None else Snapshot()

    def _pages(self, path: str) -> tuple[int, str, bytes] | None:
        """The status page and its JSON, on the health server's thread: it owns the metrics
        store (both read the store between requests, never at once)."""
        store = self._metrics_store
        return None if store is None else self.views.web(path, store)

    def _cluster(self) -> Ledger | None:
        """The coordinator and the ledger of the shared roots (None without any)."""
        if not self.shared or self.backend is None:
            return None
        self.coordinator = Coordinator(
            self.backend,
            sorted(self.shared),
            node=self.host,
            lease_seconds=self.config.cluster.lease_seconds,
            clock=self.clock,
            post=self.inbox.put,
        )
        log.info(
            "cluster",
            backend=self.backend.shown,
            node=self.host,
            shared=[describe(root) for root in sorted(self.shared)],
        )
        return Ledger(self.backend, self.coordinator, self.shared)

    def _watches(self, root: str) -> bool:
        """Whether this node watches `root` now: a local root always, a shared one while it
        holds the root's lease."""
        return root not in self.shared or (
            self.coordinator is not None and self.coordinator.holds(root)
        )

    def _wait_initial_reconcile(self, initial: Flush, stop: threading.Event) -> bool:
        """Wait for the initial reconcile, asking systemd for more start time meanwhile (a
        root of a million files on NFS takes minutes, longer than a start timeout); False
        when `stop` was set first."""
        extended = time.monotonic()
        while not initial.done.wait(0.1):
            if stop.is_set():
                return False
            if time.monotonic() - extended >= EXTEND_START_SECONDS / 3:
                extended = time.monotonic()
                self.notifier.extend_timeout(EXTEND_START_SECONDS)
                self.notifier.status("reconciling roots with the state store")
        return True

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
        down = [root for root, status in self._root_states().items() if not status.available]
        unavailable = f", {len(down)} unavailable" if down else ""
        return (
            f"watching {len(self.watchers)} roots ({roots}{unavailable}), {len(self.workers)} sinks"
        )

    def _root_states(self) -> dict[str, Any]:
        loop = self.loop
        return dict(loop.roots) if loop is not None else {}

    # -- what the threads report ---------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Called by the settle thread after an event was committed to the outbox."""
        self.metrics.event(event.short_type)
        self.views.record(event)
        if event.short_type == "rejected":
            codes = [str(e.get("code")) for e in event.data.get("errors") or ()]
            self.metrics.rejected(c if c in REJECTION_CODES else "other" for c in codes)
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
                self.inbox.put(Rescan(watcher.root.path, reason="overflow"))
                self.metrics.reconcile("overflow")

    def _outbox_stats(self) -> list[tuple[str, int, int]]:
        if self._metrics_store is None:
            return []
        return [(s.sink, s.pending, s.dead) for s in self._metrics_store.outbox.sink_stats()]

    def _refresh_metrics(self, metrics: Metrics) -> None:
        """Scrape-time figures: delivery backlog ages, progress ages, pending units."""
        now, wall = self.clock.monotonic(), self.clock.time()
        if self._metrics_store is not None:
            metrics.set_delivery_backlog(
                (s.sink, 0.0 if s.oldest_pending is None else wall - s.oldest_pending, s.discarded)
                for s in self._metrics_store.outbox.sink_stats()
            )
        if self.stages is not None:
            loop, pool = self.stages.loop, self.stages.pool
            beats = [loop.heartbeat, *(w.heartbeat for w in self.workers)]
            if isinstance(pool, InspectionPool):
                beats += pool.heartbeats
            if self.coordinator is not None:
                beats.append(self.coordinator.heartbeat)
            metrics.set_progress({h.name: h.age(now) for h in beats}, len(loop.settler))
        metrics.set_fallback({describe(w.root.path): w.fell_back for w in self.watchers})
        if self.coordinator is not None:
            metrics.set_cluster(
                (
                    ClusterRoot(
                        describe(s.root),
                        s.role == "holder",
                        s.paused,
                        s.takeovers,
                        s.losses,
                    )
                    for s in self.coordinator.status()
                ),
                self.coordinator.errors,
            )

    def stale_parts(self) -> list[str]:
        """Names of dead or wedged parts; empty when the whole pipeline is healthy.

        A part is wedged when it made no progress for `max_beat_age` seconds. A sink may
        declare sends that legitimately take long without reporting progress
        (`max_send_seconds`); a send is wedged only past that.
        """
        if self.stages is None:
            return []
        loop, pool = self.stages.loop, self.stages.pool
        threads: list[threading.Thread] = [loop, *self.workers]
        dead = [t.name for t in threads if not t.is_alive()]
        if isinstance(pool, InspectionPool):
            dead += pool.alive()
        dead += [f"watch {describe(w.root.path)}" for w in self.watchers if not w.alive()]
        now = self.clock.monotonic()
        beats: list[Heartbeat] = [loop.heartbeat]
        if self.coordinator is not None:
            beats.append(self.coordinator.heartbeat)
            if self.coordinator.ident is not None and not self.coordinator.is_alive():
                dead.append(self.coordinator.name)
        if isinstance(pool, InspectionPool):
            beats += pool.heartbeats
        stale = wedged(beats, now, self.max_beat_age)
        stale += [
            f"watch {describe(w.root.path)}"
            for w in self.watchers
            if w.stalled() > self.max_beat_age  # a poll pass stuck on a hung mount
        ]
        for worker in self.workers:
            allowed = self.max_beat_age
            if worker.sending_since is not None:
                allowed = max(allowed, getattr(worker.sink, "max_send_seconds", 0.0))
            if worker.heartbeat.age(now) > allowed:
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
        next_reconcile = self.clock.monotonic() + self._reconcile_interval()
        while not stop.wait(ROOT_CHECK_SECONDS):
            if reload_requested is not None and reload_requested.is_set():
                reload_requested.clear()
                self._reload(reload)
            if os.getpid() == 1:  # a container without an init: we are the reaper
                reaper.reap_orphans()
            self._follow_roots()
            self._report_roots()
            self._record_observers()
            if self.clock.monotonic() >= next_reconcile:
                for watcher in self.watchers:
                    if self._watches(watcher.root.path):
                        self.inbox.put(Rescan(watcher.root.path, reason="periodic"))
                        self.metrics.reconcile("periodic")
                next_reconcile = self.clock.monotonic() + self._reconcile_interval()
            self._ping_watchdog()

    def _follow_roots(self) -> None:
        """Watch each root that appeared; a shared root only while this node holds it."""
        for watcher in self.watchers:
            if self._watches(watcher.root.path):
                watcher.ensure()
            elif watcher.watching:
                watcher.stop()
                log.info("root_unwatched", root=describe(watcher.root.path), note="standby")

    def _report_roots(self) -> None:
        self.metrics.roots(Counter(w.kind for w in self.watchers))
        states = self._root_states()
        self.metrics.root_availability(
            {
                describe(w.root.path): states[w.root.path].available
                for w in self.watchers
                if w.root.path in states
            }
        )

    def _record_observers(self) -> None:
        """Store how each root is watched (inotify, polling, missing), for `status`."""
        changed = {
            w.root.path: w.kind
            for w in self.watchers
            if self._observers_recorded.get(w.root.path) != w.kind
        }
        if not changed:
            return
        try:
            if self._observer_store is None:
                self._observer_store = Store(self.state.db_path)
            for path, kind in changed.items():
                if self._observer_store.units.set_observer(describe(path), kind):
                    self._observers_recorded[path] = kind
        except StateError as exc:  # shown again at the next try
            log.warning("state_write_failed", error=str(exc))

    def _reconcile_interval(self) -> float:
        return jittered(self.config.daemon.reconcile_interval_seconds, self._rng)

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        now = self.clock.monotonic()
        if interval is None or (self._last_ping is not None and now - self._last_ping < interval):
            return
        stale = self.stale_parts()
        if stale:
            log.error("pipeline_unhealthy", parts=stale, note="not pinging the watchdog")
            self.notifier.status("unhealthy: " + ", ".join(stale))
            return
        self.notifier.watchdog()
        self._last_ping = now

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
        if new.cluster != self.config.cluster or frozenset(shared_roots(new)) != self.shared:
            raise ModelwatchError(
                "cluster: changing it, or which roots are shared, needs a restart"
            )
        schema = schema_for(new)
        old_sinks = {s.name: s for s in self.config.sinks}
        changed = [s for s in new.sinks if old_sinks.get(s.name) != s]
        fresh = {s.name: self.sink_factory(s) for s in changed}  # may raise: nothing applied yet
        if self.stages is not None:
            step = Reconfigure(new, routes_for(new), schema)
            self.inbox.put(step)
            # The loop does no slow work, so this is quick; never wait unboundedly anyway.
            if not step.done.wait(RELOAD_WAIT_SECONDS):
                log.warning("reload_slow", note="the settle loop applies the new config later")
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
        """Stop intake, give pending units their last chance, deliver, within the shutdown
        timeout (SPEC §11)."""
        self.notifier.stopping()
        self._alarm.remove()
        polled = [w.root.path for w in self.watchers if w.kind == "polling"]
        for watcher in self.watchers:
            watcher.stop()
        deadline = self.clock.monotonic() + self.config.daemon.shutdown_timeout_seconds
        if self.stages is not None:
            self._last_poll(self.stages, polled, deadline)
            self._last_chance(self.stages, deadline)
        for worker in self.workers:
            worker.finish(deadline)
        for worker in self.workers:
            worker.join(timeout=self._left(deadline))
            if worker.is_alive():
                worker.stop()
                log.warning(
                    "delivery_abandoned",
                    sink=worker.sink.name,
                    note="left in the outbox; delivered after restart",
                )
        self._leave_cluster()
        if self.health is not None:
            self.health.stop()
        if self.control is not None:
            self.control.stop()
        if self.stages is not None:
            self.stages.store.close()
        if self._metrics_store is not None:
            self._metrics_store.close()
        if self._observer_store is not None:
            self._observer_store.close()
        self.state.unlock()
        log.info("stopped")

    def _leave_cluster(self) -> None:
        """Acknowledge what was delivered, then give the leases up, so another node takes
        the shared roots over at once (and redelivers only what is still undelivered)."""
        if self.coordinator is not None and self.stages is not None:
            try:
                self.stages.registry.sweep(self.clock.monotonic(), force=True)
            except ModelwatchError as exc:
                log.warning("cluster_sweep_failed", error=str(exc))
            self.coordinator.shutdown(timeout=5.0)
        if self.backend is not None:
            self.backend.close()

    def _last_poll(self, stages: Stages, roots: list[str], deadline: float) -> None:
        """A polling root's last pass: a model written since the previous one (up to a poll
        interval before the stop) becomes pending, so it gets its last chance too. Given at
        most half of the shutdown time."""
        if not roots or not self.ready.is_set() or not stages.loop.is_alive():
            return
        for root in roots:
            self.inbox.put(Rescan(root, reason="stop"))
        done = Flush()
        self.inbox.put(done)
        if not done.done.wait(self._left(deadline) / 2):
            log.warning("last_poll_unfinished", note="what it did not reach waits for the start")

    def _last_chance(self, stages: Stages, deadline: float) -> None:
        loop = stages.loop
        if loop.is_alive():
            stop = Stop(deadline)
            self.inbox.put(stop)
            if not stop.done.wait(self._left(deadline) + 1.0):
                loop.abandon()  # past the deadline on the real clock too: stop regardless
            loop.join(timeout=2.0)
        if isinstance(stages.pool, InspectionPool):
            stages.pool.stop(timeout=1.0)

    def _left(self, deadline: float) -> float:
        return max(0.0, deadline - self.clock.monotonic())
