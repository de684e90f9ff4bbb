"""The webhook sink against a real HTTP server on 127.0.0.1.

The server records every request and answers from a script the test sets; signatures are
checked with the independent `standardwebhooks` package, not with our own code.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from modelwatch import __version__
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, Event
from modelwatch.sinks import build_sink
from modelwatch.sinks.webhook import WebhookSink, parse_retry_after
from modelwatch.testing import sample_event, sink_config
from tests.conftest import wait_until
from tests.receiver import Receiver, Reply

SECRET_A = "whsec_" + base64.b64encode(b"first secret, 32 bytes long ....").decode()
SECRET_B = "whsec_" + base64.b64encode(b"second secret, 32 bytes long ...").decode()
HOOK_VAR = "HOOK_SECRET"
SECRET_C = "whsec_" + base64.b64encode(b"nobody configured this one .....").decode()


@pytest.fixture
def make_sink(receiver: Receiver) -> Iterator[Callable[..., WebhookSink]]:
    """Build webhook sinks pointed at the receiver (by default); all are closed afterwards."""
    sinks: list[WebhookSink] = []

    def build(**options: Any) -> WebhookSink:
        options.setdefault("url", receiver.url)
        sink = WebhookSink(sink_config("webhook", options=options, key="sinks[1]"))
        sinks.append(sink)
        return sink

    yield build
    for sink in sinks:
        sink.close()


def an_event(name: str = "resnet") -> Event:
    return sample_event(name, fingerprint="sha256:" + "ab" * 32)


def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- what a request looks like --------------------------------------------------------------


def test_structured_event_is_posted_and_verifies_with_standard_webhooks(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In structured mode the CloudEvent JSON is POSTed, signed per Standard Webhooks."""
    monkeypatch.setenv(HOOK_VAR, SECRET_A)
    event = an_event()
    make_sink(secret_env=HOOK_VAR).send(event)
    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", "/hooks/models")
    assert request.body == event.to_json().encode()
    assert request.headers["content-type"] == "application/cloudevents+json; charset=utf-8"
    assert request.headers["user-agent"] == f"modelwatch/{__version__}"
    assert request.headers["webhook-id"] == event.id
    assert Webhook(SECRET_A).verify(request.body, request.headers) == event.to_dict()


def test_rotated_secrets_each_verify_on_their_own(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two secrets configured, a receiver knowing either one accepts the request."""
    monkeypatch.setenv(HOOK_VAR, f"{SECRET_A} {SECRET_B}")
    make_sink(secret_env=HOOK_VAR).send(an_event())
    [request] = receiver.requests
    assert [s.split(",")[0] for s in request.headers["webhook-signature"].split(" ")] == [
        "v1",
        "v1",
    ]
    Webhook(SECRET_A).verify(request.body, request.headers)
    Webhook(SECRET_B).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET_C).verify(request.body, request.headers)


def test_secret_can_come_from_a_file(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], tmp_path: Path
) -> None:
    """`secret_file` is read once, surrounding whitespace ignored."""
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(f"  {SECRET_B}\n")
    make_sink(secret_file=str(secret_file)).send(an_event())
    [request] = receiver.requests
    Webhook(SECRET_B).verify(request.body, request.headers)


def test_binary_mode_sends_data_as_body_and_attributes_as_ce_headers(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In binary mode the body is `data` and attributes travel percent-encoded in ce-*."""
    monkeypatch.setenv(HOOK_VAR, SECRET_A)
    event = an_event("modèle 1")
    make_sink(secret_env=HOOK_VAR, mode="binary").send(event)
    [request] = receiver.requests
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == event.to_dict()["data"]
    assert {k: v for k, v in request.headers.items() if k.startswith("ce-")} == {
        "ce-specversion": "1.0",
        "ce-id": event.id,
        "ce-source": "modelwatch:/storage/models",
        "ce-type": REGISTERED,
        "ce-subject": "mod%C3%A8le%201",
        "ce-time": event.time,
    }
    Webhook(SECRET_A).verify(request.body, request.headers)


def test_configured_headers_are_sent_and_requests_without_secret_are_unsigned(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """Extra headers go along; with no secret there is an id and timestamp but no signature."""
    make_sink(headers={"X-Team": "vision"}).send(an_event())
    [request] = receiver.requests
    assert request.headers["x-team"] == "vision"
    assert "webhook-signature" not in request.headers
    assert request.headers["webhook-id"] == an_event().id


def test_webhook_id_is_stable_across_attempts_and_timestamp_is_per_attempt(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """A retried event keeps its webhook-id; each attempt carries the current time."""
    receiver.script(Reply(503))
    sink, event = make_sink(), an_event()
    with pytest.raises(SinkError):
        sink.send(event)
    sink.send(event)
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event.id
    for request in (first, second):
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5


# --- what the answer means ------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_means_delivered(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], status: int
) -> None:
    """Every 2xx answer counts as delivered."""
    receiver.script(Reply(status, body=b"thanks"))
    make_sink().send(an_event())
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed_and_fail_permanently(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], status: int
) -> None:
    """A redirect is reported with its Location and never followed."""
    receiver.script(Reply(status, {"Location": "/elsewhere"}))
    with pytest.raises(PermanentSinkError, match="redirects are not followed") as caught:
        make_sink().send(an_event())
    assert "/elsewhere" in str(caught.value)
    assert [r.path for r in receiver.requests] == ["/hooks/models"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422])
