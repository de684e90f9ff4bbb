"""The baselines modelwatch is compared with: a bare tree walk, `inotifywait`, a bare poller.

Run as a script (`python bench/baselines.py ROOT INTERVAL`) it is a bare poller process: one
`bare_walk` of ROOT every INTERVAL seconds until killed (the idle-CPU baseline for polling).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

Stat = tuple[int, int, int]  # (inode, size, mtime_ns)
INOTIFYWAIT = ["inotifywait", "-m", "-r", "-e", "create,close_write,moved_to"]


def walk_stats(root: str) -> Iterator[tuple[str, Stat]]:
    """os.scandir + lstat of every entry below `root` (what any poller must at least do)."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                yield entry.path, (st.st_ino, st.st_size, st.st_mtime_ns)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def bare_walk(root: str) -> int:
    """`walk_stats` as a tight loop that keeps nothing; returns the number of entries."""
    count = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return count


@dataclass(frozen=True, slots=True)
class Seen:
    at: float
    path: str
    events: str


class InotifyWait:
    """`inotifywait -m -r -e create,close_write,moved_to ROOT`, each line stamped on arrival."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [*INOTIFYWAIT, "--format", "%w%f\t%e", root],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._seen: list[Seen] = []
        self._last: dict[tuple[str, str], float] = {}  # (path, CREATE|...) -> last arrival
        self._changed = threading.Condition()
        self._established = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, name="inotifywait", daemon=True),
            threading.Thread(target=self._read_errors, name="inotifywait-err", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if b"Watches established" in line:
                self._established.set()
            elif not line.startswith(b"Setting up watches"):
                sys.stderr.write("inotifywait: " + line.decode(errors="replace"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = time.time()
            path, _, events = line.decode(errors="replace").rstrip("\n").partition("\t")
            with self._changed:
                self._seen.append(Seen(at, path, events))
                for kind in events.split(","):
                    self._last[path, kind] = at
                self._changed.notify_all()

    def wait_established(self, timeout: float = 60.0) -> None:
        if not self._established.wait(timeout):
            raise TimeoutError("inotifywait did not establish its watches")

    def wait_event(self, path: str, kind: str, timeout: float) -> float:
        """When the last `kind` event (CREATE, CLOSE_WRITE, ...) of `path` arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: (path, kind) in self._last, timeout):
                raise TimeoutError(f"inotifywait did not report {kind} {path}")
            return self._last[path, kind]

    def count(self, kind: str) -> int:
        """How many distinct paths had a `kind` event."""
        with self._changed:
            return sum(1 for _, k in self._last if k == kind)

    def seen(self) -> list[Seen]:
        with self._changed:
            return list(self._seen)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)


class BarePoller(threading.Thread):
    """Walks `root` every `interval` seconds and records when each unit was last seen changing.

    A unit is the first path component below `root`; `changed[unit]` is the wall time of the
    last pass that found a difference inside it.
    """

    def __init__(self, root: str, interval: float) -> None:
        super().__init__(name="bare-poller", daemon=True)
        self.root = root
        self.interval = interval
        self.changed: dict[str, float] = {}
        self.stopping = threading.Event()
        self._passed = threading.Condition()
        self._first_pass = threading.Event()

    def begin(self) -> None:
        """Start, and return once the first pass (the reference) is taken."""
        self.start()
        self._first_pass.wait()

    def run(self) -> None:
        previous = dict(walk_stats(self.root))
        self._first_pass.set()
        while not self.stopping.wait(self.interval):
            current = dict(walk_stats(self.root))
            now = time.time()
            with self._passed:
                for path in (current.keys() - previous.keys()) | _modified(previous, current):
                    unit = os.path.relpath(path, self.root).split(os.sep, 1)[0]
                    self.changed[unit] = now
                self._passed.notify_all()
            previous = current

    def wait_units(self, count: int, timeout: float) -> None:
        """Wait until `count` units were seen changing."""
        with self._passed:
            if not self._passed.wait_for(lambda: len(self.changed) >= count, timeout):
                raise TimeoutError(f"the bare poller saw {len(self.changed)} of {count} units")

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def _modified(previous: dict[str, Stat], current: dict[str, Stat]) -> set[str]:
    return {path for path, st in current.items() if previous.get(path, st) != st}


def _poll_forever(root: str, interval: float) -> None:
    while True:
        bare_walk(root)
        time.sleep(interval)


if __name__ == "__main__":
    _poll_forever(sys.argv[1], float(sys.argv[2]))
