"""The settle loop on real directories, with a fake clock: no sleeping, no watchdog.

Changes are fed the way the watchers would feed them; time moves only when the test says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.reasons import Reason
from modelwatch.state import StateDir
from modelwatch.watch import Change
from tests.harness import SCHEMA_1_AGAIN, Harness
from tests.writers import write_safetensors


@pytest.fixture
def harness(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(
        depth: int = 0,
        extra: str = "",
        max_wait: float = 60,
        root: Path | None = None,
        wall: float | None = None,
    ) -> Harness:
        root = root or tmp_path / "models"
        root.mkdir(exist_ok=True)
        config = make_config(
            f"[defaults]\nsettle_seconds = 2.0\nmax_wait_seconds = {max_wait}\n{extra}\n"
            f'[[roots]]\npath = "{root}"\nunit_depth = {depth}\n'
        )
        h = Harness(config, wall)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def write(path: Path, data: bytes | str = b"x" * 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def types(events: list[Event]) -> list[str]:
    return [e.short_type for e in events]


def test_unit_registers_once_after_the_quiet_period(harness: Callable[..., Harness]) -> None:
    """One file written -> one registered event, exactly settle_seconds after the change."""
    h = harness()
    h.touch(write(Path(h.root) / "model.onnx"))
    assert h.advance(1.75) == []
    events = h.advance(0.25)
    assert types(events) == ["registered"]
    data = events[0].data
    assert data["version"] == 1
    assert data["format"] == "onnx"
    assert data["model_type"] == "ONNX"
    assert data["files"] == [{"path": "model.onnx", "size": 100}]
    assert data["settled_after_seconds"] == 2.0
    assert h.advance(30) == []


def test_silent_writer_is_caught_by_the_second_scan(harness: Callable[..., Harness]) -> None:
    """A file that grows without any event (mmap, NFS) restarts the quiet period."""
    h = harness()
    model = write(Path(h.root) / "model.onnx")
    h.touch(model)
    h.advance(1.0)  # probe scan taken
    with model.open("ab") as f:
        f.write(b"more")  # no event fed
    assert h.advance(1.0) == []  # final scan differs
    assert h.advance(1.75) == []
    events = h.advance(0.25)
    assert types(events) == ["registered"]
    assert events[0].data["total_bytes"] == 104


def test_ignored_files_never_delay_settling(harness: Callable[..., Harness]) -> None:
    """A TensorBoard file appended every 0.5 s beside the model does not hold it back."""
    h = harness()
    h.touch(write(Path(h.root) / "model.onnx"))
    board = Path(h.root) / "events.out.tfevents.1700000000.host"
    for _ in range(4):
        with board.open("ab") as f:
            f.write(b"scalar")
        h.touch(board)
        h.advance(0.5)
    assert types(h.events) == ["registered"]
    assert [f["path"] for f in h.events[0].data["files"]] == ["model.onnx"]


def test_in_progress_file_holds_the_unit_until_removed(harness: Callable[..., Harness]) -> None:
    """A *.tempstate* file present -> no event; removed -> one event."""
    h = harness()
    write(Path(h.root) / "variables" / "variables.index")
    temp = write(Path(h.root) / "variables" / "variables.data-00000-of-00001.tempstate123")
    write(Path(h.root) / "saved_model.pb")
    h.touch(temp)
    assert h.advance(20) == []
    temp.rename(Path(h.root) / "variables" / "variables.data-00000-of-00001")
    h.touch(Path(h.root) / "variables" / "variables.data-00000-of-00001")
    events = h.advance(2.0)
    assert types(events) == ["registered"]
    assert events[0].data["format"] == "saved_model"


def test_stable_but_incomplete_is_rechecked_without_events(
    harness: Callable[..., Harness],
) -> None:
    """A missing marker appearing with no event is still noticed one quiet period later."""
    h = harness(extra='require_marker = "_SUCCESS"')
    h.touch(write(Path(h.root) / "model.onnx"))
    assert h.advance(10) == []
    write(Path(h.root) / "_SUCCESS", b"")
    assert types(h.advance(4.0)) == ["registered"]


def test_rewrite_gives_version_two_and_delete_gives_removed(
    harness: Callable[..., Harness],
) -> None:
    """Rewriting a registered model -> v2 with a new fingerprint; deleting it -> removed."""
    h = harness(depth=1)
    unit = Path(h.root) / "exp-1"
    h.touch(write(unit / "model.onnx"))
    first = h.advance(3)
    write(unit / "model.onnx", b"y" * 200)
    h.touch(unit / "model.onnx")
    second = h.advance(3)
    assert types(first + second) == ["registered", "registered"]
    assert second[0].data["version"] == 2
    assert second[0].data["fingerprint"] != first[0].data["fingerprint"]
    assert second[0].data["experiment_id"] == "exp-1"
    for child in unit.iterdir():
        child.unlink()
    unit.rmdir()
    h.touch(unit, is_dir=True)
    removed = h.advance(3)
    assert types(removed) == ["removed"]
    assert removed[0].data["version"] == 2
    assert removed[0].data["fingerprint"] == second[0].data["fingerprint"]
    assert removed[0].data["files"] == []


def test_same_fingerprint_again_emits_nothing(harness: Callable[..., Harness]) -> None:
    """Touching nothing but re-announcing a settled unit does not emit a second event."""
    h = harness()
    model = write(Path(h.root) / "model.onnx")
    h.touch(model)
    h.advance(3)
    h.touch(model)
    h.rescan()
    assert h.advance(5) == []
    assert len(h.events) == 1


def test_invalid_metadata_is_rejected_then_fixed_registers_v1(
    harness: Callable[..., Harness],
) -> None:
    """Invalid metadata -> rejected (no version used); fixed -> registered version 1."""
    h = harness()
    meta = write(Path(h.root) / "gradient-model-metadata.json", '{"metrics": [1,]}')
    h.touch(write(Path(h.root) / "model.onnx"))
    rejected = h.advance(3)
    assert types(rejected) == ["rejected"]
    errors = rejected[0].data["errors"]
    assert errors[0]["code"] == "metadata_syntax"
    assert errors[0]["file"] == "gradient-model-metadata.json"
    assert (errors[0]["line"], errors[0]["column"]) == (1, 15)  # the trailing comma
    assert rejected[0].data["version"] is None
    meta.write_text(json.dumps({"metrics": [{"name": "accuracy", "numberValue": 0.9}]}))
    h.touch(meta)
    registered = h.advance(3)
    assert types(registered) == ["registered"]
    assert registered[0].data["version"] == 1
    assert registered[0].data["metrics"] == [{"name": "accuracy", "numberValue": 0.9}]


def test_tensorflow_model_type_ignores_custom_metadata(harness: Callable[..., Harness]) -> None:
    """model_type = Tensorflow: the metadata file is not validated and metadata_ignored is set."""
    h = harness(extra='model_type = "Tensorflow"')
    write(Path(h.root) / "gradient-model-metadata.json", "not json at all")
    h.touch(write(Path(h.root) / "model.onnx"))
    events = h.advance(3)
    assert types(events) == ["registered"]
    assert events[0].data["metadata_ignored"] is True
    assert events[0].data["metadata"] is None
    assert events[0].data["model_type"] == "Tensorflow"


def test_not_settled_is_reported_once_per_episode(harness: Callable[..., Harness]) -> None:
    """A unit that keeps changing past max_wait gets one rejected/not_settled and keeps waiting."""
    h = harness(max_wait=10)
    model = Path(h.root) / "model.onnx"
    for i in range(30):
        write(model, b"x" * (i + 1))
        h.touch(model)
        h.advance(0.5)
    assert types(h.events) == ["rejected"]
    assert h.events[0].data["errors"][0]["code"] == "not_settled"
    assert types(h.advance(3)) == ["registered"]


def test_empty_directory_is_not_a_model(harness: Callable[..., Harness]) -> None:
    """An empty unit directory settles silently."""
    h = harness(depth=1)
    (Path(h.root) / "exp-empty").mkdir()
    h.rescan()
    assert h.advance(5) == []


def test_files_above_unit_depth_are_ignored(harness: Callable[..., Harness]) -> None:
    """A file directly in a depth-1 root belongs to no unit."""
    h = harness(depth=1)
    h.touch(write(Path(h.root) / "README.txt"))
    assert h.advance(5) == []


def test_depth_one_directory_moved_in_registers(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """A finished model directory renamed into a depth-1 root -> one registered event."""
    h = harness(depth=1)
    staging = tmp_path / "staging" / "exp-7"
    write(staging / "model.onnx")
    target = Path(h.root) / "exp-7"
    staging.rename(target)
    h.loop.handle(
        Change(h.root, str(tmp_path / "elsewhere"), str(target), True, h.clock.monotonic())
    )
    events = h.advance(3)
    assert types(events) == ["registered"]
    assert events[0].subject == "exp-7"
    assert events[0].source == f"modelwatch:{h.root}"


def test_restart_reconcile_emits_only_what_changed(
    harness: Callable[..., Harness],
    tmp_path: Path,
) -> None:
    """Restart on the same state: changed -> v2, new -> v1, gone -> removed, same -> nothing."""
    h = harness(depth=1)
    for name in ("keep", "modify", "delete"):
        write(Path(h.root) / name / "model.onnx")
    h.rescan()
    assert sorted(types(h.advance(3))) == ["registered"] * 3
    h.close()
    write(Path(h.root) / "modify" / "model.onnx", b"changed")
    write(Path(h.root) / "added" / "model.onnx")
    os.remove(Path(h.root) / "delete" / "model.onnx")
    os.rmdir(Path(h.root) / "delete")
    again = Harness(h.config, starting=True)
    try:
        again.rescan()  # the start's reconcile: what vanished is removed at once
        assert [(e.subject, e.short_type) for e in again.events] == [("delete", "removed")]
        again.started()
        events = again.advance(3)
        got = sorted((e.subject, e.short_type, e.data["version"]) for e in events)
        assert got == [("added", "registered", 1), ("modify", "registered", 2)]
    finally:
        again.close()


def _event_ids(events: list[Event]) -> list[str]:
    return [e.id for e in events]


def test_event_ids_are_deterministic(harness: Callable[..., Harness]) -> None:
    """The id is sha256(type, path, fingerprint): recomputable by any node."""
    h = harness()
    h.touch(write(Path(h.root) / "model.onnx"))
    (event,) = h.advance(3)
    expected = hashlib.sha256(
        f"{event.type}\n{h.root}\n{event.data['fingerprint']}".encode()
    ).hexdigest()
    assert event.id == expected
    body: dict[str, Any] = event.to_dict()
    assert body["specversion"] == "1.0"
    assert body["datacontenttype"] == "application/json"
    assert body["time"].endswith("Z")


def test_hostile_names_and_metadata_still_give_one_line_events(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Non-UTF-8 and newline file names, and a lone surrogate in metadata, stay one JSON line."""
    from modelwatch.sinks.jsonl import JsonlSink
    from modelwatch.testing import sink_config

    h = harness()
    root = os.fsencode(h.root)
    with open(root + b"/weird-\xff-name.bin", "wb") as f:
        f.write(b"legacy pickle")
    write(Path(h.root) / "two\nlines.onnx")
    write(Path(h.root) / "gradient-model-metadata.json", '{"note": "\\ud800"}')
    h.touch(Path(h.root) / "model.onnx")
    (event,) = h.advance(3)
    assert event.short_type == "registered"
    paths = [f["path"] for f in event.data["files"]]
    assert "weird-\\xff-name.bin" in paths
    assert "two\nlines.onnx" in paths
    out = tmp_path / "events.jsonl"
    sink = JsonlSink(sink_config("jsonl", options={"path": str(out)}))
    sink.send(event)
    sink.close()
    (line,) = out.read_bytes().splitlines()
    assert json.loads(line)["id"] == event.id


