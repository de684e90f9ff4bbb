"""A real forward proxy for tests: Debian's `tinyproxy` on 127.0.0.1 (CONNECT to any port).

`forward_proxy(directory)` runs one (optionally demanding Basic credentials) and stops it on
exit; `requests()` are the request lines it logged (`CONNECT 127.0.0.1:5000 HTTP/1.1`,
`POST http://127.0.0.1:5000/hook HTTP/1.1`), which is how a test knows a request went
through it. A test needing it without tinyproxy installed is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.brokers import BrokerServer, free_port, installed

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (.*)$", re.M)


class Tinyproxy(BrokerServer):
    """tinyproxy in the foreground; its log is the test's record of what it forwarded."""

    def __init__(self, directory: Path, credentials: tuple[str, str] | None = None) -> None:
        port = free_port()
        config = directory / "tinyproxy.conf"
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "LogLevel Connect",
            "MaxClients 20",
            "Allow 127.0.0.1",
        ]  # no ConnectPort line: CONNECT to any port
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        config.write_text("\n".join(lines) + "\n")
        argv = [installed("tinyproxy"), "-d", "-c", str(config)]
        super().__init__(argv, "http", port, directory / "tinyproxy.log")
        self.log_path = directory / "tinyproxy.log"

    def requests(self) -> list[str]:
        return _REQUEST.findall(self.log_path.read_text(errors="replace"))


@contextmanager
def forward_proxy(
    directory: Path, credentials: tuple[str, str] | None = None
) -> Iterator[Tinyproxy]:
    directory.mkdir(parents=True, exist_ok=True)
    proxy = Tinyproxy(directory, credentials)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
