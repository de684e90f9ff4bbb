"""Several nodes' settle loops sharing one backend, on one fake clock (SPEC §12).

Each node is what a daemon builds (settle loop, registry, ledger, coordinator) over a store
of its own; the coordinators' turns and the loops' steps are run by hand, the backend is the
in-process `MemoryBackend`, so takeovers and outages play out without sleeping. The real
backends and real daemons are in test_cluster_backend.py and test_cluster.py.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.cluster.backend import BackendUnavailable, Write
from modelwatch.cluster.coordinator import Coordinator
from modelwatch.cluster.lease import margin
from modelwatch.cluster.ledger import Ledger
from modelwatch.cluster.memory import MemoryBackend
from modelwatch.config import Config
from modelwatch.delivery import drain
from modelwatch.events import Event
from modelwatch.stages import build_stages
from modelwatch.state import Store
from modelwatch.testing import FakeClock, MemorySink, sink_config
from modelwatch.units import Unit
from modelwatch.watch import Change
from tests.writers import write_safetensors

LEASE = 6.0


def model(unit: Path, size: int) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})


class Node:
    """One node: its own store, settle loop and coordinator; `events` as committed here."""

    def __init__(
        self, name: str, config: Config, backend: MemoryBackend, clock: FakeClock, shared: bool
    ) -> None:
        self.name = name
        self.clock = clock
        Path(config.daemon.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(f"{config.daemon.state_dir}/{name}.db")
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.events: list[Event] = []
        roots = [r.path for r in config.roots if r.shared] if shared else []
        self.coordinator = Coordinator(
            backend, roots, node=name, lease_seconds=LEASE, clock=clock, post=self.inbox.put
        )
        self.ledger = Ledger(backend, self.coordinator, roots)
        self.stages = build_stages(
            config,
            self.store,
            clock=clock,
            host=name,
            on_event=self.events.append,
            inbox=self.inbox,
            ledger=self.ledger if roots else None,
        )
        self.loop = self.stages.loop
        self.sink = MemorySink(sink_config("stdout", "stdout"))
        self.alive = True

    def turn(self) -> None:
        if not self.alive:
            return
        self.coordinator.turn()
        self.loop.step()
        while not self.inbox.empty():
            self.loop.step()

    def touch(self, root: str, path: Path) -> None:
        """What this node's watcher enqueues (a standby's loop drops it)."""
        self.loop.handle(Change(root, str(path), None, False, self.clock.monotonic()))

    def deliver(self) -> list[Event]:
        drain(self.sink, self.store, max_attempts=0, clock=self.clock)
        return self.sink.events

    def registered(self) -> list[tuple[str, int | None]]:
        return [(e.data["name"], e.data["version"]) for e in self.events]


class Cluster:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock = FakeClock()
        self.backend = MemoryBackend(self.clock)
        self.nodes: list[Node] = []

    def node(self, name: str, *, shared: bool = True) -> Node:
        node = Node(name, self.config, self.backend, self.clock, shared)
        self.nodes.append(node)
        node.turn()
        return node

    def advance(self, seconds: float, step: float = 0.25) -> None:
        elapsed = 0.0
        while elapsed < seconds - 1e-9:
            self.clock.advance(step)
            elapsed += step
            for node in self.nodes:
                node.turn()

    def close(self) -> None:
        for node in self.nodes:
            node.store.close()


@pytest.fixture
def cluster(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Cluster]:
    """A shared root (and a local one) under tmp_path; nodes are added by the test."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "local").mkdir()
    config = make_config(
        f"""
[cluster]
backend = "redis"
url = "redis://127.0.0.1:1/0"
lease_seconds = {LEASE}

[[roots]]
path = "{tmp_path / "shared"}"
unit_depth = 1
settle_seconds = 1
shared = true

[[roots]]
path = "{tmp_path / "local"}"
unit_depth = 1
settle_seconds = 1
shared = false
"""
    )
    built = Cluster(config)
    yield built
    built.close()


def shared_root(cluster: Cluster) -> str:
    return cluster.config.roots[0].path


# -- one holder ----------------------------------------------------------------------------------


