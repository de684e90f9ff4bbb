"""The nats and redis sinks against real brokers on 127.0.0.1 (see tests/brokers.py).

What arrived is read back with the brokers' own clients (a JetStream pull consumer, XRANGE),
never through the sink under test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import redis

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, Event
from modelwatch.sinks import build_sink
from modelwatch.sinks.nats import NatsSink, subject_matches
from modelwatch.sinks.redis import RedisSink
from modelwatch.testing import sample_event, sink_config
from tests.brokers import (
    BrokerServer,
    add_stream,
    free_port,
    nats_broker,
    read_stream,
    redis_broker,
    running,
    stream_messages,
    with_jetstream,
)
from tests.conftest import wait_until
from tests.writers import write_safetensors

SUBJECT = "modelwatch.events"
TOKEN_VAR = "NATS_TEST_TOKEN"  # noqa: S105 - the name of a variable, not a secret
PASSWORD_VAR = "REDIS_TEST_PASSWORD"  # noqa: S105 - the name of a variable, not a secret


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[BrokerServer]:
    """A nats-server with JetStream; its store lives in tmp_path."""
    with running(nats_broker(tmp_path)) as server:
        yield server


@pytest.fixture
def stream(nats_server: BrokerServer) -> str:
    """A stream "MW" capturing the default subject."""
    add_stream(nats_server.url, "MW", [SUBJECT])
    return "MW"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[BrokerServer]:
    """A redis-server without persistence."""
    with running(redis_broker(tmp_path)) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: BrokerServer) -> Iterator[redis.Redis]:
    """The test's own connection to the redis server."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def an_event(name: str = "resnet", version: int = 1) -> Event:
    return sample_event(name, version)


def nats_sink(server: BrokerServer | None = None, **options: Any) -> NatsSink:
    if server is not None:
        options.setdefault("servers", server.url)
    return NatsSink(sink_config("nats", options=options, key="sinks[2]"))


def redis_sink(server: BrokerServer, **options: Any) -> RedisSink:
    options.setdefault("url", server.url)
    return RedisSink(sink_config("redis", options=options, key="sinks[3]"))


# --- nats ------------------------------------------------------------------------------------


def test_nats_event_arrives_in_the_stream_with_its_id_as_nats_msg_id(
    nats_server: BrokerServer, stream: str
) -> None:
    """The CloudEvent JSON is the payload; Nats-Msg-Id, ce-id and ce-type carry its attributes."""
    event = an_event()
    with closing(nats_sink(nats_server, stream=stream)) as sink:
        sink.send(event)
    ((headers, payload),) = read_stream(nats_server.url, stream, SUBJECT)
    assert payload == event.to_json().encode()
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == event.id
    assert headers["ce-type"] == REGISTERED
    assert headers["Content-Type"] == "application/cloudevents+json"


def test_nats_redelivered_event_is_stored_once(nats_server: BrokerServer, stream: str) -> None:
    """The same event sent twice, as by a restart after a crash, leaves exactly one message."""
    event = an_event()
    with closing(nats_sink(nats_server, stream=stream)) as sink:
        sink.send(event)
    with closing(nats_sink(nats_server, stream=stream)) as restarted:
        restarted.send(event)
    assert stream_messages(nats_server.url, stream) == 1


def test_nats_missing_stream_is_permanent_and_says_how_to_create_it(
    nats_server: BrokerServer,
) -> None:
    """`stream` naming a stream that does not exist fails permanently, naming the CLI fix."""
    with (
        closing(nats_sink(nats_server, stream="X")) as sink,
        pytest.raises(PermanentSinkError, match=r"'X' does not exist.*nats stream add X"),
    ):
        sink.send(an_event())


def test_nats_create_stream_makes_a_file_stream_with_a_two_minute_window(
    nats_server: BrokerServer,
) -> None:
    """With create_stream, a missing stream is created on the subject and the event stored."""
    with closing(nats_sink(nats_server, stream="NEW", create_stream=True)) as sink:
        sink.send(an_event())

    async def config(js: Any) -> Any:
        return (await js.stream_info("NEW")).config

    created = with_jetstream(nats_server.url, config)
    assert (created.subjects, created.storage, created.duplicate_window) == (
        [SUBJECT],
        "file",
        120.0,
    )
    assert stream_messages(nats_server.url, "NEW") == 1


