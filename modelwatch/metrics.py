"""Prometheus metrics, on a registry of their own (never the process-global one).

Contract:

* `Metrics(version=..., sinks=..., outbox=...)` creates every series up front, so counters
  read 0 before their first increment and `rate()` works from the first scrape.
* Methods are named after what happened; the daemon calls them as it happens:
  `event(type)`, `delivery(sink, outcome)`, `settled(seconds)`, `roots(counts)`,
  `root_availability(roots)`, `reconcile(reason)`, `set_outbox(stats)`, `set_cluster(...)`.
  Each is thread-safe.
* Label values come from small fixed sets (`EVENT_TYPES`, `OUTCOMES`, `OBSERVERS`,
  `RECONCILE_REASONS`) or from configured sink names and root paths; anything else is a
  `ValueError`, so no label ever carries a unit's path or another unbounded value.
* `render()` returns the Prometheus text format. When an `outbox` callable was given it is
  called first (under a lock, one scrape at a time) to refresh the outbox gauges; if it fails
  the failure is logged (`metrics_outbox_failed`) and the previous values are served.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from modelwatch import __version__

log = structlog.get_logger("modelwatch.metrics")

EVENT_TYPES = ("registered", "rejected", "removed")
OUTCOMES = ("delivered", "failed", "dead")
OBSERVERS = ("inotify", "polling", "missing")
RECONCILE_REASONS = ("startup", "periodic", "overflow", "root_changed")
REJECTION_CODES = (
    "not_settled",
    "too_many_files",
    "inspection_timeout",
    "metadata_too_large",
    "metadata_not_regular_file",
    "metadata_unreadable",
    "metadata_encoding",
    "metadata_syntax",
    "metadata_duplicate_key",
    "metadata_too_deep",
    "metadata_metrics",
    "metadata_schema",
    "other",
)
# Seconds from a unit's first change to its settle: default settle periods are seconds, large
# checkpoints copied over a network take many minutes, and max_wait defaults to an hour.
SETTLE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

OutboxStats = Iterable[tuple[str, int, int]]  # (sink, pending, dead)


@dataclass(frozen=True, slots=True)
class ClusterRoot:
    """A shared root's lease as the metrics show it."""

    root: str
    held: bool
    paused: bool
    takeovers: int
    losses: int


def _known(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(allowed)}")
    return value


