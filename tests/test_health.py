"""The health server over real HTTP: liveness, readiness, metrics, shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from modelwatch.errors import ModelwatchError
from modelwatch.health import TEXT, HealthServer
from modelwatch.metrics import Metrics
from tests.brokers import free_port
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, wait_ready_line

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


# --- untrusted clients ------------------------------------------------------------------------


class Dripper:
    """A client sending `GET /healthz` one byte every `pause` seconds, for as long as the
    server keeps the connection (`closed_after` says when it did not any more)."""

    def __init__(self, port: int, pause: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.pause = pause
        self.closed_after: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, name="dripper")
        self._thread.start()

    def _drip(self) -> None:
        started = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"." * 4000
        for byte in request:
            if self._stop.wait(self.pause):
                return
            try:
                self.sock.sendall(bytes([byte]))
            except OSError:  # the server closed the connection (a reset, once it is gone)
                self.closed_after = time.monotonic() - started
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def drippers() -> Iterator[list[Dripper]]:
    """Slow clients a test starts; all stopped at the end."""
    started: list[Dripper] = []
    yield started
    for dripper in started:
        dripper.stop()


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def test_idle_and_trickling_clients_delay_neither_a_probe_nor_stop(
    server: HealthServer, drippers: list[Dripper]
) -> None:
    """With 200 idle connections and a client trickling a request byte by byte, a new
    /healthz is answered within 2 s, and stop() returns within 2 s."""
    drippers.append(Dripper(server.port, pause=0.05))
    idle = idle_connections(server.port, 200)
    try:
        started = time.monotonic()
        assert request(url(server, "/healthz"))[0] == 200
        assert time.monotonic() - started < 2.0  # the bound for a probe
        stopper = threading.Thread(target=server.stop, name="stopper")
        started = time.monotonic()
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive()
        assert time.monotonic() - started < 2.0  # stop()'s promise, whatever clients do
    finally:
        for sock in idle:
            sock.close()


def test_connections_beyond_the_cap_close_the_oldest(
    parts: Parts, ready: threading.Event, metrics: Metrics
) -> None:
    """At most max_connections stay open: each one beyond closes the oldest idle one."""
    with HealthServer(
        "127.0.0.1:0", alive=parts, ready=ready, metrics=metrics, max_connections=8
    ) as server:
        idle = idle_connections(server.port, 12)
        try:
            for sock in idle[:4]:  # the server closed these: reading gives end of file
                assert sock.recv(1) == b""
            newest = idle[-8:]
            for sock in newest:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):  # open, nothing to read yet
                    sock.recv(1)
        finally:
            for sock in idle:
                sock.close()


def test_a_request_that_does_not_arrive_in_time_is_cut_off(
    parts: Parts, ready: threading.Event, metrics: Metrics, drippers: list[Dripper]
) -> None:
    """A client still sending its request when request_seconds have passed is disconnected,
    however steadily it trickles bytes."""
    with HealthServer(
        "127.0.0.1:0", alive=parts, ready=ready, metrics=metrics, request_seconds=0.5
    ) as server:
        dripper = Dripper(server.port, pause=0.02)
        drippers.append(dripper)
        wait_until(lambda: dripper.closed_after is not None, timeout=10)
    assert dripper.closed_after is not None and dripper.closed_after < 2.0


def test_a_request_head_that_is_too_large_is_refused(server: HealthServer) -> None:
    """A request head beyond 8 KiB gets 431 and the connection is closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000)
        assert raw.recv(100).startswith(b"HTTP/1.1 431 ")


def test_sigterm_stops_a_daemon_held_by_idle_and_trickling_clients(
    tmp_path: Path, drippers: list[Dripper]
) -> None:
    """A real daemon with 200 idle connections and a trickling client on its health port
    answers a new /healthz within 2 s, and SIGTERM ends it within shutdown_timeout_seconds
    (2 s here) + 3 s."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'roots = []\n[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'health_listen = "127.0.0.1:{port}"\nshutdown_timeout_seconds = 2\n'
    )
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=env, stderr=subprocess.PIPE) as daemon:
        wait_ready_line(daemon.stderr)
        drippers.append(Dripper(port, pause=0.05))
        idle = idle_connections(port, 200)
        try:
            started = time.monotonic()
            assert request(f"http://127.0.0.1:{port}/healthz")[0] == 200
            assert time.monotonic() - started < 2.0
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
            assert time.monotonic() - started < 2.0 + 3.0  # the bound
        finally:
            for sock in idle:
                sock.close()


def test_other_paths_are_offered_to_the_pages(
    parts: Parts, ready: threading.Event, metrics: Metrics
) -> None:
    """A path the server does not own goes to `pages` (the status page): its answer is
    served, HEAD without a body; a path `pages` declines is 404, and /healthz stays the
    server's own."""
    asked: list[str] = []

    def pages(path: str) -> tuple[int, str, bytes] | None:
        asked.append(path)
        return (200, "text/html; charset=utf-8", b"<p>status</p>") if path == "/" else None

    server = HealthServer(
        "127.0.0.1:0", alive=parts, ready=ready, metrics=metrics, pages=pages, poll_interval=FAST
    )
    with server:
        assert request(url(server, "/?x=1")) == (200, "text/html; charset=utf-8", b"<p>status</p>")
        assert request(url(server, "/"), method="HEAD")[::2] == (200, b"")
        assert request(url(server, "/nowhere"))[0] == 404
        assert request(url(server, "/healthz"))[0] == 200
    assert asked == ["/", "/", "/nowhere"]
