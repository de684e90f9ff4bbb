"""1. Detection latency: last write of a unit -> its event at the sink, minus settle_seconds.

Units are written one every `latency_gap_seconds`, so each is measured alone (a burst is
benchmark 2). inotify is compared with `inotifywait` seeing the unit's last close_write;
polling with a bare poller thread walking the same tree at the same interval.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from bench.baselines import BarePoller, InotifyWait
from bench.daemons import DaemonProcess, Settings
from bench.plan import Plan
from bench.report import Result, percentile
from bench.trees import file_names, fill_unit, make_unit_dir, unit_name

TARGET_OVER_SETTLE_MS = 100.0


def run(plan: Plan, base: str) -> list[Result]:
    return [*_inotify(plan, os.path.join(base, "latency-inotify")), *_polling(plan, base)]


def _write_spaced(
    root: str, plan: Plan, created: Callable[[str], object] = lambda unit_dir: None
) -> dict[str, float]:
    """Write the units one by one, `latency_gap_seconds` apart; name -> time of last write.

    `created(unit_dir)` is called between creating a unit's directory and writing its files.
    """
    last_write: dict[str, float] = {}
    for i in range(plan.latency_units):
        name = unit_name(i)
        unit_dir = os.path.join(root, name)
        make_unit_dir(unit_dir, plan.latency_files)
        created(unit_dir)
        last_write[name] = fill_unit(unit_dir, plan.latency_files)
        time.sleep(plan.latency_gap_seconds)  # pacing: the arrivals are what is measured
    return last_write


def _daemon_latencies(
    daemon: DaemonProcess, plan: Plan, last_write: dict[str, float]
) -> list[float]:
    """Milliseconds from each unit's last write to its event, minus settle_seconds."""
    if not daemon.tap.wait_count(len(last_write), timeout=60 + plan.settle_seconds):
        raise TimeoutError(f"only {len(daemon.tap.arrivals())} of {len(last_write)} events")
    settle = plan.settle_seconds
    return [(a.at - last_write[a.unit] - settle) * 1000 for a in daemon.tap.arrivals()]


def _inotify(plan: Plan, work: str) -> list[Result]:
    root = os.path.join(work, "models")
    os.makedirs(root)
    settings = Settings(root, os.path.join(work, "state"), "inotify", plan.settle_seconds)
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        watcher = InotifyWait(root)
        try:
            watcher.wait_established()
            # inotifywait -r misses files created in a new directory before it has added its
            # watch there (the daemon does not): write only once it has.
            last_write = _write_spaced(
                root, plan, lambda unit_dir: watcher.wait_event(unit_dir, "CREATE", 10)
            )
            ours = _daemon_latencies(daemon, plan, last_write)
            theirs = [_seen_close(watcher, root, name, plan, t) for name, t in last_write.items()]
        finally:
            watcher.stop()
    limit = TARGET_OVER_SETTLE_MS
    return _rows("inotify", ours, theirs, limit, "inotifywait sees the last close_write")


def _seen_close(watcher: InotifyWait, root: str, unit: str, plan: Plan, wrote: float) -> float:
    last_file = os.path.join(root, unit, file_names(plan.latency_files)[-1])
    return (watcher.wait_event(last_file, "CLOSE_WRITE", timeout=10) - wrote) * 1000


def _polling(plan: Plan, base: str) -> list[Result]:
    work = os.path.join(base, "latency-polling")
    root = os.path.join(work, "models")
    os.makedirs(root)
    interval = plan.poll_interval_seconds
    settings = Settings(root, os.path.join(work, "state"), "polling", plan.settle_seconds, interval)
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        poller = BarePoller(root, interval)
        poller.begin()
        try:
            last_write = _write_spaced(root, plan)
            ours = _daemon_latencies(daemon, plan, last_write)
            poller.wait_units(len(last_write), timeout=10 * interval)
        finally:
            poller.stop()
    theirs = [(poller.changed[name] - t) * 1000 for name, t in last_write.items()]
    limit = interval * 1000 + TARGET_OVER_SETTLE_MS
    what = f"a bare scandir+lstat poller, same {interval:g} s interval"
    return _rows(f"polling {interval:g} s", ours, theirs, limit, what)


def _rows(
    kind: str, ours: list[float], theirs: list[float], limit_ms: float, baseline: str
) -> list[Result]:
    n = len(ours)
    note = f"{n} units; minus settle_seconds; baseline: {baseline} (no settle)"
    p50, p99 = percentile(ours, 50), percentile(ours, 99)
    return [
        Result(f"1. latency p50 over settle, {kind}", p50, percentile(theirs, 50), "ms", "-", None),
        Result(
            f"1. latency p99 over settle, {kind}",
            p99,
            percentile(theirs, 99),
            "ms",
            f"<= {limit_ms:.0f} ms",
            p99 <= limit_ms,
            note,
        ),
    ]
