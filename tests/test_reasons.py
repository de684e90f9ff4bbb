"""Why a pending unit waits, as the settle loop publishes it: driven with a fake clock and
inline jobs, read the way other threads read it (the immutable snapshot)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelwatch.config import Config
from modelwatch.pending import Snapshot, reasons
from modelwatch.reasons import CODES, Reason
from modelwatch.units import Unit
from tests.harness import Harness
from tests.writers import write_hf_sharded, write_safetensors, write_tf_checkpoint


@pytest.fixture
def loop(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(root_extra: str = "", defaults: str = "") -> Harness:
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        h = Harness(
            make_config(
                f"[defaults]\nsettle_seconds = 10\n{defaults}\n"
                f'[[roots]]\npath = "{root}"\nunit_depth = 1\n{root_extra}\n'
            )
        )
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def why(h: Harness, name: str) -> list[Reason]:
    """The reasons another thread reads for unit `name` now."""
    snapshot = h.loop.snapshot
    waiting = snapshot.pending[Unit(h.root, name)]
    return list(reasons(waiting, snapshot.roots, h.clock.monotonic()))


def test_a_fresh_change_waits_for_the_quiet_period_with_the_time_left(
    loop: Callable[..., Harness],
) -> None:
    """Three seconds after a write into a unit with settle_seconds = 10, the one reason is
    the quiet period, with seven seconds left; once settled the unit is gone from the list."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 10})
    h.touch(unit / "model.safetensors")
    h.advance(3)
    (reason,) = why(h, "exp-1")
    assert reason.code == "quiet_period"
    assert "changed 3.0 s ago" in reason.message and "(7.0 s left)" in reason.message
    assert [e.short_type for e in h.advance(10)] == ["registered"]
    assert h.loop.snapshot.pending == {}


@pytest.mark.parametrize(
    ("write", "code", "files", "message"),
    [
        (
            lambda d: (write_safetensors(d / "a.safetensors", {"w": 8}), (d / "b.part").touch()),
            "in_progress",
            ("b.part",),
            "in-progress files present: b.part",
        ),
        (
            lambda d: write_hf_sharded(d, skip_shard=2),
            "incomplete",
            ("model-00002-of-00003.safetensors", "model.safetensors.index.json"),
            "huggingface incomplete: model-00002-of-00003.safetensors missing "
            "(named in model.safetensors.index.json)",
        ),
        (
            lambda d: (
                write_tf_checkpoint(d, "ckpt-5"),
                (d / "ckpt-5.data-00000-of-00001").unlink(),
            ),
            "incomplete",
            ("ckpt-5.data-00000-of-*", "ckpt-5.index"),
            "tf_checkpoint incomplete: ckpt-5.data-00000-of-* missing (named in checkpoint)",
        ),
    ],
    ids=["in-progress", "hf-shard", "tf-data-shard"],
)
def test_a_stable_unit_that_may_not_settle_says_which_file(
    loop: Callable[..., Harness],
    write: Callable[[Path], object],
    code: str,
    files: tuple[str, ...],
    message: str,
) -> None:
    """Once its scans are stable, a unit held back by an in-progress file, a shard its index
    lists or a TF checkpoint's data shard shows that reason naming the file (and no quiet
    period: nothing changed since that check)."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write(unit)
    h.rescan()
    assert h.advance(11) == []
    assert why(h, "exp-1") == [Reason(code, message, files)]


def test_every_reason_is_listed_not_only_the_first(loop: Callable[..., Harness]) -> None:
    """An in-progress file, a missing marker and a missing shard are all reported at once."""
    h = loop(defaults='require_marker = "_SUCCESS"')
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_hf_sharded(unit, skip_shard=1)
    (unit / "model-00001-of-00003.safetensors.incomplete").touch()
    h.rescan()
    h.advance(11)
    assert [r.code for r in why(h, "exp-1")] == ["in_progress", "missing_marker", "incomplete"]
    assert why(h, "exp-1")[1].files == ("_SUCCESS",)


def test_a_change_after_a_check_adds_the_quiet_period_to_what_the_check_found(
    loop: Callable[..., Harness],
) -> None:
    """The in-progress file found at the last check is still shown after a new write, next
    to the quiet period that write restarted."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    (unit / "x.part").write_bytes(b"1")
    h.rescan()
    h.advance(11)
    (unit / "x.part").write_bytes(b"12")
    h.touch(unit / "x.part")
    h.advance(1)
    assert [r.code for r in why(h, "exp-1")] == ["in_progress", "quiet_period"]


def test_an_unavailable_root_is_the_reason(loop: Callable[..., Harness]) -> None:
    """A unit of a root whose root_marker is gone waits for the root, and says why."""
    h = loop(root_extra='root_marker = ".ready"')
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 10})
    h.rescan()
    h.advance(11)
    (reason,) = why(h, "exp-1")
    assert reason.code == "root_unavailable"
    assert reason.message == f"root {h.root} unavailable: root_marker .ready missing"


def test_the_snapshot_is_replaced_never_changed(loop: Callable[..., Harness]) -> None:
    """A reader holding a snapshot keeps what it read while the loop moves on: the loop
    publishes a new object, and an old one cannot be written to."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 10})
    h.touch(unit / "model.safetensors")
    h.advance(1)
    held: Snapshot = h.loop.snapshot
    h.advance(11)
    assert Unit(h.root, "exp-1") in held.pending and h.loop.snapshot.pending == {}
    with pytest.raises(TypeError):
        held.pending[Unit(h.root, "x")] = held.pending[Unit(h.root, "exp-1")]  # type: ignore[index]


def test_a_reader_thread_sees_whole_snapshots_only(loop: Callable[..., Harness]) -> None:
    """While the loop handles a burst of changes, a reader thread reading the snapshot over
    and over never fails and always sees each unit with its timers."""
    h = loop()
    units = []
    for i in range(50):
        unit = Path(h.root) / f"exp-{i}"
        unit.mkdir()
        (unit / "w.part").touch()
        units.append(unit)
    stop, failures = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            snapshot = h.loop.snapshot
            try:
                for waiting in snapshot.pending.values():
                    reasons(waiting, snapshot.roots, h.clock.monotonic())
            except Exception as exc:  # the assertion below reports it
                failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for unit in units:
            h.touch(unit / "w.part")
        h.advance(12)
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert len(h.loop.snapshot.pending) == 50


def test_the_readme_lists_every_reason_code() -> None:
    """The README's table of reason codes is exactly the set `explain` can print."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("| reason code |", 1)[1].split("\n\n", 1)[0]
    listed = {line.split("`")[1] for line in table.splitlines()[2:] if line.startswith("| `")}
    assert listed == set(CODES)


def test_a_not_settled_event_names_every_reason(loop: Callable[..., Harness]) -> None:
    """Past max_wait_seconds the `not_settled` error says all that holds the unit back: the
    in-progress file and the missing marker."""
    h = loop(defaults='max_wait_seconds = 30\nrequire_marker = "_SUCCESS"')
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 10})
    (unit / "optimizer.pt.part").touch()
    h.rescan()
    (event,) = h.advance(31)
    (error,) = event.data["errors"]
    assert error["code"] == "not_settled"
    assert "in-progress files present: optimizer.pt.part" in error["message"]
    assert "marker file _SUCCESS not present" in error["message"]
