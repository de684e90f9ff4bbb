"""The settle loop's decisions at the edges, driven with a fake clock and inline jobs.

A stop's last chance, roots that become unavailable, restores, depth-0 names, a budget
running out and a bug in a job: each as the events (and store rows) a user would see.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.progress import progress
from modelwatch.settle_loop import Reconfigure
from modelwatch.watch import Change
from tests.harness import Harness
from tests.writers import write_safetensors


@pytest.fixture
def loop(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(depth: int = 1, root_extra: str = "", defaults: str = "") -> Harness:
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        h = Harness(
            make_config(
                f"[defaults]\nsettle_seconds = 30\nmax_wait_seconds = 600\n{defaults}\n"
                f'[[roots]]\npath = "{root}"\nunit_depth = {depth}\n{root_extra}\n'
            )
        )
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def model(unit: Path, size: int = 100) -> Path:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})
    return unit


def kinds(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.short_type, e.subject) for e in events]


def test_stop_settles_a_complete_unit_without_waiting_out_its_quiet_period(
    loop: Callable[..., Harness],
) -> None:
    """settle_seconds = 30; a stop one second after the write registers it (two scans
    stop_settle apart), and the loop finishes."""
    h = loop()
    h.touch(model(Path(h.root) / "final") / "model.safetensors")
    assert h.advance(1.0) == []
    (event,) = h.stop(gap=1.0)
    assert (event.short_type, event.subject, event.data["version"]) == ("registered", "final", 1)
    assert h.loop.finished


def test_stop_leaves_an_incomplete_unit_pending_with_its_reason(
    loop: Callable[..., Harness], capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit with an in-progress file at the stop is not registered; the log names it and
    why (the next start's reconcile finds it)."""
    h = loop()
    unit = model(Path(h.root) / "busy")
    (unit / "model.safetensors.part").write_bytes(b"x")
    h.touch(unit / "model.safetensors.part")
    assert h.stop(gap=1.0) == []
    assert h.loop.settler.pending()[0].name == "busy"
    out = capsys.readouterr().out
    assert "unit_pending_at_stop" in out and "model.safetensors.part" in out


def test_an_unavailable_root_removes_and_registers_nothing(
    loop: Callable[..., Harness], tmp_path: Path
) -> None:
    """Root marker gone with a unit: no `removed` and no new registration meanwhile; marker
    back: the deletion is real (`removed`), the new unit is registered."""
    h = loop(root_extra='root_marker = ".ready"')
    root = Path(h.root)
    (root / ".ready").touch()
    model(root / "old")
    h.rescan()
    assert kinds(h.advance(31)) == [("registered", "old")]
    (root / ".ready").unlink()
    shutil.rmtree(root / "old")
    model(root / "new")
    h.rescan()
    assert h.advance(90) == []
    assert not h.loop.roots[h.root].available
    assert "root_marker .ready missing" in h.loop.roots[h.root].reason
    (root / ".ready").touch()
    h.rescan()
    assert sorted(kinds(h.advance(90))) == [("registered", "new"), ("removed", "old")]
    assert h.loop.roots[h.root].available


def test_restore_registers_the_old_version_again(loop: Callable[..., Harness]) -> None:
    """v1, then v2, removed, v1's files restored: `registered` v1 with restored: true; a
    fresh rewrite after that is v3."""
    h = loop()
    root = Path(h.root)
    unit = model(root / "exp", size=100)
    h.rescan()
    (v1,) = h.advance(31)
    saved = (unit / "model.safetensors").read_bytes(), (unit / "model.safetensors").stat()
    model(unit, size=200)
    h.touch(unit / "model.safetensors")
    assert [e.data["version"] for e in h.advance(31)] == [2]
    shutil.rmtree(unit)
    h.touch(unit, is_dir=True)
    (removed,) = h.advance(31)
    assert (removed.short_type, removed.data["version"]) == ("removed", 2)
    unit.mkdir()
    (unit / "model.safetensors").write_bytes(saved[0])
    os.utime(unit / "model.safetensors", ns=(saved[1].st_atime_ns, saved[1].st_mtime_ns))
    h.touch(unit / "model.safetensors")
    (restored,) = h.advance(31)
    assert restored.data["fingerprint"] == v1.data["fingerprint"]
    assert (restored.data["version"], restored.data["restored"]) == (1, True)
    assert restored.id != v1.id
    model(unit, size=300)
    h.touch(unit / "model.safetensors")
    (v3,) = h.advance(31)
    assert (v3.data["version"], "restored" in v3.data) == (3, False)


def test_depth_zero_unit_is_named_after_its_root(loop: Callable[..., Harness]) -> None:
    """data.name of the unit of a depth-0 root is the root's base name; subject is "."."""
    h = loop(depth=0)
    model(Path(h.root))
    h.rescan()
    (event,) = h.advance(31)
    assert (event.data["name"], event.subject, event.data["experiment_id"]) == ("models", ".", None)


