"""The large tree shared by benchmarks 3-5, and a state store that knows every unit of it.

Built once per run: `big_units` units of `big_files` files (100,000 files in the full run).
The state store is filled the way `modelwatch scan` fills it (every unit scanned twice,
settled, registered, delivered), so a daemon started on it has nothing to do but reconcile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from bench.daemons import Settings, in_process
from bench.plan import Plan
from bench.trees import write_tree
from modelwatch.config import Config
from modelwatch.scan_command import scan_once


@dataclass(frozen=True, slots=True)
class BigTree:
    root: str
    state_dir: str
    work: str
    units: int
    files: int
    settle_seconds: float
    build_seconds: float = 0.0
    register_seconds: float = 0.0

    def settings(self, observer: str = "inotify", poll_interval: float = 1.0) -> Settings:
        return Settings(self.root, self.state_dir, observer, self.settle_seconds, poll_interval)

    def config(self, name: str, observer: str = "inotify") -> Config:
        """A config for an in-process daemon on this tree (its files in `work/name`)."""
        config, _ = in_process(self.settings(observer), os.path.join(self.work, name))
        return config


def build(plan: Plan, base: str) -> BigTree:
    work = os.path.join(base, "big")
    root = os.path.join(work, "models")
    os.makedirs(root)
    tree = BigTree(
        root,
        os.path.join(work, "state"),
        work,
        plan.big_units,
        plan.big_file_count,
        plan.settle_seconds,
    )
    started = time.perf_counter()
    write_tree(root, plan.big_units, plan.big_files)
    built = time.perf_counter()
    _register_every_unit(tree)
    return dataclasses.replace(
        tree, build_seconds=built - started, register_seconds=time.perf_counter() - built
    )


def _register_every_unit(tree: BigTree) -> None:
    config, sink = in_process(tree.settings(), os.path.join(tree.work, "register"))
    if not scan_once(config, dry_run=False, sinks=[sink]):
        raise RuntimeError("registering the big tree failed")
    kinds = {event.short_type for event in sink.events}
    if len(sink.events) != tree.units or kinds != {"registered"}:
        raise RuntimeError(f"expected {tree.units} registered events, got {len(sink.events)}")
