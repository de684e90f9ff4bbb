"""The durable state: outbox order, sink independence, retries, full disks, restarts."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.errors import StateError
from modelwatch.events import Event
from modelwatch.sinks import build_sink
from modelwatch.state import SCHEMA_VERSION, StateDir, Store
from modelwatch.state.database import WriterQueue
from modelwatch.testing import MemorySink
from tests.conftest import fill_disk, wait_until
from tests.receiver import Receiver, Reply
from tests.writers import write_safetensors


def config_text(
    root: Path, state: Path, sinks: tuple[str, ...] = ("memory",), depth: int = 1
) -> str:
    tables = "".join(f'[[sinks]]\ntype = "memory"\nname = "{name}"\n' for name in sinks)
    return (
        f'[daemon]\nstate_dir = "{state}"\nshutdown_timeout_seconds = 2\n'
        "[defaults]\nsettle_seconds = 0.5\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = {depth}\n{tables}'
    )


class Harness:
    """Starts and stops daemons over one root and state dir, with memory sinks."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.running: list[tuple[Daemon, threading.Event, threading.Thread]] = []

    def start(self, *sinks: MemorySink) -> Daemon:
        daemon = Daemon(self.config, sinks=list(sinks), host="testhost")
        daemon.start()
        stop = threading.Event()
        thread = threading.Thread(target=daemon.serve, args=(stop,), name="lifecycle")
        thread.start()
        self.running.append((daemon, stop, thread))
        return daemon

    def stop(self) -> None:
        while self.running:
            daemon, stop, thread = self.running.pop()
            stop.set()
            thread.join()
            daemon.stop()


