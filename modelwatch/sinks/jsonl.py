"""`jsonl` sink: appends one JSON line per event to a file.

Each line is written with a single `write` on an `O_APPEND` descriptor, so concurrent readers
never see a torn line from us, and with `fsync = true` (the default) it is on disk before the
delivery is recorded. The file is reopened when it is rotated away (logrotate's move-and-create).
"""

from __future__ import annotations

import os

from modelwatch.config import SinkConfig
from modelwatch.errors import SinkError
from modelwatch.events import Event
from modelwatch.sinks import check_options


class JsonlSink:
    def __init__(self, config: SinkConfig) -> None:
        check_options(config, {"path": str, "fsync": bool}, required=("path",))
        self.name = config.name
        self.path = os.path.abspath(os.path.expanduser(str(config.options["path"])))
        self.fsync = bool(config.options.get("fsync", True))
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
            self.close()
            raise SinkError(f"{self.path}: short write ({written} of {len(line)} bytes)")

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
