"""2. Burst: `burst_units` units of `burst_files` files written at once, inotify.

modelwatch: time from the first write to the last event at the sink, minus settle_seconds (no
unit can settle sooner than settle_seconds after its last write, so what is left is the time
modelwatch needs beyond the quiet period it was told to wait).
Baseline: time from the first write until `inotifywait -m -r` has reported the close_write of
the last file written, i.e. until a bare reader has seen every write.

The unit directories exist before either run starts, because `inotifywait -r` misses files
created in a new directory before it has added the directory's watch (the daemon does not).
"""

from __future__ import annotations

import os
import time

from bench.baselines import InotifyWait
from bench.daemons import DaemonProcess, Settings
from bench.plan import Plan
from bench.report import Result
from bench.trees import file_names, fill_units, make_unit_dirs

TARGET_RATIO = 3.0


def run(plan: Plan, base: str) -> list[Result]:
    ours, theirs, seen, overflows = [], [], [], 0
    for i in range(plan.repeats):
        took, saw = _baseline(plan, os.path.join(base, f"burst-{i}-inotifywait"))
        theirs.append(took)
        seen.append(saw)
        took, overflowed = _modelwatch(plan, os.path.join(base, f"burst-{i}-modelwatch"))
        ours.append(took)
        overflows += overflowed
    files = plan.burst_units * plan.burst_files
    note = (
        f"{plan.burst_units} units x {plan.burst_files} files; modelwatch minus "
        f"{plan.settle_seconds:g} s settle; best of {plan.repeats} (all: "
        f"{', '.join(f'{t:.2f}' for t in ours)} s vs {', '.join(f'{t:.2f}' for t in theirs)} s); "
        f"inotifywait saw {min(seen)} of {files} close_writes or more; "
        f"daemon inotify overflows: {overflows} in {plan.repeats} runs"
    )
    best, base_best = min(ours), min(theirs)
    return [
        Result(
            f"2. burst of {files} files, to last event",
            best * 1000,
            base_best * 1000,
            "ms",
            f"<= {TARGET_RATIO:g}x",
            best <= TARGET_RATIO * base_best,
            note,
        )
    ]


def _units(plan: Plan, work: str) -> tuple[str, list[str]]:
    root = os.path.join(work, "models")
    os.makedirs(root)
    return root, make_unit_dirs(root, plan.burst_units, plan.burst_files)


def _baseline(plan: Plan, work: str) -> tuple[float, int]:
    """Seconds until inotifywait saw the last write; how many close_writes it saw."""
    root, names = _units(plan, work)
    last_file = os.path.join(root, names[-1], file_names(plan.burst_files)[-1])
    watcher = InotifyWait(root)
    try:
        watcher.wait_established()
        start = time.time()
        fill_units(root, names, plan.burst_files)
        seen = watcher.wait_event(last_file, "CLOSE_WRITE", timeout=60)
        return seen - start, watcher.count("CLOSE_WRITE")
    finally:
        watcher.stop()


def _modelwatch(plan: Plan, work: str) -> tuple[float, int]:
    """Seconds from the first write to the last event, minus settle; overflow warnings."""
    root, names = _units(plan, work)
    settings = Settings(root, os.path.join(work, "state"), "inotify", plan.settle_seconds)
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        start = time.time()
        fill_units(root, names, plan.burst_files)
        if not daemon.tap.wait_count(len(names), timeout=300):
            raise TimeoutError(f"{len(daemon.tap.arrivals())} of {len(names)} burst events")
        last = max(a.at for a in daemon.tap.arrivals())
        overflows = daemon.logged("inotify_overflow")
    return last - start - plan.settle_seconds, overflows
