"""Running `python -m modelwatch` as a real subprocess: a clean environment, a process that is
always killed and reaped, and waiting for the daemon's "ready" log line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

CLI = [sys.executable, "-m", "modelwatch"]


def daemon_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MODELWATCH_ or PS_ variable (the daemon reads
    both: PS_MODEL_PATH adds a root), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELWATCH_", "PS_"))}
    env.update(extra)
    return env


@contextmanager
def daemon_process(
    target: Path | Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: int = subprocess.DEVNULL,
    stderr: int = subprocess.DEVNULL,
    prefix: Sequence[str] = (),
) -> Iterator[subprocess.Popen[str]]:
    """Start `modelwatch run --config TARGET` (a Path) or `modelwatch *TARGET` (the words after
    `python -m modelwatch`), behind a wrapper command `prefix` if given (`unshare ...`,
    `setpriv ...`), in text mode, with `env` (default `daemon_env()`).

    On exit the process is killed if it is still running and always waited for, so none is
    left behind even when the test fails; pipes are closed."""
    args = ["run", "--config", str(target)] if isinstance(target, Path) else list(target)
    with subprocess.Popen(
        [*prefix, *CLI, *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=daemon_env() if env is None else env,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def wait_ready_line(stream: IO[str] | None) -> None:
    """Read the daemon's JSON log (stderr=PIPE, MODELWATCH_LOG_FORMAT=json) until it reports
    ready (it reconciled every root); fail if it exits first."""
    assert stream is not None, "start the daemon with stderr=subprocess.PIPE"
    for line in stream:
        if '"ready"' in line:
            return
    raise AssertionError("the daemon exited before it was ready")


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    """The events a `jsonl` sink has written to `path` so far, complete lines only: a line the
    daemon is still writing (a large event spans pages) is read on the next call."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]