class Metrics:
    """Every modelwatch metric, registered in `self.registry`."""

    def __init__(
        self,
        *,
        version: str = __version__,
        sinks: Iterable[str] = (),
        outbox: Callable[[], OutboxStats] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._outbox_source = outbox
        self.refresh: Callable[[Metrics], None] | None = None  # called before each scrape
        self._render_lock = threading.Lock()
        self._outbox_lock = threading.Lock()
        self._outbox_sinks: set[str] = set()
        self._available_roots: set[str] = set()
        self._cluster_seen: dict[tuple[str, str], int] = {}
        self._define()
        self._initialise(version, tuple(sinks))

    def _define(self) -> None:
        registry = self.registry
        self._events = Counter(
            "modelwatch_events", "Events committed, by type.", ["type"], registry=registry
        )
        self._deliveries = Counter(
            "modelwatch_deliveries",
            "Delivery attempts, by sink and outcome (delivered, failed and retried, dead).",
            ["sink", "outcome"],
            registry=registry,
        )
        self._pending = Gauge(
            "modelwatch_outbox_pending",
            "Events waiting in the outbox, by sink.",
            ["sink"],
            registry=registry,
        )
        self._dead = Gauge(
            "modelwatch_dead_letters", "Dead-lettered events, by sink.", ["sink"], registry=registry
        )
        self._settle = Histogram(
            "modelwatch_settle_seconds",
            "Seconds from a unit's first observed change to its settle.",
            buckets=SETTLE_BUCKETS,
            registry=registry,
        )
        self._roots = Gauge(
            "modelwatch_roots", "Roots, by observer kind.", ["observer"], registry=registry
        )
        self._available = Gauge(
            "modelwatch_root_available",
            "1 while a configured root is available, 0 while it is unavailable (missing, "
            "unreadable, its root_marker missing, or an empty mount point): nothing of it is "
            "removed or registered.",
            ["root"],
            registry=registry,
        )
        self._reconciles = Counter(
            "modelwatch_reconciles", "Root reconciles, by reason.", ["reason"], registry=registry
        )
        self._oldest = Gauge(
            "modelwatch_outbox_oldest_pending_seconds",
            "Age of the oldest event waiting in the outbox, by sink (0 when none waits).",
            ["sink"],
            registry=registry,
        )
        self._discarded = Gauge(
            "modelwatch_discarded",
            "Events given up for good with `modelwatch discard`, by sink.",
            ["sink"],
            registry=registry,
        )
        self._rejections = Counter(
            "modelwatch_rejections",
            "Rejected events, by error code (not_settled, metadata_*, inspection_timeout, ...).",
            ["code"],
            registry=registry,
        )
        self._progress = Gauge(
            "modelwatch_progress_age_seconds",
            "Seconds since each part (settle loop, inspection and delivery workers) last made "
            "progress; past 180 s it is wedged and /healthz fails.",
            ["part"],
            registry=registry,
        )
        self._pending_units = Gauge(
            "modelwatch_pending_units",
            "Units changed and not settled yet.",
            registry=registry,
        )
        self._fallback = Gauge(
            "modelwatch_inotify_fallback",
            "1 for a root polled because inotify failed on it (watch or instance limits).",
            ["root"],
            registry=registry,
        )
        self._lease_held = Gauge(
            "modelwatch_cluster_lease_held",
            "1 while this node holds the lease of a shared root (it watches and registers it),"
            " 0 while it is a standby.",
            ["root"],
            registry=registry,
        )
        self._cluster_paused = Gauge(
            "modelwatch_cluster_paused",
            "1 while the cluster backend fails for a shared root: nothing of it is registered.",
            ["root"],
            registry=registry,
        )
        self._takeovers = Counter(
            "modelwatch_cluster_takeovers",
            "Times this node took a shared root's lease.",
            ["root"],
            registry=registry,
        )
        self._lease_losses = Counter(
            "modelwatch_cluster_lease_losses",
            "Times this node lost a shared root's lease (taken over, or not renewed in time).",
            ["root"],
            registry=registry,
        )
        self._backend_errors = Counter(
            "modelwatch_cluster_backend_errors",
            "Cluster backend calls that failed (unreachable, timed out, refused).",
            registry=registry,
        )
        self._info = Gauge(
            "modelwatch_info",
            "Always 1; the labels describe the build.",
            ["version"],
            registry=registry,
        )

    def _initialise(self, version: str, sinks: tuple[str, ...]) -> None:
        self._info.labels(version=version).set(1)
        for kind in EVENT_TYPES:
            self._events.labels(type=kind)
        for observer in OBSERVERS:
            self._roots.labels(observer=observer)
        for reason in RECONCILE_REASONS:
            self._reconciles.labels(reason=reason)
        for code in REJECTION_CODES:
            self._rejections.labels(code=code)
        for sink in sinks:
            for outcome in OUTCOMES:
                self._deliveries.labels(sink=sink, outcome=outcome)
        self.set_outbox((sink, 0, 0) for sink in sinks)

    def event(self, type: str) -> None:
        """An event was committed; `type` is short ("registered") or the full CloudEvents type."""
        short = _known("event type", type.rsplit(".", 1)[-1], EVENT_TYPES)
        self._events.labels(type=short).inc()

    def delivery(self, sink: str, outcome: str) -> None:
        """One delivery attempt to `sink` ended with `outcome` (delivered, failed or dead)."""
        self._deliveries.labels(sink=sink, outcome=_known("outcome", outcome, OUTCOMES)).inc()

    def settled(self, seconds: float) -> None:
        """A unit settled `seconds` after its first observed change."""
        self._settle.observe(max(0.0, seconds))

    def roots(self, counts: Mapping[str, int]) -> None:
        """How many roots each observer kind watches now; kinds left out count 0."""
        for observer in counts:
            _known("observer", observer, OBSERVERS)
        for observer in OBSERVERS:
            self._roots.labels(observer=observer).set(counts.get(observer, 0))

    def root_availability(self, roots: Mapping[str, bool]) -> None:
        """Whether each configured root (by path) is available now; roots left out are
        dropped from the metric (no longer configured, or not checked yet)."""
        with self._outbox_lock:
            for root in self._available_roots - roots.keys():
                self._available.remove(root)
            for root, available in roots.items():
                self._available.labels(root=root).set(1 if available else 0)
            self._available_roots = set(roots)

    def reconcile(self, reason: str) -> None:
        """A root was reconciled against the state store, for `reason`."""
        self._reconciles.labels(reason=_known("reconcile reason", reason, RECONCILE_REASONS)).inc()

    def rejected(self, codes: Iterable[str]) -> None:
        """A `rejected` event was committed with these error codes (each counted once)."""
        for code in set(codes):
            self._rejections.labels(code=_known("rejection code", code, REJECTION_CODES)).inc()

    def set_delivery_backlog(self, backlog: Iterable[tuple[str, float, int]]) -> None:
        """(sink, age of its oldest pending event in seconds, discarded count) per sink."""
        for sink, oldest, discarded in backlog:
            self._oldest.labels(sink=sink).set(oldest)
            self._discarded.labels(sink=sink).set(discarded)

    def set_progress(self, ages: Mapping[str, float], pending_units: int) -> None:
        """Seconds since each part's last progress, and how many units are pending."""
        for part, age in ages.items():
            self._progress.labels(part=part).set(max(0.0, age))
        self._pending_units.set(pending_units)

    def set_fallback(self, roots: Mapping[str, bool]) -> None:
        """Which roots are polled because inotify failed on them."""
        for root, fell_back in roots.items():
            self._fallback.labels(root=root).set(1 if fell_back else 0)

    def set_cluster(self, roots: Iterable[ClusterRoot], backend_errors: int) -> None:
        """The shared roots as the coordinator sees them, with its cumulative counts (the
        counters move by what was added since the last call)."""
        with self._outbox_lock:
            for root in roots:
                self._lease_held.labels(root=root.root).set(1 if root.held else 0)
                self._cluster_paused.labels(root=root.root).set(1 if root.paused else 0)
                self._advance(self._takeovers, ("takeovers", root.root), root.takeovers)
                self._advance(self._lease_losses, ("losses", root.root), root.losses)
            self._advance(self._backend_errors, ("errors", ""), backend_errors)

    def _advance(self, counter: Counter, key: tuple[str, str], total: int) -> None:
        added = total - self._cluster_seen.get(key, 0)
        if added > 0:
            (counter.labels(root=key[1]) if key[1] else counter).inc(added)
            self._cluster_seen[key] = total

    def set_outbox(self, stats: OutboxStats) -> None:
        """Outbox depth per sink from `(sink, pending, dead)`; sinks seen before and missing
        now read 0."""
        rows = {sink: (pending, dead) for sink, pending, dead in stats}
        with self._outbox_lock:
            for sink in self._outbox_sinks - rows.keys():
                rows[sink] = (0, 0)
            for sink, (pending, dead) in rows.items():
                self._pending.labels(sink=sink).set(pending)
                self._dead.labels(sink=sink).set(dead)
            self._outbox_sinks |= rows.keys()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (refreshing the outbox first)."""
        with self._render_lock:
            self._refresh_outbox()
            if self.refresh is not None:
                try:
                    self.refresh(self)
                except Exception as exc:  # like the outbox: serve what is known
                    log.warning("metrics_refresh_failed", error=str(exc))
            return generate_latest(self.registry)

    def _refresh_outbox(self) -> None:
        if self._outbox_source is None:
            return
        try:
            self.set_outbox(self._outbox_source())
        except Exception as exc:  # a failing scrape must not take the health server down
            log.warning("metrics_outbox_failed", error=str(exc))
