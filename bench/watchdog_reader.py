"""The floor under benchmark 2: watchdog alone, as the daemon uses it, and nothing else.

Run as a script (`python bench/watchdog_reader.py ROOT LAST_FILE`) it is a process that watches
ROOT with watchdog's inotify observer and the daemon's event mask (`modelwatch.watch.
EVENT_FILTER`); its handler only puts each event on a queue, which a second thread takes
from (the daemon's handler and settle loop, minus all of the daemon's work). It prints
`ready` once the observer runs, then the wall time at which the consumer took the
`closed` event of LAST_FILE (or, when the kernel queue overflowed and that event was lost, its
last event before a second without any) and how many events it took, and exits.

No unit can be settled before its last write has come through watchdog: the time this
process needs is the part of the daemon's burst figure that no work of modelwatch's can
shorten.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any


class WatchdogReader:
    """The script above as a subprocess."""

    def __init__(self, root: str, last_file: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), root, last_file],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))},
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout

    def wait_ready(self) -> None:
        if self._out.readline().strip() != b"ready":
            raise RuntimeError("the watchdog reader did not start")

    def wait_last(self, timeout: float) -> tuple[float, int]:
        """Wall time at which the reader took the last file's `closed` event (see above), and
        how many events it took."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError("the watchdog reader did not see the last file") from None
        at, count = out.split()
        return float(at), int(count)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _main(root: str, last_file: str) -> None:
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    from modelwatch.watch import EVENT_FILTER

    events: queue.Queue[Any] = queue.Queue()
    seen = threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            events.put(event)

    def consume() -> None:
        count, at = 0, 0.0
        while True:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if count:  # the last file's event was lost to an overflow
                    break
                continue
            count, at = count + 1, time.time()
            if event.event_type == "closed" and os.fsdecode(event.src_path) == last_file:
                break
        print(f"{at:.6f} {count}", flush=True)
        seen.set()

    threading.Thread(target=consume, daemon=True).start()
    observer = Observer()
    observer.schedule(Handler(), root, recursive=True, event_filter=EVENT_FILTER)
    observer.start()
    print("ready", flush=True)
    seen.wait()
    os._exit(0)  # not observer.stop(): its join is not what is measured


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
