"""The coordinator: one thread per daemon that holds, renews and gives up the leases of the
shared roots (the decisions are `lease.RootLease`'s; this is the shell that calls the backend).

It tells the settle loop what changed through its inbox, in order:

* `Acquired(root, lease, units, bodies)` when this node takes a root: the root's stored unit
  histories and the bodies of its undelivered events, read right after the lease was taken,
  so the settle loop can adopt them, redeliver, and reconcile the root;
* `Released(root, reason)` when it stops holding one (another node has it, or the lease could
  not be renewed before its fence).

The daemon's lifecycle loop reads `holds(root)` to start or stop the root's watcher; every
commit of a shared root asks `writable(root)` for the lease, which is None past the fence or
while the backend is failing (the root pauses at once instead of waiting out a timeout per
unit). A `Heartbeat` shows the thread's progress to /healthz; a backend outage is progress
(each call ends within the backend's timeout), never a wedged daemon.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from modelwatch.clock import Clock
from modelwatch.cluster.backend import Backend, Busy, ClusterError, Lease, LeaseLost, Stored
from modelwatch.cluster.lease import RootLease
from modelwatch.progress import Heartbeat
from modelwatch.units import describe

log = structlog.get_logger("modelwatch.cluster")


@dataclass(frozen=True, slots=True)
class Acquired:
    """This node holds `root` now; `units` and `bodies` are what the backend had for it."""

    root: str
    lease: Lease
    units: Mapping[str, Stored]
    bodies: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class Released:
    """This node no longer holds `root` (why: `reason`)."""

    root: str
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseStatus:
    """One shared root as this node sees it, for `status`, metrics and the logs."""

    root: str
    role: str  # holder | standby
    paused: bool  # the backend is failing: nothing of the root is registered now
    holder: str | None
    error: str
    takeovers: int
    losses: int


class Coordinator(threading.Thread):
    """See the module docstring. `post` puts a message on the settle loop's inbox."""

    def __init__(
        self,
        backend: Backend,
        roots: Sequence[str],
        *,
        node: str,
        lease_seconds: float,
        clock: Clock,
        post: Callable[[Acquired | Released], None],
    ) -> None:
        super().__init__(name="cluster", daemon=True)
        self.backend = backend
        self.node = node
        self.seconds = lease_seconds
        self.clock = clock
        self.post = post
        self.heartbeat = Heartbeat("cluster", clock)
        self.errors = 0  # failed backend calls, for metrics
        self.takeovers: Counter[str] = Counter()
        self.losses: Counter[str] = Counter()
        self._roots = {root: RootLease(root) for root in roots}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # -- what other threads ask ----------------------------------------------------------------

    def holds(self, root: str) -> bool:
        """True while this node holds `root` (before its fence)."""
        with self._lock:
            state = self._roots.get(root)
            return state is not None and state.held(self.clock.monotonic())

    def writable(self, root: str) -> Lease | None:
        """Our lease of `root` if a commit may use it now: held, before the fence, and the
        backend not failing."""
        with self._lock:
            state = self._roots.get(root)
            now = self.clock.monotonic()
            if state is None or not state.held(now) or state.failing_since is not None:
                return None
            return state.lease

    def report_failure(self, root: str, error: str) -> None:
        """A commit found the backend failing: pause `root` until a renewal succeeds."""
        with self._lock:
            state = self._roots.get(root)
            if state is not None and state.failing_since is None:
                state.failing_since, state.last_error = self.clock.monotonic(), error
                state.next_attempt = self.clock.monotonic()
        self.errors += 1

    def status(self) -> list[LeaseStatus]:
        now = self.clock.monotonic()
        with self._lock:
            return [self._status(state, now) for state in self._roots.values()]

    def _status(self, state: RootLease, now: float) -> LeaseStatus:
        held = state.held(now)
        return LeaseStatus(
            state.root,
            "holder" if held else "standby",
            state.failing_since is not None,
            self.node if held else state.holder,
            state.last_error,
            self.takeovers[state.root],
            self.losses[state.root],
        )

    # -- the thread ------------------------------------------------------------------------------

    def run(self) -> None:
        with self.heartbeat.attached():
            while not self._stopping.is_set():
                self.heartbeat.beat()
                try:
                    self.turn()
                except Exception:  # a bug must not end lease keeping; logged, retried
                    log.exception("cluster_error")
                self._stopping.wait(self._wait())

    def turn(self) -> None:
        """Renew what is held, try to take what is not, give up what passed its fence."""
        for state in list(self._roots.values()):
            if self._stopping.is_set():
                return
            self._fence(state)
            if not state.due(self.clock.monotonic()):
                continue
            if state.lease is not None:
                self._renew(state, state.lease)
            else:
                self._acquire(state)

    def _wait(self) -> float:
        now = self.clock.monotonic()
        with self._lock:
            times = [s.next_attempt for s in self._roots.values()]
            times += [s.valid_until for s in self._roots.values() if s.lease is not None]
        return min(1.0, max(0.02, min(times, default=now + 1.0) - now))

    def _acquire(self, state: RootLease) -> None:
        sent = self.clock.monotonic()
        result: Lease | Busy | None = None
        try:
            result = self.backend.acquire(state.root, self.node, self.seconds)
            if isinstance(result, Busy):
                with self._lock:
                    state.busy(result, self.clock.monotonic(), self.seconds)
                return
            units = self.backend.load(state.root)
            wanted = {i for stored in units.values() for i in stored.undelivered}
            bodies = self.backend.events(state.root, wanted)
        except ClusterError as exc:
            if isinstance(result, Lease):  # taken but unreadable: let another node try
                self._give_up(result)
            self._failed(state, exc)
            return
        with self._lock:
            state.acquired(result, sent)
        # The settle loop drops a shared root's changes and rescans until it has adopted the
        # stored histories (Acquired); the reconcile it starts then finds whatever they missed.
        self.post(Acquired(state.root, result, units, bodies))
        self.takeovers[state.root] += 1
        log.info(
            "lease_acquired",
            root=describe(state.root),
            node=self.node,
            units=len(units),
            undelivered=len(wanted),
        )

    def _renew(self, state: RootLease, held: Lease) -> None:
        sent = self.clock.monotonic()
        try:
            lease = self.backend.renew(held)
        except LeaseLost:
            with self._lock:
                state.lost(self.clock.monotonic())
            self._released(state, "another node holds the lease")
            return
        except ClusterError as exc:
            self._failed(state, exc)
            return
        with self._lock:
            state.renewed(lease, sent)

    def _failed(self, state: RootLease, exc: ClusterError) -> None:
        self.errors += 1
        with self._lock:
            first = state.failing_since is None
            fenced = state.failed(str(exc), self.clock.monotonic(), self.seconds)
        if first:
            log.warning("cluster_backend_failed", root=describe(state.root), error=str(exc))
        if fenced:
            self._released(state, f"the lease could not be renewed in time: {exc}")

    def _fence(self, state: RootLease) -> None:
        with self._lock:
            fenced = state.fenced(self.clock.monotonic())
        if fenced:
            self._released(state, "the lease could not be renewed in time")

    def _released(self, state: RootLease, reason: str) -> None:
        self.losses[state.root] += 1
        log.warning("lease_lost", root=describe(state.root), node=self.node, reason=reason)
        self.post(Released(state.root, reason))

    # -- stopping --------------------------------------------------------------------------------

    def shutdown(self, timeout: float) -> None:
        """Stop the thread, then give up every lease still held, so another node takes over
        at once instead of after the lease runs out."""
        self._stopping.set()
        if self.ident is not None:
            self.join(timeout)
        with self._lock:
            held = [s.lease for s in self._roots.values() if s.lease is not None]
            for state in self._roots.values():
                state.lease = None
        for lease in held:
            self._give_up(lease)
            log.info("lease_released", root=describe(lease.root), node=self.node)

    def _give_up(self, lease: Lease) -> None:
        try:
            self.backend.release(lease)
        except ClusterError as exc:  # it runs out by itself
            log.warning("lease_release_failed", root=describe(lease.root), error=str(exc))
