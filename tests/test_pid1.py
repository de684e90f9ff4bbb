"""Running as PID 1 in a container: signals handled, orphaned children reaped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.daemons import daemon_process, jsonl_records
from tests.writers import write_safetensors


def orphans_of(pid: int) -> list[int]:
    """Host pids of `sleep` processes (alive or zombie) whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(pid) and fields.get("Name") == "sleep":
            found.append(int(entry))
    return found


def daemon_pid(unshare_pid: int) -> int:
    """The daemon is the only child of the `unshare --fork` process."""
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    return int(children[0])


def test_pid1_reaps_orphans_and_stops_on_sigterm(tmp_path: Path) -> None:
    """As PID 1 of a PID namespace: a command that leaves a background child leaves no zombie,
    and SIGTERM stops the daemon with exit 0."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    models = tmp_path / "models"
    models.mkdir()
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n(sleep 0.2 &)\ncat > /dev/null\nexit 0\n")
    hook.chmod(0o755)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[defaults]\nsettle_seconds = 0.3\n'
        f'[[roots]]\npath = "{models}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "command"\nargv = ["{hook}"]\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{tmp_path / "out.jsonl"}"\n'
    )
    # --kill-child: the daemon dies with unshare, even when the test fails
    unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    with daemon_process(config, prefix=unshare) as proc:
        wait_until(lambda: Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text())
        pid1 = daemon_pid(proc.pid)
        for i in range(3):
            (models / f"exp-{i}").mkdir()
            write_safetensors(models / f"exp-{i}" / "model.safetensors", {"w": 10})
        out = tmp_path / "out.jsonl"
        wait_until(lambda: len(jsonl_records(out)) == 3, timeout=20)
        # the orphans exit after 0.2 s; reaped, they vanish (unreaped, they stay zombies)
        wait_until(lambda: orphans_of(pid1) == [], timeout=5)
        os.kill(pid1, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
