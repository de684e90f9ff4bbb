"""3. Startup reconcile: `Daemon.start()` until ready, on the big tree with a store that knows
every unit, against a bare `os.scandir` + `lstat` walk of the same tree.

Both are wall-clock seconds in this process (nothing else runs meanwhile), best of
`plan.repeats`, taken alternately so machine noise hits both alike. The daemon's figure
includes setting up its inotify watches, which the bare walk does not need; the note gives
that part alone (watchdog's recursive `schedule` + `start` on the same tree), and the time a
bare inotify reader (`inotifywait -r`) needs to establish its watches on the same tree.
"""

from __future__ import annotations

import logging
import time

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from bench.baselines import InotifyWait, bare_walk
from bench.bigtree import BigTree
from bench.plan import Plan
from bench.report import Result
from modelwatch.daemon import Daemon
from modelwatch.testing import MemorySink, sink_config

TARGET_RATIO = 1.5


def start_to_ready(tree: BigTree, run: int) -> tuple[float, int]:
    """Seconds from `start()` to ready; units left pending (0: the store knew them all)."""
    config = tree.config(f"startup-{run}")
    daemon = Daemon(config, sinks=[MemorySink(sink_config("jsonl", "jsonl"))], environ={})
    started = time.perf_counter()
    daemon.start()
    elapsed = time.perf_counter() - started
    pending = len(daemon.loop.settler) if daemon.loop else -1
    daemon.stop()
    return elapsed, pending


def watch_setup_seconds(root: str) -> float:
    """Seconds watchdog needs to put recursive inotify watches on `root` (the first part of
    the daemon's start, which walks every directory of the tree)."""
    observer = Observer()
    observer.schedule(FileSystemEventHandler(), root, recursive=True)
    started = time.perf_counter()
    observer.start()
    elapsed = time.perf_counter() - started
    # watchdog logs an error when an emitter is stopped before its thread ran; harmless here
    quiet = logging.getLogger("watchdog.observers.inotify")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        observer.stop()
        observer.join()
    finally:
        quiet.setLevel(level)
    return elapsed


def inotifywait_setup_seconds(root: str) -> float:
    """Seconds from starting `inotifywait -m -r` until it reports its watches established."""
    started = time.perf_counter()
    reader = InotifyWait(root)
    try:
        reader.wait_established()
        return time.perf_counter() - started
    finally:
        reader.stop()


def walk_seconds(root: str) -> float:
    started = time.perf_counter()
    bare_walk(root)
    return time.perf_counter() - started


def run(plan: Plan, tree: BigTree) -> list[Result]:
    ours: list[float] = []
    theirs: list[float] = []
    watches: list[float] = []
    readers: list[float] = []
    pending = 0
    for i in range(plan.repeats):
        theirs.append(walk_seconds(tree.root))
        elapsed, left = start_to_ready(tree, i)
        ours.append(elapsed)
        watches.append(watch_setup_seconds(tree.root))
        readers.append(inotifywait_setup_seconds(tree.root))
        pending = max(pending, left)
    best, base, watch, reader = min(ours), min(theirs), min(watches), min(readers)
    note = (
        f"{tree.files} files in {tree.units} units, store knows every unit; best of "
        f"{plan.repeats}; units left pending after ready: {pending}; inotify watch set-up "
        f"alone {watch:.3f} s ({watch / base:.2f}x the walk), the rest "
        f"{(best - watch) / base:.2f}x; inotifywait -r sets up its watches in {reader:.3f} s: "
        f"{best / (base + reader):.2f}x the bare walk plus that"
    )
    return [
        Result(
            f"3. startup reconcile, {tree.files} files",
            best,
            base,
            "s",
            f"<= {TARGET_RATIO:g}x",
            best <= TARGET_RATIO * base and pending == 0,
            note,
        )
    ]
