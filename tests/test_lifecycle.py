"""The edges of a model's and a node's life, against a real daemon process (SPEC §11, §2).

The last model before a stop, storage that goes away and comes back, a root marker that
disappears, a unit removed and restored: each as a user would see it on the jsonl sink.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, jsonl_records
from tests.writers import write_safetensors

pytestmark = pytest.mark.slow

REGISTERED = "io.modelwatch.model.registered"
REJECTED = "io.modelwatch.model.rejected"
REMOVED = "io.modelwatch.model.removed"


def spec_id(
    event_type: str, path: str, fingerprint: str, removals: int = 0, codes: str = ""
) -> str:
    """The event id as SPEC §2 writes it, computed here independently of the code."""
    text = f"{event_type}\n{path}\n{fingerprint}"
    if removals:
        text += f"\n{removals}"
    if event_type == REJECTED:
        text += f"\n{codes}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Running:
    """A daemon process writing events to `events` and JSON logs to `log`."""

    proc: subprocess.Popen[str]
    events_path: Path
    log_path: Path

    def events(self) -> list[dict[str, Any]]:
        return jsonl_records(self.events_path)

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def logged(self, event: str, **fields: Any) -> bool:
        return any(
            r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
            for r in self.logs()
        )

    def wait_events(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.events()) >= count, timeout)
        return self.events()

    def wait_log(self, event: str, timeout: float = 20.0, **fields: Any) -> None:
        wait_until(lambda: self.logged(event, **fields), timeout)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start `modelwatch run` with a config of the given roots (TOML) and a jsonl sink."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(100))

        def start(roots: str, extra: str = "") -> Running:
            n = next(counter)
            config = tmp_path / f"config-{n}.toml"
            events = tmp_path / "events.jsonl"
            config.write_text(
                f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n{extra}\n{roots}\n'
                f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
            )
            log = tmp_path / f"daemon-{n}.log"
            log_file = stack.enter_context(log.open("w"))
            env = daemon_env(MODELWATCH_LOG_FORMAT="json")
            proc = stack.enter_context(daemon_process(config, env=env, stderr=log_file.fileno()))
            running = Running(proc, events, log)
            running.wait_log("ready")
            return running

        yield start


def model(unit: Path, size: int = 1000) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})


def root_table(path: Path, depth: int = 1, settle: float = 0.5, extra: str = "") -> str:
    return (
        f'[[roots]]\npath = "{path}"\nunit_depth = {depth}\nsettle_seconds = {settle}\n'
        f"max_wait_seconds = 600\n{extra}\n"
    )


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"].rsplit(".", 1)[1], e["subject"]) for e in events]


# -- stop --------------------------------------------------------------------------------------


def test_a_model_written_just_before_sigterm_is_registered_before_exit(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """settle_seconds = 30, SIGTERM 0.5 s after the last byte: the model gets its last chance
    and is registered (and delivered) before the daemon exits 0."""
    root = tmp_path / "models"
    root.mkdir()
    d = daemon(root_table(root, settle=30))
    model(root / "final")
    threading.Event().wait(0.5)  # the scenario: the training container exits, then we stop
    assert d.terminate() == 0
    assert kinds(d.events()) == [("registered", "final")]
    assert d.logged("last_chance")


def test_a_model_on_a_polling_root_written_since_its_last_pass_is_registered_at_stop(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """Polling every 10 s, a model written 1 s before SIGTERM has not been seen by any pass:
    the stop's last pass finds it, and it gets its last chance like any pending unit (it was
    silently left for the next start)."""
    root = tmp_path / "models"
    root.mkdir()
    extra = 'observer = "polling"\npoll_interval_seconds = 10'
    d = daemon(root_table(root, settle=30, extra=extra))
    threading.Event().wait(1.0)  # the start's pass is over
    model(root / "final")
    threading.Event().wait(1.0)
    assert d.terminate() == 0
    assert kinds(d.events()) == [("registered", "final")]


def test_a_unit_still_written_at_sigterm_waits_for_the_next_start(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """A file still growing at SIGTERM: not registered at stop (logged with its reason), and
    registered by the next start once complete."""
    root = tmp_path / "models"
    unit = root / "growing"
    unit.mkdir(parents=True)
    done = threading.Event()

    def append() -> None:
        with (unit / "model.onnx").open("ab") as f:
            while not done.wait(0.05):
                f.write(b"x" * 1000)
                f.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        wait_until(lambda: (unit / "model.onnx").exists())
        d = daemon(root_table(root, settle=30))  # its startup reconcile finds the unit
        assert d.terminate() == 0
    finally:
        done.set()
        writer.join()
    assert d.events() == []
    pending = [r for r in d.logs() if r.get("event") == "unit_pending_at_stop"]
    assert [r["unit"] for r in pending] == [str(unit)]
    assert "changed" in pending[0]["reason"]
    again = daemon(root_table(root, settle=0.5))
    (event,) = again.wait_events(1)
    assert (event["subject"], event["data"]["version"]) == ("growing", 1)
    assert event["data"]["total_bytes"] == (unit / "model.onnx").stat().st_size


# -- storage that goes away ----------------------------------------------------------------------


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (needs root): {result.stderr.strip()}")


def test_an_unmounted_root_removes_nothing_and_its_return_emits_nothing(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """The root is a mount (a tmpfs): unmounted, an empty mount point remains: nothing is
    removed; mounted again with the same files: no new event either."""
    storage, root = tmp_path / "storage", tmp_path / "models"
    storage.mkdir()
    root.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(storage))
    try:
        model(storage / "exp-1")
        model(storage / "exp-2")
        _mount("--bind", str(storage), str(root))
        d = daemon(root_table(root))
        d.wait_events(2)
        subprocess.run(["umount", str(root)], check=True)
        d.wait_log("root_unavailable", root=str(root))
        _mount("--bind", str(storage), str(root))
        d.wait_log("root_available", root=str(root))
        model(root / "exp-3")  # a canary: once it is registered, anything else would be too
        events = kinds(d.wait_events(3))
        assert sorted(events[:2]) == [("registered", "exp-1"), ("registered", "exp-2")]
        assert events[2:] == [("registered", "exp-3")]
        assert d.terminate() == 0
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(storage)], check=False, capture_output=True)


def test_a_root_renamed_away_and_back_removes_nothing(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """The root directory renamed away (a transient unmount, a careless mv) and back: no
    `removed`, no new event; `status` showed it unavailable meanwhile."""
    root = tmp_path / "models"
    model(root / "exp-1")
    d = daemon(root_table(root))
    d.wait_events(1)
    root.rename(tmp_path / "away")
    d.wait_log("root_unavailable", root=str(root))
    status = subprocess.run(
        [*CLI, "status", "--config", str(tmp_path / "config-0.toml"), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=daemon_env(),
    )
    (reported,) = json.loads(status.stdout)["roots"]
    assert (reported["state"], reported["reason"]) == ("unavailable", "missing")
    (tmp_path / "away").rename(root)
    d.wait_log("root_available", root=str(root))
    model(root / "canary")
    events = d.wait_events(2)
    assert kinds(events) == [("registered", "exp-1"), ("registered", "canary")]


def test_a_missing_root_marker_holds_removals_until_it_is_back(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """root_marker deleted and a unit deleted with it (a sync wiping the folder): no
    `removed` while the marker is missing; the marker back, the deletion is real: one
    `removed`."""
    root = tmp_path / "models"
    model(root / "exp-1")
    model(root / "exp-2")
    (root / ".stfolder").mkdir()
    d = daemon(root_table(root, extra='root_marker = ".stfolder"'))
    d.wait_events(2)
    (root / ".stfolder").rmdir()
    shutil.rmtree(root / "exp-1")
    d.wait_log("unit_not_ready", unit=str(root / "exp-1"))
    assert d.logged("root_unavailable", root=str(root))
    assert sorted(kinds(d.events())) == [("registered", "exp-1"), ("registered", "exp-2")]
    (root / ".stfolder").mkdir()
    events = d.wait_events(3)
    assert kinds(events)[2] == ("removed", "exp-1")
    model(root / "canary")
    assert kinds(d.wait_events(4))[3] == ("registered", "canary")


# -- restore and ids ------------------------------------------------------------------------------


def test_a_restored_unit_is_registered_again_with_new_ids(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """registered v1, removed, restored with the same files -> registered v1 with
    `restored: true` and a new id; removed again -> a second `removed` with a new id. Every id
    is the SPEC §2 formula."""
    root = tmp_path / "models"
    unit = root / "exp"
    model(unit)
    d = daemon(root_table(root))
    (first,) = d.wait_events(1)
    unit.rename(tmp_path / "aside")
    d.wait_events(2)
    (tmp_path / "aside").rename(unit)
    d.wait_events(3)
    shutil.rmtree(unit)
    registered, removed, restored, removed_again = d.wait_events(4)
    fp, path = first["data"]["fingerprint"], str(unit)
    assert registered["id"] == spec_id(REGISTERED, path, fp)
    assert removed["id"] == spec_id(REMOVED, path, fp)
    assert restored["type"] == REGISTERED and restored["data"]["restored"] is True
    assert (restored["data"]["version"], restored["data"]["fingerprint"]) == (1, fp)
    assert restored["id"] == spec_id(REGISTERED, path, fp, removals=1)
    assert removed_again["id"] == spec_id(REMOVED, path, fp, removals=1)
    assert "restored" not in registered["data"]
    assert len({e["id"] for e in d.events()}) == 4


def test_rejected_and_not_settled_ids_follow_the_spec(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """A rejected unit's id ends with its error codes; a `not_settled` event's fingerprint is
    that of its files (the in-progress file is named in the error, not fingerprinted), and
    both carry the parseable metadata document that was rejected."""
    root = tmp_path / "models"
    bad = root / "bad"
    model(bad)
    document = {"metrics": [{"name": "acc", "numberValue": "high"}]}
    (bad / "gradient-model-metadata.json").write_text(json.dumps(document))
    stuck = root / "stuck"
    model(stuck)
    (stuck / "model.safetensors.part").write_bytes(b"partial")
    d = daemon(
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\nsettle_seconds = 0.5\nmax_wait_seconds = 2\n'
    )
    events = {e["subject"]: e for e in d.wait_events(2)}
    rejected, overdue = events["bad"], events["stuck"]
    assert [e["code"] for e in rejected["data"]["errors"]] == ["metadata_metrics"]
    assert rejected["data"]["metadata"] == document
    assert rejected["id"] == spec_id(
        REJECTED, str(bad), rejected["data"]["fingerprint"], codes="metadata_metrics"
    )
    assert [e["code"] for e in overdue["data"]["errors"]] == ["not_settled"]
    assert "model.safetensors.part" in overdue["data"]["errors"][0]["message"]
    files = [f["path"] for f in overdue["data"]["files"]]
    assert files == ["model.safetensors"]
    assert overdue["id"] == spec_id(
        REJECTED, str(stuck), overdue["data"]["fingerprint"], codes="not_settled"
    )
    (stuck / "model.safetensors.part").unlink()
    (settled,) = d.wait_events(3)[2:]
    assert (settled["type"], settled["subject"]) == (REGISTERED, "stuck")
    # the same files: not_settled then registered share a fingerprint, not an id
    assert settled["data"]["fingerprint"] == overdue["data"]["fingerprint"]
    assert settled["id"] == spec_id(REGISTERED, str(stuck), overdue["data"]["fingerprint"])


def test_a_depth_zero_root_names_its_model_after_the_directory(
    daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """/artifacts-style roots: `name` is the root's base name (or its configured `name`),
    `subject` stays "." (SPEC §2, §5)."""
    artifacts, other = tmp_path / "artifacts", tmp_path / "run-7"
    model(artifacts)
    model(other)
    d = daemon(
        root_table(artifacts, depth=0) + root_table(other, depth=0, extra='name = "resnet-50"')
    )
    events = {e["data"]["root"]: e for e in d.wait_events(2)}
    assert (events[str(artifacts)]["data"]["name"], events[str(artifacts)]["subject"]) == (
        "artifacts",
        ".",
    )
    assert events[str(other)]["data"]["name"] == "resnet-50"
    assert events[str(other)]["data"]["experiment_id"] is None


SLOW_RECONCILE = """\
import sys, time
import modelwatch.checks as checks
from modelwatch.progress import progress
original = checks.reconcile

def slow(*args, **kwargs):  # a root of a million files on NFS: minutes, reporting progress
    print("reconciling", file=sys.stderr, flush=True)
    until = time.monotonic() + 60
    while time.monotonic() < until:
        progress()
        time.sleep(0.01)
    return original(*args, **kwargs)

checks.reconcile = slow
from modelwatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_initial_reconcile_stops_within_the_shutdown_timeout(
    tmp_path: Path,
) -> None:
    """A stop asked for while the first reconcile of a huge root is still running is carried
    out within shutdown_timeout_seconds (it waited for the reconcile, minutes, until systemd
    or the kubelet killed the daemon)."""
    (tmp_path / "models").mkdir()
    config = tmp_path / "modelwatch.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout_seconds = 2\n'
        f'[[roots]]\npath = "{tmp_path / "models"}"\n'
    )
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RECONCILE)
    with subprocess.Popen(
        [sys.executable, str(script), "run", "--config", str(config)],
        env=daemon_env(PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as daemon:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            if "reconciling" in line:
                break
        sent = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=30)
        took = time.monotonic() - sent
    assert rc == 0
    assert took < 2 + 2.0  # shutdown_timeout_seconds, and the interpreter's exit
