"""Building the stages in one place: the daemon (`run`), `scan` and the tests use this.

watchers ──▶ inbox ──▶ SettleLoop ◀──▶ pool (InspectionPool, or InlinePool in tests/scan)
                           │
                        Registry ──▶ Store (units, outbox) ──▶ delivery workers
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Collection
from dataclasses import dataclass

from modelwatch.clock import Clock
from modelwatch.cluster.ledger import Ledger
from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.metadata import SchemaValidator
from modelwatch.pool import InlinePool, InspectionPool
from modelwatch.registry import Registry, Route
from modelwatch.settle_loop import Inbox, SettleLoop
from modelwatch.sinks import Sink, build_sink
from modelwatch.state import Store


def routes_for(config: Config) -> list[Route]:
    return [Route(s.name, s.event_types) for s in config.sinks]


def schema_for(config: Config) -> SchemaValidator | None:
    return SchemaValidator.from_file(config.metadata.schema) if config.metadata.schema else None


def build_sinks(config: Config) -> list[Sink]:
    return [build_sink(s) for s in config.sinks]


@dataclass(slots=True)
class Stages:
    config: Config
    store: Store
    registry: Registry
    inbox: Inbox
    loop: SettleLoop
    pool: InspectionPool | InlinePool


def build_stages(
    config: Config,
    store: Store,
    *,
    clock: Clock,
    host: str,
    on_event: Callable[[Event], None],
    schema: SchemaValidator | None = None,
    workers: int | None = None,
    inbox: Inbox | None = None,
    ledger: Ledger | None = None,
) -> Stages:
    """The settle loop, its pool and the registry over `store`.

    `workers`: the size of a threaded `InspectionPool` (started by the caller); None runs
    every job inline on the thread that drives the loop (`SettleLoop.step`). `ledger`: the
    shared versions of the roots it names (`cluster.ledger`); those roots start paused.
    """
    inbox = inbox if inbox is not None else queue.SimpleQueue()
    registry = Registry(store, routes_for(config), host, ledger)
    pool: InspectionPool | InlinePool
    if workers is None:
        pool = InlinePool(store, clock, inbox.put)
    else:
        pool = InspectionPool(workers, store.path, clock, inbox.put)
    shared: Collection[str] = ledger.roots if ledger is not None else ()
    loop = SettleLoop(config, registry, inbox, clock, on_event, pool, schema, shared)
    return Stages(config, store, registry, inbox, loop, pool)