def test_nats_stream_that_does_not_capture_the_subject_is_permanent(
    nats_server: BrokerServer,
) -> None:
    """A stream that exists but would not store the subject is a configuration mistake."""
    add_stream(nats_server.url, "OTHER", ["other.>"])
    with (
        closing(nats_sink(nats_server, stream="OTHER")) as sink,
        pytest.raises(PermanentSinkError, match="does not capture subject"),
    ):
        sink.send(an_event())


def test_nats_subject_without_a_stream_is_retried(nats_server: BrokerServer) -> None:
    """No stream captures the subject (yet): retried, and delivered once one exists."""
    with closing(nats_sink(nats_server)) as sink:
        with pytest.raises(SinkError, match="no JetStream stream answered") as failure:
            sink.send(an_event())
        assert not isinstance(failure.value, PermanentSinkError)
        add_stream(nats_server.url, "LATE", [SUBJECT])
        sink.send(an_event())
    assert stream_messages(nats_server.url, "LATE") == 1


def send_across_a_restart(sink: Any, server: BrokerServer) -> None:
    """Send, stop the server (the next send fails with a retryable SinkError naming it), start
    it again, send that event again."""
    sink.send(an_event("before"))
    server.stop()
    with pytest.raises(SinkError, match=r"127\.0\.0\.1") as failure:
        sink.send(an_event("during"))
    assert not isinstance(failure.value, PermanentSinkError)
    server.start()
    sink.send(an_event("during"))


def test_nats_server_down_is_retried_and_a_restart_delivers(
    nats_server: BrokerServer, stream: str
) -> None:
    """While the server is down sends fail with SinkError; after it is back they deliver."""
    with closing(nats_sink(nats_server, stream=stream, timeout_seconds=2)) as sink:
        send_across_a_restart(sink, nats_server)
    assert stream_messages(nats_server.url, stream) == 2


def test_nats_connection_dropped_while_idle_is_reopened_within_the_send(
    nats_server: BrokerServer, stream: str
) -> None:
    """A kept connection the server dropped between sends costs no failed attempt."""
    with closing(nats_sink(nats_server, stream=stream)) as sink:
        sink.send(an_event("a"))
        nats_server.stop()
        nats_server.start()
        started = time.monotonic()
        sink.send(an_event("b"))
        assert time.monotonic() - started < 5  # not after a request timeout
    assert stream_messages(nats_server.url, stream) == 2


def test_nats_closed_port_is_retried() -> None:
    """Nothing listening: SinkError (retry), naming the server."""
    port = free_port()
    with (
        closing(nats_sink(servers=f"nats://127.0.0.1:{port}", timeout_seconds=2)) as sink,
        pytest.raises(SinkError, match=f"nats://127.0.0.1:{port}") as failure,
    ):
        sink.send(an_event())
    assert not isinstance(failure.value, PermanentSinkError)


def test_nats_server_that_never_answers_times_out(tmp_path: Path) -> None:
    """A peer that accepts the connection but never speaks NATS fails within timeout_seconds."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with (
            closing(nats_sink(servers=url, timeout_seconds=0.5)) as sink,
            pytest.raises(SinkError) as failure,
        ):
            sink.send(an_event())
    assert time.monotonic() - started < 3
    assert not isinstance(failure.value, PermanentSinkError)


def test_nats_wrong_token_is_permanent_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused token is a permanent failure; the token is in no message or repr."""
    with running(nats_broker(tmp_path, "--auth", "right-token-123")) as server:
        add_stream(server.url.replace("nats://", "nats://right-token-123@"), "MW", [SUBJECT])
        monkeypatch.setenv(TOKEN_VAR, "wrong-token-456")
        with closing(nats_sink(server, token_env=TOKEN_VAR)) as sink:
            with pytest.raises(PermanentSinkError, match=r"(?i)authorization") as failure:
                sink.send(an_event())
            assert "wrong-token-456" not in str(failure.value) + repr(sink)
        monkeypatch.setenv(TOKEN_VAR, "right-token-123")
        with closing(nats_sink(server, token_env=TOKEN_VAR, stream="MW")) as sink:
            sink.send(an_event())
        assert stream_messages(server.url.replace("//", "//right-token-123@"), "MW") == 1


