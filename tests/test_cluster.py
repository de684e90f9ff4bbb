"""Many nodes, one shared tree, with real daemons and a real redis-server / nats-server
(SPEC §12): one registrar per shared root, the same ids and versions in every sink, a
takeover after `kill -9`, a backend that stops and comes back, and a partitioned holder.

The daemons poll the shared directory (as on NFS, where inotify sees nothing another node
writes); each has its own state directory and jsonl sink, and logs JSON to a file whose
timestamps say when leases changed hands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelwatch.cluster.backend import Lease
from modelwatch.cluster.connect import connect
from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.scan_command import scan_once
from modelwatch.testing import MemorySink, sink_config
from tests.brokers import BrokerServer, free_port, nats_broker, redis_broker, running
from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, jsonl_records
from tests.proxy import Proxy
from tests.writers import write_safetensors

pytestmark = pytest.mark.slow

LEASE = 3.0
POLL = 1.0


@dataclass
class Node:
    """One daemon: its config, sink file and JSON log."""

    name: str
    proc: subprocess.Popen[str]
    config: Path
    events_path: Path
    log_path: Path
    health: str

    def events(self) -> list[dict[str, Any]]:
        return jsonl_records(self.events_path)

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def logged_at(self, event: str) -> list[float]:
        """Wall times (epoch seconds) of each `event` line in the log."""
        return [
            dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp()
            for r in self.logs()
            if r.get("event") == event
        ]

    def kill(self) -> float:
        """kill -9; returns when."""
        self.proc.kill()
        killed = time.time()
        self.proc.wait()
        return killed

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.health}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The shared directory every node mounts (here: the same local directory)."""
    path = tmp_path / "shared-models"
    path.mkdir()
    return path


@pytest.fixture
def fleet(tmp_path: Path, tree: Path) -> Iterator[Callable[..., Node]]:
    """Start daemons sharing `tree` through the backend at the URL given."""
    prefix = "t" + uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:

        def start(name: str, kind: str, url: str) -> Node:
            home = tmp_path / name
            home.mkdir()
            health = f"127.0.0.1:{free_port()}"
            config = home / "config.toml"
            config.write_text(
                f'[daemon]\nstate_dir = "{home / "state"}"\nhealth_listen = "{health}"\n'
                f"shutdown_timeout_seconds = 5\n"
                f'[cluster]\nbackend = "{kind}"\nurl = "{url}"\nnode_id = "{name}"\n'
                f'lease_seconds = {LEASE}\nprefix = "{prefix}"\n'
                f'[[roots]]\npath = "{tree}"\nunit_depth = 1\nsettle_seconds = 0.5\n'
                f'observer = "polling"\npoll_interval_seconds = {POLL}\nmax_wait_seconds = 600\n'
                f"shared = true\n"
                f'[[sinks]]\ntype = "jsonl"\npath = "{home / "events.jsonl"}"\n'
            )
            log = home / "daemon.log"
            log_file = stack.enter_context(log.open("w"))
            env = daemon_env(MODELWATCH_LOG_FORMAT="json")
            proc = stack.enter_context(daemon_process(config, env=env, stderr=log_file.fileno()))
            node = Node(name, proc, config, home / "events.jsonl", log, health)
            wait_until(lambda: node.logged_at("ready"), timeout=30)
            return node

        yield start


@pytest.fixture(params=["redis", "nats"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerServer]:
    """A persistent backend (Redis with its append-only file, JetStream on disk)."""
    home = tmp_path / "backend"
    home.mkdir()
    if request.param == "redis":
        server = redis_broker(home, "--appendonly", "yes", "--appendfsync", "always")
    else:
        server = nats_broker(home)
    with running(server):
        yield server


def kind_of(server: BrokerServer) -> str:
    return server.url.split(":", 1)[0]


def model(unit: Path, size: int) -> int:
    """Write a model; returns its file size (how its fingerprint is recognised)."""
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})
    return (unit / "model.safetensors").stat().st_size


def registered(nodes: list[Node]) -> list[dict[str, Any]]:
    return [e for node in nodes for e in node.events() if e["type"].endswith(".registered")]


