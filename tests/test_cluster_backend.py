"""The cluster backend contract, against a real redis-server and nats-server (and the
in-process `MemoryBackend` the loop tests use): leases, compare-and-set histories, the
bodies of undelivered events, and what an unreachable backend looks like (SPEC §12)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelwatch.cluster.backend import (
    Backend,
    BackendUnavailable,
    Busy,
    ClusterError,
    Conflict,
    Lease,
    LeaseLost,
    Write,
)
from modelwatch.cluster.codec import decode_event, decode_history, encode_event
from modelwatch.cluster.connect import connect
from modelwatch.cluster.memory import MemoryBackend
from modelwatch.config import ClusterConfig
from modelwatch.state import Fingerprinted, KnownFingerprint, Registered, UnitHistory
from modelwatch.testing import sample_event
from tests.brokers import BrokerServer, free_port, nats_broker, redis_broker, running
from tests.conftest import wait_until

LEASE = 3.0
ROOT = "/storage/models"


def history(version: int, fp: str = "sha256:aa") -> UnitHistory:
    seen = KnownFingerprint("registered", version, 0, f"id-{version}")
    known = {fp: Fingerprinted(seen, 1_800_000_000.25, ({"code": "x", "line": None},))}
    return UnitHistory(version, 0, True, Registered(fp, version, "onnx", "ONNX"), known)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BrokerServer]]:
    """One redis-server and one nats-server (JetStream) for the module."""
    directory = tmp_path_factory.mktemp("brokers")
    (directory / "r").mkdir()
    (directory / "n").mkdir()
    with running(redis_broker(directory / "r")) as r, running(nats_broker(directory / "n")) as n:
        yield {"redis": r, "nats": n}


class Fleet:
    """Backends of one kind as separate nodes would open them, all closed at the end."""

    def __init__(self, kind: str, url: str, prefix: str) -> None:
        self.kind = kind
        self.url = url
        self.prefix = prefix
        self.opened: list[Backend] = []
        self.memory = MemoryBackend(_RealClock())

    def node(self) -> Backend:
        if self.kind == "memory":
            return self.memory
        config = ClusterConfig(self.kind, url=self.url, prefix=self.prefix, lease_seconds=LEASE)
        backend = connect(config, {})
        self.opened.append(backend)
        return backend


class _RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


@pytest.fixture(params=["memory", "redis", "nats"])
def fleet(request: pytest.FixtureRequest, servers: dict[str, BrokerServer]) -> Iterator[Fleet]:
    """Nodes of one backend kind, under a prefix of their own."""
    kind = request.param
    url = servers[kind].url if kind in servers else ""
    fleet = Fleet(kind, url, "t" + uuid.uuid4().hex[:10])
    yield fleet
    for backend in fleet.opened:
        backend.close()


def take(backend: Backend, node: str, root: str = ROOT) -> Lease:
    result = backend.acquire(root, node, LEASE)
    assert isinstance(result, Lease), result
    return result


# -- leases ----------------------------------------------------------------------------------


def test_one_node_holds_a_lease_and_the_other_sees_who(fleet: Fleet) -> None:
    """While node a holds a root's lease, node b cannot take it and is told a holds it."""
    a, b = fleet.node(), fleet.node()
    take(a, "node-a")
    busy = b.acquire(ROOT, "node-b", LEASE)
    assert isinstance(busy, Busy)
    assert busy.holder == "node-a"
    assert busy.remaining is None or 0 < busy.remaining <= LEASE + 0.5
    assert b.holder(ROOT) == "node-a"


def test_roots_have_separate_leases(fleet: Fleet) -> None:
    """Holding one root says nothing about another: each shared root has its own lease."""
    a, b = fleet.node(), fleet.node()
    take(a, "node-a", "/storage/models")
    take(b, "node-b", "/shared/models")
    assert a.holder("/shared/models") == "node-b"