@pytest.fixture
def harness(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(sinks: tuple[str, ...] = ("memory",), state: Path | None = None) -> Harness:
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        state_dir = state or tmp_path / "state"
        text = config_text(root, state_dir, sinks)
        h = Harness(make_config(text, MODELWATCH_STATE_DIR=str(state_dir)))
        made.append(h)
        return h

    yield build
    for h in made:
        h.stop()


def model(root: Path, name: str, size: int = 1000) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    write_safetensors(root / name / "model.safetensors", {"w": size})


def test_state_dir_is_private_and_versioned(tmp_path: Path) -> None:
    """state_dir is created 0700 and the database carries its schema version."""
    state = StateDir(str(tmp_path / "s"))
    store = Store(state.db_path)
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    import sqlite3

    db = sqlite3.connect(state.db_path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A state store written by a newer modelwatch is not silently downgraded."""
    import sqlite3

    state = StateDir(str(tmp_path / "s"))
    db = sqlite3.connect(state.db_path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this modelwatch"):
        Store(state.db_path)


def test_second_lock_on_the_same_state_dir_fails(tmp_path: Path) -> None:
    """Two daemons cannot share a state_dir."""
    first, second = StateDir(str(tmp_path)), StateDir(str(tmp_path))
    first.lock()
    try:
        with pytest.raises(StateError, match=f"pid {os.getpid()}"):
            second.lock()
    finally:
        first.unlock()


def test_a_failing_sink_never_delays_another(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """One sink failing for a while: the other gets every event at once; later, both get all,
    in version order per unit."""
    h = harness(sinks=("good", "flaky"))
    good, flaky = MemorySink(), MemorySink()
    good.name, flaky.name = "good", "flaky"
    flaky.fail_next(6, retry_after=0.3)
    h.start(good, flaky)
    root = tmp_path / "models"
    model(root, "a", 100)
    good.wait_for(1)
    model(root, "a", 200)
    model(root, "b", 100)
    got = good.wait_for(3, timeout=10)
    assert len(got) == 3
    assert flaky.events == []  # still failing: retries are spaced by Retry-After
    done = flaky.wait_for(3, timeout=15)
    assert sorted(e.id for e in done) == sorted(e.id for e in got)
    versions_a = [e.data["version"] for e in done if e.subject == "a"]
    assert versions_a == [1, 2]  # per unit in version order (units do not wait for each other)


def test_permanent_failure_goes_to_dead_letters_and_redeliver_resends(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """A permanent sink error dead-letters the event; redeliver puts it back; it is delivered."""
    h = harness()
    sink = MemorySink()
    sink.fail_next(1, permanent=True)
    daemon = h.start(sink)
    model(tmp_path / "models", "a")
    store = Store(daemon.state.db_path)
    try:
        wait_until(lambda: [s.dead for s in store.outbox.sink_stats()] == [1])
        assert store.outbox.redeliver(sink="memory") == 1
        for worker in daemon.workers:
            worker.wake.set()
        assert len(sink.wait_for(1)) == 1
        wait_until(lambda: store.outbox.sink_stats() == [])
    finally:
        store.close()


def test_restart_emits_exactly_what_changed_while_down(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Stop; modify one, add one, delete one, leave one; start -> v2, v1, removed, nothing."""
    h = harness()
    root = tmp_path / "models"
    for name in ("keep", "modify", "delete"):
        model(root, name)
    sink = MemorySink()
    h.start(sink)
    assert len(sink.wait_for(3)) == 3
    h.stop()
    model(root, "modify", 2000)
    model(root, "add")
    shutil.rmtree(root / "delete")
    after = MemorySink()
    h.start(after)
    events = after.wait_for(3)
    assert after.wait_for(4, timeout=2.0) == events  # and nothing more
    got = sorted((e.subject, e.short_type, e.data["version"]) for e in events)
    assert got == [("add", "registered", 1), ("delete", "removed", 1), ("modify", "registered", 2)]


def test_stop_leaves_undelivered_events_for_the_next_start(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Events a sink could not take before shutdown are delivered after a restart, same ids."""
    h = harness()
    down = MemorySink()
    down.fail_next(1000, retry_after=60)
    daemon = h.start(down)
    model(tmp_path / "models", "a")
    store = Store(daemon.state.db_path)
    try:
        wait_until(lambda: [s.pending for s in store.outbox.sink_stats()] == [1])
    finally:
        store.close()
    h.stop()
    up = MemorySink()
    h.start(up)
    (event,) = up.wait_for(1)
    assert event.subject == "a"


def test_full_disk_loses_nothing(
    harness: Callable[..., Harness], tmp_path: Path, small_disk: Path
) -> None:
    """State dir on a full disk: the daemon keeps running, and registers all once space returns."""
    h = harness(state=small_disk / "state")
    sink = MemorySink()
    with structlog.testing.capture_logs() as logs:
        h.start(sink)
        filler = fill_disk(small_disk)
        names = [f"exp-{i:02d}" for i in range(30)]
        for name in names:
            model(tmp_path / "models", name)
        wait_until(lambda: any(e["event"] == "state_write_failed" for e in list(logs)))
        assert len(sink.events) < len(names)  # what could not be committed was not sent
        filler.unlink()
        events = sink.wait_for(len(names), timeout=30)
    assert sorted(e.subject for e in events) == names
    assert all(e.data["version"] == 1 for e in events)
    assert all(t.is_alive() for _, _, t in h.running)


def test_webhook_outage_then_everything_in_order(
    tmp_path: Path, make_config: Callable[..., Config], receiver: Receiver
) -> None:
    """A receiver failing with 503, a timeout and 429 + Retry-After: the other sink is not
    delayed, and afterwards the receiver has every event, in version order per unit."""
    root = tmp_path / "models"
    root.mkdir()
    receiver.script(
        Reply(503), Reply(204, delay=1.5), Reply(429, headers={"Retry-After": "1"}), Reply(500)
    )
    text = config_text(root, tmp_path / "state") + (
        f'[[sinks]]\ntype = "webhook"\nname = "hook"\nurl = "{receiver.url}"\n'
        "timeout_seconds = 0.5\n"
    )
    config = make_config(text)
    memory = MemorySink()
    h = Harness(config)
    try:
        h.start(memory, build_sink(config.sinks[1]))
        model(root, "a", 100)
        memory.wait_for(1)
        model(root, "a", 200)
        model(root, "b", 100)
        fast = memory.wait_for(3)
        assert len(fast) == 3

        def delivered() -> list[str]:
            ok = [r for r in receiver.requests if r.headers.get("webhook-id")]
            return [r.headers["webhook-id"] for r in ok]

        reader = Store(StateDir(config.daemon.state_dir).db_path)
        try:  # every event delivered: nothing left in the webhook's outbox
            wait_until(lambda: not any(s.pending for s in reader.outbox.sink_stats()), 30)
        finally:
            reader.close()
    finally:
        h.stop()
    # the last attempt of each id is the successful one; per unit, in commit (version) order
    last = {event_id: i for i, event_id in enumerate(delivered())}
    assert set(last) == {e.id for e in fast}
    a1, a2 = (e.id for e in fast if e.subject == "a")
    assert last[a1] < last[a2]
    assert len(receiver.requests) == 3 + 4  # four failures were retried


def _registered(unit: str, version: int = 1) -> Event:
    from modelwatch.events import REGISTERED, make_event

    return make_event(
        REGISTERED,
        root="/r",
        unit_path=f"/r/{unit}",
        name=unit,
        when=0.0,
        data={"fingerprint": f"sha256:{unit}{version}", "version": version},
    )


def test_dead_letter_holds_back_later_versions_of_its_unit(tmp_path: Path) -> None:
    """v1 dead-lettered: v2 of the same unit waits (another unit does not); after redeliver
    they go out in version order."""
    store = Store(StateDir(str(tmp_path)).db_path)
    try:
        for e in (_registered("a", 1), _registered("a", 2), _registered("b", 1)):
            store.outbox.enqueue(e, ["hook"])
        head = store.outbox.next_due("hook", 0)
        assert head is not None and head.event.data["version"] == 1
        store.outbox.mark_failed(
            "hook", head.seq, attempts=1, next_attempt=0, error="410", dead=True
        )
        nxt = store.outbox.next_due("hook", 0)
        assert nxt is not None and nxt.event.subject == "b"
        store.outbox.mark_delivered("hook", nxt.seq)
        assert store.outbox.next_due("hook", 0) is None  # a/v2 waits behind the dead a/v1
        assert store.outbox.redeliver("hook") == 1
        order = []
        while (row := store.outbox.next_due("hook", 0)) is not None:
            order.append((row.event.subject, row.event.data["version"]))
            store.outbox.mark_delivered("hook", row.seq)
        assert order == [("a", 1), ("a", 2)]
    finally:
        store.close()


def test_changes_while_down_are_reconciled_before_ready(
    harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """A model deleted while the daemon was down is removed before READY; a root deleted
    while it was down removes nothing (an unavailable root, SPEC §11)."""
    h = harness()
    model(tmp_path / "models", "a")
    model(tmp_path / "models", "b")
    sink = MemorySink()
    h.start(sink)
    sink.wait_for(2)
    h.stop()
    shutil.rmtree(tmp_path / "models" / "a")
    after = MemorySink()
    daemon = h.start(after)
    # committed when the start returns, READY: not one quiet period later
    store = Store(daemon.state.db_path)
    try:
        record = store.units.get(str(tmp_path / "models" / "a"))
        assert record is not None and not record.present and record.removals == 1
    finally:
        store.close()
    (removed,) = after.wait_for(1)
    assert (removed.short_type, removed.subject) == ("removed", "a")
    h.stop()
    shutil.rmtree(tmp_path / "models")
    last = MemorySink()
    daemon = h.start(last)
    assert daemon.loop is not None and not daemon.loop.roots[str(tmp_path / "models")].available
    assert last.events == []


def test_retry_delay_is_full_jitter_capped_and_honours_retry_after() -> None:
    """Backoff: uniform in [0, min(cap, base * 2^(n-1))]; Retry-After wins."""
    import random

    from modelwatch.delivery import BACKOFF_CAP, retry_delay

    rng = random.Random(1)
    for attempts, ceiling in ((1, 1.0), (2, 2.0), (4, 8.0), (20, BACKOFF_CAP), (500, BACKOFF_CAP)):
        delays = [retry_delay(attempts, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # really spread over the range
    assert retry_delay(3, 42.0, rng) == 42.0


def _record(store: Store, event: Event) -> None:
    """What the registry writes for a registered event: the unit, then its outbox row."""
    with store.transaction():
        store.units.record_settled(
            root="/r",
            unit=event.unit_path,
            fp=str(event.data["fingerprint"]),
            outcome="registered",
            version=int(event.data["version"]),
            event_id=event.id,
            epoch=0,
        )
        store.outbox.enqueue(event, ["s"])


def test_a_batch_commits_together_and_a_failing_unit_alone_is_undone(tmp_path: Path) -> None:
    """Units settling together share one transaction: another connection (a delivery worker)
    sees none of them before the batch ends, then all but the one whose write failed."""
    path = StateDir(str(tmp_path)).db_path
    store, reader = Store(path), Store(path)
    try:
        with store.transaction():
            _record(store, _registered("a"))
            with pytest.raises(RuntimeError), store.transaction() as db:
                db.execute("UPDATE units SET last_version = 99")
                raise RuntimeError("this unit failed half-way")
            _record(store, _registered("b"))
            assert reader.units.all() == [] and reader.outbox.next_due("s", 0) is None
        units = [(u.path, u.last_version) for u in reader.units.all()]
        assert units == [("/r/a", 1), ("/r/b", 1)]
        assert [s.pending for s in reader.outbox.sink_stats()] == [2]
    finally:
        store.close()
        reader.close()


def test_events_are_handed_on_only_once_committed(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """A burst of units settling at once: each event reaches the daemon's callback (which wakes
    the delivery workers) only when another connection can already read it."""
    from tests.harness import Harness

    root = tmp_path / "models"
    for i in range(40):
        (root / f"exp-{i:02d}").mkdir(parents=True)
        (root / f"exp-{i:02d}" / "model.onnx").write_bytes(b"onnx" * (i + 1))
    config = make_config(
        f'[defaults]\nsettle_seconds = 2.0\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
    )
    reader = Store(StateDir(config.daemon.state_dir).db_path)
    seen: list[tuple[str, int]] = []

    def on_event(event: Event) -> None:
        seen.append((event.subject, sum(s.pending for s in reader.outbox.sink_stats())))

    h = Harness(config, on_event=on_event)
    try:
        h.rescan()
        h.advance(5)
        assert sorted(name for name, _ in seen) == [f"exp-{i:02d}" for i in range(40)]
        assert all(pending >= 40 for _, pending in seen)  # the whole burst, committed once
    finally:
        h.close()
        reader.close()


def test_a_writer_waiting_behind_back_to_back_commits_gets_its_turn(tmp_path: Path) -> None:
    """The settle loop commits batch after batch in a burst; a delivery thread's write waits
    for one batch, not until the burst is over (SQLite's busy handler alone starved it)."""
    db_path = str(tmp_path / "state.db")
    busy, other = Store(db_path), Store(db_path)
    stop, hammering = threading.Event(), threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 5.0
        while not stop.is_set() and time.monotonic() < deadline:
            with busy.transaction() as db:
                db.execute("UPDATE units SET present = present")
                hammering.set()
                stop.wait(0.02)  # a batch of units being recorded

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        assert hammering.wait(5)
        waits = []
        for _ in range(10):
            started = time.monotonic()
            with other.transaction():
                pass
            waits.append(time.monotonic() - started)
        stop.set()
    finally:
        stop.set()
        thread.join()
        busy.close()
        other.close()
    assert max(waits) < 0.5, waits  # one batch is 0.02 s; starved, it was the whole 5 s


def test_a_writer_interrupted_while_waiting_gives_up_its_turn() -> None:
    queue_ = WriterQueue()
    holder_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        with queue_:
            holder_in.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holder_in.wait(5)
    interrupted: list[BaseException] = []

    def wait_then_interrupt() -> None:
        # a waiter whose wait raises (as a signal handler's exception would)
        original = queue_._cond.wait

        def raising(timeout: float | None = None) -> bool:
            raise KeyboardInterrupt

        queue_._cond.wait = raising  # type: ignore[method-assign]
        try:
            with queue_:
                pass
        except KeyboardInterrupt as exc:
            interrupted.append(exc)
        finally:
            queue_._cond.wait = original  # type: ignore[method-assign]

    waiter = threading.Thread(target=wait_then_interrupt)
    waiter.start()
    waiter.join(5)
    assert interrupted
    release.set()
    holder.join(5)
    got = threading.Event()

    def later() -> None:
        with queue_:
            got.set()

    late = threading.Thread(target=later)
    late.start()
    late.join(5)
    assert got.is_set()  # the abandoned turn was skipped, not waited for
