"""Real message brokers for tests: `nats-server` (with JetStream) and `redis-server` on 127.0.0.1.

Each runs as a child process on a free port and is terminated and waited for afterwards.
`stop()` and `start()` restart a server on the same port (and, for NATS, the same JetStream
store, so streams survive), which is how a test simulates an outage. A test needing a broker
that is not installed is skipped with the command that installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType

from tests.pki import Pki

T = TypeVar("T")
START_SECONDS = 10.0


def wait_started(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    log_path: Path,
    name: str,
    stop: Callable[[], None],
    timeout: float = START_SECONDS,
    step: float = 0.02,
) -> None:
    """Return once `ready()`; if the process exits or `timeout` passes first, `stop()` it and
    fail with the tail of its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            stop()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{name} did not start:\n{tail}")
        time.sleep(step)


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick, released at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class BrokerServer:
    """One broker process; `url` stays valid across `stop()` and `start()`."""

    def __init__(self, argv: list[str], scheme: str, port: int, log_path: Path) -> None:
        self.argv = argv
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self._log_path = log_path
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and return once it accepts connections."""
        self._log = self._log_path.open("ab")
        self._process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        wait_started(self._process, self._accepts, self._log_path, self.argv[0], self.stop)

    def stop(self) -> None:
        """Terminate the process and wait for it; the port is free afterwards."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True


@contextmanager
def running(server: BrokerServer) -> Iterator[BrokerServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def installed(binary: str) -> str:
    """The path of `binary`, or skip the test naming the Debian package to install."""
    # Debian installs nats-server in /usr/sbin, which is not on every user's PATH
    path = shutil.which(binary, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin")))
    if path is None:
        pytest.skip(f"{binary} not installed (apt-get install {binary})")
    return path


def nats_broker(directory: Path, *extra: str) -> BrokerServer:
    """nats-server with JetStream, its store in `directory`/js."""
    port = free_port()
    argv = [installed("nats-server"), "-js", "-p", str(port), "-a", "127.0.0.1"]
    argv += ["-sd", str(directory / "js"), *extra]
    return BrokerServer(argv, "nats", port, directory / "nats-server.log")


def redis_broker(directory: Path, *extra: str) -> BrokerServer:
    """redis-server without persistence."""
    port = free_port()
    argv = [installed("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(directory), *extra]
    return BrokerServer(argv, "redis", port, directory / "redis-server.log")


def tls_redis_broker(directory: Path, pki: Pki) -> BrokerServer:
    """redis-server speaking only TLS (`rediss://`), requiring a client certificate `pki`
    signed (`--tls-auth-clients yes`)."""
    server, port = pki.server("redis"), free_port()
    argv = [installed("redis-server"), "--port", "0", "--tls-port", str(port)]
    argv += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    argv += ["--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key)]
    argv += ["--tls-ca-cert-file", str(pki.ca.cert), "--tls-auth-clients", "yes"]
    return BrokerServer(argv, "rediss", port, directory / "redis-server.log")


def tls_nats_broker(directory: Path, pki: Pki) -> BrokerServer:
    """nats-server with JetStream, TLS only (`tls://`), `verify: true` (client certificates
    `pki` signed required)."""
    server, port = pki.server("nats"), free_port()
    config = directory / "nats.conf"
    config.write_text(
        f'host: "127.0.0.1"\nport: {port}\njetstream {{ store_dir: "{directory / "js"}" }}\n'
        f'tls {{\n  cert_file: "{server.cert}"\n  key_file: "{server.key}"\n'
        f'  ca_file: "{pki.ca.cert}"\n  verify: true\n}}\n'
    )
    argv = [installed("nats-server"), "-c", str(config)]
    return BrokerServer(argv, "tls", port, directory / "nats-server.log")


# --- looking into JetStream from the test side -------------------------------------------------


def with_jetstream(url: str, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run `work` with a JetStream context on a connection of its own, then close it."""

    async def main() -> T:
        client = await nats.connect(url, allow_reconnect=False)
        try:
            return await work(client.jetstream())
        finally:
            await client.close()

    return asyncio.run(main())


def add_stream(url: str, name: str, subjects: list[str]) -> None:
    """Create a file-backed stream (2 minute duplicate window, the server default)."""

    async def add(js: JetStreamContext) -> None:
        await js.add_stream(name=name, subjects=subjects, storage=StorageType.FILE)

    with_jetstream(url, add)


def stream_messages(url: str, stream: str) -> int:
    async def count(js: JetStreamContext) -> int:
        return (await js.stream_info(stream)).state.messages

    return with_jetstream(url, count)


def read_stream(url: str, stream: str, subject: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message in `stream` on `subject`, as (headers, payload), via a pull consumer."""

    async def read(js: JetStreamContext) -> list[tuple[dict[str, str], bytes]]:
        total = (await js.stream_info(stream)).state.messages
        if total == 0:
            return []
        consumer = await js.pull_subscribe(subject, stream=stream)
        messages: list[Msg] = []
        try:
            while len(messages) < total:
                messages += await consumer.fetch(total - len(messages), timeout=5)
        finally:
            await consumer.unsubscribe()
        return [(dict(m.headers or {}), m.data) for m in messages]

    return with_jetstream(url, read)
