"""Watching roots: watchdog observers whose handlers only enqueue.

Each root gets its own observer (inotify, or polling for `observer = "polling"`). The handler
puts a `Change` on the pipeline's queue and returns: no stat, no inspection, no sink call ever
runs on an observer thread. `RootWatcher.ensure()`, called periodically by the lifecycle loop,
starts the observer when the root appears, and restarts it when the root disappears, is
replaced (different inode) or its observer thread died; each (re)start queues a `Rescan` so
whatever happened while nobody watched is reconciled.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
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

from modelwatch.clock import Clock
from modelwatch.config import RootConfig
from modelwatch.mounts import choose_observer, root_filesystem
from modelwatch.poller import RecordPoller
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
    reason: str = "root_changed"  # startup | periodic | overflow | root_changed


class _Handler(FileSystemEventHandler):
    """Enqueues every event, with paths under the configured root path.

    A root given as a symlink is watched at its target (`watched`); event paths are mapped
    back with a string operation (no I/O on the observer thread).
    """

    def __init__(
        self, root: str, watched: str, changes: queue.SimpleQueue[Any], clock: Clock
    ) -> None:
        self.root = root
        self.watched = watched
        self.changes = changes
        self.clock = clock

    def _path(self, raw: bytes | str) -> str:
        path = os.fsdecode(raw)
        if self.watched != self.root and path.startswith(self.watched):
            return self.root + path[len(self.watched) :]
        return path

    def on_any_event(self, event: FileSystemEvent) -> None:
        dest = event.dest_path or None
        self.changes.put(
            Change(
                self.root,
                self._path(event.src_path),
                self._path(dest) if dest else None,
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


# inotify limits and the sysctl that raises each, for the fallback warning.
_LIMITS = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
    errno.ENFILE: "fs.file-max",
}

ObserverFactory = Callable[[str, float], Any]


def make_observer(kind: str, poll_interval: float) -> Any:
    """A watchdog observer of `kind` ("inotify" or "polling")."""
    if kind == "polling":
        # lstat only: symlinks inside units are never followed; an unchanged directory costs
        # one bytes comparison per pass (see modelwatch.poller).
        return RecordPoller(poll_interval)
    return Observer()


class RootWatcher:
    """One root's observer, (re)started by `ensure()` from the lifecycle thread.

    The observer kind is chosen when the root is first watched: the configured `observer`, or
    for "auto" polling on network/FUSE filesystems and inotify elsewhere. When inotify runs
    out of watches or instances, the root falls back to polling (with a warning naming the
    sysctl to raise) and stays on polling until the daemon restarts.
    """

    def __init__(
        self,
        root: RootConfig,
        changes: queue.SimpleQueue[Any],
        clock: Clock,
        observer_factory: ObserverFactory = make_observer,
    ) -> None:
        self.root = root
        self.changes = changes
        self.clock = clock
        self.observer_factory = observer_factory
        self._observer: Any = None
        self._kind = "missing"
        self._fallback = False
        self._identity: tuple[int, int] | None = None
        self._failed_identity: tuple[int, int] | None = None
        self._log = log.bind(root=describe(root.path))

    @property
    def kind(self) -> str:
        """ "inotify", "polling", or "missing" while the root is not watched."""
        return self._kind if self._observer is not None else "missing"

    @property
    def fell_back(self) -> bool:
        """True when inotify limits forced this root onto polling."""
        return self._fallback

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

    def stalled(self) -> float:
        """Seconds a polling observer has made no progress (0 for inotify: the kernel does
        the watching, a dead thread shows in `alive`)."""
        stalled = getattr(self._observer, "stalled", None)
        return float(stalled()) if callable(stalled) else 0.0

    def ensure(self) -> None:
        """Start, restart or stop watching so it matches what is on disk now."""
        current = _identity(self.root.path)
        if self._observer is not None and (current != self._identity or not self.alive()):
            self._log.info("root_changed", present=current is not None)
            self.stop()
            self.changes.put(Rescan(self.root.path))
        if self._observer is None and current is not None:
            self._start(current)

    def _choose(self) -> str:
        if self._fallback:
            return "polling"
        return choose_observer(self.root.policy.observer, root_filesystem(self.root.path))

    def _start(self, identity: tuple[int, int]) -> None:
        kind = self._choose()
        try:
            observer = self._launch(kind)
        except OSError as exc:
            sysctl = _LIMITS.get(exc.errno or 0)
            if kind != "inotify" or sysctl is None:
                self._failed_watch(identity, kind, exc)
                return
            self._log.warning(
                "inotify_limit_reached",
                error=str(exc),
                fallback="polling",
                hint=f"raise the sysctl {sysctl}",
            )
            self._fallback, kind = True, "polling"
            try:
                observer = self._launch(kind)
            except OSError as again:
                self._failed_watch(identity, kind, again)
                return
        self._observer, self._identity, self._kind = observer, identity, kind
        self._log.info("root_watched", observer=kind)
        self.changes.put(Rescan(self.root.path))

    def _failed_watch(self, identity: tuple[int, int], kind: str, exc: OSError) -> None:
        """Log once per root identity and rescan, so what is there is still registered."""
        if self._failed_identity != identity:
            self._failed_identity = identity
            self._log.warning("watch_failed", observer=kind, error=str(exc))
            self.changes.put(Rescan(self.root.path))

    def _launch(self, kind: str) -> Any:
        observer = self.observer_factory(kind, self.root.policy.poll_interval_seconds)
        watched = os.path.realpath(self.root.path)
        handler = _Handler(self.root.path, watched, self.changes, self.clock)
        try:
            observer.schedule(handler, watched, recursive=True, event_filter=EVENT_FILTER)
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()
            raise
        return observer

    def stop(self) -> None:
        observer, self._observer, self._identity = self._observer, None, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)


class OverflowAlarm(logging.Handler):
    """Calls `on_overflow` when watchdog reports a kernel inotify queue overflow.

    watchdog (>= 7) logs the overflow and rebuilds its watches, but the events lost are not
    replayed; the daemon must rescan. The log record is the only signal watchdog gives.
    """

    LOGGER = "watchdog.observers.inotify_c"

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()

    def install(self) -> None:
        _report_overflows_on_watchdog6()
        logging.getLogger(self.LOGGER).addHandler(self)

    def remove(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def _report_overflows_on_watchdog6() -> None:
    """watchdog < 7 (the last line for Python 3.10) drops IN_Q_OVERFLOW silently.

    Wrap its event-buffer parser so an overflow is logged the way watchdog 7 logs it, and the
    alarm above works on both. Nothing changes on watchdog >= 7.
    """
    if int(version("watchdog").split(".")[0]) >= 7:
        return
    try:
        from watchdog.observers import inotify_c
    except ImportError:  # not Linux
        return
    inotify = getattr(inotify_c, "Inotify", None)
    original = getattr(inotify, "_parse_event_buffer", None)
    if inotify is None or original is None or getattr(original, "_modelwatch", False):
        return
    overflow = 0x4000  # IN_Q_OVERFLOW
    logger = logging.getLogger(OverflowAlarm.LOGGER)

    def parse(event_buffer: bytes) -> Any:
        for wd, mask, cookie, name in original(event_buffer):
            if wd == -1 and mask & overflow:
                logger.warning("Inotify queue overflowed; filesystem events were lost")
            yield wd, mask, cookie, name

    parse._modelwatch = True  # type: ignore[attr-defined]
    inotify._parse_event_buffer = staticmethod(parse)