def test_released_lease_is_taken_at_once(fleet: Fleet) -> None:
    """A clean stop gives the lease up: another node takes it without waiting it out."""
    a, b = fleet.node(), fleet.node()
    a.release(take(a, "node-a"))
    take(b, "node-b")
    assert a.holder(ROOT) == "node-b"


def test_renewed_lease_outlives_its_length_and_a_dead_one_expires(fleet: Fleet) -> None:
    """A holder that renews keeps the lease past its length; once it stops renewing, the
    lease runs out and another node takes it."""
    a, b = fleet.node(), fleet.node()
    lease = take(a, "node-a")
    started = time.monotonic()
    while time.monotonic() - started < LEASE * 1.5:
        lease = a.renew(lease)
        assert isinstance(b.acquire(ROOT, "node-b", LEASE), Busy)
        time.sleep(LEASE / 3)
    stopped = time.monotonic()
    wait_until(lambda: isinstance(b.acquire(ROOT, "node-b", LEASE), Lease), timeout=LEASE + 3)
    assert time.monotonic() - stopped >= LEASE - LEASE / 3 - 0.2
    with pytest.raises(LeaseLost):
        a.renew(lease)


def test_release_of_a_lease_taken_over_leaves_the_new_holder_alone(fleet: Fleet) -> None:
    """An old holder that gives up a lease it lost does not end the new holder's."""
    a, b = fleet.node(), fleet.node()
    old = take(a, "node-a")
    a.release(old)
    take(b, "node-b")
    a.release(old)
    assert b.holder(ROOT) == "node-b"


# -- histories and events ------------------------------------------------------------------------


def test_histories_are_compare_and_set(fleet: Fleet) -> None:
    """A write expecting an old revision is refused with what is stored now; one expecting
    the current revision goes through, and every node loads the same."""
    a, b = fleet.node(), fleet.node()
    lease = take(a, "node-a")
    unit = f"{ROOT}/exp-1"
    first = a.commit(lease, Write(unit, 0, history(1), ()))
    second = a.commit(lease, Write(unit, first, history(2, "sha256:bb"), ()))
    with pytest.raises(Conflict) as conflict:
        a.commit(lease, Write(unit, first, history(2, "sha256:cc"), ()))
    assert conflict.value.current is not None
    assert conflict.value.current.revision == second
    assert conflict.value.current.history == history(2, "sha256:bb")
    with pytest.raises(Conflict):
        a.commit(lease, Write(unit, 0, history(1), ()))  # "create" of a unit that exists
    loaded = b.load(ROOT)
    assert set(loaded) == {unit}
    assert loaded[unit].history == history(2, "sha256:bb")
    assert loaded[unit].revision == second
    assert b.load("/elsewhere") == {}


def test_undelivered_events_are_stored_until_forgotten(fleet: Fleet) -> None:
    """An event committed with a history is readable by the next holder, byte for byte,
    until a later write forgets it."""
    a, b = fleet.node(), fleet.node()
    lease = take(a, "node-a")
    event = sample_event("exp-1", 1, root=ROOT)
    unit = event.unit_path
    revision = a.commit(
        lease, Write(unit, 0, history(1), (event.id,), (event.id, encode_event(event)))
    )
    stored = b.load(ROOT)[unit]
    assert stored.undelivered == (event.id,)
    bodies = b.events(ROOT, [event.id, "nothing-like-it"])
    assert decode_event(bodies[event.id], "test") == event
    a.commit(lease, Write(unit, revision, history(1), (), None, (event.id,)))
    assert b.events(ROOT, [event.id]) == {}
    assert b.load(ROOT)[unit].undelivered == ()


def test_an_event_body_larger_than_a_message_is_stored_whole(fleet: Fleet) -> None:
    """A body of 3 MB that does not compress (a model of many files, described) is kept and
    read back byte for byte, and forgotten whole (NATS caps one message at 1 MB)."""
    a, b = fleet.node(), fleet.node()
    lease = take(a, "node-a")
    unit, body = f"{ROOT}/exp-big", os.urandom(3 * 1024 * 1024)
    revision = a.commit(lease, Write(unit, 0, history(1), ("big",), ("big", body)))
    assert b.events(ROOT, ["big"]) == {"big": body}
    a.commit(lease, Write(unit, revision, history(1), (), None, ("big",)))
    assert b.events(ROOT, ["big"]) == {}


