"""NATS and Redis over mutual TLS with a private CA: real `nats-server` (TLS, `verify`) and
`redis-server` (`--tls-port`, `--tls-auth-clients yes`) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import Event
from modelwatch.nats_tls import PlainTextRefused, TlsClient, open_connection
from modelwatch.sinks.nats import NatsSink
from modelwatch.sinks.redis import RedisSink
from modelwatch.testing import sample_event, sink_config
from modelwatch.tls import TlsOptions, client_tls
from tests.brokers import (
    BrokerServer,
    add_stream,
    nats_broker,
    running,
    stream_messages,
    tls_nats_broker,
    tls_redis_broker,
)
from tests.pki import Pair, Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(pki: Pki) -> Pair:
    return pki.client("modelwatch")


def identity(client: Pair) -> dict[str, str]:
    """The client certificate keys of a sink."""
    return {"client_cert_file": str(client.cert), "client_key_file": str(client.key)}


def mutual(pki: Pki, client: Pair) -> dict[str, str]:
    """The TLS keys of a sink trusting the private CA and presenting `client`."""
    return {"ca_file": str(pki.ca.cert), **identity(client)}


def an_event() -> Event:
    return sample_event("bert", fingerprint="sha256:" + "ef" * 32)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Close every sink handed to it at teardown."""
    sinks: list[Any] = []
    yield lambda sink: sinks.append(sink) or sink
    for sink in sinks:
        sink.close()


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerServer]:
    """redis-server speaking only TLS, requiring a client certificate of the private CA."""
    with running(tls_redis_broker(tmp_path_factory.mktemp("redis"), pki)) as broker:
        yield broker


def redis_sink(url: str, **options: Any) -> RedisSink:
    return RedisSink(sink_config("redis", options={"url": url, **options}, key="sinks[2]"))


def test_redis_over_mutual_tls_is_delivered_with_the_right_files(
    tls_redis: BrokerServer, pki: Pki, client: Pair, closing: Callable[[Any], Any]
) -> None:
    """rediss:// with ca_file and the client certificate: the event is in the stream."""
    sink = closing(redis_sink(tls_redis.url, **mutual(pki, client)))
    sink.send(an_event())
    reader = redis.Redis.from_url(
        tls_redis.url,
        ssl_ca_certs=str(pki.ca.cert),
        ssl_certfile=str(client.cert),
        ssl_keyfile=str(client.key),
    )
    try:
        [(_id, fields)] = reader.xrange("modelwatch:events", count=10)
    finally:
        reader.close()
    assert fields[b"id"] == an_event().id.encode()


def test_redis_without_ca_file_refuses_the_private_certificate(
    tls_redis: BrokerServer, client: Pair, closing: Callable[[Any], Any]
) -> None:
    """Without ca_file the server's certificate is not trusted: permanent, saying so."""
    sink = closing(redis_sink(tls_redis.url, **identity(client)))
    with pytest.raises(PermanentSinkError, match="the server's certificate is not trusted"):
        sink.send(an_event())


def test_redis_without_a_client_certificate_is_refused(
    tls_redis: BrokerServer, pki: Pki, closing: Callable[[Any], Any]
) -> None:
    """A server requiring client certificates refuses a client without one."""
    sink = closing(redis_sink(tls_redis.url, ca_file=str(pki.ca.cert)))
    with pytest.raises(SinkError):
        sink.send(an_event())


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=none", {}, "sinks[2].url: TLS settings in the URL"),
        ("redis://127.0.0.1:1/0", {"ca_file": "/x"}, "sinks[2].ca_file: the URL is redis://"),
        (
            "redis://127.0.0.1:1/0",
            {"insecure_skip_verify": True},
            "sinks[2].insecure_skip_verify: the URL is redis://",
        ),
    ],
)
def test_redis_tls_can_only_be_configured_with_the_shared_keys(
    url: str, options: dict[str, Any], expected: str
) -> None:
    """redis-py's own ssl_* URL parameters are refused (they could turn verification off),
    and TLS keys next to a plain redis:// URL are refused rather than ignored."""
    with pytest.raises(ConfigError) as caught:
        redis_sink(url, **options)
    assert str(caught.value).startswith(expected)


# --- NATS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_nats(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerServer]:
    """nats-server with JetStream, TLS only, `verify: true` (client certificates required)."""
    with running(tls_nats_broker(tmp_path_factory.mktemp("nats"), pki)) as broker:
        yield broker


