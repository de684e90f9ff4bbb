"""`command` sink: runs a program per event, the event JSON on its stdin (SPEC §5b).

Keys: `CommandSink.OPTIONS` (`argv`, `timeout_seconds`, `pass_env`).

The command runs in its own session and process group with a minimal environment: `PATH`,
`LANG` and `HOME` from the daemon's, the event's `MODELWATCH_EVENT_ID`, `MODELWATCH_EVENT_TYPE`
and `MODELWATCH_UNIT_PATH`, and the variables named in `pass_env`; nothing else, so no other
sink's secret reaches it. Stdin is the event as one JSON line, stdout is discarded, the last
8 KiB of stderr are kept. Exit status 0 = delivered; 75 (EX_TEMPFAIL) or death by a signal =
`SinkError` (retried); any other status, or a program that cannot be started, =
`PermanentSinkError`. At the timeout the whole process group is killed with SIGKILL and the
attempt is retried. The command itself is always waited for by the sink (started through
`reaper.spawn`, so that the PID-1 reaper never takes its exit status); background processes
it leaves behind after a normal exit are its own business, and `send` returns without waiting
for them. Non-empty stderr is logged (`command_stderr`) and quoted, as one line, in error
messages.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import time
from typing import IO, Any, ClassVar

import structlog

from modelwatch import reaper
from modelwatch.config import SinkConfig
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.sinks.options import (
    ENV_NAME,
    REQUIRED,
    SECONDS,
    STRING,
    Kind,
    Option,
    SinkOptions,
    array,
)

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


def _argv(key: str, value: Any) -> list[str]:
    argv: list[str] = array(STRING, nonempty=True).check(key, value)
    if not argv[0]:
        raise ConfigError(f"{key}[0]: must name the program to run")
    return argv


# what the child inherits from the daemon's environment, besides `pass_env`
INHERITED = ("PATH", "LANG", "HOME")


class CommandSink:
    """Delivered when the command exits 0."""

    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option("argv", Kind("array of strings", _argv), "the program and its arguments", REQUIRED),
        Option("timeout_seconds", SECONDS, "the command is killed after this long", 60.0),
        Option(
            "pass_env",
            array(ENV_NAME),
            "variables passed on from the daemon's environment, besides PATH, LANG and HOME",
            [],
        ),
    )

    def __init__(self, config: SinkConfig) -> None:
        values = self.OPTIONS.parse(config)
        self.name = config.name
        self.argv = tuple(values["argv"])
        self.timeout: float = values["timeout_seconds"]
        self.pass_env = tuple(values["pass_env"])

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

    def environment(self, event: Event) -> dict[str, str]:
        """The command's whole environment for `event`."""
        env = {"PATH": os.defpath}
        env.update({n: os.environ[n] for n in (*INHERITED, *self.pass_env) if n in os.environ})
        env.update(
            MODELWATCH_EVENT_ID=event.id,
            MODELWATCH_EVENT_TYPE=event.type,
            MODELWATCH_UNIT_PATH=event.unit_path,
        )
        return env

    def _start(self, event: Event) -> subprocess.Popen[bytes]:
        env = self.environment(event)
        try:
            return reaper.spawn(
                lambda: subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                )
            )
        except OSError as exc:
            message = f"command {self.argv[0]!r} cannot be started: {exc.strerror or exc}"
            if exc.errno in _CANNOT_EXEC:
                raise PermanentSinkError(message) from exc
            raise SinkError(message) from exc  # out of processes or descriptors: transient
        except ValueError as exc:  # a value the environment cannot carry (NUL, bad encoding)
            raise PermanentSinkError(f"command {self.argv[0]!r}: {exc}") from exc

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
    reaper.release(proc.pid)
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
