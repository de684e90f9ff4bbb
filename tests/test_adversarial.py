"""Hostile model directories: the daemon stays up, rejects precisely, never reads outside a
unit, and registers the next good model normally."""

from __future__ import annotations

import errno
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.events import Event
from modelwatch.testing import MemorySink
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, jsonl_records
from tests.writers import write_safetensors

OUTSIDE_MARKER = "TOP-OUTSIDE_MARKER-OUTSIDE-THE-UNIT"


class Running:
    def __init__(self, daemon: Daemon, sink: MemorySink, root: Path) -> None:
        self.daemon, self.sink, self.root = daemon, sink, root

    def event_for(self, subject: str, timeout: float = 20.0) -> Event:
        wait_until(lambda: any(e.subject == subject for e in self.sink.events), timeout)
        return next(e for e in self.sink.events if e.subject == subject)

    def alive(self) -> bool:
        return self.daemon.stale_parts() == []


@pytest.fixture
def running(
    tmp_path: Path, make_config: Callable[..., Config], run_daemon: Callable[..., Daemon]
) -> Running:
    root = tmp_path / "root"
    root.mkdir()
    config = make_config(
        "[defaults]\nsettle_seconds = 0.5\nmax_wait_seconds = 4\nmax_files_per_unit = 20000\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n[[sinks]]\ntype = "memory"\n'
    )
    sink = MemorySink(config.sinks[0])
    return Running(run_daemon(config, [sink]), sink, root)


def good_model(unit: Path) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": 256})