def nats_sink(url: str, **options: Any) -> NatsSink:
    options = {"servers": url, "stream": "TLS", "create_stream": True, **options}
    return NatsSink(sink_config("nats", options=options, key="sinks[3]"))


def test_nats_over_mutual_tls_is_delivered_with_the_right_files(
    tls_nats: BrokerServer, pki: Pki, client: Pair, closing: Callable[[Any], Any]
) -> None:
    """tls:// with ca_file and the client certificate: JetStream acknowledges the event."""
    sink = closing(nats_sink(tls_nats.url, **mutual(pki, client)))
    sink.send(an_event())
    sink.send(an_event())  # the kept connection, and JetStream's duplicate ack


def test_nats_without_ca_file_refuses_the_private_certificate(
    tls_nats: BrokerServer, client: Pair, closing: Callable[[Any], Any]
) -> None:
    """Without ca_file the server's certificate is not trusted: permanent, saying so."""
    sink = closing(nats_sink(tls_nats.url, **identity(client)))
    with pytest.raises(PermanentSinkError, match="the server's certificate is not trusted"):
        sink.send(an_event())


def test_nats_without_a_client_certificate_is_refused(
    tls_nats: BrokerServer, pki: Pki, closing: Callable[[Any], Any]
) -> None:
    """A server with `verify: true` refuses a client without a certificate."""
    sink = closing(nats_sink(tls_nats.url, ca_file=str(pki.ca.cert), timeout_seconds=3))
    with pytest.raises(SinkError):
        sink.send(an_event())


def test_nats_server_name_verifies_another_name(
    tls_nats: BrokerServer, pki: Pki, client: Pair, closing: Callable[[Any], Any]
) -> None:
    """server_name is the name verified: one the certificate lacks is refused, naming it."""
    sink = closing(nats_sink(tls_nats.url, server_name="elsewhere.example", **mutual(pki, client)))
    with pytest.raises(PermanentSinkError, match=r"for the name elsewhere\.example"):
        sink.send(an_event())


def test_a_tls_nats_url_is_never_used_in_plain_text(
    tmp_path: Path, pki: Pki, closing: Callable[[Any], Any]
) -> None:
    """nats-py connects in plain text to a tls:// server that offers no TLS (whoever sits
    between the daemon and the server can be that server): the sink refuses the connection
    and publishes nothing."""
    with running(nats_broker(tmp_path)) as plain:
        tls_url = plain.url.replace("nats://", "tls://")
        sink = closing(nats_sink(tls_url, ca_file=str(pki.ca.cert), timeout_seconds=3))
        with pytest.raises(SinkError, match="did not start TLS"):
            sink.send(an_event())
        add_stream(plain.url, "TLS", ["modelwatch.>"])
        assert stream_messages(plain.url, "TLS") == 0


TOKEN = "never-in-plain-text"  # noqa: S105 (a test token)


@pytest.mark.parametrize("scheme", ["tls", "nats"])
def test_a_plain_text_server_never_sees_the_nats_credentials(pki: Pki, scheme: str) -> None:
    """Whoever answers for a tls:// server, or for any server once TLS keys are set, without
    TLS (a host between the node and the server) gets nothing: the client refuses at the
    server's INFO, before its CONNECT with the token."""
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.sendall(
                b'INFO {"server_id":"x","version":"2.10.0","max_payload":1048576}\r\n'
            )
            connection.settimeout(2.0)
            with contextlib.suppress(OSError):
                while chunk := connection.recv(4096):
                    received.extend(chunk)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    tls = client_tls("sinks[3]", TlsOptions(ca_file=str(pki.ca.cert)))

    async def connect() -> None:
        await open_connection(
            TlsClient(),
            tls,
            servers=[f"{scheme}://127.0.0.1:{port}"],
            token=TOKEN,
            allow_reconnect=False,
            connect_timeout=2,
        )

    with pytest.raises(PlainTextRefused, match="did not start TLS"):
        asyncio.run(connect())
    thread.join(5)
    listener.close()
    assert TOKEN.encode() not in received
    assert b"CONNECT" not in received


def test_nats_tls_keys_are_checked_at_start(tmp_path: Path) -> None:
    """A missing CA file is a configuration error naming the key, before any connection."""
    with pytest.raises(ConfigError, match=r"^sinks\[3\]\.ca_file: cannot read"):
        nats_sink("tls://127.0.0.1:1", ca_file=str(tmp_path / "nope.pem"))
