"""9. A normal unit's time to register while a hostile unit is being inspected, against the
same units alone (target: <= 1.2x).

One daemon (inotify, `content_digest = "sha256"`). First `isolation_units` small units are
written one at a time and timed from their last write to their event (settle period
included): the baseline. Then a unit holding a sparse file of `isolation_sparse_gb` GB (no
disk, a minute of hashing for one inspection worker) is written, and once its hashing has
begun the same number of small units is written and timed the same way; the hostile unit
must still be inspecting when the last of them arrives, or the figure would not say anything.
"""

from __future__ import annotations

import os
import time

from bench.daemons import DaemonProcess, Settings
from bench.plan import Plan
from bench.report import Result, percentile
from bench.trees import fill_unit, make_unit_dir

TARGET_RATIO = 1.2
FILES = 3
GAP_SECONDS = 0.3


def run(plan: Plan, base: str) -> list[Result]:
    work = os.path.join(base, "isolation")
    root = os.path.join(work, "models")
    os.makedirs(root)
    settings = Settings(
        root,
        os.path.join(work, "state"),
        "inotify",
        plan.settle_seconds,
        defaults='content_digest = "sha256"\ninspect_timeout_seconds = 3600',
    )
    with DaemonProcess(settings, os.path.join(work, "daemon")) as daemon:
        daemon.wait_ready()
        alone = _timed(daemon, root, "alone", plan)
        hostile_path = _hostile(root, plan.isolation_sparse_gb)
        time.sleep(plan.settle_seconds + 1.0)  # pacing: its quiet period is over, hashing began
        beside = _timed(daemon, root, "beside", plan)
        if any(a.unit == "hostile" for a in daemon.tap.arrivals()):
            raise RuntimeError("the hostile unit finished before the normal units were timed")
    os.unlink(hostile_path)
    return _rows(plan, alone, beside)


def _hostile(root: str, gigabytes: int) -> str:
    unit = os.path.join(root, "hostile")
    os.makedirs(unit)
    path = os.path.join(unit, "weights.bin")
    with open(path, "wb") as f:
        f.truncate(gigabytes * 2**30)
    return path


def _timed(daemon: DaemonProcess, root: str, prefix: str, plan: Plan) -> list[float]:
    """Seconds from each unit's last write to its event."""
    last_write: dict[str, float] = {}
    for i in range(plan.isolation_units):
        name = f"{prefix}-{i:03d}"
        unit_dir = os.path.join(root, name)
        make_unit_dir(unit_dir, FILES)
        last_write[name] = fill_unit(unit_dir, FILES)
        time.sleep(GAP_SECONDS)  # pacing: each unit is timed on its own
    wanted = set(last_write)
    if not daemon.tap.wait_for(
        lambda arrivals: wanted <= {a.unit for a in arrivals}, timeout=60 + plan.settle_seconds
    ):
        raise TimeoutError(f"not every {prefix} unit was registered")
    return [a.at - last_write[a.unit] for a in daemon.tap.arrivals() if a.unit in wanted]


def _rows(plan: Plan, alone: list[float], beside: list[float]) -> list[Result]:
    p50, base50 = percentile(beside, 50), percentile(alone, 50)
    note = (
        f"{len(beside)} units each, last write -> event (settle {plan.settle_seconds:g} s "
        f"included); beside a {plan.isolation_sparse_gb} GB sparse file being hashed"
    )
    return [
        Result(
            "9. time to register beside a hostile unit, p50",
            p50,
            base50,
            "s",
            f"<= {TARGET_RATIO}x",
            p50 <= TARGET_RATIO * base50,
            note,
        ),
        Result(
            "9. time to register beside a hostile unit, p99",
            percentile(beside, 99),
            percentile(alone, 99),
            "s",
            "-",
            None,
        ),
    ]