def has_final(nodes: list[Node], expected: dict[str, int]) -> bool:
    """Every unit's last write is registered in some sink."""
    seen = {(e["data"]["path"], e["data"]["files"][0]["size"]) for e in registered(nodes)}
    return all((unit, size) in seen for unit, size in expected.items())


def check_consistent(nodes: list[Node]) -> dict[str, list[int]]:
    """One id and one version per (unit, fingerprint) across every sink, and per unit the
    versions 1..k without gaps, each for one fingerprint. Returns the versions per unit."""
    per_key: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    per_version: dict[tuple[str, int], set[str]] = defaultdict(set)
    for event in registered(nodes):
        data = event["data"]
        per_key[data["path"], data["fingerprint"]].add((event["id"], data["version"]))
        per_version[data["path"], data["version"]].add(data["fingerprint"])
    assert all(len(ids) == 1 for ids in per_key.values()), per_key
    assert all(len(fps) == 1 for fps in per_version.values()), per_version
    versions: dict[str, list[int]] = defaultdict(list)
    for unit, version in sorted(per_version):
        versions[unit].append(version)
    for unit, numbers in versions.items():
        assert numbers == list(range(1, len(numbers) + 1)), (unit, numbers)
    return versions


def holder_of(nodes: list[Node]) -> Node:
    """The node that logged taking the lease last."""
    return max(nodes, key=lambda n: max(n.logged_at("lease_acquired"), default=0.0))


# -- three daemons, kill -9 ------------------------------------------------------------------------


def test_three_daemons_one_registrar_and_a_takeover_after_kill_9(
    fleet: Callable[..., Node], backend: BrokerServer, tree: Path
) -> None:
    """Three nodes on one tree: only the lease holder registers, every sink agrees on ids and
    versions; after `kill -9` of the holder mid-stream another node takes over within
    lease_seconds + one poll interval, versions continue and nothing is lost."""
    kind = kind_of(backend)
    a = fleet("a", kind, backend.url)
    b, c = fleet("b", kind, backend.url), fleet("c", kind, backend.url)
    nodes = [a, b, c]
    assert a.logged_at("lease_acquired") and not b.logged_at("lease_acquired")
    expected = {str(tree / f"exp-{i}"): model(tree / f"exp-{i}", 100 + i) for i in range(8)}
    wait_until(lambda: has_final([a], expected), timeout=30)
    assert b.events() == [] and c.events() == []
    killed = 0.0
    for i in range(8):  # new versions, with the holder killed in the middle of the stream
        expected[str(tree / f"exp-{i}")] = model(tree / f"exp-{i}", 300 + i)
        if i == 3:
            killed = a.kill()
        time.sleep(0.2)
    wait_until(lambda: has_final(nodes, expected), timeout=40)
    successor = holder_of([b, c])
    takeover = min(successor.logged_at("lease_acquired")) - killed
    assert takeover <= LEASE + POLL, takeover
    versions = check_consistent(nodes)
    assert all(numbers[-1] >= 2 for numbers in versions.values())  # continued, not from 1
    standby = c if successor is b else b
    assert standby.events() == []
    hosts = {e["data"]["host"] for e in successor.events()}
    assert hosts <= {"a", successor.name}


# -- the backend stops and comes back --------------------------------------------------------------


def test_backend_stopped_and_restarted_pauses_and_loses_nothing(
    fleet: Callable[..., Node], backend: BrokerServer, tree: Path
) -> None:
    """While the backend is down shared roots pause (warned, /healthz stays 200, status and
    metrics say so); when it is back every model written meanwhile is registered, with no
    version given twice."""
    kind = kind_of(backend)
    nodes = [fleet(name, kind, backend.url) for name in ("a", "b", "c")]
    a = nodes[0]
    expected = {str(tree / f"exp-{i}"): model(tree / f"exp-{i}", 100 + i) for i in range(3)}
    wait_until(lambda: has_final(nodes, expected), timeout=30)
    backend.stop()
    try:
        for i in range(2, 5):
            expected[str(tree / f"exp-{i}")] = model(tree / f"exp-{i}", 500 + i)
        wait_until(lambda: a.logged_at("lease_lost"), timeout=LEASE + 5)
        assert a.get("/healthz")[0] == 200
        metrics = a.get("/metrics")[1]
        assert f'modelwatch_cluster_lease_held{{root="{tree}"}} 0.0' in metrics
        assert "modelwatch_cluster_backend_errors_total 0.0" not in metrics
        status = subprocess.run(
            [*CLI, "status", "--config", str(a.config), "--format", "json"],
            capture_output=True,
            text=True,
            env=daemon_env(),
            timeout=30,
            check=True,
        )
        report = json.loads(status.stdout)["cluster"]
        assert report["roots"][0]["role"] == "unknown"
        assert report["error"]
        assert not has_final(nodes, expected)
    finally:
        backend.start()
    wait_until(lambda: has_final(nodes, expected), timeout=40)
    check_consistent(nodes)


