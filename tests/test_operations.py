"""Operating the daemon: systemd notify, watchdog, reload, shutdown with a backlog, health."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.events import Event
from modelwatch.testing import MemorySink
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process
from tests.receiver import Receiver, Reply
from tests.writers import write_safetensors


def model(unit: Path, size: int = 1000) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})


class NotifySocket:
    """A datagram socket bound the way systemd binds $NOTIFY_SOCKET; collects messages."""

    def __init__(self, address: str) -> None:
        self.address = address  # as put in NOTIFY_SOCKET ("@name" = abstract)
        bind = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if predicate(message):
                    self.messages.remove(message)
                    return message
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        raise AssertionError(f"no matching notify message; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_protocol_across_start_reload_and_stop(tmp_path: Path, abstract: bool) -> None:
    """READY after the initial reconcile, WATCHDOG pings, RELOADING + MONOTONIC_USEC then
    READY on SIGHUP, STOPPING on SIGTERM, exit 0."""
    address = f"@modelwatch-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify")
    notify = NotifySocket(address)
    (tmp_path / "models").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[roots]]\npath = "{tmp_path / "models"}"\n'
    )
    env = daemon_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="2000000")
    try:
        with daemon_process(config, env=env) as proc:
            ready = notify.wait_for(lambda m: m.startswith("READY=1"))
            assert "STATUS=watching 1 roots" in ready
            notify.wait_for(lambda m: m == "WATCHDOG=1")
            notify.wait_for(lambda m: m == "WATCHDOG=1")
            proc.send_signal(signal.SIGHUP)
            reloading = notify.wait_for(lambda m: m.startswith("RELOADING=1"))
            usec = int(reloading.split("MONOTONIC_USEC=")[1])
            assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30e6
            notify.wait_for(lambda m: m.startswith("READY=1"))
            proc.send_signal(signal.SIGTERM)
            notify.wait_for(lambda m: m == "STOPPING=1")
            assert proc.wait(timeout=15) == 0
    finally:
        notify.close()


class BlockingSink(MemorySink):
    """A sink whose send hangs until released: a wedged delivery worker."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def send(self, event: Event) -> None:
        self.release.wait()
        super().send(event)


@pytest.fixture
def daemon_with(
    tmp_path: Path, make_config: Callable[..., Config]
) -> Iterator[Callable[..., tuple[Daemon, Callable[[], None]]]]:
    running: list[tuple[Daemon, threading.Event, threading.Thread]] = []

    def start(
        text: str,
        sinks: list[MemorySink],
        environ: dict[str, str] | None = None,
        factory: Callable[..., MemorySink] | None = None,
    ) -> tuple[Daemon, Callable[[], None]]:
        config = make_config(text)
        kwargs = {"sink_factory": factory} if factory else {}
        daemon = Daemon(config, sinks=sinks, host="testhost", environ=environ or {}, **kwargs)
        daemon.start()
        stop, reload_requested = threading.Event(), threading.Event()
        pending: list[Config] = []

        def reload() -> Config | None:
            return pending.pop() if pending else None

        thread = threading.Thread(
            target=daemon.serve,
            args=(stop,),
            kwargs={"reload": reload, "reload_requested": reload_requested},
            name="lifecycle",
        )
        thread.start()
        running.append((daemon, stop, thread))

        def request_reload(new_text: str = "") -> None:
            pending.append(make_config(new_text or text))
            reload_requested.set()

        return daemon, request_reload  # type: ignore[return-value]

    yield start
    for daemon, stop, thread in running:
        stop.set()
        thread.join()
        daemon.stop()


def roots_text(*roots: Path, settle: float = 0.5, health: str = "") -> str:
    daemon = f'[daemon]\nhealth_listen = "{health}"\n' if health else ""
    tables = "".join(f'[[roots]]\npath = "{r}"\nunit_depth = 1\n' for r in roots)
    return f"{daemon}[defaults]\nsettle_seconds = {settle}\n{tables}"


