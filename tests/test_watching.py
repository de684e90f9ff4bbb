"""Watching that never misses: observer choice, fallbacks, overflow, roots that come and go."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelwatch import units
from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.mounts import choose_observer, filesystem_type, parse_mountinfo
from modelwatch.testing import MemorySink
from modelwatch.units import locate
from modelwatch.watch import make_observer
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, jsonl_records, wait_ready_line
from tests.writers import write_safetensors

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /storage rw,relatime shared:20 - nfs4 10.0.0.5:/export rw,vers=4.2
31 30 0:41 / /storage/local rw shared:21 - xfs /dev/sdb1 rw
32 22 0:42 / /mnt/s3 rw,nosuid shared:22 - fuse.s3fs s3fs rw
33 22 0:43 / /with\\040space rw shared:23 - 9p host0 rw
"""


def test_mountinfo_is_parsed_with_escapes() -> None:
    """Mount points with escaped spaces are read back correctly."""
    assert ("/with space", "9p") in parse_mountinfo(MOUNTINFO)


@pytest.mark.parametrize(
    ("path", "fstype", "observer"),
    [
        ("/artifacts", "ext4", "inotify"),
        ("/storage/models", "nfs4", "polling"),
        ("/storage/local/models", "xfs", "inotify"),
        ("/storage-other", "ext4", "inotify"),
        ("/mnt/s3/models", "fuse.s3fs", "polling"),
        ("/with space/m", "9p", "polling"),
    ],
)
def test_auto_polls_network_and_fuse_filesystems(path: str, fstype: str, observer: str) -> None:
    """observer = auto: the longest mount prefix decides; network and FUSE mean polling."""
    assert filesystem_type(path, MOUNTINFO) == fstype
    assert choose_observer("auto", fstype) == observer
    assert choose_observer("inotify", fstype) == "inotify"


class Running:
    def __init__(self, daemon: Daemon, sink: MemorySink, root: Path) -> None:
        self.daemon, self.sink, self.root = daemon, sink, root


@pytest.fixture
def start(
    tmp_path: Path, make_config: Callable[..., Config], run_daemon: Callable[..., Daemon]
) -> Callable[..., Running]:
    def run(
        depth: int = 1,
        extra: str = "",
        factory: Any = None,
        settle: float = 0.6,
        create_root: bool = True,
    ) -> Running:
        root = tmp_path / "root"
        if create_root:
            root.mkdir(exist_ok=True)
        config = make_config(
            f"[defaults]\nsettle_seconds = {settle}\n{extra}\n"
            f'[[roots]]\npath = "{root}"\nunit_depth = {depth}\n[[sinks]]\ntype = "memory"\n'
        )
        sink = MemorySink(config.sinks[0])
        if factory is None:
            return Running(run_daemon(config, [sink]), sink, root)
        daemon = run_daemon(config, [sink], observer_factory=factory)
        return Running(daemon, sink, root)

    return run


def model(unit: Path, size: int = 1000, **kw: Any) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size}, **kw)


def test_forced_polling_sees_a_slow_in_place_writer(start: Callable[..., Running]) -> None:
    """Polling root; pauses longer than the poll interval but shorter than settle -> one event,
    after the last write."""
    d = start(extra='observer = "polling"\npoll_interval_seconds = 0.2', settle=1.5)
    assert [w.kind for w in d.daemon.watchers] == ["polling"]
    model(d.root / "exp", size=40_000, chunk=8_000, pause=0.5)
    done = time.time()
    (event,) = d.sink.wait_for(1, timeout=15)
    assert event.data["total_bytes"] > 40_000
    assert event.data["settled_after_seconds"] >= 1.5
    assert d.sink.wait_for(2, timeout=2.0) == [event]
    assert time.time() >= done


