"""`modelwatch scan`: one reconcile pass without a daemon.

The same stages as the daemon, driven on the caller's thread (jobs run inline): every root is
reconciled against the state store, and every unit that may have changed gets the daemon's
last-chance check with `settle_seconds` between its two scans (it settles when nothing
changed, no in-progress file is present, it is complete and its marker exists). Then every
sink's due events are delivered once.

Shared roots (SPEC §12) are scanned only when their lease can be taken now: a root another
node holds is left to it (warning `scan_skipped_shared_root`); one taken is adopted, scanned
and registered with the shared versions, its deliveries acknowledged, and its lease given
back at the end. `--dry-run` decides on a copy of what the backend stores and writes nothing.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Iterator, Sequence

import structlog

from modelwatch.clock import Clock, SystemClock
from modelwatch.cluster.backend import Backend, ClusterError
from modelwatch.cluster.connect import connect
from modelwatch.cluster.coordinator import Coordinator
from modelwatch.cluster.ledger import Ledger
from modelwatch.cluster.memory import MemoryBackend
from modelwatch.cluster.sharing import shared_roots
from modelwatch.config import Config
from modelwatch.delivery import drain
from modelwatch.events import Event
from modelwatch.settle_loop import Inbox, SettleLoop, Stop
from modelwatch.sinks import Sink
from modelwatch.stages import build_sinks, build_stages, schema_for
from modelwatch.state import StateDir, Store
from modelwatch.units import describe
from modelwatch.watch import Rescan

log = structlog.get_logger("modelwatch.scan")


def scan_once(
    config: Config,
    *,
    dry_run: bool,
    clock: Clock | None = None,
    sinks: Sequence[Sink] | None = None,
    print_event: Callable[[Event], None] | None = None,
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
        return _scan(config, store, clock, sinks, print_event if dry_run else None, dry_run)
    finally:
        store.close()
        state.unlock()


def _scan(
    config: Config,
    store: Store,
    clock: Clock,
    sinks: Sequence[Sink] | None,
    print_event: Callable[[Event], None] | None,
    dry_run: bool,
) -> bool:
    inbox: Inbox = queue.SimpleQueue()
    events: list[Event] = []
    with _cluster(config, clock, inbox, dry_run=dry_run) as ledger:
        stages = build_stages(
            config,
            store,
            clock=clock,
            host=config.cluster.node_id,
            on_event=events.append,
            schema=schema_for(config),
            inbox=inbox,
            ledger=ledger,
        )
        _scan_pass(config, stages.loop)
        if dry_run:
            for event in events:
                (print_event or _print)(event)
            return True
        ok = _deliver(config, store, clock, sinks)
        stages.registry.sweep(clock.monotonic(), force=True)  # acknowledge what was delivered
        return ok


def _deliver(config: Config, store: Store, clock: Clock, sinks: Sequence[Sink] | None) -> bool:
    store.outbox.retry_now()  # the sink may have been fixed since the last attempt
    built = list(sinks) if sinks is not None else build_sinks(config)
    attempts = {s.name: s.max_attempts for s in config.sinks}
    ok = True
    for sink in built:
        ok = drain(sink, store, max_attempts=attempts.get(sink.name, 0), clock=clock) and ok
        sink.close()
    return ok


@contextlib.contextmanager
def _cluster(
    config: Config, clock: Clock, inbox: Inbox, *, dry_run: bool
) -> Iterator[Ledger | None]:
    """The ledger of the shared roots whose lease this scan could take (None without any)."""
    roots = shared_roots(config)
    if not roots:
        yield None
        return
    backend: Backend = connect(config.cluster)
    if dry_run:
        backend = _copy_of(backend, roots, clock)
    coordinator = Coordinator(
        backend,
        roots,
        node=config.cluster.node_id,
        lease_seconds=config.cluster.lease_seconds,
        clock=clock,
        post=inbox.put,
    )
    try:
        coordinator.turn()  # one try per root: a root another node holds is left to it
        _warn_skipped(coordinator)
        coordinator.start()  # renews while the scan runs
        yield Ledger(backend, coordinator, roots)
    finally:
        coordinator.shutdown(timeout=5.0)
        backend.close()


def _warn_skipped(coordinator: Coordinator) -> None:
    for status in coordinator.status():
        if status.role != "holder":
            log.warning(
                "scan_skipped_shared_root",
                root=describe(status.root),
                holder=status.holder,
                error=status.error or None,
                note="the node holding its lease registers it",
            )


def _copy_of(backend: Backend, roots: Sequence[str], clock: Clock) -> Backend:
    """What `backend` stores for `roots`, in memory (a dry run writes nothing to it)."""
    copy = MemoryBackend(clock)
    try:
        for root in roots:
            units = backend.load(root)
            ids = {i for stored in units.values() for i in stored.undelivered}
            copy.seed(root, units, backend.events(root, ids))
    except ClusterError as exc:
        log.warning("scan_cluster_unreachable", error=str(exc), note="shared roots are left out")
        copy.down = True
    finally:
        backend.close()
    return copy


def _print(event: Event) -> None:
    print(event.to_json(), flush=True)


def _scan_pass(config: Config, loop: SettleLoop) -> None:
    """Reconcile every root, then settle the units found changed if two scans
    `settle_seconds` apart agree."""
    loop.step()  # shared roots taken: adopted (and reconciled) first
    for root in config.roots:
        loop.handle(Rescan(root.path, reason="startup"))
    loop.step()  # the reconciles' results: units that may have changed become pending
    gap = max((r.policy.settle_seconds for r in config.roots), default=0.0)
    loop.handle(Stop(deadline=float("inf"), gap=gap, log_as="unit_skipped"))
    while not loop.finished:
        loop.step(None)