def test_non_utf8_names_survive_checks_and_restarts(harness: Callable[..., Harness]) -> None:
    """A unit and a weight file whose names are not UTF-8 register once, are checked for
    completeness under their real name, and a restart does not call them removed."""
    h = harness(depth=1)
    unit = os.fsencode(h.root) + b"/exp-\xff"
    os.mkdir(unit)
    full = Path(h.root) / "scratch.safetensors"
    write_safetensors(full, {"w": 64})
    os.rename(full, unit + b"/model-\xfe.safetensors")
    h.rescan()
    (event,) = h.advance(3)
    assert event.subject == "exp-\\xff"
    assert event.data["format"] == "safetensors"
    h.close()
    again = Harness(h.config)
    try:
        again.rescan()
        assert again.advance(5) == []
    finally:
        again.close()


def test_depth_zero_root_given_as_a_symlink_registers(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """/artifacts -> /real/dir: the unit is the link's target, scanned without following
    anything below it."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "artifacts"
    link.symlink_to(real)
    h = harness(root=link)
    write(real / "model.onnx")
    h.rescan()
    (event,) = h.advance(3)
    assert event.data["files"] == [{"path": "model.onnx", "size": 100}]


def test_not_settled_and_a_later_rejection_have_different_ids(
    harness: Callable[..., Harness],
) -> None:
    """A unit held by an in-progress file past max_wait, then settling with bad metadata:
    two rejected events consumers can tell apart."""
    h = harness(max_wait=6)
    write(Path(h.root) / "gradient-model-metadata.json", "{bad")
    temp = write(Path(h.root) / "model.onnx.part")
    h.touch(write(Path(h.root) / "model.onnx"))
    (stuck,) = h.advance(8)
    temp.unlink()
    h.touch(temp)
    (rejected,) = h.advance(3)
    assert [e["code"] for e in stuck.data["errors"]] == ["not_settled"]
    assert [e["code"] for e in rejected.data["errors"]] == ["metadata_syntax"]
    assert stuck.id != rejected.id


def test_too_many_files_is_rejected(harness: Callable[..., Harness]) -> None:
    """More files than max_files_per_unit -> rejected with too_many_files."""
    h = harness(extra="max_files_per_unit = 3")
    for i in range(5):
        write(Path(h.root) / f"shard-{i}.bin")
    h.rescan()
    (event,) = h.advance(3)
    assert event.short_type == "rejected"
    assert [e["code"] for e in event.data["errors"]] == ["too_many_files"]


def test_content_digest_ignores_touches(harness: Callable[..., Harness]) -> None:
    """content_digest = sha256: files carry digests, and a touch that changes only the mtime
    is not a new version."""
    h = harness(extra='content_digest = "sha256"')
    model = write(Path(h.root) / "model.onnx", b"weights")
    h.touch(model)
    (event,) = h.advance(3)
    assert event.data["files"] == [
        {
            "path": "model.onnx",
            "size": 7,
            "sha256": hashlib.sha256(b"weights").hexdigest(),
        }
    ]
    os.utime(model, ns=(1, 1))
    h.touch(model)
    assert h.advance(3) == []


class ScanSpy:
    """Counts full manifest scans (the work the reconcile shortcut avoids)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import modelwatch.rules

        self.units: list[str] = []
        real = modelwatch.rules.scan_unit

        def counting(unit_dir: str, **kwargs: Any) -> Any:
            self.units.append(unit_dir)
            return real(unit_dir, **kwargs)

        monkeypatch.setattr(modelwatch.rules, "scan_unit", counting)


@pytest.mark.parametrize("digest", ["none", "sha256"])
def test_reconcile_skips_units_whose_files_did_not_change(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch, digest: str
) -> None:
    """A periodic reconcile of registered, untouched units scans none of them in full and
    re-hashes nothing; a changed unit next to them is still found."""
    h = harness(depth=1, extra=f'content_digest = "{digest}"')
    for name in ("a", "b", "c"):
        write(Path(h.root) / name / "model.onnx", name)
    h.rescan()
    assert types(h.advance(3)) == ["registered"] * 3
    spy = ScanSpy(monkeypatch)
    h.rescan()
    assert spy.units == [] and h.loop.settler.pending() == []
    write(Path(h.root) / "b" / "model.onnx", "b2")
    h.rescan()
    assert spy.units == [os.path.join(h.root, "b")]
    events = h.advance(3)
    assert [(e.subject, e.data["version"]) for e in events] == [("b", 2)]


def test_reconcile_sees_a_rewrite_that_restored_size_and_mtime(
    harness: Callable[..., Harness],
) -> None:
    """content_digest = sha256 exists for copies whose mtimes lie: a same-size rewrite with
    the old mtime put back is still a new version at the next reconcile (the inode change
    time, which no writer can set, differs)."""
    h = harness(extra='content_digest = "sha256"')
    model = write(Path(h.root) / "model.onnx", b"weights-1")
    h.rescan()
    assert types(h.advance(3)) == ["registered"]
    before = model.stat()
    model.write_bytes(b"weights-2")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    h.rescan()
    (event,) = h.advance(3)
    assert (event.short_type, event.data["version"]) == ("registered", 2)
    assert event.data["files"][0]["sha256"] == hashlib.sha256(b"weights-2").hexdigest()


def test_store_written_before_scan_digests_learns_them_on_first_reconcile(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state store of schema 1 is migrated: its units are scanned once, found unchanged
    (no event), and skipped from the next reconcile on."""
    import sqlite3

    h = harness(depth=1)
    for name in ("a", "b"):
        write(Path(h.root) / name / "model.onnx", name)
    h.rescan()
    assert types(h.advance(3)) == ["registered"] * 2
    h.close()
    db = sqlite3.connect(StateDir(h.config.daemon.state_dir).db_path)
    db.executescript(SCHEMA_1_AGAIN)
    db.close()
    again = Harness(h.config)
    try:
        assert [r.scan_digest for r in again.store.units.all()] == [None, None]
        spy = ScanSpy(monkeypatch)
        again.rescan()
        assert len(spy.units) == 2 and again.advance(3) == []
        assert all(r.scan_digest for r in again.store.units.all())
        again.rescan()
        assert len(spy.units) == 2 and again.loop.settler.pending() == []
    finally:
        again.close()


def test_removed_unit_forgets_its_scan_digest(harness: Callable[..., Harness]) -> None:
    h = harness(depth=1)
    model = write(Path(h.root) / "exp" / "model.onnx")
    h.rescan()
    assert types(h.advance(3)) == ["registered"]
    assert h.store.units.all()[0].scan_digest
    model.unlink()
    h.touch(model)
    assert types(h.advance(3)) == ["removed"]
    assert h.store.units.all()[0].scan_digest is None


def test_a_parent_swapped_for_a_symlink_hides_the_unit_instead_of_leaking(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """unit_depth = 2: `team/exp` registered, then `team` is swapped for a symlink to a
    directory elsewhere that holds an `exp` of its own. The unit is gone from where it was
    watched (removed); nothing from elsewhere is scanned or registered."""
    h = harness(depth=2)
    write(Path(h.root) / "team" / "exp" / "model.onnx", "mine")
    h.rescan()
    assert types(h.advance(3)) == ["registered"]
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "exp" / "model.onnx", "someone else's model")
    os.rename(Path(h.root) / "team", tmp_path / "team-moved")
    os.symlink(elsewhere, Path(h.root) / "team")
    h.rescan()
    events = h.advance(3)
    assert [(e.subject, e.short_type) for e in events] == [("team/exp", "removed")]


def test_a_bug_in_one_units_check_strands_no_other_unit(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units settle together; if checking one of them raises (a bug), the others are still
    committed and sent, and the failed one is tried again one quiet period later."""
    import modelwatch.checks

    h = harness(depth=1)
    for name in ("a", "b", "c"):
        write(Path(h.root) / name / "model.onnx", name)
    h.rescan()
    real = modelwatch.checks.readiness
    calls: list[str] = []

    def flaky(unit_dir: str, *args: Any) -> tuple[Reason, ...]:
        calls.append(unit_dir)
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return real(unit_dir, *args)

    monkeypatch.setattr(modelwatch.checks, "readiness", flaky)
    h.advance(3)
    assert len(h.events) == 2  # the units checked around the bug are committed and sent
    h.advance(5)
    assert sorted(e.subject for e in h.events) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('ignore = ["*.bak"]', ("registered", 2)),
        ('content_digest = "sha256"', ("registered", 2)),
        ("max_files_per_unit = 1", ("rejected", None)),
    ],
)
def test_a_rule_change_is_applied_to_units_already_registered(
    harness: Callable[..., Harness], rule: str, expected: tuple[str, int | None]
) -> None:
    """Restarted with rules that change what a fingerprint covers: the reconcile looks at the
    units again (their stored scan digests were made under the old rules)."""
    h = harness(depth=1)
    write(Path(h.root) / "exp" / "model.onnx", "m")
    write(Path(h.root) / "exp" / "model.bak", "old")
    h.rescan()
    assert types(h.advance(3)) == ["registered"]
    h.close()
    again = harness(depth=1, extra=rule)
    again.rescan()
    (event,) = again.advance(3)
    assert (event.short_type, event.data["version"]) == expected


def test_writes_through_a_mapping_are_seen_by_content_digests(
    harness: Callable[..., Harness],
) -> None:
    """content_digest = "sha256": a model rewritten through a shared mapping, in a page that is
    already dirty, keeps its ctime and mtime; a reconcile soon after still re-hashes it (no
    scan digest is trusted for files changed less than a minute ago) and finds version 2."""
    import mmap
    import time

    h = harness(extra='content_digest = "sha256"', wall=time.time())
    model = write(Path(h.root) / "model.onnx", b"\0" * 4096)
    with model.open("r+b") as f, mmap.mmap(f.fileno(), 4096) as mapped:
        mapped[0:5] = b"AAAAA"
        h.rescan()
        assert types(h.advance(3)) == ["registered"]
        mapped[0:5] = b"BBBBB"  # the page is still dirty: Linux moves no timestamp
        h.rescan()
        (event,) = h.advance(3)
    assert (event.short_type, event.data["version"]) == ("registered", 2)
