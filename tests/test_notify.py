"""The sd_notify protocol over real AF_UNIX datagram sockets, and the watchdog decision."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from modelwatch.notify import Notifier, pipeline_healthy


class Manager:
    """The service manager's end: a bound datagram socket we read messages from."""

    def __init__(self, bind_address: str, environ_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_address)
        self.sock.settimeout(5.0)
        self.environ_value = environ_value

    def notifier(self, **extra: str) -> Notifier:
        return Notifier.from_environ({"NOTIFY_SOCKET": self.environ_value, **extra})

    def receive(self) -> bytes:
        return self.sock.recv(4096)

    def nothing_waiting(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5.0)
        return False


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    """A listening notify socket, as a filesystem path or as an abstract `@name`."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        server = Manager(path, path)
    else:
        name = f"modelwatch-test-{uuid.uuid4().hex}"
        server = Manager("\0" + name, "@" + name)
    with server.sock:
        yield server


def test_ready_sends_ready_and_status(manager: Manager) -> None:
    """ready() sends READY=1 with the status line in one datagram."""
    manager.notifier().ready("watching 3 roots")
    assert manager.receive() == b"READY=1\nSTATUS=watching 3 roots"


def test_status_newlines_become_spaces(manager: Manager) -> None:
    """Line breaks in a status cannot inject other assignments."""
    manager.notifier().status("line one\nWATCHDOG=1\r\nend")
    assert manager.receive() == b"STATUS=line one WATCHDOG=1  end"


def test_status_with_undecodable_path_is_sent(manager: Manager) -> None:
    """A surrogate-escaped file name in a status is escaped, not an exception."""
    manager.notifier().status("unit " + b"m\xffodel".decode("utf-8", "surrogateescape"))
    assert manager.receive() == b"STATUS=unit m\\udcffodel"


def test_reloading_carries_monotonic_usec(manager: Manager) -> None:
    """reloading() sends RELOADING=1 and the CLOCK_MONOTONIC time in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    manager.notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = manager.receive().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping(manager: Manager) -> None:
    """stopping() sends STOPPING=1."""
    manager.notifier().stopping()
    assert manager.receive() == b"STOPPING=1"


def test_watchdog_ping(manager: Manager) -> None:
    """watchdog() sends WATCHDOG=1 when the manager set WATCHDOG_USEC for this process."""
    notifier = manager.notifier(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    notifier.watchdog()
    assert manager.receive() == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_disabled(manager: Manager) -> None:
    """WATCHDOG_PID naming another process disables the watchdog: no interval, no ping."""
    notifier = manager.notifier(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid() + 1))
    assert notifier.watchdog_interval is None
    notifier.watchdog()
    notifier.stopping()
    assert manager.receive() == b"STOPPING=1"  # the ping was never sent


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    """The ping interval is half of WATCHDOG_USEC, when the watchdog is meant for us."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/nowhere.sock", **environ})
    assert notifier.watchdog_interval == interval


def test_without_notify_socket_everything_is_a_noop() -> None:
    """Outside systemd there is no socket, no watchdog and no error."""
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.status("x")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()


def test_send_failure_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    """A vanished socket is logged once as notify_failed; sending goes on quietly."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        notifier.status("one")
        notifier.status("two")
        notifier.stopping()
    assert [entry["event"] for entry in logs] == ["notify_failed"]


@pytest.mark.parametrize(
    ("beats", "stale"),
    [
        ({}, []),
        ({"settle": 99.5, "deliver-webhook": 99.9}, []),
        ({"settle": 90.0, "deliver-webhook": 99.9}, []),  # exactly max_age old: still fresh
        ({"settle": 89.9, "deliver-webhook": 99.9}, ["settle"]),
        ({"settle": 10.0, "deliver-a": 50.0, "deliver-b": 95.0}, ["settle", "deliver-a"]),
        ({"settle": 101.0}, []),  # a beat after `now` (read just before it) is fresh
    ],
)
def test_pipeline_healthy(beats: dict[str, float], stale: list[str]) -> None:
    """Threads whose heartbeat is older than max_age are reported as stale."""
    assert pipeline_healthy(beats, now=100.0, max_age=10.0) == stale