def test_inotify_limit_falls_back_to_polling(start: Callable[..., Running]) -> None:
    """ENOSPC from inotify -> the root is polled, with a warning naming the sysctl."""

    def no_watches_left(kind: str, interval: float) -> Any:
        if kind == "inotify":
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return make_observer(kind, interval)

    with structlog.testing.capture_logs() as logs:
        d = start(factory=no_watches_left, extra="poll_interval_seconds = 0.2")
    assert [(w.kind, w.fell_back) for w in d.daemon.watchers] == [("polling", True)]
    warning = next(e for e in logs if e["event"] == "inotify_limit_reached")
    assert "fs.inotify.max_user_watches" in warning["hint"]
    model(d.root / "exp")
    assert len(d.sink.wait_for(1)) == 1


def test_root_deleted_and_recreated_is_followed(start: Callable[..., Running]) -> None:
    """A root removed is unavailable (its model is not removed while it is missing); created
    again (empty, on the same filesystem) it is watched again and its model is removed."""
    d = start()
    model(d.root / "a")
    d.sink.wait_for(1)
    shutil.rmtree(d.root)
    assert d.daemon.loop is not None
    wait_until(lambda: not d.daemon.loop.roots[str(d.root)].available, timeout=10)
    assert len(d.sink.events) == 1
    d.root.mkdir()
    wait_until(lambda: all(w.kind == "inotify" for w in d.daemon.watchers), timeout=5)
    removed = d.sink.wait_for(2)[1]
    assert (removed.short_type, removed.subject) == ("removed", "a")
    model(d.root / "b")
    assert d.sink.wait_for(3)[2].subject == "b"


def test_root_symlink_swapped_is_followed(start: Callable[..., Running], tmp_path: Path) -> None:
    """A root that is a symlink swapped to another directory is re-watched there."""
    first, second = tmp_path / "blue", tmp_path / "green"
    first.mkdir()
    second.mkdir()
    os.symlink(first, tmp_path / "root")
    d = start(create_root=False)
    model(first / "a")
    assert d.sink.wait_for(1)[0].subject == "a"
    os.symlink(second, tmp_path / "root.new")
    os.replace(tmp_path / "root.new", tmp_path / "root")
    removed = d.sink.wait_for(2)[1]
    assert (removed.short_type, removed.subject) == ("removed", "a")
    # the removal came from the rescan that followed re-watching the new target
    model(second / "b")
    assert d.sink.wait_for(3)[2].subject == "b"


def test_unit_renamed_within_the_root(start: Callable[..., Running]) -> None:
    """Renaming a unit directory: the old name is removed, the new one registered."""
    d = start()
    model(d.root / "old")
    d.sink.wait_for(1)
    (d.root / "old").rename(d.root / "new")
    got = d.sink.wait_for(3)
    assert sorted((e.short_type, e.subject) for e in got[1:]) == [
        ("registered", "new"),
        ("removed", "old"),
    ]


def test_unit_moved_in_with_a_thousand_files(start: Callable[..., Running], tmp_path: Path) -> None:
    """A directory created elsewhere with 1,000 files, moved in -> one event listing all."""
    d = start()
    staging = tmp_path / "staging" / "big"
    staging.mkdir(parents=True)
    for i in range(1000):
        (staging / f"part-{i:04d}.bin").write_bytes(b"x")
    staging.rename(d.root / "big")
    (event,) = d.sink.wait_for(1)
    assert event.data["file_count"] == 1000
    assert d.sink.wait_for(2, timeout=2.0) == [event]


