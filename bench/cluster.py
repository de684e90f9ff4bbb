"""10. Many nodes, one shared tree: `cluster_daemons` daemons on this machine share the big
tree through a real redis-server, then a real nats-server (JetStream), as a fleet of nodes
mounting the same storage would.

* **CPU per poll interval**: CPU time of every thread of every daemon (the scheduler's
  account, to the nanosecond) over `cluster_window_seconds` of steady state (every unit
  registered, nothing changing), per poll interval, against one daemon without a cluster
  polling the same tree in the same window (running beside the fleet, so the machine's load
  weighs on both alike). Target: <= 1.2x: the lease holder polls, the standbys do not scan.
* **Backend operations per second** at that steady state: Redis `total_commands_processed`,
  NATS `in_msgs` (every message clients sent: lease renewals and polls, JetStream API
  requests); divided by the daemons, it is the per-node cost that scales to a fleet.
* **Takeover**: `kill -9` of the holder, until the backend names another node holder (the
  bench asks every 20 ms). Target: <= lease_seconds + one poll interval. The note adds when
  a model written at the kill arrived from the new holder (its quiet period, the new
  holder's first reconcile of the root with an empty copy, and a poll included).

The tree's units are registered once (the big tree's store, copied to the first node, is
written to the backend when it takes the root); the other nodes start with empty stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from bench.bigtree import BigTree
from bench.daemons import DaemonProcess, Settings
from bench.plan import Plan
from bench.procfs import cpu_seconds_exact as cpu_seconds
from bench.report import Result
from bench.trees import write_tree
from modelwatch.cluster.connect import connect
from modelwatch.config import ClusterConfig

TARGET_CPU_RATIO = 1.2


@dataclass(frozen=True, slots=True)
class Server:
    kind: str
    url: str
    monitor: str  # NATS monitoring endpoint ("" for Redis)


def run(plan: Plan, tree: BigTree, base: str) -> list[Result]:
    work = os.path.join(base, "cluster")
    os.makedirs(work)
    results: list[Result] = []
    for kind in ("redis", "nats"):
        with _server(kind, os.path.join(work, f"{kind}-server")) as server:
            results += _fleet(plan, tree, os.path.join(work, kind), server)
    return results


# -- the fleet ----------------------------------------------------------------------------------


def _fleet(plan: Plan, tree: BigTree, work: str, server: Server) -> list[Result]:
    prefix = "bench" + uuid.uuid4().hex[:6]
    lease, poll = plan.cluster_lease_seconds, plan.poll_interval_seconds
    with contextlib.ExitStack() as stack:
        state = os.path.join(work, "state-alone")
        shutil.copytree(tree.state_dir, state)
        settings = Settings(tree.root, state, "polling", plan.settle_seconds, poll)
        alone = stack.enter_context(DaemonProcess(settings, os.path.join(work, "alone")))
        alone.wait_ready(timeout=300)
        daemons: list[DaemonProcess] = []
        for index in range(plan.cluster_daemons):
            state = os.path.join(work, f"state-{index}")
            if index == 0:  # the first holder writes the registered tree to the backend
                shutil.copytree(tree.state_dir, state)
            cluster = (
                f'backend = "{server.kind}"\nurl = "{server.url}"\nnode_id = "node-{index}"\n'
                f'lease_seconds = {lease}\nprefix = "{prefix}"\n'
            )
            settings = Settings(
                tree.root, state, "polling", plan.settle_seconds, poll, cluster=cluster
            )
            daemon = stack.enter_context(DaemonProcess(settings, os.path.join(work, f"n{index}")))
            if index == 0:
                daemon.wait_ready(timeout=300)  # the holder, before any standby starts
            daemons.append(daemon)
        for daemon in daemons[1:]:
            daemon.wait_ready(timeout=300)
        probe = connect(ClusterConfig(server.kind, url=server.url, prefix=prefix), {})
        stack.callback(probe.close)
        if probe.holder(tree.root) != "node-0":
            raise RuntimeError(f"node-0 should hold the tree, {probe.holder(tree.root)} does")
        time.sleep(poll)  # past the holder's first pass
        used, operations = _steady(plan, [*daemons, alone], server)
        takeover, resumed = _takeover(daemons, probe, tree, work)
    window = plan.cluster_window_seconds
    *used, alone_used = used
    per_poll = sum(used) / window * poll
    alone_per_poll = alone_used / window * poll
    n = plan.cluster_daemons
    standby = sum(used[1:]) / max(1, n - 1) / window * 100
    note = (
        f"{n} daemons, {tree.files} files, poll {poll:g} s, lease {lease:g} s, "
        f"{window:g} s window; baseline: one daemon without a cluster beside them; the holder "
        f"{used[0] / window * poll:.3f} s per poll, each standby {standby:.2f} % CPU"
    )
    rate = operations / window
    return [
        Result(
            f"10. cluster CPU per poll, {n} nodes, {server.kind}",
            per_poll,
            alone_per_poll,
            "s",
            f"<= {TARGET_CPU_RATIO:g}x",
            per_poll <= TARGET_CPU_RATIO * alone_per_poll,
            note,
        ),
        Result(
            f"10. {server.kind} operations at steady state",
            rate,
            rate / n,
            "op/s",
            "-",
            None,
            f"baseline column: per node ({n} nodes, {tree.units} units, lease {lease:g} s)",
        ),
        Result(
            f"10. takeover after kill -9, {server.kind}",
            takeover,
            lease + poll,
            "s",
            "<= lease + poll",
            takeover <= lease + poll,
            f"a model written at the kill arrived from the new holder after {resumed:.2f} s",
        ),
    ]


def _steady(plan: Plan, daemons: list[DaemonProcess], server: Server) -> tuple[list[float], float]:
    """(CPU seconds of each daemon, backend operations) over the window."""
    pids = [d.pid for d in daemons]
    ops_before = _operations(server)
    cpu_before = [cpu_seconds(pid) for pid in pids]
    time.sleep(plan.cluster_window_seconds)  # steady state is the thing measured
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, cpu_before, strict=True)]
    return used, _operations(server) - ops_before


def _takeover(
    daemons: list[DaemonProcess], probe: object, tree: BigTree, work: str
) -> tuple[float, float]:
    """Seconds from kill -9 of the holder until another node holds the tree, and until a
    model written at that moment arrives from it."""
    holder = daemons[0]
    canary = os.path.join(tree.root, "unit-canary")
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.time()
    holder.proc.wait()
    os.makedirs(canary)
    write_tree(canary, 1, 10)
    taken = None
    deadline = killed + 120
    while taken is None and time.time() < deadline:
        current = probe.holder(tree.root)  # type: ignore[attr-defined]
        if current not in (None, "node-0"):
            taken = time.time()
        else:
            time.sleep(0.02)
    if taken is None:
        raise TimeoutError("no node took the tree over")
    arrived = None
    while arrived is None and time.time() < deadline:
        for daemon in daemons[1:]:
            for arrival in daemon.tap.arrivals():
                if arrival.event["data"]["path"].startswith(canary):
                    arrived = arrival.at
        time.sleep(0.05)
    shutil.rmtree(canary, ignore_errors=True)
    return taken - killed, (arrived or float("nan")) - killed


# -- the backends -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _operations(server: Server) -> float:
    if server.kind == "redis":
        import redis

        client = redis.Redis.from_url(server.url)
        try:
            return float(client.info("stats")["total_commands_processed"])
        finally:
            client.close()
    with urllib.request.urlopen(f"{server.monitor}/varz", timeout=5) as reply:  # noqa: S310
        return float(json.load(reply)["in_msgs"])


@contextlib.contextmanager
def _server(kind: str, directory: str) -> Iterator[Server]:
    os.makedirs(directory)
    port = _free_port()
    if kind == "redis":
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", directory]
        server = Server(kind, f"redis://127.0.0.1:{port}/0", "")
    else:
        monitor = _free_port()
        nats = shutil.which("nats-server", path=os.environ.get("PATH", "") + ":/usr/sbin")
        argv = [nats or "nats-server", "-js", "-p", str(port), "-a", "127.0.0.1"]
        argv += ["-sd", os.path.join(directory, "js"), "-m", str(monitor)]
        server = Server(kind, f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{monitor}")
    with open(os.path.join(directory, "server.log"), "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.02)
    raise TimeoutError(f"{proc.args!r} did not listen on {port}")
