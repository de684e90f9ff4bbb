"""The health server over real HTTP: liveness, readiness, metrics, shutdown."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from modelwatch.errors import ModelwatchError
from modelwatch.health import TEXT, HealthServer
from modelwatch.metrics import Metrics

FAST = 0.02  # the serving loop's poll interval: stop() returns quickly

# Never send test requests to a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request; every response is closed."""
    try:
        req = urllib.request.Request(url, method=method)  # noqa: S310 - http URLs we build
        with _OPENER.open(req, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


class Parts:
    """What the daemon would report as dead or stale; tests change it."""

    def __init__(self) -> None:
        self.failing: list[str] = []

    def __call__(self) -> list[str]:
        return list(self.failing)


@pytest.fixture
def parts() -> Parts:
    """A liveness callback that starts out healthy."""
    return Parts()


@pytest.fixture
def ready() -> threading.Event:
    """The daemon's readiness flag, initially unset."""
    return threading.Event()


@pytest.fixture
def metrics() -> Metrics:
    """Metrics for two configured sinks, with a fixed outbox report."""
    return Metrics(sinks=["webhook", "jsonl"], outbox=lambda: [("webhook", 4, 1), ("jsonl", 0, 0)])


@pytest.fixture
def make_server(
    parts: Parts, ready: threading.Event, metrics: Metrics
) -> Iterator[Callable[[str], HealthServer]]:
    """Build (unstarted) servers wired to the fixtures; every one is stopped after the test."""
    built: list[HealthServer] = []

    def build(listen: str = "127.0.0.1:0") -> HealthServer:
        server = HealthServer(listen, alive=parts, ready=ready, metrics=metrics, poll_interval=FAST)
        built.append(server)
        return server

    yield build
    for server in built:
        server.stop()


@pytest.fixture
def server(make_server: Callable[[str], HealthServer]) -> HealthServer:
    """A started server on a free loopback port."""
    started = make_server("127.0.0.1:0")
    started.start()
    return started


def url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_healthz_follows_alive(server: HealthServer, parts: Parts) -> None:
    """/healthz is 200 ok while nothing fails, 503 naming each failing part otherwise."""
    assert request(url(server, "/healthz")) == (200, "text/plain; charset=utf-8", b"ok\n")
    parts.failing = ["deliver-webhook", "watch /data/models"]
    status, _, body = request(url(server, "/healthz"))
    assert (status, body) == (503, b"deliver-webhook\nwatch /data/models\n")


def test_healthz_keeps_names_on_one_line(server: HealthServer, parts: Parts) -> None:
    """A part name with a newline cannot add lines to the response."""
    parts.failing = ["watch /data/evil\nok"]
    assert request(url(server, "/healthz"))[2] == b"watch /data/evil\\x0aok\n"


def test_readyz_turns_200_once_ready(server: HealthServer, ready: threading.Event) -> None:
    """/readyz is 503 until the initial reconcile is done, then 200."""
    assert request(url(server, "/readyz"))[0] == 503
    ready.set()
    assert request(url(server, "/readyz"))[0] == 200


def test_metrics_exposes_what_happened(server: HealthServer, metrics: Metrics) -> None:
    """/metrics serves the Prometheus text format with the recorded samples and labels."""
    metrics.event("registered")
    metrics.event("io.modelwatch.model.registered")
    metrics.event("rejected")
    metrics.delivery("webhook", "delivered")
    metrics.delivery("webhook", "failed")
    metrics.delivery("jsonl", "dead")
    metrics.settled(3.0)
    metrics.settled(90.0)
    metrics.roots({"inotify": 2, "polling": 1})
    metrics.reconcile("startup")
    status, content_type, body = request(url(server, "/metrics"))
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    expected = {
        ("modelwatch_events_total", (("type", "registered"),)): 2,
        ("modelwatch_events_total", (("type", "rejected"),)): 1,
        ("modelwatch_events_total", (("type", "removed"),)): 0,
        ("modelwatch_deliveries_total", (("outcome", "delivered"), ("sink", "webhook"))): 1,
        ("modelwatch_deliveries_total", (("outcome", "failed"), ("sink", "webhook"))): 1,
        ("modelwatch_deliveries_total", (("outcome", "dead"), ("sink", "jsonl"))): 1,
        ("modelwatch_deliveries_total", (("outcome", "delivered"), ("sink", "jsonl"))): 0,
        ("modelwatch_outbox_pending", (("sink", "webhook"),)): 4,
        ("modelwatch_dead_letters", (("sink", "webhook"),)): 1,
        ("modelwatch_outbox_pending", (("sink", "jsonl"),)): 0,
        ("modelwatch_settle_seconds_count", ()): 2,
        ("modelwatch_settle_seconds_sum", ()): 93.0,
        ("modelwatch_settle_seconds_bucket", (("le", "5.0"),)): 1,
        ("modelwatch_settle_seconds_bucket", (("le", "7200.0"),)): 2,
        ("modelwatch_roots", (("observer", "inotify"),)): 2,
        ("modelwatch_roots", (("observer", "polling"),)): 1,
        ("modelwatch_roots", (("observer", "missing"),)): 0,
        ("modelwatch_reconciles_total", (("reason", "startup"),)): 1,
        ("modelwatch_reconciles_total", (("reason", "overflow"),)): 0,
        ("modelwatch_info", (("version", "0.1.0"),)): 1,
    }
    assert {key: samples.get(key) for key in expected} == expected


def test_metric_labels_refuse_unbounded_values() -> None:
    """Unknown label values (a path, a typo) are refused instead of creating new series."""
    metrics = Metrics()
    for call in (
        lambda: metrics.event("/data/models/resnet"),
        lambda: metrics.delivery("webhook", "maybe"),
        lambda: metrics.roots({"/data": 1}),
        lambda: metrics.reconcile("because"),
    ):
        with pytest.raises(ValueError, match="unknown"):
            call()


def test_outbox_gauges_reset_for_sinks_no_longer_reported() -> None:
    """A sink that drops out of the outbox report reads 0 instead of its last value."""
    metrics = Metrics()
    metrics.set_outbox([("webhook", 7, 2)])
    metrics.set_outbox([])
    body = metrics.render().decode()
    assert 'modelwatch_outbox_pending{sink="webhook"} 0.0' in body
    assert 'modelwatch_dead_letters{sink="webhook"} 0.0' in body


def test_unknown_path_is_404_and_head_has_no_body(server: HealthServer) -> None:
    """Other paths are 404; HEAD answers like GET without a body; POST is not served."""
    assert request(url(server, "/"))[0] == 404
    assert request(url(server, "/healthz?verbose=1"))[0] == 200
    assert request(url(server, "/healthz"), method="HEAD") == (
        200,
        "text/plain; charset=utf-8",
        b"",
    )
    assert request(url(server, "/healthz"), method="POST")[0] == 501


def test_stop_joins_the_thread_and_closes_the_port(
    make_server: Callable[[str], HealthServer],
) -> None:
    """After stop() the `health` thread is gone and the port refuses connections."""
    server = make_server("127.0.0.1:0")
    server.start()
    assert request(url(server, "/healthz"))[0] == 200
    assert "health" in [t.name for t in threading.enumerate()]
    server.stop()
    server.stop()  # idempotent
    assert "health" not in [t.name for t in threading.enumerate()]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_stop_without_start_closes_the_socket(
    make_server: Callable[[str], HealthServer],
) -> None:
    """A server that never started can still be stopped without hanging."""
    server = make_server("127.0.0.1:0")
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_port_in_use_names_the_setting(
    server: HealthServer, make_server: Callable[[str], HealthServer]
) -> None:
    """A port that cannot be bound is an error naming daemon.health_listen."""
    with pytest.raises(ModelwatchError, match=r"daemon\.health_listen: cannot listen"):
        make_server(f"127.0.0.1:{server.port}")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen(make_server: Callable[[str], HealthServer]) -> None:
    """`[::1]:0` listens on the IPv6 loopback."""
    with make_server("[::1]:0") as server:
        assert server.host == "::1"
        assert request(f"http://[::1]:{server.port}/healthz")[0] == 200


def test_requests_are_not_logged(server: HealthServer, capfd: pytest.CaptureFixture[str]) -> None:
    """Probes and bad requests leave stderr and stdout silent."""
    request(url(server, "/healthz"))
    request(url(server, "/nope"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        raw.recv(4096)
    assert capfd.readouterr() == ("", "")


def test_failing_checks_do_not_break_the_server() -> None:
    """A raising liveness check reads as unhealthy; a failing outbox query keeps /metrics up."""

    def broken() -> list[str]:
        raise RuntimeError("boom")

    def no_outbox() -> list[tuple[str, int, int]]:
        raise OSError("database is locked")

    metrics = Metrics(sinks=["webhook"], outbox=no_outbox)
    with (
        HealthServer(
            "127.0.0.1:0",
            alive=broken,
            ready=threading.Event(),
            metrics=metrics,
            poll_interval=FAST,
        ) as server,
        capture_logs() as logs,
    ):
        assert request(url(server, "/healthz")) == (503, TEXT, b"health check failed: boom\n")
        status, _, body = request(url(server, "/metrics"))
    assert status == 200
    assert b'modelwatch_outbox_pending{sink="webhook"} 0.0' in body
    assert [entry["event"] for entry in logs] == ["metrics_outbox_failed"]
