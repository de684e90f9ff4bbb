"""`command` sink: runs a program per event, the event JSON on its stdin (SPEC §5b).

Keys: `argv` (required: the program and its arguments; no shell), `timeout_seconds = 60`.

The command runs in its own session and process group, with the daemon's environment plus
`MODELWATCH_EVENT_ID`, `MODELWATCH_EVENT_TYPE` and `MODELWATCH_UNIT_PATH`; stdin is the event
as one JSON line, stdout is discarded, the last 8 KiB of stderr are kept. Exit status 0 =
delivered; 75 (EX_TEMPFAIL) or death by a signal = `SinkError` (retried); any other status, or
a program that cannot be started, = `PermanentSinkError`. At the timeout the whole process
group is killed with SIGKILL and the attempt is retried. The command itself is always waited
for; background processes it leaves behind after a normal exit are its own business, and
`send` returns without waiting for them. Non-empty stderr is logged (`command_stderr`) and
quoted, as one line, in error messages.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import selectors
import signal
import subprocess
import time
from typing import IO

import structlog

from modelwatch import reaper
from modelwatch.config import SinkConfig
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.sinks import check_options

log = structlog.get_logger("modelwatch.sinks.command")

EX_TEMPFAIL = 75
STDERR_TAIL = 8 * 1024
_EXCERPT_CHARS = 500  # of the stderr tail, in error messages (the log line has all of it)
_POLL_SECONDS = 0.1  # how often to look whether the command exited while its children live on
_CHUNK = 512  # PIPE_BUF: a write of this size never blocks on a pipe select() calls writable
# The program itself is wrong (missing, not executable, not a program): retrying cannot help.
_CANNOT_EXEC = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR, errno.ELOOP}


class _TimedOut(Exception):
    """The deadline passed before the command exited; `stderr` is what it wrote so far."""

    def __init__(self, stderr: bytes) -> None:
        super().__init__("timed out")
        self.stderr = stderr


class CommandSink:
    """Delivered when the command exits 0."""

    def __init__(self, config: SinkConfig) -> None:
        check_options(config, {"argv": list, "timeout_seconds": (int, float)}, required=("argv",))
        self.name = config.name
        self.argv = _argv(config)
        self.timeout = _timeout(config)

    def __repr__(self) -> str:
        return f"CommandSink(name={self.name!r}, argv={self.argv!r}, timeout={self.timeout!r})"

    def send(self, event: Event) -> None:
        proc = self._start(event)
        stderr, timed_out = b"", False
        deadline = time.monotonic() + self.timeout
        try:
            stderr = _converse(proc, (event.to_json() + "\n").encode(), deadline)
            proc.wait(max(0.0, deadline - time.monotonic()))
        except _TimedOut as exc:
            stderr, timed_out = exc.stderr, True
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _reap(proc)  # kills the process group if the command still runs
        code = None if timed_out else proc.returncode
        self._judge(event, code, _one_line(stderr.decode("utf-8", "replace")))

    def close(self) -> None:
        return None

    def _start(self, event: Event) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "MODELWATCH_EVENT_ID": event.id,
            "MODELWATCH_EVENT_TYPE": event.type,
            "MODELWATCH_UNIT_PATH": event.unit_path,
        }
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            message = f"command {self.argv[0]!r} cannot be started: {exc.strerror or exc}"
            if exc.errno in _CANNOT_EXEC:
                raise PermanentSinkError(message) from exc
            raise SinkError(message) from exc  # out of processes or descriptors: transient
        except ValueError as exc:  # a value the environment cannot carry (NUL, bad encoding)
            raise PermanentSinkError(f"command {self.argv[0]!r}: {exc}") from exc
        reaper.track(proc.pid)
        return proc

    def _judge(self, event: Event, code: int | None, stderr: str) -> None:
        """Delivered on status 0; `code` None means the command timed out."""
        if stderr:
            level = log.info if code == 0 else log.warning
            level("command_stderr", sink=self.name, event_id=event.id, stderr=stderr)
        if code == 0:
            return
        quoted = f": {_tail(stderr)}" if stderr else ""
        what = f"command {self.argv[0]!r}"
        if code is None:
            raise SinkError(f"{what} timed out after {self.timeout:g} s{quoted}")
        if code < 0:
            raise SinkError(f"{what} was killed by {_signal_name(-code)}{quoted}")
        if code == EX_TEMPFAIL:
            raise SinkError(f"{what} exited with status 75 (temporary failure){quoted}")
        raise PermanentSinkError(f"{what} exited with status {code}{quoted}")


def _converse(proc: subprocess.Popen[bytes], payload: bytes, deadline: float) -> bytes:
    """Write `payload` to stdin and keep the tail of stderr until the command exits.

    Returns when stdin is written and stderr is at its end, or as soon as the command has
    exited (its background children may hold stderr open for a long time); raises
    `_TimedOut` at the deadline.
    """
    stdin, stderr = proc.stdin, proc.stderr
    if stdin is None or stderr is None:  # pragma: no cover - _start always makes both pipes
        raise TypeError("the command was started without stdin and stderr pipes")
    os.set_blocking(stderr.fileno(), False)
    tail = bytearray()
    pending = memoryview(payload)
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        selector.register(stderr, selectors.EVENT_READ)
        while selector.get_map():
            if proc.poll() is not None:
                _collect(stderr.fileno(), tail)
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut(bytes(tail))
            for key, _ in selector.select(min(remaining, _POLL_SECONDS)):
                if key.fileobj is stdin:
                    pending = _feed(selector, stdin, pending)
                elif not _collect(stderr.fileno(), tail):
                    selector.unregister(stderr)
    return bytes(tail)


def _feed(selector: selectors.BaseSelector, stdin: IO[bytes], pending: memoryview) -> memoryview:
    """Write the next chunk of stdin; at the end (or if the command stopped reading), close it."""
    try:
        pending = pending[os.write(stdin.fileno(), pending[:_CHUNK]) :]
    except BrokenPipeError:
        pending = pending[:0]  # the command does not want (more of) the event; its status says
    if not pending:
        selector.unregister(stdin)
        stdin.close()
    return pending


def _collect(fd: int, tail: bytearray, max_reads: int = 64) -> bool:
    """Read what stderr has now into `tail` (keeping its last bytes); False at end of file."""
    for _ in range(max_reads):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        tail += data
        del tail[:-STDERR_TAIL]
    return True


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group if the command still runs, wait for it, close the pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the command and everything it started
        proc.wait()
    reaper.untrack(proc.pid)
    for pipe in (proc.stdin, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _one_line(text: str) -> str:
    """`text` without surrounding blanks, newlines and other controls escaped: one log line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text.strip())


def _tail(text: str) -> str:
    return text if len(text) <= _EXCERPT_CHARS else "..." + text[-_EXCERPT_CHARS:]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _argv(config: SinkConfig) -> tuple[str, ...]:
    argv = config.options["argv"]
    if not argv:
        raise ConfigError(f"{config.key}.argv: must not be empty (the program to run comes first)")
    for index, item in enumerate(argv):
        if not isinstance(item, str) or "\x00" in item:
            raise ConfigError(
                f"{config.key}.argv[{index}]: must be a string without NUL, got {item!r}"
            )
    if not argv[0]:
        raise ConfigError(f"{config.key}.argv[0]: must name the program to run")
    return tuple(argv)


def _timeout(config: SinkConfig) -> float:
    value = config.options.get("timeout_seconds", 60)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{config.key}.timeout_seconds: must be > 0, got {value!r}")
    return float(value)
