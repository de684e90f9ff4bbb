"""Enterprise networks for the webhook sink: a private CA, mutual TLS and a real forward proxy.

Everything is real and on 127.0.0.1: certificates made by `openssl` (tests/pki.py), an HTTPS
receiver presenting them (tests/receiver.py), Debian's `tinyproxy` as the forward proxy
(tests/forward_proxy.py).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.sinks.webhook import WebhookSink
from modelwatch.testing import sample_event, sink_config
from tests.brokers import free_port
from tests.daemons import CLI, daemon_env
from tests.forward_proxy import Tinyproxy, forward_proxy
from tests.pki import Pki
from tests.receiver import Receiver, Reply, running_receiver

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_from_the_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the proxy variables themselves; none leaks in from the caller's shell."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def https_receiver(pki: Pki) -> Iterator[Receiver]:
    """An HTTPS receiver whose certificate the private CA signed."""
    with running_receiver(pki.server_context(pki.server())) as server:
        yield server


@pytest.fixture
def make_sink() -> Iterator[Callable[..., WebhookSink]]:
    sinks: list[WebhookSink] = []

    def build(**options: Any) -> WebhookSink:
        sink = WebhookSink(sink_config("webhook", options=options, key="sinks[1]"))
        sinks.append(sink)
        return sink

    yield build
    for sink in sinks:
        sink.close()


def an_event() -> Any:
    return sample_event("resnet", fingerprint="sha256:" + "cd" * 32)


# --- a private CA ------------------------------------------------------------------------------


def test_a_receiver_signed_by_a_private_ca_is_delivered_to_with_ca_file(
    pki: Pki, https_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """With `ca_file` naming the private CA, the HTTPS receiver gets the event."""
    make_sink(url=https_receiver.url, ca_file=str(pki.ca.cert)).send(an_event())
    assert [r.path for r in https_receiver.requests] == ["/hooks/models"]


def test_without_ca_file_the_private_certificate_is_refused_permanently(
    https_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """Without `ca_file` the certificate is not trusted: a permanent failure saying so."""
    with pytest.raises(PermanentSinkError) as caught:
        make_sink(url=https_receiver.url).send(an_event())
    message = str(caught.value)
    assert "the server's certificate is not trusted" in message
    assert "trusting the system's CA store" in message
    assert "set ca_file" in message
    assert https_receiver.requests == []


def test_another_ca_is_not_trusted_either(
    tmp_path: Path, https_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """`ca_file` replaces the system store: a CA that did not sign the receiver is refused."""
    other = Pki(tmp_path / "other", name="someone else's CA")
    with pytest.raises(PermanentSinkError, match=r"not trusted.*the CA certificates in"):
        make_sink(url=https_receiver.url, ca_file=str(other.ca.cert)).send(an_event())


def test_server_name_verifies_a_name_other_than_the_urls_host(
    pki: Pki, make_sink: Callable[..., WebhookSink]
) -> None:
    """A certificate for hooks.modelwatch.test only: refused at 127.0.0.1, naming the fix,
    and delivered with `server_name = "hooks.modelwatch.test"`."""
    named = pki.server("named", alt_names="DNS:hooks.modelwatch.test")
    with running_receiver(pki.server_context(named)) as receiver:
        with pytest.raises(PermanentSinkError, match="set server_name"):
            make_sink(url=receiver.url, ca_file=str(pki.ca.cert)).send(an_event())
        sink = make_sink(
            url=receiver.url, ca_file=str(pki.ca.cert), server_name="hooks.modelwatch.test"
        )
        sink.send(an_event())
        assert len(receiver.requests) == 1


# --- mutual TLS --------------------------------------------------------------------------------


@pytest.fixture
def mtls_receiver(pki: Pki) -> Iterator[Receiver]:
    """An HTTPS receiver that requires a client certificate the private CA signed."""
    with running_receiver(pki.server_context(pki.server(), require_client=True)) as server:
        yield server


def test_a_receiver_requiring_client_certificates_gets_ours(
    pki: Pki, mtls_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """With client_cert_file and client_key_file the receiver sees our certificate."""
    client = pki.client("modelwatch-client")
    sink = make_sink(
        url=mtls_receiver.url,
        ca_file=str(pki.ca.cert),
        client_cert_file=str(client.cert),
        client_key_file=str(client.key),
    )
    sink.send(an_event())
    sink.send(an_event())
    assert [r.client_cert for r in mtls_receiver.requests] == ["modelwatch-client"] * 2


def test_one_file_may_hold_the_client_certificate_and_its_key(
    pki: Pki, mtls_receiver: Receiver, make_sink: Callable[..., WebhookSink], tmp_path: Path
) -> None:
    """client_cert_file alone works when the file holds the key as well."""
    client = pki.client("combined")
    both = tmp_path / "combined.pem"
    both.write_bytes(client.cert.read_bytes() + client.key.read_bytes())
    both.chmod(0o600)
    make_sink(url=mtls_receiver.url, ca_file=str(pki.ca.cert), client_cert_file=str(both)).send(
        an_event()
    )
    assert [r.client_cert for r in mtls_receiver.requests] == ["combined"]


def test_without_a_client_certificate_the_receiver_refuses(
    pki: Pki, mtls_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """No client certificate for a receiver that requires one: the attempt fails and nothing
    is received (permanent when the server's alert arrives, else retried like a reset)."""
    with pytest.raises(SinkError):
        make_sink(url=mtls_receiver.url, ca_file=str(pki.ca.cert)).send(an_event())
    assert mtls_receiver.requests == []


# --- verification cannot be turned off silently -------------------------------------------------


def test_insecure_skip_verify_delivers_and_warns_at_every_start(
    https_receiver: Receiver, make_sink: Callable[..., WebhookSink]
) -> None:
    """`insecure_skip_verify = true` accepts the unknown certificate, and every sink built
    with it (every start, every reload) logs tls_verification_disabled."""
    with structlog.testing.capture_logs() as logs:
        make_sink(url=https_receiver.url, insecure_skip_verify=True).send(an_event())
        make_sink(url=https_receiver.url, insecure_skip_verify=True)
    warnings = [entry for entry in logs if entry["event"] == "tls_verification_disabled"]
    assert [(w["log_level"], w["key"]) for w in warnings] == [
        ("warning", "sinks[1].insecure_skip_verify")
    ] * 2
    assert len(https_receiver.requests) == 1


# --- configuration mistakes name the key ---------------------------------------------------------


def _broken_files(pki: Pki, tmp_path: Path) -> dict[str, Path]:
    client = pki.client()
    other = pki.client("other")
    encrypted = tmp_path / "encrypted.key"
    encrypt = ["openssl", "pkey", "-in", str(client.key), "-aes256", "-passout", "pass:x"]
    subprocess.run(
        [*encrypt, "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    not_pem = tmp_path / "not-pem.txt"
    not_pem.write_text("hello\n")
    return {
        "cert": client.cert,
        "key": client.key,
        "other_key": other.key,
        "encrypted": encrypted,
        "not_pem": not_pem,
        "directory": tmp_path,
        "missing": tmp_path / "missing.pem",
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"ca_file": "missing"}, "sinks[1].ca_file: cannot read {missing}: No such file"),
        ({"ca_file": "directory"}, "sinks[1].ca_file: cannot read {directory}: Is a directory"),
        ({"ca_file": "not_pem"}, "sinks[1].ca_file: {not_pem} holds no PEM CA certificate"),
        ({"client_cert_file": "missing", "client_key_file": "key"}, "sinks[1].client_cert_file:"),
        ({"client_cert_file": "cert", "client_key_file": "missing"}, "sinks[1].client_key_file: c"),
        ({"client_cert_file": "cert"}, "sinks[1].client_cert_file: {cert} must hold the cert"),
        ({"client_key_file": "key"}, "sinks[1].client_key_file: needs client_cert_file"),
        (
            {"client_cert_file": "cert", "client_key_file": "other_key"},
            "sinks[1].client_key_file: {other_key} is not the key of the certificate",
        ),
        (
            {"client_cert_file": "cert", "client_key_file": "encrypted"},
            "sinks[1].client_key_file: the private key is protected by a passphrase",
        ),
        (
            {"ca_file": "cert", "insecure_skip_verify": True},
            "sinks[1].insecure_skip_verify: give ca_file or insecure_skip_verify, not both",
        ),
        ({"insecure_skip_verify": "yes"}, "sinks[1].insecure_skip_verify: must be true or false"),
    ],
)
def test_tls_configuration_mistakes_name_the_key(
    pki: Pki, tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    """A CA, certificate or key file that is missing, unreadable, not PEM, encrypted or not
    matching is a ConfigError naming the key (and the path, never the key's content)."""
    files = _broken_files(pki, tmp_path)
    given = {
        k: str(files[v]) if isinstance(v, str) and v in files else v for k, v in options.items()
    }
    with pytest.raises(ConfigError) as caught:
        WebhookSink(
            sink_config("webhook", options={"url": "https://127.0.0.1:9/", **given}, key="sinks[1]")
        )
    message = str(caught.value)
    assert message.startswith(expected.format(**{k: str(v) for k, v in files.items()}))
    assert "PRIVATE KEY" not in message


# --- a real forward proxy ------------------------------------------------------------------------


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with forward_proxy(tmp_path / "proxy") as server:
        yield server


def test_https_proxy_tunnels_https_with_connect(
    pki: Pki,
    https_receiver: Receiver,
    proxy: Tinyproxy,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTPS_PROXY set, an https:// receiver is reached through a CONNECT tunnel (and
    its certificate still verified end to end with ca_file)."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    sink = make_sink(url=https_receiver.url, ca_file=str(pki.ca.cert))
    sink.send(an_event())
    sink.send(an_event())
    assert len(https_receiver.requests) == 2
    [tunnel] = proxy.requests()  # one tunnel, kept alive for both
    assert tunnel.startswith(f"CONNECT 127.0.0.1:{https_receiver.server_port} HTTP/1.")


def test_http_proxy_forwards_plain_http(
    receiver: Receiver,
    proxy: Tinyproxy,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTP_PROXY set, an http:// receiver gets the request from the proxy, signed and
    whole."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    event = an_event()
    make_sink(url=receiver.url).send(event)
    [request] = receiver.requests
    assert "tinyproxy" in request.headers.get("via", "")
    assert request.headers["webhook-id"] == event.id
    assert request.body == event.to_json().encode()
    assert proxy.requests() == [f"POST {receiver.url} HTTP/1.1"]


def test_no_proxy_sends_directly(
    receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host listed in NO_PROXY is reached directly, though the proxy variable names a
    proxy that is not even running."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "localhost, 127.0.0.0/8")
    make_sink(url=receiver.url).send(an_event())
    assert len(receiver.requests) == 1


def test_a_proxy_that_is_down_is_retried(
    https_receiver: Receiver, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy nobody answers on is a retryable failure naming the proxy; nothing arrives."""
    port = free_port()
    monkeypatch.setenv("https_proxy", f"127.0.0.1:{port}")  # no scheme: http://, as curl reads it
    with pytest.raises(SinkError) as caught:
        make_sink(url=https_receiver.url, insecure_skip_verify=True).send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)
    assert f"proxy http://127.0.0.1:{port} (from https_proxy)" in str(caught.value)
    assert https_receiver.requests == []


def test_the_sinks_own_proxy_wins_over_the_environment(
    receiver: Receiver,
    proxy: Tinyproxy,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`proxy` in the sink's table replaces HTTP_PROXY for that sink."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    make_sink(url=receiver.url, proxy=proxy.url).send(an_event())
    assert len(receiver.requests) == 1
    assert len(proxy.requests()) == 1


def test_a_proxy_with_credentials_comes_from_proxy_env(
    tmp_path: Path,
    https_receiver: Receiver,
    pki: Pki,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """proxy_env names a variable holding a proxy URL with a password: the tunnel is opened
    with it; a proxy refusing a wrong password is permanent, and no message shows it."""
    with forward_proxy(tmp_path / "auth-proxy", credentials=("alice", "pr0xy-pass")) as proxy:
        host = proxy.url.removeprefix("http://")
        monkeypatch.setenv("CORP_PROXY", f"http://alice:pr0xy-pass@{host}")
        monkeypatch.setenv("WRONG_PROXY", f"http://alice:guessed-pass@{host}")
        options = {"url": https_receiver.url, "ca_file": str(pki.ca.cert)}
        make_sink(proxy_env="CORP_PROXY", **options).send(an_event())
        assert len(https_receiver.requests) == 1
        wrong = make_sink(proxy_env="WRONG_PROXY", **options)
        with pytest.raises(PermanentSinkError) as caught:
            wrong.send(an_event())
    message = str(caught.value) + repr(wrong)
    assert "Tunnel connection failed: 401" in message  # tinyproxy's answer to CONNECT
    assert "guessed-pass" not in message
    assert "YWxpY2U6Z3Vlc3NlZC1wYXNz" not in message  # the base64 of alice:guessed-pass
    assert "(from proxy_env (WRONG_PROXY))" in message


def test_the_deadline_holds_through_a_proxy(
    receiver: Receiver,
    proxy: Tinyproxy,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer dripping through the proxy still ends the attempt at timeout_seconds."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    receiver.script(Reply(200, body=b"x" * 200, drip=0.1))
    sink = make_sink(url=receiver.url, timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"timed out after 1 s"):
        sink.send(an_event())
    assert 1.0 <= time.monotonic() - started < 1.5


# --- check-config says what each sink trusts and through which proxy -----------------------------


def test_check_config_shows_trust_and_proxy_never_key_material(pki: Pki, tmp_path: Path) -> None:
    """check-config names the CA, client certificate and key files and the proxy each sink
    uses (its password masked), the route of a NO_PROXY host, and never a key's content; the
    private key others may read draws a warning."""
    client = pki.client("modelwatch")
    client.key.chmod(0o644)
    config = tmp_path / "modelwatch.toml"
    config.write_text(
        f"""
roots = []
[[sinks]]
type = "webhook"
name = "outside"
url = "https://hooks.example.com/in"
ca_file = "{pki.ca.cert}"
client_cert_file = "{client.cert}"
client_key_file = "{client.key}"
proxy_env = "CORP_PROXY"
[[sinks]]
type = "webhook"
name = "inside"
url = "http://hooks.corp.internal/in"
[[sinks]]
type = "redis"
url = "rediss://cache.corp.internal:6380/0"
server_name = "cache.modelwatch.test"
ca_file = "{pki.ca.cert}"
"""
    )
    env = daemon_env(
        CORP_PROXY="http://alice:pr0xy-pass@proxy.corp:3128",
        HTTP_PROXY="http://proxy.corp:3128",
        NO_PROXY=".corp.internal",
    )
    result = subprocess.run(
        [*CLI, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f'client_key_file = "{client.key}"' in out
    assert (
        "# route: https://hooks.example.com:443 via http://***@proxy.corp:3128"
        " (from proxy_env (CORP_PROXY))"
    ) in out
    assert (
        f"# trusts: the CA certificates in {pki.ca.cert} (ca_file), for the name hooks.example.com"
    ) in out
    assert f"# client certificate: {client.cert} (key {client.key})" in out
    assert "# route: http://hooks.corp.internal:80 via direct (NO_PROXY covers" in out
    assert "for the name cache.modelwatch.test" in out
    assert "pr0xy-pass" not in out + result.stderr
    assert "PRIVATE KEY" not in out + result.stderr
    assert "secret_file_readable" in result.stderr


# --- MLflow: the same settings, as MLflow's client reads them ------------------------------------


@pytest.mark.parametrize(
    ("key", "variable"),
    [
        ("ca_file", "MLFLOW_TRACKING_SERVER_CERT_PATH"),
        ("client_key_file", "MLFLOW_TRACKING_CLIENT_CERT_PATH"),
        ("insecure_skip_verify", "MLFLOW_TRACKING_INSECURE_TLS=true"),
        ("proxy", "HTTPS_PROXY"),
    ],
)
def test_mlflow_refuses_the_shared_keys_naming_its_variable(key: str, variable: str) -> None:
    """MLflow's client reads TLS and proxies from the environment: a shared key in an mlflow
    sink is an error naming the variable to set instead, not a silently ignored key."""
    pytest.importorskip("mlflow")
    from modelwatch.sinks.mlflow import MlflowSink

    options = {"tracking_uri": "https://mlflow.example.com", key: "x"}
    with pytest.raises(ConfigError) as caught:
        MlflowSink(sink_config("mlflow", options=options, key="sinks[1]"))
    assert str(caught.value).startswith(f"sinks[1].{key}: MLflow's client reads")
    assert variable in str(caught.value)


def test_mlflow_checks_the_files_its_variables_name_and_warns_when_insecure(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA file named by MLFLOW_TRACKING_SERVER_CERT_PATH that is missing is an error naming
    the variable; MLFLOW_TRACKING_INSECURE_TLS=true is a warning at every start."""
    pytest.importorskip("mlflow")
    from modelwatch.sinks.mlflow import MlflowSink

    config = sink_config("mlflow", options={"tracking_uri": "https://m.example"}, key="sinks[1]")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"^sinks\[1\] \(MLFLOW_TRACKING_SERVER_CERT_PATH\)"):
        MlflowSink(config)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(pki.ca.cert))
    assert f"trusts: the CA certificates in {pki.ca.cert}" in "\n".join(
        MlflowSink(config).network_summary()
    )
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    with structlog.testing.capture_logs() as logs:
        MlflowSink(config)
    assert [e["event"] for e in logs] == ["tls_verification_disabled"]