def test_an_inspection_past_its_budget_is_rejected_once(
    loop: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inspection that keeps reporting progress past inspect_timeout_seconds ends as
    `rejected` with `inspection_timeout`; the same files are not inspected again."""
    import modelwatch.checks

    h = loop(defaults="inspect_timeout_seconds = 5")
    calls: list[str] = []

    def endless(*args: Any, **kwargs: Any) -> Any:
        calls.append("inspect")
        while True:  # hashing a sparse terabyte: progress, but no end in sight
            h.clock.advance(1.0)
            progress()

    monkeypatch.setattr(modelwatch.checks, "inspect_unit", endless)
    model(Path(h.root) / "huge")
    h.rescan()
    (event,) = h.advance(40)
    assert event.short_type == "rejected"
    assert [e["code"] for e in event.data["errors"]] == ["inspection_timeout"]
    size = (Path(h.root) / "huge" / "model.safetensors").stat().st_size
    assert event.data["files"] == [{"path": "model.safetensors", "size": size}]
    h.rescan()
    assert h.advance(40) == [] and calls == ["inspect"]


def test_a_reload_removing_a_root_loses_nothing_of_the_others(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """Units of two roots settle in the same turn as a reload drops one root: the kept
    root's unit is registered, the dropped root's unit is forgotten, and the loop keeps
    turning (a stale unit used to fail every turn and hold up the stop)."""
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    kept.mkdir()
    dropped.mkdir()
    roots = f'[[roots]]\npath = "{kept}"\nunit_depth = 1\n'
    other = f'[[roots]]\npath = "{dropped}"\nunit_depth = 1\n'
    both = make_config(f"[defaults]\nsettle_seconds = 2\n{roots}{other}")
    h = Harness(both)
    try:
        for root in (kept, dropped):
            unit = model(root / "m")
            h.loop.handle(
                Change(str(root), str(unit / "model.safetensors"), None, False, h.clock.monotonic())
            )
        assert h.advance(1.0) == []  # the probe scans, half-way through the quiet period
        h.clock.advance(1.0)
        h.loop.step()  # the final checks run; their outcomes wait in the inbox
        h.loop.inbox.put(
            Reconfigure(make_config(f"[defaults]\nsettle_seconds = 2\n{roots}"), [], None)
        )
        h.idle()
        assert kinds(h.events) == [("registered", "m")]
        assert h.events[0].data["path"].startswith(str(kept))
        assert h.loop.settler.pending() == []
        assert h.stop(gap=0.5) == []
    finally:
        h.close()


def test_a_root_whose_marker_comes_back_is_reconciled_without_a_rescan(
    loop: Callable[..., Harness],
) -> None:
    """The marker is back (an event at the root): the root is reconciled at once, and a
    unit deleted while it was away is `removed`; without an event the root is looked at
    again every few seconds."""
    h = loop(root_extra='root_marker = ".ready"')
    root = Path(h.root)
    (root / ".ready").touch()
    model(root / "old")
    model(root / "older")
    h.rescan()
    assert sorted(kinds(h.advance(31))) == [("registered", "old"), ("registered", "older")]
    (root / ".ready").unlink()
    h.touch(root / ".ready")
    h.idle()
    assert not h.loop.roots[h.root].available
    shutil.rmtree(root / "old")
    assert h.advance(60) == []
    (root / ".ready").touch()
    h.touch(root / ".ready")  # the marker's event: no rescan asked for
    assert kinds(h.advance(31)) == [("removed", "old")]
    assert h.loop.roots[h.root].available
    # gone again, back again without any event: found by looking again
    (root / ".ready").unlink()
    h.touch(root / ".ready")
    h.idle()
    assert not h.loop.roots[h.root].available
    shutil.rmtree(root / "older")
    (root / ".ready").touch()
    assert kinds(h.advance(40)) == [("removed", "older")]


def test_a_description_no_event_can_carry_does_not_hold_up_registration(
    loop: Callable[..., Harness],
) -> None:
    """A 2 KB safetensors header whose tensor has 250 dimensions of 10^18 (an element count
    of 4,500 digits) and an MLmodel whose signature holds a date and a NaN: each unit is
    registered once, its `data.model` saying what it could not show (they used to fail at
    every check, forever)."""
    h = loop()
    root = Path(h.root)
    big = root / "big"
    big.mkdir()
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [10**18] * 250, "data_offsets": [0, 0]}}
    ).encode()
    (big / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    odd = root / "odd"
    odd.mkdir()
    (odd / "MLmodel").write_text(
        "flavors:\n  python_function: {}\nsignature:\n  inputs: 2001-12-14\n  outputs: .nan\n"
    )
    h.rescan()
    events = {e.subject: e for e in h.advance(31)}
    assert sorted(events) == ["big", "odd"]
    assert all(e.short_type == "registered" for e in events.values())
    big_model = events["big"].data["model"]
    assert big_model["parameter_count"] is None
    assert big_model["error"]["code"] == "describe_out_of_range"
    odd_model = events["odd"].data["model"]
    assert odd_model["signature"]["inputs"] == "2001-12-14"
    assert odd_model["error"]["code"] == "describe_out_of_range"
    json.loads(json.dumps([e.to_dict() for e in events.values()], allow_nan=False))


def test_a_removal_is_told_once_whatever_was_rejected_after_it(
    loop: Callable[..., Harness],
) -> None:
    """v1 registered, removed; files that are rejected come and go: no second `removed`
    for v1 (it came with a new id, so deduplicating by id did not catch it)."""
    h = loop()
    root = Path(h.root)
    model(root / "m")
    h.rescan()
    assert kinds(h.advance(31)) == [("registered", "m")]
    shutil.rmtree(root / "m")
    h.rescan()
    assert kinds(h.advance(31)) == [("removed", "m")]
    unit = model(root / "m", size=7)
    (unit / "gradient-model-metadata.json").write_text("{not json")
    h.rescan()
    assert kinds(h.advance(31)) == [("rejected", "m")]
    shutil.rmtree(root / "m")
    h.rescan()
    assert h.advance(31) == []
    model(root / "m", size=9)
    h.rescan()
    (event,) = h.advance(31)
    assert (event.short_type, event.data["version"]) == ("registered", 2)
    shutil.rmtree(root / "m")
    h.rescan()
    assert kinds(h.advance(31)) == [("removed", "m")]