def test_nats_permission_violation_is_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user not allowed to publish on the subject fails permanently, at once."""
    users = (
        'authorization { users = [{user: "app", password: "app-pass",'
        ' permissions: {publish: {deny: ["modelwatch.>"]}}}] }'
    )
    (tmp_path / "nats.conf").write_text(users)
    with running(nats_broker(tmp_path, "-c", str(tmp_path / "nats.conf"))) as server:
        url = server.url.replace("nats://", "nats://app:app-pass@")
        add_stream(url, "MW", [SUBJECT])
        monkeypatch.setenv("NATS_URL", url)
        started = time.monotonic()
        with (
            closing(nats_sink(url_env="NATS_URL", stream="MW")) as sink,
            pytest.raises(PermanentSinkError, match=r"(?i)permissions violation") as failure,
        ):
            sink.send(an_event())
    assert time.monotonic() - started < 5  # not after the 10 s request timeout
    assert "app-pass" not in str(failure.value)


def test_nats_credentials_in_server_urls_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user and password inside a server URL (from url_env) never show in repr or errors."""
    port = free_port()
    monkeypatch.setenv("NATS_URL", f"nats://alice:hunter2@127.0.0.1:{port}")
    with closing(nats_sink(url_env="NATS_URL", timeout_seconds=1)) as sink:
        assert "hunter2" not in repr(sink)
        with pytest.raises(SinkError) as failure:
            sink.send(an_event())
    assert "hunter2" not in str(failure.value)
    assert "alice:***@" in str(failure.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"servers": []}, r"sinks\[2\]\.servers: must be a URL or a non-empty array"),
        ({"servers": "http://x:4222"}, r"sinks\[2\]\.servers: must be a URL \(nats://"),
        ({"servers": ["nats://a:4222", 7]}, r"sinks\[2\]\.servers\[1\]: must be a string"),
        ({"servers": "nats://a:99999"}, r"sinks\[2\]\.servers: .* invalid port"),
        ({"servers": 4222}, r"sinks\[2\]\.servers: must be a URL or a non-empty array"),
        ({"servers": "nats://u:p@a:4222"}, r"sinks\[2\]\.servers: a user or password .* url_env"),
        ({"servers": "nats://tok@a:4222"}, r"sinks\[2\]\.servers: a user or password"),
        ({"url_env": "NATS_URL", "servers": "nats://a"}, r"sinks\[2\]\.url_env: give one of"),
        ({"url_env": "MODELWATCH_UNSET_VARIABLE"}, r"sinks\[2\]\.url_env: .* not set"),
        ({"token_file": "/nonexistent/token"}, r"sinks\[2\]\.token_file: cannot read"),
        ({"subject": "models.*"}, r"sinks\[2\]\.subject: must be dot-separated"),
        ({"subject": "a..b"}, r"sinks\[2\]\.subject"),
        ({"stream": "my.stream"}, r"sinks\[2\]\.stream: must be letters"),
        ({"create_stream": True}, r"sinks\[2\]\.create_stream: needs `stream`"),
        ({"timeout_seconds": 0}, r"sinks\[2\]\.timeout_seconds: must be > 0"),
        ({"token_env": "MODELWATCH_UNSET_VARIABLE"}, r"sinks\[2\]\.token_env: .* not set"),
        ({"credentials_file": "/nonexistent.creds"}, r"sinks\[2\]\.credentials_file: cannot"),
        ({"token_env": "A", "credentials_file": "b"}, r"sinks\[2\]\.token_env: give"),
        ({"subjects": "x"}, r"sinks\[2\]\.subjects: unknown key for a nats sink"),
    ],
)
def test_nats_bad_configuration_names_the_key(options: dict[str, Any], expected: str) -> None:
    """Every configuration mistake is a ConfigError starting with the offending key."""
    with pytest.raises(ConfigError, match=expected):
        nats_sink(**options)