def test_watchdog_pings_stop_while_a_worker_is_wedged(
    tmp_path: Path, daemon_with: Callable[..., tuple[Daemon, Callable[[], None]]]
) -> None:
    """A delivery worker stuck in a send: no more WATCHDOG=1, and STATUS says which part."""
    notify = NotifySocket(f"@modelwatch-test-{uuid.uuid4().hex}")
    root = tmp_path / "models"
    root.mkdir()
    sink = BlockingSink()
    try:
        daemon, _ = daemon_with(
            roots_text(root) + '[[sinks]]\ntype = "memory"\n',
            [sink],
            environ={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"},
        )
        daemon.max_beat_age = 1.5
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        model(root / "a")  # the worker now blocks in send()
        unhealthy = notify.wait_for(lambda m: m.startswith("STATUS=unhealthy"))
        assert "deliver-memory" in unhealthy
        notify.messages.clear()
        with pytest.raises(AssertionError):
            notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=2.5)
        sink.release.set()
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        assert len(sink.wait_for(1)) == 1
    finally:
        sink.release.set()
        notify.close()


def test_reload_adds_a_root_and_a_sink_while_a_model_is_pending(
    tmp_path: Path, daemon_with: Callable[..., tuple[Daemon, Callable[[], None]]]
) -> None:
    """SIGHUP-style reload mid-settle: the pending model still registers once; the new sink
    and the new root work for later events."""
    first_root, second_root = tmp_path / "a", tmp_path / "b"
    first_root.mkdir()
    second_root.mkdir()
    sinks = {"one": MemorySink(), "two": MemorySink()}
    for name, sink in sinks.items():
        sink.name = name

    def factory(config: object) -> MemorySink:
        return sinks[config.name]  # type: ignore[attr-defined]

    one = '[[sinks]]\ntype = "memory"\nname = "one"\n'
    two = '[[sinks]]\ntype = "memory"\nname = "two"\n'
    daemon, reload = daemon_with(
        roots_text(first_root, settle=2.0) + one, [sinks["one"]], factory=factory
    )
    model(first_root / "pending")
    reload(roots_text(first_root, second_root, settle=2.0) + one + two)  # type: ignore[call-arg]
    wait_until(lambda: len(daemon.watchers) == 2 and len(daemon.workers) == 2)
    (first,) = sinks["one"].wait_for(1)
    assert first.subject == "pending"
    model(second_root / "later")
    # the pending model settled after the reload, so the new sink gets it too
    assert [e.subject for e in sinks["two"].wait_for(2)] == ["pending", "later"]
    assert [e.subject for e in sinks["one"].wait_for(2)] == ["pending", "later"]
    assert sinks["one"].wait_for(3, timeout=2.0)[2:] == []  # registered once


def test_invalid_reload_keeps_the_old_config(
    tmp_path: Path, daemon_with: Callable[..., tuple[Daemon, Callable[[], None]]]
) -> None:
    """A new config whose sink cannot be built is refused; STATUS says why; nothing changes."""
    notify = NotifySocket(f"@modelwatch-test-{uuid.uuid4().hex}")
    root = tmp_path / "models"
    root.mkdir()
    sink = MemorySink()
    try:
        daemon, reload = daemon_with(
            roots_text(root) + '[[sinks]]\ntype = "memory"\n',
            [sink],
            environ={"NOTIFY_SOCKET": notify.address},
            factory=lambda config: (_ for _ in ()).throw(
                __import__("modelwatch.errors").errors.ConfigError(f"{config.key}.url: required")
            ),
        )
        reload(roots_text(root) + '[[sinks]]\ntype = "memory"\nname = "other"\n')  # type: ignore[call-arg]
        status = notify.wait_for(lambda m: "reload failed" in m)
        assert "sinks[0].url: required" in status
        assert [w.sink.name for w in daemon.workers] == ["memory"]
        model(root / "a")
        assert len(sink.wait_for(1)) == 1
    finally:
        notify.close()