def test_kernel_queue_overflow_misses_no_unit(tmp_path: Path) -> None:
    """SIGSTOP the daemon, create more files than the kernel queue holds, SIGCONT: every unit
    is registered exactly once."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    units, per_unit = 100, max(10, limit // 100 + 10)  # > limit files, and > limit events
    root, out = tmp_path / "root", tmp_path / "events.jsonl"
    root.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[defaults]\nsettle_seconds = 1.0\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{out}"\nfsync = false\n'
    )
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=env, stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []))
        reader.start()
        for u in range(units):  # empty units, watched before the burst
            (root / f"exp-{u:03d}").mkdir()
        time.sleep(1.0)  # the daemon adds a watch per new directory; nothing to wait on
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for u in range(units):
                unit = root / f"exp-{u:03d}"
                for i in range(per_unit):
                    (unit / f"shard-{i:04d}.bin").write_bytes(b"w")
        finally:
            os.kill(proc.pid, signal.SIGCONT)

        def delivered() -> Counter[str]:
            return Counter(e["subject"] for e in jsonl_records(out))

        try:
            wait_until(lambda: len(delivered()) == units, timeout=90)
            time.sleep(1.0)  # and nothing more arrives
            counts = delivered()
            assert set(counts.values()) == {1}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            reader.join()
    if int(version("watchdog").split(".")[0]) >= 7:
        # watchdog 6 (the last release for Python 3.10) drops the overflow silently; there the
        # periodic reconcile is the safety net.
        assert any("inotify_overflow" in line for line in lines), "the overflow was noticed"


def test_polling_never_follows_symlinks_out_of_a_unit(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    """A polled unit with a symlink loop and a link to /usr still registers, listing the links
    as links."""
    d = start(extra='observer = "polling"\npoll_interval_seconds = 0.2')
    unit = d.root / "exp"
    model(unit)
    os.symlink("..", unit / "loop")
    os.symlink("/usr", unit / "escape")
    (event,) = d.sink.wait_for(1)
    rows = {f["path"]: f for f in event.data["files"]}
    assert rows["escape"] == {"path": "escape", "size": 0, "symlink": "/usr"}
    assert rows["loop"]["symlink"] == ".."
    assert [w.kind for w in d.daemon.watchers] == ["polling"]


def test_poller_reports_creations_changes_and_deletions(tmp_path: Path) -> None:
    """One polling pass over a real tree: only what changed produces events; an unchanged tree
    produces none."""
    from modelwatch.poller import changes, take

    (tmp_path / "exp" / "sub").mkdir(parents=True)
    (tmp_path / "exp" / "keep.bin").write_bytes(b"k")
    (tmp_path / "exp" / "grow.bin").write_bytes(b"g")
    (tmp_path / "exp" / "gone.bin").write_bytes(b"x")
    os.symlink("/usr", tmp_path / "exp" / "escape")
    before = take(str(tmp_path))
    assert changes(before, take(str(tmp_path))) == []
    with (tmp_path / "exp" / "grow.bin").open("ab") as f:
        f.write(b"more")
    (tmp_path / "exp" / "gone.bin").unlink()
    (tmp_path / "exp" / "sub" / "new.bin").write_bytes(b"n")
    got = sorted(
        (type(e).__name__, os.path.relpath(e.src_path, tmp_path))
        for e in changes(before, take(str(tmp_path)))
    )
    assert got == [
        ("FileCreatedEvent", "exp/sub/new.bin"),
        ("FileDeletedEvent", "exp/gone.bin"),
        ("FileModifiedEvent", "exp/grow.bin"),
    ]
    assert not any("usr" in path for path in take(str(tmp_path)))  # links are not followed


@pytest.mark.parametrize(
    ("root", "path", "is_dir"),
    [
        ("/models", "/models/a/b/c.bin", False),
        ("/models", "/models/a", True),
        ("/models", "/models/a/b", True),
        ("/models", "/models", True),
        ("/models/", "/models/a/x", False),
        ("/models", "/models/./a/x", False),
        ("/models", "/models/a/../b/x", False),
        ("/models", "/models//a/x", False),
        ("/models", "/modelsX/a/x", False),
        ("/models", "/other/a/x", False),
        ("/", "/a/b/c", False),
    ],
)
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_locating_an_event_path_agrees_with_relpath(
    root: str, path: str, is_dir: bool, depth: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Event paths are mapped to units by slicing when they are plainly below the root; any
    other spelling takes `os.path.relpath`: both give the same answer for every path."""
    fast = locate(root, depth, path, is_dir)
    monkeypatch.setattr(units, "_relative", lambda root, path: os.path.relpath(path, root))
    assert fast == locate(root, depth, path, is_dir)