def test_a_node_without_the_lease_cannot_commit(fleet: Fleet) -> None:
    """A write under a lease that was taken over is refused (Redis and memory check the
    lease in the same step; NATS relies on fencing by expiry, see the README)."""
    if fleet.kind == "nats":
        pytest.skip("JetStream KV has no multi-key check; fencing is by lease expiry")
    a, b = fleet.node(), fleet.node()
    old = take(a, "node-a")
    a.release(old)
    take(b, "node-b")
    with pytest.raises(LeaseLost):
        a.commit(old, Write(f"{ROOT}/exp-1", 0, history(1), ()))
    assert b.load(ROOT) == {}


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_nothing_listening_is_backend_unavailable_in_time(kind: str) -> None:
    """A backend nobody answers for is BackendUnavailable, quickly, naming where it is."""
    url = f"{kind}://127.0.0.1:{free_port()}"
    backend = connect(ClusterConfig(kind, url=url, lease_seconds=LEASE), {})
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1"):
            backend.acquire(ROOT, "node-a", LEASE)
    finally:
        backend.close()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_a_silent_peer_times_out(kind: str) -> None:
    """A peer that accepts connections and never answers fails within the operation timeout
    (a partition, as the holder sees it)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"{kind}://127.0.0.1:{silent.getsockname()[1]}"
        backend = connect(ClusterConfig(kind, url=url, lease_seconds=LEASE), {})
        started = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable):
                backend.holder(ROOT)
        finally:
            backend.close()
    assert time.monotonic() - started < 5


def test_credentials_from_the_environment_never_show(tmp_path: Path) -> None:
    """A URL with a password (from url_env) works and its password is in no message."""
    directory = tmp_path / "auth"
    directory.mkdir()
    with running(redis_broker(directory, "--requirepass", "s3cr3t-pw")) as server:
        good = f"redis://:s3cr3t-pw@127.0.0.1:{server.port}/0"
        config = ClusterConfig("redis", url_env="MW_URL", lease_seconds=LEASE)
        backend = connect(config, {"MW_URL": good})
        try:
            take(backend, "node-a")
            assert "s3cr3t" not in backend.shown
        finally:
            backend.close()
        wrong = connect(config, {"MW_URL": good.replace("s3cr3t-pw", "wrong-pw-1")})
        try:
            with pytest.raises(ClusterError) as failure:
                wrong.holder(ROOT)
        finally:
            wrong.close()
    assert "wrong-pw-1" not in str(failure.value)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"{not json", "not a modelwatch unit history"),
        (b'{"format": 99, "unit": "/x", "undelivered": []}', "format 99"),
        (b'{"format": 1, "unit": 7, "undelivered": []}', "expected a string"),
        (b'{"format": 1, "unit": "/x", "undelivered": [], "last_version": "3"}', "history"),
        (
            b'{"format": 1, "unit": "/x", "undelivered": [], "last_version": 3, "removals": 0,'
            b' "present": true, "registered": null, "fingerprints": {"sha256:a": [1, 2]}}',
            "history",
        ),
    ],
)
def test_a_damaged_history_is_a_precise_error(data: bytes, problem: str) -> None:
    """What comes back from the backend is checked: garbage is a ClusterError naming the
    record, never a crash."""
    with pytest.raises(ClusterError, match=problem) as failure:
        decode_history(data, 1, "units[/x]")
    assert "units[/x]" in str(failure.value)


def test_a_damaged_event_body_is_a_precise_error() -> None:
    """An event body that does not inflate to an event is a ClusterError, not a crash."""
    for data in (b"garbage", encode_event(sample_event())[:-4]):
        with pytest.raises(ClusterError, match="not a stored event"):
            decode_event(data, "event e1")
