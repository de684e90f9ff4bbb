"""4. CPU of one pass over the unchanged big tree, against a bare `os.scandir` + `lstat` walk.

- polling pass: what watchdog's `PollingObserverVFS(os.lstat, os.scandir)` does every
  `poll_interval_seconds`: a new `DirectorySnapshot` plus its `DirectorySnapshotDiff` against
  the previous one;
- reconcile pass: the daemon's own `Pipeline.reconcile(root)` (list units, scan each, look
  its fingerprint up in the state store), as the periodic reconcile runs it.

CPU seconds of this thread (`time.thread_time`: user + system), best of `plan.repeats`, taken
alternately with the bare walk.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import Any

from watchdog.utils.dirsnapshot import DirectorySnapshot, DirectorySnapshotDiff

from bench.baselines import bare_walk
from bench.bigtree import BigTree
from bench.plan import Plan
from bench.report import Result
from modelwatch.clock import SystemClock
from modelwatch.daemon import routes_for
from modelwatch.pipeline import Pipeline, Units
from modelwatch.registry import Registry
from modelwatch.state import StateDir, Store

TARGET_RATIO = 1.5


def cpu_seconds(work: Callable[[], object]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


def snapshot(root: str) -> DirectorySnapshot:
    """A snapshot taken exactly as the polling observer takes it."""
    return DirectorySnapshot(root, recursive=True, stat=os.lstat, listdir=os.scandir)


class PollingPass:
    """One observer pass: a new snapshot, diffed against the previous one."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.previous = snapshot(root)
        self.snapshot_cpu = 0.0
        self.diff_cpu = 0.0

    def __call__(self) -> None:
        started = time.thread_time()
        current = snapshot(self.root)
        taken = time.thread_time()
        diff = DirectorySnapshotDiff(self.previous, current)
        self.snapshot_cpu, self.diff_cpu = taken - started, time.thread_time() - taken
        self.previous = current
        if diff.files_modified or diff.files_created or diff.files_deleted:
            raise RuntimeError("the big tree changed during the polling benchmark")


def reconcile_pass(tree: BigTree) -> Callable[[], None]:
    """The daemon's reconcile of the tree's root, with a store that knows every unit."""
    config = tree.config("reconcile")
    store = Store(StateDir(config.daemon.state_dir).db_path)
    clock = SystemClock()
    units = Units(config, Registry(store, routes_for(config), "bench"), clock, None)
    pipeline = Pipeline(units, queue.Queue[Any](), clock, lambda event: None)

    def one_pass() -> None:
        pipeline.reconcile(tree.root)
        if len(pipeline.settler):
            raise RuntimeError("reconcile found changed units in the unchanged tree")

    return one_pass


def run(plan: Plan, tree: BigTree) -> list[Result]:
    poll = PollingPass(tree.root)
    reconcile = reconcile_pass(tree)
    walks, polls, reconciles, parts = [], [], [], []
    for _ in range(plan.repeats):
        walks.append(cpu_seconds(lambda: bare_walk(tree.root)))
        polls.append(cpu_seconds(poll))
        parts.append((poll.snapshot_cpu, poll.diff_cpu))
        reconciles.append(cpu_seconds(reconcile))
    base = min(walks)
    snap, diff = min(parts)
    per_file = 1e6 / tree.files
    common = f"{tree.files} files; best of {plan.repeats}"
    return [
        _row(
            "4. polling pass CPU (watchdog snapshot+diff)",
            min(polls),
            base,
            f"{common}; snapshot {snap:.3f} s + diff {diff:.3f} s; "
            f"{min(polls) * per_file:.1f} us/file vs bare {base * per_file:.1f} us/file",
        ),
        _row("4. reconcile pass CPU (daemon scan)", min(reconciles), base, common),
    ]


def _row(name: str, value: float, base: float, note: str) -> Result:
    passed = value <= TARGET_RATIO * base
    return Result(name, value, base, "s", f"<= {TARGET_RATIO:g}x", passed, note)
