"""The systemd notify protocol (sd_notify), spoken directly over `$NOTIFY_SOCKET`.

Contract:

* `Notifier.from_environ(environ)` reads `NOTIFY_SOCKET` (a filesystem path, or `@name` for
  an abstract socket, the `@` standing for a leading NUL byte) and `WATCHDOG_USEC` (honoured
  only when `WATCHDOG_PID` is absent or equals this process's pid). Without `NOTIFY_SOCKET`,
  or with an address form it does not support, every method is a no-op.
* Each method sends one AF_UNIX datagram: `ready(status)` -> `READY=1\\nSTATUS=...`,
  `status(text)` -> `STATUS=...`, `reloading()` -> `RELOADING=1\\nMONOTONIC_USEC=<n>`,
  `stopping()` -> `STOPPING=1`, `watchdog()` -> `WATCHDOG=1` (only while the watchdog is
  enabled), `extend_timeout(s)` -> `EXTEND_TIMEOUT_USEC=<n>` (a long initial reconcile).
  Status text is made one line: newlines (and other line breaks, NUL) become spaces.
* Sending never raises: the first failure of a run of failures is logged as `notify_failed`,
  later ones are silent until a send succeeds again.
* `pipeline_healthy(beats, now, max_age)` is the pure decision behind the watchdog ping: the
  names of the threads whose last heartbeat is older than `max_age`. Ping only when it is [].
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("modelwatch.notify")

# Characters that would split a STATUS= line (or the datagram) into several assignments.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\v\f\x00\x1c\x1d\x1e\x85\u2028\u2029", " "))


def _address(value: str) -> str | None:
    """The sendto() address for a NOTIFY_SOCKET value, or None if unsupported."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC as a positive integer, when it is meant for process `pid`."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def one_line(text: str) -> str:
    """`text` with every line break replaced by a space (safe inside `STATUS=`)."""
    return text.translate(_LINE_BREAKS)


class Notifier:
    """Sends sd_notify messages to the service manager; see the module docstring."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._failing = False
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, pid: int | None = None) -> Notifier:
        """A notifier configured from `environ` (usually `os.environ`) for process `pid`."""
        raw = environ.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls(None)
        address = _address(raw)
        if address is None:
            log.warning("notify_failed", error="unsupported NOTIFY_SOCKET address", socket=raw)
            return cls(None)
        return cls(address, _watchdog_usec(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        """True when a service manager is listening (NOTIFY_SOCKET was set)."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str) -> None:
        """Startup is complete (after the initial reconcile)."""
        self._send(f"READY=1\nSTATUS={one_line(status)}")

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status`."""
        self._send(f"STATUS={one_line(text)}")

    def reloading(self) -> None:
        """A reload (SIGHUP) has started; follow with `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the current start (or stop) times out."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def stopping(self) -> None:
        """Shutdown has started."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep-alive ping; a no-op unless the service manager asked for one."""
        if self._watchdog_usec is not None:
            self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        data = message.encode("utf-8", "backslashreplace")  # lone surrogates from odd paths
        try:
            # One short-lived socket per message, as sd_notify does: nothing to close later.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            self._failed(exc, self.address)
        else:
            self._failing = False

    def _failed(self, exc: OSError, address: str) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first:
            log.warning("notify_failed", error=str(exc), socket=address.replace("\0", "@"))


def pipeline_healthy(beats: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """Names of the threads whose last heartbeat (monotonic seconds) is older than `max_age`.

    An empty list means every thread made progress recently and the watchdog may be pinged.
    """
    return [name for name, beat in beats.items() if now - beat > max_age]
