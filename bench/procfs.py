"""What the kernel says about another process: memory (VmRSS, VmHWM) and CPU time."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of `pid`, in MB (2**20 bytes)."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0]) / 1024  # the kernel reports kB
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may contain spaces; fields after it are fixed.
        fields = stat.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def cpu_seconds_exact(pid: int) -> float:
    """CPU seconds of every thread of `pid` so far, in nanoseconds' precision (the
    scheduler's own account, /proc/<pid>/task/*/schedstat), where `cpu_seconds` counts clock
    ticks of 10 ms: for figures of a few milliseconds per second."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return total / 1e9