def test_sigterm_with_a_backlog_exits_in_time_and_delivers_after_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A failing webhook with a backlog: SIGTERM exits 0 within the shutdown timeout; the
    backlog is delivered after a restart."""
    root = tmp_path / "models"
    for i in range(3):
        model(root / f"exp-{i}")
    receiver.script(*[Reply(503, delay=0.3)] * 1000)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout_seconds = 2\n'
        f'[defaults]\nsettle_seconds = 0.2\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\ntimeout_seconds = 5\n'
    )
    with daemon_process(config) as proc:
        wait_until(lambda: len(receiver.requests) >= 2, timeout=20)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - started < 2 + 3  # the timeout, plus process exit
    receiver.replies.clear()
    before = len(receiver.requests)
    with daemon_process(config) as proc:
        try:
            wait_until(
                lambda: len({r.headers["webhook-id"] for r in receiver.requests[before:]}) == 3,
                timeout=20,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
    subjects = {json.loads(r.body)["subject"] for r in receiver.requests[before:]}
    assert subjects == {"exp-0", "exp-1", "exp-2"}


def test_health_endpoints_and_metrics_from_a_running_daemon(
    tmp_path: Path, daemon_with: Callable[..., tuple[Daemon, Callable[[], None]]]
) -> None:
    """/healthz, /readyz and /metrics over HTTP; metrics parse and count what happened."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    root = tmp_path / "models"
    root.mkdir()
    sink = MemorySink()
    daemon_with(
        roots_text(root, health=f"127.0.0.1:{port}") + '[[sinks]]\ntype = "memory"\n', [sink]
    )
    model(root / "a")
    sink.wait_for(1)
    base = f"http://127.0.0.1:{port}"
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=5) as response:  # noqa: S310
            assert response.status == 200

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:  # noqa: S310
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    delivered = ("modelwatch_deliveries_total", (("outcome", "delivered"), ("sink", "memory")))
    inotify_roots = ("modelwatch_roots", (("observer", "inotify"),))
    # the delivery is counted after send() returns; roots are refreshed every second
    wait_until(lambda: scrape()[delivered] == 1 and scrape()[inotify_roots] == 1)
    samples = scrape()
    assert samples[("modelwatch_events_total", (("type", "registered"),))] == 1
    assert samples[("modelwatch_settle_seconds_count", ())] == 1
    assert ("modelwatch_outbox_pending", (("sink", "memory"),)) in samples


def test_metrics_show_rejections_backlog_progress_and_pending(
    tmp_path: Path, make_config: Callable[..., Config], run_daemon: Callable[..., Daemon]
) -> None:
    """What dashboards and alerts need: rejections by code, the age of the oldest pending
    delivery, each part's progress age and the number of pending units."""
    root = tmp_path / "models"
    model(root / "good")
    (root / "bad").mkdir()
    (root / "bad" / "model.onnx").write_bytes(b"onnx")
    (root / "bad" / "gradient-model-metadata.json").write_text("{,}")
    config = make_config(
        f'[defaults]\nsettle_seconds = 0.3\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        '[[sinks]]\ntype = "memory"\n'
    )
    sink = MemorySink()
    sink.fail_next(1000)
    daemon = run_daemon(config, [sink])

    def samples() -> dict[str, float]:
        text = daemon.metrics.render().decode()
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    wait_until(lambda: samples().get("modelwatch_rejections_total[('code', 'metadata_syntax')]"))
    oldest = "modelwatch_outbox_oldest_pending_seconds[('sink', 'memory')]"
    wait_until(lambda: samples().get(oldest, 0) > 0.5)
    found = samples()
    assert found["modelwatch_pending_units[]"] == 0
    assert 0 <= found["modelwatch_progress_age_seconds[('part', 'settle')]"] < 5
    assert "modelwatch_progress_age_seconds[('part', 'deliver-memory')]" in found
    assert found[f"modelwatch_inotify_fallback[('root', '{root}')]"] == 0


