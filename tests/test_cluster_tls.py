"""The `[cluster]` backend over TLS with a private CA (SPEC §5b, §12): a real redis-server
(`--tls-port`, `--tls-auth-clients yes`) and nats-server (TLS, `verify: true`) on 127.0.0.1.
With the right files the backend holds leases and keeps event bodies, and a daemon
registers through it; without them it is refused with a message naming the key to set."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.cluster.backend import Backend, BackendUnavailable, Busy, Lease, Write
from modelwatch.cluster.connect import connect
from modelwatch.config import ClusterConfig
from tests.brokers import running, tls_nats_broker, tls_redis_broker
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, jsonl_records
from tests.pki import Pair, Pki
from tests.writers import write_safetensors

LEASE = 3.0
ROOT = "/shared/models"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(pki: Pki) -> Pair:
    return pki.client("modelwatch")


@pytest.fixture(scope="module")
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The TLS-only servers of the module, by URL kind: `rediss`, `tls` and `nats` (the
    same nats-server named by a nats:// URL: it requires TLS, so the client upgrades)."""
    redis_dir, nats_dir = tmp_path_factory.mktemp("redis"), tmp_path_factory.mktemp("nats")
    with (
        running(tls_redis_broker(redis_dir, pki)) as redis_server,
        running(tls_nats_broker(nats_dir, pki)) as nats_server,
    ):
        yield {
            "rediss": f"{redis_server.url}/0",
            "tls": nats_server.url,
            "nats": nats_server.url.replace("tls://", "nats://"),
        }


def tls_files(pki: Pki, client: Pair) -> dict[str, str]:
    """The right files: the private CA and a client certificate it signed."""
    return {
        "ca_file": str(pki.ca.cert),
        "client_cert_file": str(client.cert),
        "client_key_file": str(client.key),
    }


@pytest.fixture
def node(servers: dict[str, str]) -> Iterator[Callable[..., Backend]]:
    """`node(kind, **tls)`: a backend as one node builds it from `[cluster]`, closed at the
    end; every node of a test shares a prefix of its own."""
    prefix, opened = "t" + uuid.uuid4().hex[:10], []

    def build(kind: str, **tls: Any) -> Backend:
        backend_kind = "redis" if kind == "rediss" else "nats"
        config = ClusterConfig(
            backend_kind, url=servers[kind], lease_seconds=LEASE, prefix=prefix, **tls
        )
        opened.append(connect(config, {}))
        return opened[-1]

    yield build
    for backend in opened:
        backend.close()


KINDS = ["rediss", "tls", "nats"]


@pytest.mark.parametrize("kind", KINDS)
def test_backend_over_mutual_tls_works_with_the_right_files(
    node: Callable[..., Backend], pki: Pki, client: Pair, kind: str
) -> None:
    """With ca_file and the client certificate, one node takes the lease and commits an
    event, and another node sees the holder and reads the event's body (rediss://, tls://,
    and nats:// to a server that requires TLS)."""
    a, b = node(kind, **tls_files(pki, client)), node(kind, **tls_files(pki, client))
    lease = a.acquire(ROOT, "node-a", LEASE)
    assert isinstance(lease, Lease)
    busy = b.acquire(ROOT, "node-b", LEASE)
    assert isinstance(busy, Busy) and busy.holder == "node-a"
    a.commit(lease, Write(f"{ROOT}/bert", 0, None, ("id-1",), event=("id-1", b"body")))
    assert b.events(ROOT, ["id-1"]) == {"id-1": b"body"}


@pytest.mark.parametrize("kind", KINDS)
def test_backend_without_ca_file_is_refused_naming_the_key(
    node: Callable[..., Backend], client: Pair, kind: str
) -> None:
    """Without ca_file the server's certificate is not trusted: the backend fails, saying
    what it trusted and that ca_file is the key to set."""
    backend = node(kind, client_cert_file=str(client.cert), client_key_file=str(client.key))
    with pytest.raises(BackendUnavailable) as caught:
        backend.acquire(ROOT, "node-a", LEASE)
    message = str(caught.value)
    assert "the server's certificate is not trusted" in message
    assert "(trusting the system's CA store, for the name 127.0.0.1); set ca_file" in message


