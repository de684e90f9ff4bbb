"""Reaping orphans when modelwatch runs as PID 1 (a container without an init).

Processes started by the command sink may leave background children behind; when the command
exits they are re-parented to PID 1, and someone must `wait()` for them or they stay zombies.

The sink's own children are never reaped here: they are started through `spawn`, which holds
the lock a reaping pass holds from start to end, and counts the child as owned before letting
go. A pass therefore sees every child either owned (its exit status belongs to the `Popen`
that waits for it) or an orphan; never a command that has started, and perhaps already exited,
but is not owned yet. Reaping such a command would steal its exit status, and `subprocess`
reports a stolen status as 0: a command that failed would count as delivered.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Protocol, TypeVar


class _Child(Protocol):
    @property
    def pid(self) -> int: ...


C = TypeVar("C", bound=_Child)

_lock = threading.Lock()
_owned: Counter[int] = Counter()


def spawn(start: Callable[[], C]) -> C:
    """Run `start()` (which starts one child, e.g. `subprocess.Popen(...)`) so that no
    reaping pass can see the child before it is owned; `release(child.pid)` once waited for."""
    with _lock:
        child = start()
        _owned[child.pid] += 1
        return child


def release(pid: int) -> None:
    """The owner has waited for `pid`: it is no business of the reaper's any more."""
    with _lock:
        _owned[pid] -= 1
        if _owned[pid] <= 0:
            del _owned[pid]


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
    """Wait for every zombie child nobody owns; returns how many."""
    reaped = 0
    with _lock:
        for pid in _children():
            if pid not in _owned and _is_zombie(pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                    reaped += 1
    return reaped
