"""`modelwatch scan`: one reconcile pass without a daemon.

The same stages as the daemon, driven on the caller's thread (jobs run inline): every root is
reconciled against the state store, and every unit that may have changed gets the daemon's
last-chance check with `settle_seconds` between its two scans (it settles when nothing
changed, no in-progress file is present, it is complete and its marker exists). Then every
sink's due events are delivered once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import structlog

from modelwatch.clock import Clock, SystemClock
from modelwatch.config import Config
from modelwatch.delivery import drain
from modelwatch.events import Event
from modelwatch.settle_loop import Stop
from modelwatch.sinks import Sink
from modelwatch.stages import build_sinks, build_stages, schema_for
from modelwatch.state import StateDir, Store
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
        events = _scan_pass(config, store, clock)
        if dry_run:
            for event in events:
                (print_event or _print)(event)
            return True
        store.outbox.retry_now()  # the sink may have been fixed since the last attempt
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


def _scan_pass(config: Config, store: Store, clock: Clock) -> list[Event]:
    """Reconcile every root, then settle the units found changed if two scans
    `settle_seconds` apart agree."""
    events: list[Event] = []
    stages = build_stages(
        config,
        store,
        clock=clock,
        host=socket.gethostname(),
        on_event=events.append,
        schema=schema_for(config),
    )
    loop = stages.loop
    for root in config.roots:
        loop.handle(Rescan(root.path, reason="startup"))
    loop.step()  # the reconciles' results: units that may have changed become pending
    gap = max((r.policy.settle_seconds for r in config.roots), default=0.0)
    loop.handle(Stop(deadline=float("inf"), gap=gap, log_as="unit_skipped"))
    while not loop.finished:
        loop.step(None)
    return events
