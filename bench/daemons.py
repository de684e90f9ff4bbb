"""A real `modelwatch run` subprocess, its config, its readiness and its events.

Events: the daemon's `jsonl` sink writes into a FIFO that `EventTap` reads on a thread, stamping
each line with `time.time()` the moment it arrives, so an event's arrival time is when the sink
delivered it (not when the event was created). Readiness: the daemon speaks sd_notify; a
datagram socket given as `NOTIFY_SOCKET` receives `READY=1` after the initial reconcile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import modelwatch
from modelwatch.config import Config, load_config
from modelwatch.testing import MemorySink, sink_config

_STOP = b'{"bench": "stop"}\n'


@dataclass(frozen=True, slots=True)
class Settings:
    """What a benchmark daemon watches and how."""

    root: str
    state_dir: str
    observer: str = "inotify"
    settle_seconds: float = 1.0
    poll_interval_seconds: float = 1.0
    unit_depth: int = 1
    defaults: str = ""  # more [defaults] lines (TOML)
    cluster: str = ""  # a [cluster] table's lines (TOML); with it, the root is shared


def config_text(settings: Settings, events_path: str) -> str:
    return f"""\
[daemon]
state_dir = {json.dumps(settings.state_dir)}
log_level = "warning"

[defaults]
settle_seconds = {settings.settle_seconds}
observer = "{settings.observer}"
poll_interval_seconds = {settings.poll_interval_seconds}
{settings.defaults}

[[roots]]
path = {json.dumps(settings.root)}
unit_depth = {settings.unit_depth}
{"shared = true" if settings.cluster else ""}

[[sinks]]
type = "jsonl"
path = {json.dumps(events_path)}
fsync = false
{"[cluster]" if settings.cluster else ""}
{settings.cluster}
"""


def write_config(settings: Settings, workdir: str) -> str:
    """Write `workdir/config.toml` (events to `workdir/events.fifo`); returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.toml")
    with open(path, "w") as out:
        out.write(config_text(settings, os.path.join(workdir, "events.fifo")))
    return path


def in_process(settings: Settings, workdir: str) -> tuple[Config, MemorySink]:
    """The config an in-process `Daemon` uses, and a memory sink standing in for its sink."""
    config = load_config(write_config(settings, workdir), {})
    return config, MemorySink(sink_config("jsonl", "jsonl"))


@dataclass(frozen=True, slots=True)
class Arrival:
    """An event line as the sink delivered it, and when it arrived."""

    at: float
    event: dict[str, Any]

    @property
    def unit(self) -> str:
        return str(self.event["data"]["name"])


class EventTap:
    """Reads JSON lines from a FIFO on a thread and stamps each on arrival."""

    def __init__(self, path: str) -> None:
        os.mkfifo(path, 0o600)
        # O_RDWR: the writer's open never blocks, and no EOF while the daemon restarts.
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._arrivals: list[Arrival] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._read, args=(self._fd,), name="event-tap", daemon=True
        )
        self._thread.start()

    def _read(self, fd: int) -> None:
        with open(fd, "rb", closefd=False) as stream:
            for line in stream:
                at = time.time()
                if line == _STOP:
                    return
                arrival = Arrival(at, json.loads(line))
                with self._changed:
                    self._arrivals.append(arrival)
                    self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[Arrival]], bool], timeout: float) -> bool:
        """Wait until `predicate(arrivals so far)` holds; False at the deadline."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._arrivals), timeout)

    def wait_count(self, count: int, timeout: float) -> bool:
        return self.wait_for(lambda arrivals: len(arrivals) >= count, timeout)

    def arrivals(self) -> list[Arrival]:
        with self._changed:
            return list(self._arrivals)

    def close(self) -> None:
        if self._fd is None:
            return
        os.write(self._fd, _STOP)
        self._thread.join(timeout=10)
        os.close(self._fd)
        self._fd = None


class ReadySignal:
    """A NOTIFY_SOCKET for the daemon: `wait()` returns when it sent READY=1."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)

    def wait(self, alive: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._sock.settimeout(min(0.5, max(0.01, deadline - time.monotonic())))
            try:
                message = self._sock.recv(4096)
            except TimeoutError:
                if not alive():
                    raise RuntimeError("the daemon exited before it was ready") from None
                continue
            if b"READY=1" in message.split(b"\n"):
                return
        raise TimeoutError(f"the daemon was not ready within {timeout} s")

    def close(self) -> None:
        self._sock.close()


def _daemon_environment(notify_socket: str) -> dict[str, str]:
    """The daemon runs the very `modelwatch` this process imported (a checkout, a prototype)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(modelwatch.__file__)))
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "NOTIFY_SOCKET": notify_socket,
        "MODELWATCH_LOG_FORMAT": "json",
    }


def _log_event(line: bytes) -> object:
    try:
        return json.loads(line).get("event")
    except (ValueError, AttributeError):
        return None  # not a JSON object: a traceback line, say


class DaemonProcess:
    """`python -m modelwatch run --config FILE` in `workdir`, with an event tap.

    Use as a context manager: the daemon is stopped (SIGTERM) and the tap closed on exit.
    """

    def __init__(self, settings: Settings, workdir: str) -> None:
        os.makedirs(workdir)
        self.settings = settings
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "daemon.log")
        self.tap = EventTap(os.path.join(workdir, "events.fifo"))
        self._ready = ReadySignal(os.path.join(workdir, "notify.sock"))
        config = write_config(settings, workdir)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelwatch", "run", "--config", config],
                cwd=workdir,
                env=_daemon_environment(self._ready.path),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the daemon sent READY=1 (its initial reconcile is done)."""
        self._ready.wait(lambda: self.proc.poll() is None, timeout)

    def logged(self, event: str) -> int:
        """How many log lines of the daemon (JSON) are the structlog event `event`."""
        with open(self.log_path, "rb") as log:
            return sum(1 for line in log if _log_event(line) == event)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tap.close()
        self._ready.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        if kind is not None:  # what the daemon said helps more than the benchmark's traceback
            with open(self.log_path, errors="replace") as log:
                tail = log.readlines()[-20:]
            sys.stderr.write(f"daemon log ({self.log_path}), last lines:\n" + "".join(tail))