# -- a partition -----------------------------------------------------------------------------------


def test_partitioned_holder_stops_registering_before_the_new_holder_starts(
    fleet: Callable[..., Node], backend: BrokerServer, tree: Path
) -> None:
    """The holder's connection to the backend is cut (packets dropped, not refused): it
    stops registering before another node takes the root, and what is written meanwhile is
    registered by the new holder alone."""
    kind = kind_of(backend)
    with Proxy(backend.port) as proxy:
        a = fleet("a", kind, f"{kind}://127.0.0.1:{proxy.port}")
        b = fleet("b", kind, backend.url)
        expected = {str(tree / "exp-0"): model(tree / "exp-0", 100)}
        wait_until(lambda: has_final([a], expected), timeout=30)
        proxy.block()
        wait_until(lambda: b.logged_at("lease_acquired"), timeout=LEASE + 10)
        stopped, started = min(a.logged_at("lease_lost")), min(b.logged_at("lease_acquired"))
        assert stopped < started
        expected[str(tree / "exp-1")] = model(tree / "exp-1", 200)
        wait_until(lambda: has_final([b], expected), timeout=30)
        proxy.unblock()
        wait_until(lambda: len(a.logged_at("lease_lost")) >= 1, timeout=10)
        expected[str(tree / "exp-2")] = model(tree / "exp-2", 300)
        wait_until(lambda: has_final([b], expected), timeout=30)
    assert [e["data"]["name"] for e in a.events()] == ["exp-0"]
    check_consistent([a, b])


# -- modelwatch scan -------------------------------------------------------------------------------


def test_scan_registers_shared_roots_it_can_hold_and_leaves_the_others(
    backend: BrokerServer, tree: Path, make_config: Callable[..., Config]
) -> None:
    """`modelwatch scan` registers a shared root with the shared versions when it can take
    its lease (and gives it back), skips one another node holds, and `--dry-run` writes
    nothing to the backend."""
    kind = kind_of(backend)
    config = make_config(
        f'[cluster]\nbackend = "{kind}"\nurl = "{backend.url}"\nnode_id = "scanner"\n'
        f'lease_seconds = {LEASE}\nprefix = "s{uuid.uuid4().hex[:8]}"\n'
        f'[[roots]]\npath = "{tree}"\nunit_depth = 1\nsettle_seconds = 0.2\nshared = true\n'
    )
    other = connect(config.cluster, {})
    try:
        lease = other.acquire(str(tree), "daemon-x", LEASE)
        assert isinstance(lease, Lease)
        model(tree / "exp-1", 100)
        sink = MemorySink(sink_config("stdout", "stdout"))
        assert scan_once(config, dry_run=False, sinks=[sink])
        assert sink.events == []  # daemon-x holds it: its job
        other.release(lease)
        assert scan_once(config, dry_run=False, sinks=[sink])
        assert [(e.data["name"], e.data["version"], e.data["host"]) for e in sink.events] == [
            ("exp-1", 1, "scanner")
        ]
        assert other.holder(str(tree)) is None  # given back
        stored = other.load(str(tree))[str(tree / "exp-1")]
        assert stored.history is not None
        assert stored.undelivered == ()  # delivered, so acknowledged
        model(tree / "exp-1", 200)
        printed: list[Event] = []
        assert scan_once(config, dry_run=True, print_event=printed.append)
        assert [e.data["version"] for e in printed] == [2]
        assert other.load(str(tree))[str(tree / "exp-1")] == stored
    finally:
        other.close()