def reader_present(fifo: Path) -> bool:
    """True when some process has `fifo` open for reading (a write-open then succeeds)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return False
    os.close(fd)
    return True


def test_hostile_tree_is_registered_without_reading_outside(
    running: Running, tmp_path: Path
) -> None:
    """Symlink loops, links to /etc/passwd and to a FIFO outside, FIFOs, sockets, non-UTF-8 and
    newline names, 10,000 empty files: one registered event, links recorded as links, nothing
    outside the unit opened."""
    outside = tmp_path / "outside"
    outside.mkdir()
    trap = outside / "trap.fifo"
    os.mkfifo(trap)
    (outside / "secret.json").write_text(json.dumps({"metrics": [], "note": OUTSIDE_MARKER}))
    staging = tmp_path / "staging" / "hostile"
    staging.mkdir(parents=True)
    good_model(staging)
    os.symlink("..", staging / "loop")
    os.symlink(staging / "loop2", staging / "loop2")
    os.symlink("/etc/passwd", staging / "passwd")
    os.symlink(trap, staging / "trap.safetensors")
    os.symlink(outside / "secret.json", staging / "gradient-model-metadata.json")
    os.mkfifo(staging / "pipe.safetensors")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(staging / "sock"))
    with open(os.fsencode(staging) + b"/bytes-\xff\xfe.bin", "wb") as f:
        f.write(b"x")
    (staging / "new\nline.bin").write_bytes(b"y")
    many = staging / "many"
    many.mkdir()
    for i in range(10_000):
        (many / f"{i:05d}").touch()
    try:
        staging.rename(running.root / "hostile")
        event = running.event_for("hostile")
        assert not reader_present(trap)
    finally:
        sock.close()
    assert event.short_type == "rejected"  # the metadata file is a symlink
    assert [e["code"] for e in event.data["errors"]] == ["metadata_not_regular_file"]
    assert OUTSIDE_MARKER not in event.to_json()
    rows = {f["path"]: f for f in event.data["files"]}
    assert rows["passwd"] == {"path": "passwd", "size": 0, "symlink": "/etc/passwd"}
    assert "pipe.safetensors" not in rows and "sock" not in rows
    assert "bytes-\\xff\\xfe.bin" in rows and "new\nline.bin" in rows
    assert event.data["file_count"] == 10_000 + 8  # model, 5 symlinks, 2 odd names
    assert "\n" not in event.to_json()
    good_model(running.root / "next")
    assert running.event_for("next").short_type == "registered"
    assert running.alive()


@pytest.mark.parametrize(
    ("name", "content", "code"),
    [
        ("huge", None, "metadata_too_large"),
        ("deep", "[" * 100_000 + "]" * 100_000, "metadata_too_deep"),
        ("nan", '{"metrics": [{"name": "loss", "numberValue": NaN}]}', "metadata_syntax"),
        ("dup", '{"a": 1, "a": 2}', "metadata_duplicate_key"),
        ("latin1", b'{"name": "caf\xe9"}', "metadata_encoding"),
        ("bool-metric", '{"metrics": [{"name": "acc", "numberValue": true}]}', "metadata_metrics"),
    ],
)
def test_bad_metadata_gets_its_code_and_the_next_model_registers(
    running: Running, name: str, content: str | bytes | None, code: str
) -> None:
    """Each kind of bad metadata is rejected with its code; the daemon carries on."""
    unit = running.root / name
    good_model(unit)
    meta = unit / "gradient-model-metadata.json"
    if content is None:  # 100 MB, sparse: reading it whole would be the bug
        with meta.open("wb") as f:
            f.truncate(100 * 1024 * 1024)
    else:
        meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    event = running.event_for(name)
    assert event.short_type == "rejected"
    assert [e["code"] for e in event.data["errors"]] == [code]
    good_model(running.root / f"{name}-next")
    assert running.event_for(f"{name}-next").short_type == "registered"


def test_files_churning_during_scans_never_crash(running: Running) -> None:
    """Files created, truncated and deleted while scans run: no crash; once quiet, the unit
    registers with what is there."""
    unit = running.root / "churn"
    good_model(unit)
    stop = threading.Event()
    rng = random.Random(7)

    def churn() -> None:
        while not stop.is_set():
            path = unit / f"tmp-{rng.randrange(50)}.bin"
            action = rng.random()
            try:
                if action < 0.4:
                    path.write_bytes(os.urandom(rng.randrange(1, 4096)))
                elif action < 0.7:
                    with path.open("r+b") as f:
                        f.truncate(rng.randrange(0, 10))
                else:
                    path.unlink()
            except FileNotFoundError:
                pass

    worker = threading.Thread(target=churn, name="churn")
    worker.start()
    try:
        stop.wait(3.0)  # churn for a while: scans race with creations, truncations, deletions
    finally:
        stop.set()
        worker.join()
    assert running.alive()
    wait_until(
        lambda: any(
            e.subject == "churn" and e.short_type == "registered" for e in running.sink.events
        ),
        timeout=10,
    )


def nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    return entry.pw_uid, entry.pw_gid


def test_unreadable_files_as_an_unprivileged_user(tmp_path: Path) -> None:
    """Run as `nobody`: an unreadable metadata file is rejected with metadata_unreadable, an
    unreadable directory is reported not_settled, and the next good model registers."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to drop to an unprivileged user")
    uid, gid = nobody()
    as_nobody = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    probe = subprocess.run(
        [*as_nobody, sys.executable, "-c", "import modelwatch"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(
            f"this Python cannot run as nobody here (lives under a private home?): "
            f"{probe.stderr.decode(errors='replace').strip()[:200]}"
        )
    base = Path(
        f"/tmp/modelwatch-unpriv-{os.getpid()}"
    )  # tmp_path is 0700 root: unusable by nobody
    shutil.rmtree(base, ignore_errors=True)
    root, state, out = base / "root", base / "state", base / "events.jsonl"
    for d in (base, root, state):
        d.mkdir(parents=True)
        os.chown(d, uid, gid)
    base.chmod(0o755)
    config = base / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{state}"\n'
        "[defaults]\nsettle_seconds = 0.3\nmax_wait_seconds = 3\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{out}"\nfsync = false\n'
    )
    config.chmod(0o644)
    try:
        with daemon_process(config, env=daemon_env(HOME=str(base)), prefix=as_nobody) as proc:
            try:
                secret = root / "secret-meta"
                good_model(secret)
                (secret / "gradient-model-metadata.json").write_text("{}")
                (secret / "gradient-model-metadata.json").chmod(0o000)
                locked = root / "locked-dir"
                good_model(locked)
                (locked / "private").mkdir()
                (locked / "private").chmod(0o000)

                def events() -> dict[str, dict[str, object]]:
                    return {e["subject"]: e for e in jsonl_records(out)}

                wait_until(lambda: {"secret-meta", "locked-dir"} <= set(events()), timeout=30)
                got = events()
                codes = {
                    s: [e["code"] for e in got[s]["data"]["errors"]]  # type: ignore[index]
                    for s in ("secret-meta", "locked-dir")
                }
                assert codes == {
                    "secret-meta": ["metadata_unreadable"],
                    "locked-dir": ["not_settled"],
                }
                good_model(root / "fine")
                wait_until(lambda: "fine" in events(), timeout=20)
                assert proc.poll() is None
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=20) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