def test_only_the_holder_registers_and_the_standby_drops_changes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Two nodes see the same new model: the lease holder registers it once, the standby
    keeps nothing pending of it."""
    a, b = cluster.node("a"), cluster.node("b")
    root = shared_root(cluster)
    model(tmp_path / "shared" / "exp-1", 100)
    for node in (a, b):
        node.touch(root, tmp_path / "shared" / "exp-1" / "model.safetensors")
    assert len(b.loop.settler) == 0
    cluster.advance(3)
    assert a.registered() == [("exp-1", 1)]
    assert b.events == []
    assert b.loop.paused == {root: "waiting for the cluster lease"}
    stored = cluster.backend.load(root)[str(tmp_path / "shared" / "exp-1")]
    assert stored.history is not None
    assert stored.history.last_version == 1


def test_delivered_events_are_acknowledged_and_not_sent_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Once the holder delivered an event, the backend forgets it: a later holder sends
    nothing again."""
    a, b = cluster.node("a"), cluster.node("b")
    root = shared_root(cluster)
    model(tmp_path / "shared" / "exp-1", 100)
    a.touch(root, tmp_path / "shared" / "exp-1" / "model.safetensors")
    cluster.advance(3)
    assert len(a.deliver()) == 1
    cluster.advance(1.5)  # a sweep
    assert cluster.backend.stored_events(root) == set()
    a.alive = False
    cluster.advance(LEASE + 1)
    assert b.coordinator.holds(root)
    assert b.deliver() == []


# -- takeover ------------------------------------------------------------------------------------