def test_client_errors_are_permanent_and_quote_the_answer(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], status: int
) -> None:
    """4xx answers (other than 408 and 429) dead-letter the event, quoting the body on one line."""
    receiver.script(Reply(status, body=b"schema says no:\n  field 'version' missing"))
    with pytest.raises(PermanentSinkError) as caught:
        make_sink().send(an_event())
    message = str(caught.value)
    assert f"HTTP {status}" in message
    assert "schema says no: field 'version' missing" in message
    assert "\n" not in message


@pytest.mark.parametrize("status", [408, 429, 503])
def test_retryable_answers_honour_retry_after_seconds(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], status: int
) -> None:
    """408, 429 and 5xx are retried, after the server's Retry-After when it gives one."""
    receiver.script(Reply(status, {"Retry-After": "7"}))
    with pytest.raises(SinkError) as caught:
        make_sink().send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)
    assert caught.value.retry_after == 7
    assert f"HTTP {status}" in str(caught.value)


def test_retry_after_may_be_an_http_date(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """An HTTP-date Retry-After becomes the seconds until that date."""
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    receiver.script(Reply(429, {"Retry-After": later}))
    with pytest.raises(SinkError) as caught:
        make_sink().send(an_event())
    assert caught.value.retry_after is not None
    assert 110 <= caught.value.retry_after <= 121


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried_with_backoff(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], status: int
) -> None:
    """5xx without Retry-After is retried on the normal backoff."""
    receiver.script(Reply(status, body=b"upstream unavailable"))
    with pytest.raises(SinkError) as caught:
        make_sink().send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)
    assert caught.value.retry_after is None
    assert "upstream unavailable" in str(caught.value)


@pytest.mark.parametrize("value", ["soon", "-1", "1.5", "", "Mon, 99 Foo 2026 99:00:00 GMT"])
def test_unreadable_retry_after_is_ignored(value: str) -> None:
    """A Retry-After that is neither delta-seconds nor an HTTP-date gives no hint."""
    assert parse_retry_after(value, time.time()) is None


def test_a_slow_server_times_out_and_the_next_send_reconnects(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """A server slower than timeout_seconds is a retryable timeout; the sink recovers."""
    receiver.script(Reply(delay=10))
    sink = make_sink(timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"timed out after 0\.5 s") as caught:
        sink.send(an_event())
    assert time.monotonic() - started < 3
    assert not isinstance(caught.value, PermanentSinkError)
    sink.send(an_event())
    assert receiver.connections_opened == 2


def test_a_receiver_dripping_its_answer_cannot_stretch_an_attempt(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """timeout_seconds bounds the whole attempt: an answer trickling in a byte every 0.1 s
    (each read well within the timeout) still ends the attempt at its deadline."""
    receiver.script(Reply(200, body=b"x" * 200, drip=0.1))
    sink = make_sink(timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"timed out after 1 s") as caught:
        sink.send(an_event())
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.5, elapsed  # the bound: the attempt ends at its deadline
    assert not isinstance(caught.value, PermanentSinkError)


@pytest.fixture
def tls_dripper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 (a self-signed certificate the client is told to trust)
    that reads a request, then answers one byte every 0.1 s; yields its URL."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run([*request, *subject, *files], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                if stop.wait(0.1):
                    return
                tls.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, name="tls-dripper")
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            socket.create_connection(listener.getsockname(), timeout=1).close()  # wake accept
        thread.join()
        listener.close()


def test_the_deadline_holds_over_tls_too(
    tls_dripper: str, make_sink: Callable[..., WebhookSink]
) -> None:
    """Over HTTPS (handshake included) a dripping answer also ends the attempt at its deadline."""
    sink = make_sink(url=tls_dripper, timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"timed out after 1 s"):
        sink.send(an_event())
    assert 1.0 <= time.monotonic() - started < 1.5


def test_connection_refused_is_retryable(make_sink: Callable[..., WebhookSink]) -> None:
    """Nobody listening is a retryable failure, not a dead letter."""
    sink = make_sink(url=f"http://127.0.0.1:{refused_port()}/hook")
    with pytest.raises(SinkError) as caught:
        sink.send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)


