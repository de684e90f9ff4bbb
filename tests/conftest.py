"""Shared fixtures: config files on disk, waiting with deadlines, and a leaked-thread guard."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.config import Config, load_config
from modelwatch.daemon import Daemon
from tests.receiver import Receiver, running_receiver

# Fuzz depth: the suite's default keeps CI fast; MODELWATCH_FUZZ_EXAMPLES=20000 digs deeper.
FUZZ_SCALE = max(1, int(os.environ.get("MODELWATCH_FUZZ_EXAMPLES", "300"))) / 300


def examples(n: int) -> int:
    """`n` hypothesis examples at the default depth, scaled by MODELWATCH_FUZZ_EXAMPLES."""
    return max(1, int(n * FUZZ_SCALE))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail any test that leaves a thread running (every thread must be stopped and joined)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll `predicate` until it is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """Build a Config through the real loader from TOML text (state_dir in tmp_path)."""
    counter = iter(range(1000))

    def build(text: str = "", **env: str) -> Config:
        path = tmp_path / f"config-{next(counter)}.toml"
        path.write_text(text)
        environ = {"MODELWATCH_STATE_DIR": str(tmp_path / "state"), **env}
        return load_config(str(path), environ)

    return build


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording HTTP server on 127.0.0.1 (see tests/receiver.py)."""
    with running_receiver() as server:
        yield server


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., Daemon]]:
    """Start Daemons (given sink objects) with their lifecycle loop on a thread, as `run`
    does; every one is stopped and joined at teardown."""
    running: list[tuple[Daemon, threading.Event, threading.Thread]] = []

    def start(config: Config, sinks: list[Any], **kwargs: Any) -> Daemon:
        daemon = Daemon(config, sinks=sinks, host="testhost", **kwargs)
        daemon.start()
        stop = threading.Event()
        thread = threading.Thread(target=daemon.serve, args=(stop,), name="lifecycle")
        thread.start()
        running.append((daemon, stop, thread))
        return daemon

    yield start
    for daemon, stop, thread in running:
        stop.set()
        thread.join()
        daemon.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the state dir, so the disk can really fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path) -> Path:
    """Fill the filesystem holding `directory` completely; returns the filler file."""
    filler = directory / f"filler-{uuid.uuid4().hex}"
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    return filler