def test_nats_subject_matching_follows_nats_wildcards() -> None:
    """`*` matches one token, `>` one or more trailing tokens."""
    assert subject_matches("modelwatch.events", "modelwatch.events")
    assert subject_matches("modelwatch.*", "modelwatch.events")
    assert subject_matches(">", "modelwatch.events")
    assert not subject_matches("modelwatch.>", "modelwatch")
    assert not subject_matches("*", "modelwatch.events")


def test_build_sink_finds_the_nats_sink_through_entry_points() -> None:
    """`type = "nats"` resolves through the modelwatch.sinks entry points."""
    with closing(build_sink(sink_config("nats", options={"subject": "a.b"}))) as sink:
        assert isinstance(sink, NatsSink)


def test_daemon_registers_a_model_into_jetstream(
    nats_server: BrokerServer,
    stream: str,
    tmp_path: Path,
    make_config: Callable[..., Config],
) -> None:
    """End to end: a model written into a watched root arrives in the JetStream stream."""
    root = tmp_path / "models"
    root.mkdir()
    config = make_config(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout_seconds = 2\n'
        "[defaults]\nsettle_seconds = 0.3\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "nats"\nservers = ["{nats_server.url}"]\nstream = "{stream}"\n'
    )
    daemon = Daemon(config, sinks=[build_sink(config.sinks[0])], host="testhost")
    daemon.start()
    stop = threading.Event()
    lifecycle = threading.Thread(target=daemon.serve, args=(stop,), name="lifecycle")
    lifecycle.start()
    try:
        (root / "resnet").mkdir()
        write_safetensors(root / "resnet" / "model.safetensors", {"w": 1000})
        wait_until(lambda: stream_messages(nats_server.url, stream) == 1, timeout=15)
    finally:
        stop.set()
        lifecycle.join()
        daemon.stop()
    ((headers, payload),) = read_stream(nats_server.url, stream, SUBJECT)
    body = json.loads(payload)
    assert (body["type"], body["subject"], body["data"]["version"]) == (REGISTERED, "resnet", 1)
    assert headers["Nats-Msg-Id"] == body["id"]


# --- redis -----------------------------------------------------------------------------------


def test_redis_xadd_lands_with_id_type_subject_and_event(
    redis_server: BrokerServer, redis_client: redis.Redis
) -> None:
    """Each event is one stream entry with the fields id, type, subject and event (the JSON)."""
    event = an_event()
    with closing(redis_sink(redis_server)) as sink:
        sink.send(event)
    ((_entry_id, fields),) = redis_client.xrange("modelwatch:events")
    assert fields == {
        "id": event.id,
        "type": REGISTERED,
        "subject": "resnet",
        "event": event.to_json(),
    }


def test_redis_redelivery_appends_again_for_consumers_to_dedupe(
    redis_server: BrokerServer, redis_client: redis.Redis
) -> None:
    """Redis streams do not deduplicate: a resent event is a second entry with the same id."""
    event = an_event()
    with closing(redis_sink(redis_server, stream="events")) as sink:
        sink.send(event)
        sink.send(event)
    entries = redis_client.xrange("events")
    assert [fields["id"] for _, fields in entries] == [event.id, event.id]


def test_redis_maxlen_trims_approximately(
    redis_server: BrokerServer, redis_client: redis.Redis
) -> None:
    """With maxlen = 100, a thousand events leave about a hundred entries, not a thousand."""
    with closing(redis_sink(redis_server, maxlen=100)) as sink:
        for version in range(1000):
            sink.send(an_event(version=version))
    assert 100 <= redis_client.xlen("modelwatch:events") < 300


def test_redis_key_that_is_not_a_stream_is_permanent(
    redis_server: BrokerServer, redis_client: redis.Redis
) -> None:
    """WRONGTYPE (the key holds a string) fails permanently and says what is wrong."""
    redis_client.set("modelwatch:events", "not a stream")
    with (
        closing(redis_sink(redis_server)) as sink,
        pytest.raises(PermanentSinkError, match=r"WRONGTYPE.*not a stream"),
    ):
        sink.send(an_event())


