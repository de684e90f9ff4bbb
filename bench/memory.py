"""5. Memory of a `modelwatch run` subprocess (VmRSS, VmHWM from /proc/<pid>/status).

- watching the big tree (store knows every unit), inotify and polling: steady RSS after a
  canary unit went through the whole pipeline (for polling: at least one full pass of the
  poller after its first record), and peak RSS (VmHWM) since the start;
- after `memory_events` inotify events: `hot_units` units of the same root are rewritten in
  place (each rewrite is exactly IN_MODIFY + IN_CLOSE_WRITE), one unit per round of 1,000
  events, so units keep settling and registering new versions while the flood goes on.
  RSS before, after the first tenth (warm-up) and after the last event has settled.

Baseline: the same daemon watching an empty root (interpreter, threads, SQLite: the fixed
cost). The target is absolute: <= 100 MB, and flat after the flood.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from bench.bigtree import BigTree
from bench.daemons import Arrival, DaemonProcess, Settings
from bench.plan import Plan
from bench.procfs import memory_mb
from bench.report import Result
from bench.trees import file_names, fill_unit, make_unit_dir, rewrite_in_place
from modelwatch.config import DEFAULT_IGNORE, DEFAULT_IN_PROGRESS
from modelwatch.manifest import PatternSet, fingerprint, scan_unit

LIMIT_MB = 100.0
FLAT_MB = 5.0  # growth between the warm-up mark and the end still counted as flat
HOT_FILES = 10
EVENTS_PER_ROUND = 1000
EVENTS_PER_REWRITE = 2
FLOOD_RATE = 10_000  # events/s: well within what one daemon drains, so nothing overflows


@dataclass(frozen=True, slots=True)
class Memory:
    rss: float
    hwm: float


def run(plan: Plan, tree: BigTree, base: str) -> list[Result]:
    empty = _empty_root(plan, os.path.join(base, "memory-empty"))
    polling = _watching(tree, "polling", os.path.join(base, "memory-polling"))
    inotify, flood = _inotify_with_flood(plan, tree, os.path.join(base, "memory-inotify"))
    return [
        *_watch_rows("inotify", inotify, empty, tree),
        *_watch_rows("polling", polling, empty, tree),
        _flood_row(plan, flood),
    ]


def _sample(daemon: DaemonProcess) -> Memory:
    found = memory_mb(daemon.pid)
    return Memory(found["VmRSS"], found["VmHWM"])


def _empty_root(plan: Plan, work: str) -> Memory:
    root = os.path.join(work, "models")
    os.makedirs(root)
    settings = Settings(root, os.path.join(work, "state"), "inotify", plan.settle_seconds)
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        _round_trip(daemon, os.path.join(root, "canary"), settings)
        return _sample(daemon)


def _round_trip(daemon: DaemonProcess, unit_dir: str, settings: Settings) -> None:
    """Write (or rewrite) a unit until its next event arrives.

    A polling daemon may include the first write in its first record and never report it;
    a later rewrite is always reported, so the nudges repeat until an event comes.
    """
    name = os.path.basename(unit_dir)
    before = _events_of(daemon.tap.arrivals(), name)
    if not os.path.isdir(unit_dir):
        make_unit_dir(unit_dir, HOT_FILES)
    patience = 3 * settings.poll_interval_seconds + settings.settle_seconds + 5
    for _ in range(5):
        fill_unit(unit_dir, HOT_FILES)
        if daemon.tap.wait_for(lambda a: _events_of(a, name) > before, timeout=patience):
            return
    raise TimeoutError(f"no event for {name}")


def _events_of(arrivals: list[Arrival], unit: str) -> int:
    return sum(1 for a in arrivals if a.unit == unit)


def _watching(tree: BigTree, observer: str, work: str) -> Memory:
    settings = tree.settings(observer)
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        _round_trip(daemon, os.path.join(tree.root, f"canary-{observer}"), settings)
        return _sample(daemon)


@dataclass(frozen=True, slots=True)
class Flood:
    before: Memory
    warm: Memory
    after: Memory
    events: int
    registered: int
    overflows: int
    seconds: float


def _inotify_with_flood(plan: Plan, tree: BigTree, work: str) -> tuple[Memory, Flood]:
    settings = tree.settings("inotify")
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        hot = [os.path.join(tree.root, f"hot-{i:03d}") for i in range(plan.hot_units)]
        for unit_dir in hot:
            _round_trip(daemon, unit_dir, settings)
        watching = _sample(daemon)
        flood = _flood(daemon, hot, plan.memory_events)
    return watching, flood


def _flood(daemon: DaemonProcess, hot: list[str], events: int) -> Flood:
    rounds = max(1, events // EVENTS_PER_ROUND)
    data = [name for name in file_names(HOT_FILES) if name.endswith(".dat")]
    before, warm = _sample(daemon), None
    registered_before = len(daemon.tap.arrivals())
    started = time.monotonic()
    for r in range(rounds):
        unit_dir = hot[r % len(hot)]
        for k in range(EVENTS_PER_ROUND // EVENTS_PER_REWRITE):
            rewrite_in_place(os.path.join(unit_dir, data[k % len(data)]))
        if r + 1 == max(1, rounds // 10):
            warm = _sample(daemon)
        # pacing, not waiting for a condition: the event rate is what is being set
        time.sleep(max(0.0, started + (r + 1) * EVENTS_PER_ROUND / FLOOD_RATE - time.monotonic()))
    _wait_settled(daemon, hot)
    elapsed = time.monotonic() - started
    return Flood(
        before=before,
        warm=warm or before,
        after=_sample(daemon),
        events=rounds * EVENTS_PER_ROUND,
        registered=len(daemon.tap.arrivals()) - registered_before,
        overflows=daemon.logged("inotify_overflow"),
        seconds=elapsed,
    )


def _wait_settled(daemon: DaemonProcess, hot: list[str]) -> None:
    """Until every hot unit's event for its final content has arrived."""
    ignore, in_progress = PatternSet(DEFAULT_IGNORE), PatternSet(DEFAULT_IN_PROGRESS)
    final = {
        os.path.basename(d): fingerprint(
            scan_unit(d, ignore=ignore, in_progress=in_progress, max_files=10**6).entries
        )
        for d in hot
    }

    def settled(arrivals: list[Arrival]) -> bool:
        seen = {(a.unit, a.event["data"]["fingerprint"]) for a in arrivals}
        return all((unit, fp) in seen for unit, fp in final.items())

    if not daemon.tap.wait_for(settled, timeout=120):
        raise TimeoutError("the hot units did not settle after the flood")