@pytest.mark.parametrize("kind", KINDS)
def test_backend_without_a_client_certificate_is_refused(
    node: Callable[..., Backend], pki: Pki, kind: str
) -> None:
    """A server requiring client certificates refuses a node without one (the server may
    close the connection before its alert can be read, so the message is not asserted)."""
    backend = node(kind, ca_file=str(pki.ca.cert))
    with pytest.raises(BackendUnavailable):
        backend.acquire(ROOT, "node-a", LEASE)


@pytest.mark.parametrize("kind", ["rediss", "tls"])
def test_server_name_is_the_name_verified(
    node: Callable[..., Backend], pki: Pki, client: Pair, kind: str
) -> None:
    """server_name replaces the URL's host as the verified name: one the certificate lacks
    is refused, naming it and the key."""
    backend = node(kind, **tls_files(pki, client), server_name="elsewhere.example")
    with pytest.raises(BackendUnavailable) as caught:
        backend.acquire(ROOT, "node-a", LEASE)
    assert "for the name elsewhere.example); set server_name" in str(caught.value)


# -- a daemon ------------------------------------------------------------------------------------


def daemon_home(home: Path, tree: Path, kind: str, url: str, tls: dict[str, str]) -> Path:
    """A daemon's directory and config (`config.toml`), sharing `tree` through the backend at
    `url` with the TLS keys `tls`; its sink writes `events.jsonl`."""
    home.mkdir()
    keys = "".join(f'{name} = "{value}"\n' for name, value in tls.items())
    config = home / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{home / "state"}"\nshutdown_timeout_seconds = 5\n'
        f'[cluster]\nbackend = "{kind}"\nurl = "{url}"\nnode_id = "{home.name}"\n'
        f'lease_seconds = {LEASE}\nprefix = "{tree.name}"\n{keys}'
        f'[[roots]]\npath = "{tree}"\nunit_depth = 1\nsettle_seconds = 0.3\nshared = true\n'
        f'observer = "polling"\npoll_interval_seconds = 0.5\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{home / "events.jsonl"}"\n'
    )
    return home


def logged(home: Path, event: str) -> list[dict[str, Any]]:
    """The `event` lines of the daemon's JSON log so far (complete lines only)."""
    path = home / "daemon.log"
    lines = path.read_text(errors="replace").split("\n")[:-1] if path.exists() else []
    return [r for r in (json.loads(x) for x in lines if x.startswith("{")) if r["event"] == event]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rediss", "tls"])
def test_a_cluster_daemon_registers_over_tls_and_one_without_ca_file_pauses_naming_it(
    servers: dict[str, str], pki: Pki, client: Pair, tmp_path: Path, kind: str
) -> None:
    """Two daemons share a tree through the TLS backend: the one with the right files holds
    the root and registers the model; the one without ca_file starts, registers nothing and
    logs cluster_backend_failed saying to set ca_file."""
    tree = tmp_path / f"m{uuid.uuid4().hex[:8]}"
    tree.mkdir()
    backend = "redis" if kind == "rediss" else "nats"
    right = tls_files(pki, client)
    no_ca = {k: v for k, v in right.items() if k != "ca_file"}
    good = daemon_home(tmp_path / "good", tree, backend, servers[kind], right)
    bad = daemon_home(tmp_path / "bad", tree, backend, servers[kind], no_ca)
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with contextlib.ExitStack() as stack:
        procs = []
        for home in (good, bad):
            log = stack.enter_context((home / "daemon.log").open("w"))
            config = home / "config.toml"
            procs.append(stack.enter_context(daemon_process(config, env=env, stderr=log.fileno())))
        wait_until(lambda: logged(good, "lease_acquired"), timeout=30)
        wait_until(lambda: logged(bad, "cluster_backend_failed"), timeout=30)
        (tree / "bert").mkdir()
        write_safetensors(tree / "bert" / "model.safetensors", {"w": 64})
        wait_until(lambda: jsonl_records(good / "events.jsonl"), timeout=30)
        assert [proc.poll() for proc in procs] == [None, None]  # both running
    [event] = jsonl_records(good / "events.jsonl")
    assert (event["data"]["name"], event["data"]["version"], event["data"]["host"]) == (
        "bert",
        1,
        "good",
    )
    assert jsonl_records(bad / "events.jsonl") == []
    [failed] = logged(bad, "cluster_backend_failed")
    assert "the server's certificate is not trusted" in failed["error"]
    assert "set ca_file to the CA that signed it" in failed["error"]
    assert "PRIVATE KEY" not in (bad / "daemon.log").read_text()