def test_one_connection_is_kept_alive_across_sends(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """Consecutive sends reuse one TCP connection, error answers included."""
    receiver.script(Reply(200), Reply(500, body=b"oops"), Reply(204))
    sink = make_sink()
    sink.send(an_event("a"))
    with pytest.raises(SinkError):
        sink.send(an_event("b"))
    sink.send(an_event("c"))
    assert len({r.client_port for r in receiver.requests}) == 1
    assert receiver.connections_opened == 1


def test_a_huge_answer_is_not_read_in_full(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """An answer body beyond 64 KiB is abandoned with its connection, not buffered."""
    receiver.script(Reply(200, body=b"x" * 1_000_000))
    sink = make_sink()
    sink.send(an_event("a"))
    sink.send(an_event("b"))
    assert receiver.connections_opened == 2


def test_non_ascii_url_paths_are_percent_encoded(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """A URL path with non-ASCII characters is sent percent-encoded (UTF-8)."""
    make_sink(url=receiver.url.replace("/models", "/modèles?team=ü%20x")).send(an_event())
    assert [r.path for r in receiver.requests] == ["/hooks/mod%C3%A8les?team=%C3%BC%20x"]


def test_a_connection_the_server_closed_while_idle_is_reopened(
    receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """When the server drops an idle kept-alive connection, the next send just reconnects."""
    receiver.idle_timeout = 0.2
    sink = make_sink()
    sink.send(an_event("a"))
    wait_until(lambda: receiver.connections_closed == 1, timeout=5)
    sink.send(an_event("b"))
    first, second = receiver.requests
    assert first.client_port != second.client_port


# --- configuration and secrecy --------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"url": None}, "sinks[1].url: required"),
        ({"url": "ftp://example.com/x"}, "sinks[1].url: must be a URL (http://, https://)"),
        ({"url": "https://user:pw@example.com/"}, "sinks[1].url: a user or password"),
        ({"url": "https://example.com/?token=t"}, "sinks[1].url: a credential in the URL query"),
        ({"url": None, "url_env": "NO_SUCH_VARIABLE"}, "sinks[1].url_env: environment"),
        ({"url_env": "HOOK_SECRET"}, "sinks[1].url_env: give one of url, url_env or url_file"),
        ({"headers": {"X-Api-Key": "k"}}, "sinks[1].headers.X-Api-Key: a credential header"),
        ({"headers_env": {"X-Api-Key": "NO_SUCH_VARIABLE"}}, "sinks[1].headers_env.X-Api-Key: "),
        (
            {"headers": {"X-Team": "a"}, "headers_env": {"x-team": "HOOK_SECRET"}},
            "sinks[1].headers_env.x-team: this header is given twice",
        ),
        (
            {"headers_env": {"A": "HOOK_SECRET"}, "headers_file": {"A": "/x"}},
            "sinks[1].headers_file.A: also in headers_env",
        ),
        ({"secret_env": "HOOK_SECRET", "secret_file": "/x"}, "sinks[1].secret_file: "),
        ({"secret_env": "NO_SUCH_VARIABLE"}, "sinks[1].secret_env: environment variable"),
        ({"secret_env": "BAD_SECRET"}, "sinks[1].secret_env (BAD_SECRET): secret 2 of 2"),
        ({"secret_file": "/nonexistent/secret"}, "sinks[1].secret_file: cannot read"),
        ({"timeout_seconds": 0}, "sinks[1].timeout_seconds: must be > 0"),
        ({"mode": "xml"}, "sinks[1].mode: must be"),
        ({"headers": {"webhook-id": "x"}}, "sinks[1].headers.webhook-id: set by the"),
        ({"headers": {"Content-Type": "text/plain"}}, "sinks[1].headers.Content-Type: set by"),
        ({"headers": {"ce-type": "x"}}, "sinks[1].headers.ce-type: set by"),
        ({"headers": {"X-Bad": "a\r\nInjected: 1"}}, "sinks[1].headers.X-Bad: must be"),
        ({"proxy": "socks5://proxy:1080"}, "sinks[1].proxy: must be a URL (http://, https://)"),
        ({"proxy": "http://user:pw@proxy:3128"}, "sinks[1].proxy: a user or password"),
        (
            {"proxy": "http://proxy:3128", "proxy_env": "HOOK_SECRET"},
            "sinks[1].proxy_env: give one of proxy or proxy_env",
        ),
        ({"proxy_env": "NO_SUCH_VARIABLE"}, "sinks[1].proxy_env: environment variable"),
        ({"ca_file": "/nonexistent/ca.pem"}, "sinks[1].ca_file: cannot read /nonexistent/ca.pem"),
        ({"server_name": "bad name"}, "sinks[1].server_name: must be a DNS name"),
    ],
)
def test_bad_configuration_names_the_key(
    options: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configuration mistake is a ConfigError that starts with the full key."""
    monkeypatch.setenv(HOOK_VAR, SECRET_A)
    monkeypatch.setenv("BAD_SECRET", f"{SECRET_A} not-a-whsec-secret")
    monkeypatch.delenv("NO_SUCH_VARIABLE", raising=False)
    full = {"url": "http://127.0.0.1:9/hook", **options}
    with pytest.raises(ConfigError) as caught:
        WebhookSink(
            sink_config(
                "webhook", options={k: v for k, v in full.items() if v is not None}, key="sinks[1]"
            )
        )
    message = str(caught.value)
    assert message.startswith(expected)
    assert "not-a-whsec-secret" not in message
    assert SECRET_A not in message


def test_secrets_and_signatures_never_show_in_repr_errors_or_logs(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a server echoing our headers back cannot get the secret or signature into a message."""
    monkeypatch.setenv(HOOK_VAR, f"{SECRET_A} {SECRET_B}")
    receiver.script(Reply(500, echo_credentials=True), Reply(400, echo_credentials=True))
    monkeypatch.setenv("HOOK_AUTHORIZATION", "Bearer hunter2")
    sink = make_sink(secret_env=HOOK_VAR, headers_env={"Authorization": "HOOK_AUTHORIZATION"})
    messages = [repr(sink)]
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(SinkError) as caught:
                sink.send(an_event())
            messages.append(str(caught.value))
    leaks = [SECRET_A, SECRET_B, "hunter2"]
    for request in receiver.requests:
        leaks += [sig.split(",")[1] for sig in request.headers["webhook-signature"].split()]
    shown = "\n".join(messages) + repr(logs)
    assert '"webhook-signature": "v1,*** v1,***"' in messages[1]  # the echo did reach the excerpt
    assert [leak for leak in leaks if leak in shown] == []


def test_build_sink_finds_the_webhook_sink_through_entry_points(receiver: Receiver) -> None:
    """`type = "webhook"` in the config resolves to this sink via the entry points."""
    sink = build_sink(sink_config("webhook", options={"url": receiver.url}))
    try:
        assert isinstance(sink, WebhookSink)
    finally:
        sink.close()


def test_a_user_and_password_in_url_env_are_sent_as_basic_authorization(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL with credentials comes from the environment (or a file); its user:password
    becomes the request's Basic authorization (it was dropped, and the receiver answered
    401), and neither appears in the sink's description or its errors."""
    with_credentials = receiver.url.replace("http://", "http://alice:s%40cret@")
    monkeypatch.setenv("HOOK_URL", with_credentials)
    sink = WebhookSink(sink_config("webhook", options={"url_env": "HOOK_URL"}, key="sinks[1]"))
    try:
        sink.send(an_event())
    finally:
        sink.close()
    [request] = receiver.requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s@cret").decode(
        "ascii"
    )
    assert "s%40cret" not in repr(sink)
    assert "alice" not in repr(sink)


def test_credentials_in_url_env_and_an_authorization_header_are_refused(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_URL", receiver.url.replace("http://", "http://alice:pw@"))
    monkeypatch.setenv("HOOK_AUTH", "Bearer abcdefgh")
    options = {"url_env": "HOOK_URL", "headers_env": {"Authorization": "HOOK_AUTH"}}
    with pytest.raises(ConfigError, match=r"^sinks\[1\]: the URL carries a user:password"):
        WebhookSink(sink_config("webhook", options=options, key="sinks[1]"))
