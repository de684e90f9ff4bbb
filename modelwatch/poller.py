"""Polling a tree cheaply: per directory, one compact bytes record of its entries.

Each pass walks the tree with os.scandir and lstat (DirEntry.stat, relative to each
directory's fd) and, per directory, builds the sorted list of (name, inode, size, mtime_ns,
mode) of its entries (size and mtime 0 for subdirectories: their own record covers their
contents), marshalled to bytes. An unchanged directory costs one bytes
comparison; a changed one is unmarshalled and diffed entry by entry, so the handler gets the
same per-path events as from watchdog's polling emitter (created, deleted, modified).
"""

from __future__ import annotations

import marshal
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
)

_S_ISDIR = stat.S_ISDIR
Record = dict[str, bytes]


_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def take(root: str, listed: Callable[[], None] | None = None) -> Record:
    """directory path -> marshalled sorted entries, for every directory under `root`;
    `listed()` is called after each directory (progress, for liveness).

    Each directory is listed through an fd (the root followed if it is a symlink, nothing
    below it): entries are then stat-ed relative to it (fstatat), cheaper than by full path.
    """
    records: Record = {}
    stack = [root]
    flags = _LIST
    while stack:
        path = stack.pop()
        items = []
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        flags = _LIST | os.O_NOFOLLOW
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    mode = st.st_mode
                    if _S_ISDIR(mode):
                        items.append((entry.name, st.st_ino, 0, 0, mode))
                        stack.append(os.path.join(path, entry.name))
                    else:
                        items.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, mode))
        except OSError:
            continue
        finally:
            os.close(fd)
        items.sort()
        records[path] = marshal.dumps(items, 2)  # version 2: no back-references, canonical
        if listed is not None:
            listed()
    return records


def changes(old: Record, new: Record) -> list[Any]:
    """watchdog events for every entry that differs between two passes."""
    events: list[Any] = []
    for path, blob in new.items():
        before = old.get(path)
        if before is None or before == blob:
            continue  # a new directory was reported by its parent
        events += _diff(path, dict(_by_name(before)), dict(_by_name(blob)))
    return events


def _by_name(blob: bytes) -> list[tuple[str, tuple[int, int, int, int]]]:
    # our own bytes from `take`, never read from outside the process
    return [(name, rest) for name, *rest in marshal.loads(blob)]  # noqa: S302


def _diff(path: str, old: dict[str, Any], new: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    for name in old.keys() - new.keys():
        kind = DirDeletedEvent if _S_ISDIR(old[name][3]) else FileDeletedEvent
        events.append(kind(os.path.join(path, name)))
    for name, now in new.items():
        was = old.get(name)
        if was == now:
            continue
        full = os.path.join(path, name)
        if was is None or _S_ISDIR(was[3]) != _S_ISDIR(now[3]):
            events.append((DirCreatedEvent if _S_ISDIR(now[3]) else FileCreatedEvent)(full))
        else:
            events.append(FileModifiedEvent(full))
    return events


class RecordPoller(threading.Thread):
    """Drop-in for the watchdog observer as `RootWatcher` uses it (schedule/start/stop)."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="poll", daemon=True)
        self.interval = interval
        self.emitters: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._handler: Any = None
        self._root = ""
        self._progressed = time.monotonic()  # the last directory listed, or pass ended

    def schedule(self, handler: Any, path: str, recursive: bool = True, **_: Any) -> None:
        self._handler, self._root = handler, path

    def run(self) -> None:
        previous = take(self._root, self._progress)
        self._progress()
        while not self._stopped.wait(self.interval):
            current = take(self._root, self._progress)
            for event in changes(previous, current):
                self._handler.on_any_event(event)
            previous = current
            self._progress()

    def _progress(self) -> None:
        self._progressed = time.monotonic()

    def stalled(self) -> float:
        """Seconds without progress beyond the wait between passes: a pass stuck in a
        system call (a hung NFS hard mount) grows it; a poller waiting for its next pass
        does not."""
        return max(0.0, time.monotonic() - self._progressed - self.interval)

    def stop(self) -> None:
        self._stopped.set()
