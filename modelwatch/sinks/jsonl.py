"""`jsonl` sink: appends one JSON line per event to a file.

Each line is written with a single `write` on an `O_APPEND` descriptor, so lines of several
writers never interleave, and with `fsync = true` (the default) it is on disk before the
delivery is recorded. A reader racing a write may see the start of a line before its end (a
line of a large event spans pages): readers take complete, newline-terminated lines. A short
write (disk full) leaves the start of a line behind; the file is reopened for the retry, and
opening it ends an unfinished last line with a newline, so each event's full line stands
alone (also after a restart). The file is reopened when it is rotated away
(logrotate's move-and-create).
"""

from __future__ import annotations

import os
from typing import ClassVar

from modelwatch.config import SinkConfig
from modelwatch.errors import SinkError
from modelwatch.events import Event
from modelwatch.sinks.options import BOOLEAN, PATH, REQUIRED, Option, SinkOptions


class JsonlSink:
    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option("path", PATH, "the file events are appended to", REQUIRED),
        Option("fsync", BOOLEAN, "sync the file after each event, before it counts", True),
    )

    def __init__(self, config: SinkConfig) -> None:
        values = self.OPTIONS.parse(config)
        self.name = config.name
        self.path = os.path.abspath(values["path"])
        self.fsync: bool = values["fsync"]
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def _open(self) -> int:
        try:
            current = os.stat(self.path)
            identity: tuple[int, int] | None = (current.st_dev, current.st_ino)
        except FileNotFoundError:
            identity = None
        if self._fd is not None and identity == self._inode:
            return self._fd
        self.close()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        try:
            if st.st_size and _last_byte(self.path, st.st_size) not in (b"\n", b""):
                os.write(fd, b"\n")  # a line a full disk (or a crash) left unfinished
        except OSError:
            os.close(fd)
            raise
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)
        return fd

    def send(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode()
        try:
            fd = self._open()
            written = os.write(fd, line)
            if written == len(line) and self.fsync:
                os.fsync(fd)
        except OSError as exc:
            self.close()
            raise SinkError(f"{self.path}: {exc}") from exc
        if written != len(line):
            self.close()  # reopening ends the unfinished line (see `_open`)
            raise SinkError(f"{self.path}: short write ({written} of {len(line)} bytes)")

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _last_byte(path: str, size: int) -> bytes:
    """The last byte of the file (b"" when it cannot be read: nothing to repair then)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.pread(fd, 1, size - 1)
    except OSError:
        return b""
    finally:
        os.close(fd)