def _slow_inspection(
    monkeypatch: pytest.MonkeyPatch, seconds: float, report_progress: bool
) -> threading.Event:
    """Make every inspection take `seconds` (reporting progress every 0.05 s, or not)."""
    import modelwatch.checks
    from modelwatch.progress import progress

    real = modelwatch.checks.inspect_unit
    started = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        started.set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if report_progress:
                progress()
            time.sleep(0.05)  # the slow work itself
        return real(*args, **kwargs)

    monkeypatch.setattr(modelwatch.checks, "inspect_unit", slow)
    return started


def test_long_work_that_reports_progress_is_healthy_and_silence_is_not(
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Liveness is progress: an inspection twice as long as the wedge threshold that keeps
    reporting progress never makes the daemon unhealthy; one that reports nothing for longer
    than the threshold names its worker. (Idle parts beat at least every second: the
    threshold here, 2.5 s, leaves them room on a loaded machine.)"""
    root = tmp_path / "models"
    root.mkdir()
    config = make_config(
        f'[defaults]\nsettle_seconds = 0.2\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        '[[sinks]]\ntype = "memory"\n'
    )
    sink = MemorySink()
    started = _slow_inspection(monkeypatch, 5.0, report_progress=True)
    daemon = run_daemon(config, [sink])
    daemon.max_beat_age = 2.5
    model(root / "big")
    assert started.wait(10)
    while not sink.events:
        assert daemon.stale_parts() == []
        time.sleep(0.1)  # sampling the health check while the inspection runs
    started = _slow_inspection(monkeypatch, 5.0, report_progress=False)
    model(root / "silent")
    assert started.wait(10)
    wait_until(lambda: any(p.startswith("inspect-") for p in daemon.stale_parts()), timeout=8)
    sink.wait_for(2)
    wait_until(lambda: daemon.stale_parts() == [], timeout=5)


def test_a_reload_during_a_long_inspection_applies_at_once(
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`systemctl reload` while a unit takes 30 s to inspect: the new config is applied within
    a second (the settle loop never waits for an inspection)."""
    root, other = tmp_path / "models", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    text = (
        "[daemon]\nshutdown_timeout_seconds = 1\n"
        f'[defaults]\nsettle_seconds = 0.2\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        '[[sinks]]\ntype = "memory"\n'
    )
    started = _slow_inspection(monkeypatch, 30.0, report_progress=True)
    daemon = run_daemon(make_config(text), [MemorySink()])
    model(root / "big")
    assert started.wait(10)
    began = time.monotonic()
    daemon.apply(make_config(text + f'[[roots]]\npath = "{other}"\nunit_depth = 1\n'))
    assert time.monotonic() - began < 1.0
    assert daemon.loop is not None and str(other) in daemon.loop.rules


def test_a_poll_pass_stuck_on_a_hung_mount_makes_the_daemon_unhealthy(
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A polling watcher whose pass hangs in a system call (an NFS hard mount whose server
    went away: the thread is alive but makes no progress) is named by the health check;
    once the pass goes on, the daemon is healthy again. The hang itself is stood in for: it
    cannot be made here."""
    root = tmp_path / "models"
    root.mkdir()
    config = make_config(
        f'[defaults]\nsettle_seconds = 0.2\nobserver = "polling"\npoll_interval_seconds = 0.2\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n[[sinks]]\ntype = "memory"\n'
    )
    import modelwatch.poller

    hung, release = threading.Event(), threading.Event()
    real = modelwatch.poller.take

    def take(path: str, listed: Any = None) -> Any:
        if hung.is_set():
            release.wait(30)  # lstat on a hung hard mount: no progress, no error
        return real(path, listed)

    monkeypatch.setattr(modelwatch.poller, "take", take)
    daemon = run_daemon(config, [MemorySink()])
    daemon.max_beat_age = 2.5
    assert daemon.stale_parts() == []
    hung.set()
    try:
        wait_until(lambda: f"watch {root}" in daemon.stale_parts(), timeout=10)
    finally:
        hung.clear()
        release.set()
    wait_until(lambda: daemon.stale_parts() == [], timeout=5)