def test_takeover_continues_versions_and_redelivers_what_the_holder_did_not(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The holder registers v1 and dies before delivering it; the next holder delivers that
    very event (same id) and numbers the model's next fingerprint 2, not 1."""
    a, b = cluster.node("a"), cluster.node("b")
    root, unit = shared_root(cluster), tmp_path / "shared" / "exp-1"
    model(unit, 100)
    a.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    (v1,) = a.events
    a.alive = False  # kill -9: no renewal, no delivery
    model(unit, 200)  # written while nobody holds the root; no node sees a change
    cluster.advance(LEASE + 0.5)
    assert b.coordinator.holds(root)
    cluster.advance(3)
    assert b.registered() == [("exp-1", 2)]
    sent = b.deliver()
    assert [e.id for e in sent] == [v1.id, b.events[0].id]
    assert sent[0] == v1  # byte for byte what a committed, host a included
    cluster.advance(1.5)
    assert cluster.backend.stored_events(root) == set()


def test_takeover_within_the_lease_and_a_poll(cluster: Cluster, tmp_path: Path) -> None:
    """A dead holder's root is taken over once its lease runs out, well before a second
    lease could pass."""
    a, b = cluster.node("a"), cluster.node("b")
    root = shared_root(cluster)
    a.alive = False
    waited = 0.0
    while not b.coordinator.holds(root) and waited < 3 * LEASE:
        cluster.advance(0.25)
        waited += 0.25
    assert waited <= LEASE + 1.0


def test_a_stale_copy_is_made_current_before_deciding(cluster: Cluster, tmp_path: Path) -> None:
    """A node that held the root long ago and comes back decides on what the backend says
    now, not on its old copy: no version is given twice."""
    a = cluster.node("a")
    root, unit = shared_root(cluster), tmp_path / "shared" / "exp-1"
    model(unit, 100)
    a.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    a.alive = False
    b = cluster.node("b")
    cluster.advance(LEASE + 0.5)
    model(unit, 200)
    b.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    assert b.registered() == [("exp-1", 2)]
    b.alive = False  # now a comes back with its copy that knows only v1
    a.alive = True
    a.coordinator = Coordinator(
        cluster.backend,
        [root],
        node="a",
        lease_seconds=LEASE,
        clock=cluster.clock,
        post=a.inbox.put,
    )
    a.ledger.leases = a.coordinator
    cluster.advance(LEASE + 0.5)
    model(unit, 300)
    a.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    assert a.registered() == [("exp-1", 1), ("exp-1", 3)]


def test_a_write_behind_the_holders_back_is_not_overwritten(
    cluster: Cluster, tmp_path: Path
) -> None:
    """When the backend changed since the holder last read it (another writer in a split
    brain), the compare-and-set fails, the holder reads again and decides on that."""
    a = cluster.node("a")
    root, unit = shared_root(cluster), tmp_path / "shared" / "exp-1"
    model(unit, 100)
    a.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    lease = a.coordinator.writable(root)
    assert lease is not None
    stored = cluster.backend.load(root)[str(unit)]
    assert stored.history is not None
    bumped = type(stored.history)(
        5, 0, True, stored.history.registered, stored.history.fingerprints
    )
    cluster.backend.commit(lease, Write(str(unit), stored.revision, bumped, stored.undelivered))
    model(unit, 200)
    a.touch(root, unit / "model.safetensors")
    cluster.advance(3)
    assert a.registered() == [("exp-1", 1), ("exp-1", 6)]


def test_history_known_only_locally_is_seeded_on_the_first_takeover(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Turning the cluster on where a node already registered models: its versions go to
    the backend, and the fleet continues from them."""
    unit = tmp_path / "shared" / "exp-1"
    before = cluster.node("a", shared=False)  # the same store, before the cluster was on
    root = shared_root(cluster)
    for size in (100, 200):
        model(unit, size)
        before.touch(root, unit / "model.safetensors")
        cluster.advance(3)
    assert before.registered() == [("exp-1", 1), ("exp-1", 2)]
    before.alive = False
    cluster.nodes.remove(before)
    before.store.close()
    a = cluster.node("a")
    b = cluster.node("b")
    cluster.advance(1)
    assert a.events == []  # the reconcile after the takeover finds nothing new
    stored = cluster.backend.load(root)[str(unit)]
    assert stored.history is not None
    assert stored.history.last_version == 2
    a.alive = False
    model(unit, 300)
    cluster.advance(LEASE + 4)
    assert b.registered() == [("exp-1", 3)]


# -- the backend fails -----------------------------------------------------------------------------


def test_backend_outage_pauses_shared_roots_loses_nothing_and_local_roots_go_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    """While the backend is down nothing of the shared root is registered (the holder stops
    before its lease can have run out) and the local root goes on; when it is back, the
    model written meanwhile is registered once."""
    a = cluster.node("a")
    root, local = shared_root(cluster), cluster.config.roots[1].path
    cluster.backend.down = True
    model(tmp_path / "shared" / "exp-1", 100)
    model(tmp_path / "local" / "exp-9", 100)
    a.touch(root, tmp_path / "shared" / "exp-1" / "model.safetensors")
    a.touch(local, tmp_path / "local" / "exp-9" / "model.safetensors")
    cluster.advance(3)
    assert a.registered() == [("exp-9", 1)]
    waiting = a.loop.snapshot.pending[Unit(root, "exp-1")]
    assert [r.code for r in waiting.findings] == ["cluster_paused"]
    cluster.advance(LEASE)
    assert not a.coordinator.holds(root)
    assert a.loop.paused[root].startswith("standby: the lease could not be renewed")
    cluster.backend.down = False
    cluster.advance(LEASE + 4)
    assert a.coordinator.holds(root)
    assert a.registered() == [("exp-9", 1), ("exp-1", 1)]


class Link:
    """One node's way to the backend; `cut` makes it fail as a partition would."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        if self.cut and name in ("acquire", "renew", "release", "holder", "load", "commit"):
            raise BackendUnavailable("memory: partitioned")
        return getattr(self.backend, name)


def test_partitioned_holder_stops_registering_before_another_node_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The holder is cut off from the backend, the standby is not: the holder stops
    registering (its fence) at least `margin` before the standby can take the root."""
    a = cluster.node("a")
    link = Link(cluster.backend)
    a.coordinator.backend = a.ledger.backend = link  # type: ignore[assignment]
    b = cluster.node("b")
    root = shared_root(cluster)
    link.cut = True
    fenced_at = taken_at = None
    while taken_at is None and cluster.clock.monotonic() < 1000 + 3 * LEASE:
        cluster.advance(0.25)
        now = cluster.clock.monotonic()
        if fenced_at is None and a.coordinator.writable(root) is None:
            fenced_at = now
        if b.coordinator.holds(root):
            taken_at = now
    assert fenced_at is not None
    assert taken_at is not None
    assert taken_at - fenced_at >= margin(LEASE) - 0.25
    model(tmp_path / "shared" / "exp-1", 100)
    a.touch(root, tmp_path / "shared" / "exp-1" / "model.safetensors")
    b.touch(root, tmp_path / "shared" / "exp-1" / "model.safetensors")
    cluster.advance(3)
    assert a.events == []
    assert b.registered() == [("exp-1", 1)]