def test_redis_server_stopped_is_retried_and_a_restart_delivers(
    redis_server: BrokerServer,
) -> None:
    """While the server is down sends fail with SinkError; once it is back they deliver."""
    with closing(redis_sink(redis_server, timeout_seconds=2)) as sink:
        send_across_a_restart(sink, redis_server)
    with closing(redis.Redis.from_url(redis_server.url)) as client:
        assert client.xlen("modelwatch:events") == 1  # the restart lost the unsaved entry


def test_redis_password_in_the_url_is_masked_in_repr_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong password in the URL (from url_env): permanent failure; it shows nowhere."""
    with running(redis_broker(tmp_path, "--requirepass", "right-pass")) as server:
        monkeypatch.setenv("REDIS_URL", server.url.replace("redis://", "redis://:wrong-pass@"))
        config = sink_config("redis", options={"url_env": "REDIS_URL"}, key="sinks[3]")
        with closing(RedisSink(config)) as sink:
            with pytest.raises(PermanentSinkError) as failure:
                sink.send(an_event())
            shown = str(failure.value) + repr(sink) + repr(config)
    assert "wrong-pass" not in shown
    assert ":***@127.0.0.1" in str(failure.value)


def test_redis_password_env_authenticates_and_a_missing_password_is_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """password_env supplies the password; without one, the error says how to give it."""
    with running(redis_broker(tmp_path, "--requirepass", "right-pass")) as server:
        with (
            closing(redis_sink(server)) as sink,
            pytest.raises(PermanentSinkError, match="password_env"),
        ):
            sink.send(an_event())
        monkeypatch.setenv(PASSWORD_VAR, "right-pass")
        with closing(redis_sink(server, password_env=PASSWORD_VAR)) as sink:
            sink.send(an_event())
            assert "right-pass" not in repr(sink)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, r"sinks\[3\]\.url: required"),
        ({"url": "http://127.0.0.1:6379"}, r"sinks\[3\]\.url: must be a URL \(redis://"),
        ({"url": "redis://127.0.0.1:99999"}, r"sinks\[3\]\.url: the URL has an invalid port"),
        ({"url": "redis://:pw@127.0.0.1"}, r"sinks\[3\]\.url: a user or password .* url_env"),
        ({"password_file": "/nonexistent"}, r"sinks\[3\]\.password_file: cannot read"),
        ({"url": "redis://127.0.0.1/name"}, r"sinks\[3\]\.url: the path must be a database"),
        ({"stream": ""}, r"sinks\[3\]\.stream: must not be empty"),
        ({"maxlen": -1}, r"sinks\[3\]\.maxlen: must be >= 0"),
        ({"maxlen": 1.5}, r"sinks\[3\]\.maxlen: must be an integer"),
        ({"timeout_seconds": -2}, r"sinks\[3\]\.timeout_seconds: must be > 0"),
        ({"password_env": "MODELWATCH_UNSET_VARIABLE"}, r"sinks\[3\]\.password_env: .* not set"),
        ({"streams": "x"}, r"sinks\[3\]\.streams: unknown key for a redis sink"),
    ],
)
def test_redis_bad_configuration_names_the_key(options: dict[str, Any], expected: str) -> None:
    """Every configuration mistake is a ConfigError starting with the offending key."""
    if options != {}:
        options.setdefault("url", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match=expected):
        RedisSink(sink_config("redis", options=options, key="sinks[3]"))


def test_redis_password_in_url_and_password_env_are_exclusive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A password in the URL and password_env at once is a ConfigError that shows neither."""
    monkeypatch.setenv(PASSWORD_VAR, "from-env")
    monkeypatch.setenv("REDIS_URL", "redis://:in-url@127.0.0.1:6379")
    options = {"url_env": "REDIS_URL", "password_env": PASSWORD_VAR}
    with pytest.raises(ConfigError, match=r"sinks\[3\]\.password_env") as failure:
        RedisSink(sink_config("redis", options=options, key="sinks[3]"))
    assert "in-url" not in str(failure.value)
    assert "from-env" not in str(failure.value)


def test_build_sink_finds_the_redis_sink_through_entry_points() -> None:
    """`type = "redis"` resolves through the modelwatch.sinks entry points."""
    config = sink_config("redis", options={"url": "redis://127.0.0.1:6379"})
    with closing(build_sink(config)) as sink:
        assert isinstance(sink, RedisSink)
