"""Run every modelwatch benchmark and print each figure next to its same-run baseline.

    python bench/run.py            # the full suite (under 10 minutes on 2 cores)
    python bench/run.py --quick    # a small smoke run (under a minute)
    python bench/run.py --json     # the results as JSON on stdout
    python bench/run.py --only 3 4 # some benchmarks only (numbers as in bench/README.md)

Everything is written to a fresh directory on tmpfs (/dev/shm when writable) and removed at
the end. Progress goes to stderr. The exit status is 0 when every benchmark ran, whether or
not its target was met (the table says), 2 when inotifywait (inotify-tools) is missing; a
benchmark that could not run raises.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

from bench import (
    bigtree,
    burst,
    cluster,
    describe,
    digest,
    idle,
    isolation,
    latency,
    memory,
    polling,
    report,
    startup,
)
from bench.bigtree import BigTree
from bench.plan import FULL, QUICK, Plan
from bench.report import Result
from modelwatch import log


class Context:
    """What the benchmarks share: the plan, the scratch directory, the big tree (built once)."""

    def __init__(self, plan: Plan, base: str) -> None:
        self.plan = plan
        self.base = base

    @functools.cached_property
    def tree(self) -> BigTree:
        _progress(f"building the big tree ({self.plan.big_file_count} files) and its store")
        return bigtree.build(self.plan, self.base)


Benchmark = Callable[[Context], list[Result]]

BENCHMARKS: dict[str, tuple[str, Benchmark]] = {
    "1": ("detection latency", lambda c: latency.run(c.plan, c.base)),
    "2": ("burst", lambda c: burst.run(c.plan, c.base)),
    "3": ("startup reconcile", lambda c: startup.run(c.plan, c.tree)),
    "4": ("polling pass CPU", lambda c: polling.run(c.plan, c.tree)),
    "5": ("memory", lambda c: memory.run(c.plan, c.tree, c.base)),
    "6": ("sha256 throughput", lambda c: digest.run(c.plan, c.base)),
    "7": ("idle CPU", lambda c: idle.run(c.plan, c.base)),
    "8": ("model description", lambda c: describe.run(c.plan, c.base)),
    "9": ("isolation", lambda c: isolation.run(c.plan, c.base)),
    "10": ("many nodes, one tree", lambda c: cluster.run(c.plan, c.tree, c.base)),
}


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A fresh directory on tmpfs when possible, removed afterwards."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = tempfile.mkdtemp(prefix="modelwatch-bench-", dir=parent)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(plan: Plan, only: Sequence[str]) -> tuple[list[Result], dict[str, float]]:
    """Run the selected benchmarks; their results and seconds each took."""
    results: list[Result] = []
    durations: dict[str, float] = {}
    with scratch() as base:
        context = Context(plan, base)
        for key in only:
            title, benchmark = BENCHMARKS[key]
            _progress(f"{key}. {title}")
            started = time.monotonic()
            results += benchmark(context)
            durations[f"{key}. {title}"] = round(time.monotonic() - started, 1)
        if "tree" in vars(context):
            tree = context.tree
            durations["big tree build"] = round(tree.build_seconds, 1)
            durations["big tree register"] = round(tree.register_seconds, 1)
    return results, durations


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small smoke variant (< 60 s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="N")
    return parser.parse_args(argv)


NEED_INOTIFYWAIT = {"1", "2", "7"}


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    plan = QUICK if args.quick else FULL
    selected = args.only or sorted(BENCHMARKS, key=int)
    if NEED_INOTIFYWAIT & set(selected) and shutil.which("inotifywait") is None:
        _progress("the baselines need inotifywait: apt-get install inotify-tools")
        return 2
    log.configure("warning", "json")  # for the daemons run in this process
    started = time.monotonic()
    results, durations = run(plan, selected)
    info = {
        "machine": report.machine(),
        "plan": plan.name,
        "seconds": round(time.monotonic() - started, 1),
        "durations": durations,
    }
    print(report.to_json(results, info) if args.json else report.text(results, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
