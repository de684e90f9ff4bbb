"""Reaping orphans when modelwatch runs as PID 1 (a container without an init).

Processes started by the command sink may leave background children behind; when the command
exits they are re-parented to PID 1, and someone must `wait()` for them or they stay zombies.
Children the command sink is still waiting for itself are tracked here and left alone, so
their exit status is never stolen from `subprocess`.
"""

from __future__ import annotations

import contextlib
import os
import threading

_lock = threading.Lock()
_active: set[int] = set()


def track(pid: int) -> None:
    """A child whose exit status belongs to someone else (a `subprocess.Popen`)."""
    with _lock:
        _active.add(pid)


def untrack(pid: int) -> None:
    with _lock:
        _active.discard(pid)


def _children() -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def reap_orphans() -> int:
    """Wait for every zombie child nobody else is waiting for; returns how many."""
    reaped = 0
    for pid in _children():
        with _lock:
            if pid in _active:
                continue
        if _is_zombie(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
    return reaped
