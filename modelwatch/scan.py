"""`modelwatch scan`: one reconcile pass without a daemon.

Every unit is scanned twice, `settle_seconds` apart; units that did not change and are ready
are settled through the same registry and state store as the daemon, then every sink's
outbox is delivered once.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import structlog

from modelwatch.clock import Clock, SystemClock
from modelwatch.config import Config
from modelwatch.daemon import build_sinks, routes_for, schema_for
from modelwatch.delivery import drain
from modelwatch.errors import UnitUnavailable
from modelwatch.events import Event
from modelwatch.inspection import readiness
from modelwatch.manifest import Manifest
from modelwatch.pipeline import Units
from modelwatch.registry import Registry
from modelwatch.sinks import Sink
from modelwatch.state import StateDir, Store
from modelwatch.units import Unit

log = structlog.get_logger("modelwatch.scan")


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
        registry = Registry(store, routes_for(config), socket.gethostname())
        units = Units(config, registry, clock, schema_for(config))
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
        try:
            event = units.settle(unit, after, wait)
        except UnitUnavailable as exc:
            log.info("unit_skipped", unit=unit.display, reason=str(exc))
            continue
        if event is not None:
            events.append(event)
    return events
