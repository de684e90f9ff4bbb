"""7. Idle CPU: share of one core a `modelwatch run` subprocess uses over `idle_seconds` while
nothing changes in its `idle_units * idle_files` watched files (units already registered).

Two daemons at once on the same tree: inotify, and polling at the configured default interval.
Baselines over the same window: `inotifywait -m -r` on the tree, and a bare poller process
(`bench/baselines.py`: one scandir + lstat walk per interval). CPU is utime + stime of every
thread, from /proc/<pid>/stat.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from bench.baselines import InotifyWait
from bench.daemons import DaemonProcess, Settings
from bench.plan import Plan
from bench.procfs import cpu_seconds
from bench.report import Result
from bench.trees import write_tree

TARGET_PERCENT = 1.0


def run(plan: Plan, base: str) -> list[Result]:
    work = os.path.join(base, "idle")
    root = os.path.join(work, "models")
    os.makedirs(root)
    files = write_tree(root, plan.idle_units, plan.idle_files)
    interval = plan.idle_poll_interval_seconds
    with contextlib.ExitStack() as stack:
        poller = stack.enter_context(_bare_poller(root, interval))  # its start-up: not measured
        inotify = stack.enter_context(_registered(plan, root, work, "inotify"))
        polling = stack.enter_context(_registered(plan, root, work, "polling"))
        watcher = InotifyWait(root)
        stack.callback(watcher.stop)
        watcher.wait_established()
        pids = [inotify.pid, polling.pid, watcher.proc.pid, poller.pid]
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(plan.idle_seconds)  # idle time is the thing measured
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    share = [100 * u / plan.idle_seconds for u in used]
    note = f"{files} files, {plan.idle_seconds:g} s window, both daemons and baselines at once"
    return [
        _row(f"7. idle CPU, {files} files, inotify", share[0], share[2], note),
        _row(
            f"7. idle CPU, {files} files, polling {interval:g} s",
            share[1],
            share[3],
            f"{note}; baseline: bare scandir+lstat walk every {interval:g} s",
        ),
    ]


def _row(name: str, value: float, baseline: float, note: str) -> Result:
    target = f"< {TARGET_PERCENT:g} %"
    return Result(name, value, baseline, "%", target, value < TARGET_PERCENT, note)


@contextlib.contextmanager
def _registered(plan: Plan, root: str, work: str, observer: str) -> Iterator[DaemonProcess]:
    """A daemon on `root` that has registered every unit (and so has nothing left to do)."""
    settings = Settings(
        root,
        os.path.join(work, f"state-{observer}"),
        observer,
        plan.settle_seconds,
        plan.idle_poll_interval_seconds,
    )
    with DaemonProcess(settings, os.path.join(work, observer)) as daemon:
        daemon.wait_ready()
        if not daemon.tap.wait_count(plan.idle_units, timeout=120):
            raise TimeoutError(f"the {observer} daemon did not register every unit")
        yield daemon


@contextlib.contextmanager
def _bare_poller(root: str, interval: float) -> Iterator[subprocess.Popen[bytes]]:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines.py")
    proc = subprocess.Popen([sys.executable, script, root, str(interval)])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
