"""4. CPU of one pass over the unchanged big tree, against a bare `os.scandir` + `lstat` walk.

- polling pass: what the daemon's polling observer (`modelwatch.poller.RecordPoller`) does
  every `poll_interval_seconds`: `take` (walk, one marshalled record per directory) and
  `changes` against the previous pass;
- reconcile pass: the daemon's own reconcile job (`checks.reconcile`: list units, check each
  one's scan digest against the state store), as the periodic reconcile runs it, here run
  inline on this thread by the settle loop.

CPU seconds of this thread (`time.thread_time`: user + system), best of `plan.repeats`, taken
alternately with the bare walk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.baselines import bare_walk
from bench.bigtree import BigTree
from bench.plan import Plan
from bench.report import Result
from modelwatch.clock import SystemClock
from modelwatch.poller import changes, take
from modelwatch.stages import build_stages
from modelwatch.state import StateDir, Store
from modelwatch.watch import Rescan

TARGET_RATIO = 1.5


def cpu_seconds(work: Callable[[], object]) -> float:
    started = time.thread_time()
    work()
    return time.thread_time() - started


class PollingPass:
    """One poller pass: a new record of the tree, compared with the previous one."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.previous = take(root)
        self.take_cpu = 0.0
        self.compare_cpu = 0.0

    def __call__(self) -> None:
        started = time.thread_time()
        current = take(self.root)
        taken = time.thread_time()
        found = changes(self.previous, current)
        self.take_cpu, self.compare_cpu = taken - started, time.thread_time() - taken
        self.previous = current
        if found:
            raise RuntimeError("the big tree changed during the polling benchmark")


def reconcile_pass(tree: BigTree) -> Callable[[], None]:
    """The daemon's reconcile of the tree's root, with a store that knows every unit."""
    config = tree.config("reconcile")
    store = Store(StateDir(config.daemon.state_dir).db_path)
    stages = build_stages(config, store, clock=SystemClock(), host="bench", on_event=print)
    loop = stages.loop

    def one_pass() -> None:
        loop.handle(Rescan(tree.root))  # the inline pool runs the reconcile job right here
        loop.step()
        if len(loop.settler):
            raise RuntimeError("reconcile found changed units in the unchanged tree")

    return one_pass


def run(plan: Plan, tree: BigTree) -> list[Result]:
    poll = PollingPass(tree.root)
    reconcile = reconcile_pass(tree)
    walks, polls, reconciles, parts = [], [], [], []
    for _ in range(plan.repeats):
        walks.append(cpu_seconds(lambda: bare_walk(tree.root)))
        polls.append(cpu_seconds(poll))
        parts.append((poll.take_cpu, poll.compare_cpu))
        reconciles.append(cpu_seconds(reconcile))
    base = min(walks)
    walk, compare = min(parts)
    per_file = 1e6 / tree.files
    common = f"{tree.files} files; best of {plan.repeats}"
    return [
        _row(
            "4. polling pass CPU (daemon poller)",
            min(polls),
            base,
            f"{common}; walk {walk:.3f} s + compare {compare:.3f} s; "
            f"{min(polls) * per_file:.1f} us/file vs bare {base * per_file:.1f} us/file",
        ),
        _row("4. reconcile pass CPU (daemon scan)", min(reconciles), base, common),
    ]


def _row(name: str, value: float, base: float, note: str) -> Result:
    passed = value <= TARGET_RATIO * base
    return Result(name, value, base, "s", f"<= {TARGET_RATIO:g}x", passed, note)