def _watch_rows(kind: str, got: Memory, empty: Memory, tree: BigTree) -> list[Result]:
    note = f"{tree.files} files; baseline: the same daemon watching an empty root"
    return [
        Result(
            f"5. RSS steady, {tree.files} files, {kind}",
            got.rss,
            empty.rss,
            "MB",
            f"<= {LIMIT_MB:.0f} MB",
            got.rss <= LIMIT_MB,
            note,
        ),
        Result(
            f"5. RSS peak, {tree.files} files, {kind}",
            got.hwm,
            empty.hwm,
            "MB",
            f"<= {LIMIT_MB:.0f} MB",
            got.hwm <= LIMIT_MB,
        ),
    ]


def _flood_row(plan: Plan, flood: Flood) -> Result:
    growth = flood.after.rss - flood.warm.rss
    note = (
        f"{flood.events} inotify events in {flood.seconds:.1f} s, {flood.registered} new "
        f"versions registered, overflow warnings: {flood.overflows}; RSS before "
        f"{flood.before.rss:.1f} MB, after the first tenth {flood.warm.rss:.1f} MB, after all "
        f"{flood.after.rss:.1f} MB (peak {flood.after.hwm:.1f} MB); baseline: after the first tenth"
    )
    return Result(
        f"5. RSS after {flood.events} events, inotify",
        flood.after.rss,
        flood.warm.rss,
        "MB",
        f"<= +{FLAT_MB:.0f} MB, <= {LIMIT_MB:.0f} MB",
        growth <= FLAT_MB and flood.after.rss <= LIMIT_MB,
        note,
    )
