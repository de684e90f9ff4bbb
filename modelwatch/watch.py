"""Watching roots: watchdog observers whose handlers only enqueue.

Each root gets its own observer (inotify, or polling for `observer = "polling"`). The handler
puts a `Change` on the pipeline's queue and returns: no stat, no inspection, no sink call ever
runs on an observer thread. `RootWatcher.ensure()`, called periodically by the lifecycle loop,
starts the observer when the root appears, and restarts it when the root disappears, is
replaced (different inode) or its observer thread died; each (re)start queues a `Rescan` so
whatever happened while nobody watched is reconciled.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from modelwatch.clock import Clock
from modelwatch.config import RootConfig
from modelwatch.units import describe

log = structlog.get_logger("modelwatch.watch")

# The narrow mask: created, written-and-closed, modified, moved, deleted. Opens and
# close-without-write are left out, so our own reads generate no events and bursts fit in the
# kernel queue.
EVENT_FILTER = [
    FileCreatedEvent,
    FileClosedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


@dataclass(frozen=True, slots=True)
class Change:
    """Something changed at `path` (and `dest` for moves) under `root` at monotonic time `at`."""

    root: str
    path: str
    dest: str | None
    is_dir: bool
    at: float


@dataclass(frozen=True, slots=True)
class Rescan:
    """Reconcile `root` (only below the relative directory `below`, when given)."""

    root: str
    below: str = ""


class _Handler(FileSystemEventHandler):
    def __init__(self, root: str, changes: queue.Queue[Any], clock: Clock) -> None:
        self.root = root
        self.changes = changes
        self.clock = clock

    def on_any_event(self, event: FileSystemEvent) -> None:
        dest = event.dest_path or None
        self.changes.put(
            Change(
                self.root,
                os.fsdecode(event.src_path),
                os.fsdecode(dest) if dest else None,
                event.is_directory,
                self.clock.monotonic(),
            )
        )


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(path) else None


class RootWatcher:
    """One root's observer, (re)started by `ensure()` from the lifecycle thread."""

    def __init__(self, root: RootConfig, changes: queue.Queue[Any], clock: Clock) -> None:
        self.root = root
        self.changes = changes
        self.clock = clock
        self._observer: Any = None
        self._identity: tuple[int, int] | None = None
        self._log = log.bind(root=describe(root.path))

    @property
    def kind(self) -> str:
        return "polling" if self.root.policy.observer == "polling" else "inotify"

    @property
    def watching(self) -> bool:
        return self._observer is not None

    def alive(self) -> bool:
        """False when a thread of the observer died (the root is then re-watched by `ensure`)."""
        observer = self._observer
        if observer is None:
            return True
        threads = [observer, *observer.emitters]
        # watchdog >= 7 reads inotify on a thread of its own; it is not public API.
        reader = getattr(observer, "_inotify_fd", None)
        if isinstance(reader, threading.Thread):
            threads.append(reader)
        return all(t.is_alive() for t in threads)

    def ensure(self) -> None:
        """Start, restart or stop watching so it matches what is on disk now."""
        current = _identity(self.root.path)
        if self._observer is not None and (current != self._identity or not self.alive()):
            self._log.info("root_changed", present=current is not None)
            self.stop()
            self.changes.put(Rescan(self.root.path))
        if self._observer is None and current is not None:
            self._start(current)

    def _start(self, identity: tuple[int, int]) -> None:
        observer: Any
        if self.kind == "polling":
            observer = PollingObserver(timeout=self.root.policy.poll_interval_seconds)
        else:
            observer = Observer()
        handler = _Handler(self.root.path, self.changes, self.clock)
        try:
            observer.schedule(handler, self.root.path, recursive=True, event_filter=EVENT_FILTER)
            observer.start()
        except OSError as exc:
            self._log.warning("watch_failed", error=str(exc))
            return
        self._observer, self._identity = observer, identity
        self._log.info("root_watched", observer=self.kind)
        self.changes.put(Rescan(self.root.path))

    def stop(self) -> None:
        observer, self._observer, self._identity = self._observer, None, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
