"""The whole daemon on real directories: watchdog, settle loop, state store, delivery.

Models are written the way frameworks write them (chunks, temp names renamed into place,
index files last) while the daemon runs; time is real, settle periods short.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.events import Event
from modelwatch.testing import MemorySink
from tests.conftest import wait_until
from tests.writers import write_hf_sharded, write_safetensors, write_saved_model

SETTLE = 1.0


class Running:
    def __init__(self, daemon: Daemon, sink: MemorySink, root: Path) -> None:
        self.daemon = daemon
        self.sink = sink
        self.root = root

    def events(self, count: int, timeout: float = 15.0) -> list[Event]:
        """Wait until `count` events were delivered; return all delivered so far."""
        got = self.sink.wait_for(count, timeout)
        assert len(got) >= count, f"expected {count} events, got {[e.type for e in got]}"
        return got

    def quiet(self, expected: int, seconds: float = 3 * SETTLE) -> list[Event]:
        """Nothing beyond `expected` events is delivered within `seconds`."""
        got = self.sink.wait_for(expected + 1, seconds)
        assert len(got) == expected, [(e.short_type, e.data.get("version")) for e in got]
        return got


@pytest.fixture
def start(
    tmp_path: Path, make_config: Callable[..., Config], run_daemon: Callable[..., Daemon]
) -> Callable[..., Running]:
    def run(depth: int = 1, extra: str = "", create_root: bool = True) -> Running:
        root = tmp_path / "root"
        if create_root:
            root.mkdir()
        config = make_config(
            f"[defaults]\nsettle_seconds = {SETTLE}\n{extra}\n"
            f'[[roots]]\npath = "{root}"\nunit_depth = {depth}\n'
            '[[sinks]]\ntype = "memory"\n'
        )
        sink = MemorySink(config.sinks[0])
        return Running(run_daemon(config, [sink]), sink, root)

    return run


def test_saved_model_written_in_chunks_registers_once_after_the_last_write(
    start: Callable[..., Running],
) -> None:
    """Shards written over seconds, pauses shorter than settle -> one event, after the end."""
    d = start()
    write_saved_model(
        d.root / "exp-1", shards=3, shard_bytes=96 * 1024, chunk=32 * 1024, pause=0.25
    )
    finished = time.time()
    (event,) = d.events(1)
    assert event.short_type == "registered"
    assert event.data["format"] == "saved_model"
    assert event.data["model_type"] == "Tensorflow"
    assert event.data["experiment_id"] == "exp-1"
    assert (
        time.mktime(time.strptime(event.time[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        >= int(finished) - 1
    )
    paths = [f["path"] for f in event.data["files"]]
    assert "saved_model.pb" in paths
    assert not [p for p in paths if "tempstate" in p or ".tmp" in p]
    d.quiet(1)


def test_sharded_model_with_a_missing_shard_waits_for_it(start: Callable[..., Running]) -> None:
    """An HF index naming a shard that is not there yet -> no event until it arrives."""
    d = start()
    unit = d.root / "llm"
    write_hf_sharded(unit, shards=3, skip_shard=2)
    d.quiet(0, seconds=3 * SETTLE)
    write_safetensors(
        unit / "model-00002-of-00003.safetensors",
        {"layers.2.weight": 4096},
        metadata={"format": "pt"},
    )
    (event,) = d.events(1)
    assert event.data["format"] == "huggingface"
    assert event.data["file_count"] == 5
    d.quiet(1)


def test_truncated_safetensors_waits_until_complete(start: Callable[..., Running]) -> None:
    """A safetensors file whose size disagrees with its header -> no event until it is whole."""
    d = start()
    full = d.root / "scratch.safetensors"
    write_safetensors(full, {"w": 50_000})
    data = full.read_bytes()
    full.unlink()
    unit = d.root / "st"
    unit.mkdir()
    (unit / "model.safetensors").write_bytes(data[: len(data) // 2])
    d.quiet(0, seconds=3 * SETTLE)
    with (unit / "model.safetensors").open("ab") as f:
        f.write(data[len(data) // 2 :])
    (event,) = d.events(1)
    assert event.data["format"] == "safetensors"
    assert event.data["total_bytes"] == len(data)


def test_tempstate_file_blocks_until_removed(start: Callable[..., Running]) -> None:
    """A TF *.tempstate* file in the unit -> no event; once it is gone -> one event."""
    d = start()
    unit = d.root / "tf"
    write_saved_model(unit, shards=1)
    stray = unit / "variables" / "variables.data-00000-of-00001.tempstate9876"
    # The unit appeared with a leftover temp file: nothing may be registered.
    (d.root / "staging").mkdir(exist_ok=True)
    stray.write_bytes(b"partial")
    d.quiet(0, seconds=3 * SETTLE)
    stray.unlink()
    (event,) = d.events(1)
    assert event.short_type == "registered"


def test_directory_renamed_into_the_root_registers_once(
    start: Callable[..., Running],
    tmp_path: Path,
) -> None:
    """A finished model moved into the root with rename(2) -> exactly one event."""
    d = start()
    staging = tmp_path / "staging" / "exp-9"
    write_hf_sharded(staging, shards=2)
    staging.rename(d.root / "exp-9")
    (event,) = d.events(1)
    assert event.subject == "exp-9"
    assert event.data["format"] == "huggingface"
    d.quiet(1)


def test_model_beside_a_growing_tensorboard_log_registers(
    start: Callable[..., Running],
) -> None:
    """A continuously appended events.out.tfevents.* file never delays settling."""
    d = start()
    unit = d.root / "exp-2"
    unit.mkdir()
    stop = threading.Event()

    def tensorboard() -> None:
        with (unit / "events.out.tfevents.1700000000.worker").open("ab") as f:
            while not stop.wait(0.1):
                f.write(b"summary")
                f.flush()

    writer = threading.Thread(target=tensorboard)
    writer.start()
    try:
        write_safetensors(unit / "model.safetensors", {"w": 1000})
        (event,) = d.events(1)
        assert [f["path"] for f in event.data["files"]] == ["model.safetensors"]
    finally:
        stop.set()
        writer.join()


def test_rewrite_and_delete(start: Callable[..., Running]) -> None:
    """Rewriting a registered model -> version 2; deleting the unit -> removed."""
    d = start()
    unit = d.root / "exp-3"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 1000})
    first = d.events(1)[0]
    write_safetensors(unit / "model.safetensors", {"w": 2000})
    second = d.events(2)[1]
    assert (second.short_type, second.data["version"]) == ("registered", 2)
    assert second.data["fingerprint"] != first.data["fingerprint"]
    shutil.rmtree(unit)
    removed = d.events(3)[2]
    assert (removed.short_type, removed.data["version"]) == ("removed", 2)


def test_root_created_after_start_is_picked_up(start: Callable[..., Running]) -> None:
    """A root that does not exist at start is watched once it appears."""
    d = start(depth=0, create_root=False)
    assert d.daemon.ready.is_set()
    d.root.mkdir()
    wait_until(lambda: all(w.watching for w in d.daemon.watchers), timeout=5)
    write_safetensors(d.root / "model.safetensors", {"w": 10})
    (event,) = d.events(1)
    assert event.subject == "."


def test_the_periodic_reconcile_runs_on_the_injected_clock(
    tmp_path: Path, make_config: Callable[..., Config], run_daemon: Callable[..., Daemon]
) -> None:
    """The daemon's own schedule reads its clock: with a fake clock, the hourly reconcile
    runs when the test moves time past it, not before, and no test sleeps an hour."""
    from modelwatch.testing import FakeClock

    root = tmp_path / "models"
    root.mkdir()
    config = make_config(
        f"[daemon]\nreconcile_interval_seconds = 3600\nshutdown_timeout_seconds = 1\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
    )
    clock = FakeClock()
    daemon = run_daemon(config, [MemorySink()], clock=clock)

    def periodic() -> float:
        for line in daemon.metrics.render().decode().splitlines():
            if line.startswith('modelwatch_reconciles_total{reason="periodic"}'):
                return float(line.rsplit(" ", 1)[1])
        return -1.0

    threading.Event().wait(2.5)  # two turns of the lifecycle loop on the real clock
    assert periodic() == 0.0
    clock.advance(3600 * 1.25 + 1)  # past the largest jitter
    wait_until(lambda: periodic() == 1.0, timeout=5)
