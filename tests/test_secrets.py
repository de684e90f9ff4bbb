"""Secrets end to end, through the real command line (SPEC §10).

Each credential written into the TOML is refused by `check-config` and by `run`, naming the
key and the alternative. Secrets given the right way (environment, files) reach the servers
they are for and nothing else: not `check-config`, not a log line, not an event, not `status`,
not the state database, not a command sink's environment; not even when a server echoes
them back in an error.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from modelwatch.credentials import Scrubber
from tests.brokers import BrokerServer, nats_broker, read_stream, redis_broker, running
from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, jsonl_records
from tests.receiver import Receiver, Reply
from tests.writers import write_safetensors

# Distinct, greppable secrets; none is a substring of another or of anything else in the output.
URL_TOKEN = "urltok-5c1e7a"  # noqa: S105
HEADER_TOKEN = "hdrtok-8d2f4b"  # noqa: S105
SIGNING_KEY = b"signing key of 32 bytes, secret!"
SIGNING_SECRET = "whsec_" + base64.b64encode(SIGNING_KEY).decode()
REDIS_PASSWORD = "redispw-3a9c0e"  # noqa: S105
NATS_TOKEN = "natstok-6b4d1f"  # noqa: S105
BYSTANDER = "awssecret-2e7f90"  # in the daemon's environment, for nobody
SECRETS = (
    URL_TOKEN,
    HEADER_TOKEN,
    SIGNING_SECRET,
    SIGNING_SECRET.removeprefix("whsec_"),
    REDIS_PASSWORD,
    NATS_TOKEN,
    BYSTANDER,
)


def modelwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m modelwatch ARGS`, its output captured."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=env or daemon_env(),
        timeout=60,
        check=False,
    )


def leaks(*texts: str | bytes) -> list[str]:
    """The secrets found in any of `texts`."""
    joined = b"\n".join(t.encode() if isinstance(t, str) else t for t in texts)
    return [secret for secret in SECRETS if secret.encode() in joined]


def state_bytes(state_dir: Path) -> bytes:
    """Every file of the state directory (database, WAL, lock), as bytes."""
    if not state_dir.exists():
        return b""
    return b"".join(p.read_bytes() for p in sorted(state_dir.rglob("*")) if p.is_file())


# --- refused in the TOML ----------------------------------------------------------------------

REFUSED = [
    pytest.param(
        f'type = "webhook"\nurl = "https://hook:{URL_TOKEN}@hooks.example/in"',
        "sinks[0].url: a user or password in the URL",
        "use url_env or url_file",
        id="webhook-userinfo",
    ),
    pytest.param(
        f'type = "webhook"\nurl = "https://hooks.example/in?token={URL_TOKEN}"',
        "sinks[0].url: a credential in the URL query (token=)",
        "use url_env or url_file",
        id="webhook-query-token",
    ),
    pytest.param(
        f'type = "webhook"\nurl = "https://hooks.example/in"\n'
        f'headers = {{ Authorization = "Bearer {HEADER_TOKEN}" }}',
        "sinks[0].headers.Authorization: a credential header",
        'headers_env = { "Authorization" = "VARIABLE" }',
        id="webhook-authorization-header",
    ),
    pytest.param(
        f'type = "webhook"\nurl = "https://hooks.example/in"\n'
        f'headers = {{ X-Auth = "{HEADER_TOKEN}" }}',
        "sinks[0].headers.X-Auth: a credential header",
        "headers_env",
        id="webhook-x-auth-header",
    ),
    pytest.param(
        f'type = "redis"\nurl = "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"',
        "sinks[0].url: a user or password in the URL",
        "url_env, url_file, password_env or password_file",
        id="redis-password",
    ),
    pytest.param(
        f'type = "nats"\nservers = ["nats://app:{NATS_TOKEN}@127.0.0.1:4222"]',
        "sinks[0].servers[0]: a user or password in the URL",
        "url_env or url_file",
        id="nats-userinfo",
    ),
    pytest.param(
        f'type = "nats"\nservers = "nats://{NATS_TOKEN}@127.0.0.1:4222"',
        "sinks[0].servers: a user or password in the URL",
        "token_env",
        id="nats-token",
    ),
    pytest.param(
        f'type = "mlflow"\ntracking_uri = "https://mlflow.example/?access_token={URL_TOKEN}"',
        "sinks[0].tracking_uri: a credential in the URL query",
        "MLFLOW_TRACKING_TOKEN",
        id="mlflow-query-token",
    ),
    pytest.param(
        f'type = "webhook"\nurl = "https://hooks.example/in"\nsecret = "{SIGNING_SECRET}"',
        "sinks[0].secret: secrets are not allowed in the config file",
        "use secret_env or secret_file",
        id="webhook-secret-key",
    ),
]


@pytest.mark.parametrize(("sink", "key", "alternative"), REFUSED)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_credential_in_the_toml_is_refused_without_showing_it(
    tmp_path: Path, command: str, sink: str, key: str, alternative: str
) -> None:
    """check-config and run exit 2 with an error naming the key and the alternative; the
    secret is in no output and nothing of it reaches the state directory."""
    config = tmp_path / "config.toml"
    state = tmp_path / "state"
    config.write_text(f'roots = []\n[daemon]\nstate_dir = "{state}"\n[[sinks]]\n{sink}\n')
    result = modelwatch(command, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert alternative in result.stderr
    assert leaks(result.stdout, result.stderr, state_bytes(state)) == []


# --- given the right way ------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[BrokerServer]:
    """A redis-server that wants REDIS_PASSWORD."""
    (tmp_path / "redis").mkdir()
    with running(redis_broker(tmp_path / "redis", "--requirepass", REDIS_PASSWORD)) as server:
        yield server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[BrokerServer]:
    """A nats-server with JetStream that wants NATS_TOKEN."""
    (tmp_path / "nats").mkdir()
    with running(nats_broker(tmp_path / "nats", "--auth", NATS_TOKEN)) as server:
        yield server


def secret_config(
    tmp_path: Path, receiver: Receiver, redis_server: BrokerServer, nats_server: BrokerServer
) -> tuple[Path, dict[str, str]]:
    """A config using every way of giving a secret, and the environment it needs."""
    secret_file = tmp_path / "hook-secret"
    secret_file.write_text(SIGNING_SECRET + "\n")
    secret_file.chmod(0o644)  # readable by others: accepted, with a warning
    models = tmp_path / "models"
    models.mkdir()
    host_port = redis_server.url.removeprefix("redis://")
    env = daemon_env(
        MODELWATCH_LOG_FORMAT="json",
        HOOK_URL=f"{receiver.url}?token={URL_TOKEN}&team=ml",
        HOOK_AUTHORIZATION=f"Bearer {HEADER_TOKEN}",
        REDIS_URL=f"redis://:{REDIS_PASSWORD}@{host_port}/0",
        NATS_URL=nats_server.url.replace("nats://", f"nats://{NATS_TOKEN}@"),
        AWS_SECRET_ACCESS_KEY=BYSTANDER,
    )
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
shutdown_timeout_seconds = 2
[defaults]
settle_seconds = 0.3
[[roots]]
path = "{models}"
unit_depth = 1
[[sinks]]
type = "webhook"
url_env = "HOOK_URL"
secret_file = "{secret_file}"
headers = {{ X-Team = "ml" }}
headers_env = {{ Authorization = "HOOK_AUTHORIZATION" }}
timeout_seconds = 2
[[sinks]]
type = "redis"
url_env = "REDIS_URL"
[[sinks]]
type = "nats"
url_env = "NATS_URL"
stream = "MW"
create_stream = true
[[sinks]]
type = "command"
argv = ["/bin/sh", "-c", 'env > "$1"', "sh", "{tmp_path / "command-env"}"]
[[sinks]]
type = "jsonl"
path = "{tmp_path / "events.jsonl"}"
"""
    )
    return config, env


def test_check_config_masks_and_never_shows_a_secret(
    tmp_path: Path, receiver: Receiver, redis_server: BrokerServer, nats_server: BrokerServer
) -> None:
    """check-config reads every secret (so a missing one would be an error) and prints only
    where each comes from: header values as ***, no secret anywhere; a secret file others may
    read draws a warning on stderr."""
    config, env = secret_config(tmp_path, receiver, redis_server, nats_server)
    result = modelwatch("check-config", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert 'url_env = "HOOK_URL"' in result.stdout
    assert 'headers = { X-Team = "***" }' in result.stdout
    assert 'headers_env = { Authorization = "HOOK_AUTHORIZATION" }' in result.stdout
    assert "secret_file_readable" in result.stderr
    assert leaks(result.stdout, result.stderr) == []


def test_a_running_daemon_delivers_secrets_to_their_servers_and_nowhere_else(
    tmp_path: Path, receiver: Receiver, redis_server: BrokerServer, nats_server: BrokerServer
) -> None:
    """With every sink's secrets from the environment or files, and a webhook answering 500
    with our own Authorization and signature echoed back: redis and nats (which need their
    secrets) get the event, the webhook receives the credentials, and no secret shows in the
    daemon's output, its log, the events, `status`, the state database or the command's
    environment."""
    receiver.script(*[Reply(500, echo_credentials=True)] * 100)
    config, env = secret_config(tmp_path, receiver, redis_server, nats_server)
    (tmp_path / "models" / "exp-1").mkdir()
    write_safetensors(tmp_path / "models" / "exp-1" / "model.safetensors", {"w": 10})
    with daemon_process(config, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as d:
        assert d.stderr is not None
        early = []  # the log up to "ready", which wait_ready_line would consume
        for line in d.stderr:
            early.append(line)
            if '"ready"' in line:
                break
        wait_until(lambda: jsonl_records(tmp_path / "events.jsonl"), timeout=30)
        wait_until(lambda: len(receiver.requests) >= 2, timeout=30)
        wait_until(lambda: (tmp_path / "command-env").exists(), timeout=30)
        client = redis.Redis.from_url(env["REDIS_URL"])
        try:
            wait_until(lambda: client.xlen("modelwatch:events") == 1, timeout=30)
        finally:
            client.close()
        nats_url = env["NATS_URL"]
        wait_until(lambda: len(read_stream(nats_url, "MW", "modelwatch.events")) == 1, timeout=30)
        d.send_signal(signal.SIGTERM)
        stdout, late = d.communicate(timeout=30)
    stderr = "".join(early) + late
    assert d.returncode == 0, stderr
    # the secrets did go where they belong
    request = receiver.requests[0]
    assert request.path == f"/hooks/models?token={URL_TOKEN}&team=ml"
    assert request.headers["authorization"] == f"Bearer {HEADER_TOKEN}"
    assert request.headers["x-team"] == "ml"
    Webhook(SIGNING_SECRET).verify(request.body, request.headers)
    # and nowhere else
    status = modelwatch("status", "--config", str(config), env=env)
    status_json = modelwatch("status", "--config", str(config), "--format", "json", env=env)
    assert status.returncode == status_json.returncode == 0, status.stderr
    pending = {s["sink"]: s["pending"] for s in json.loads(status_json.stdout)["sinks"]}
    assert pending["webhook"] == 1  # the echoing receiver kept it failing
    stored = state_bytes(tmp_path / "state")
    assert b"***" in stored  # the echoed credentials were scrubbed from the stored error
    command_env = (tmp_path / "command-env").read_text()
    assert "MODELWATCH_EVENT_ID=" in command_env
    outputs = [stdout, stderr, (tmp_path / "events.jsonl").read_text(), command_env]
    assert leaks(*outputs, status.stdout, status_json.stdout, stored) == []
    assert "secret_file_readable" in stderr
    assert os.stat(tmp_path / "hook-secret").st_mode & 0o777 == 0o644  # only warned about


def test_a_token_echoed_without_its_scheme_is_scrubbed() -> None:
    """A receiver that quotes only the token of `Authorization: Bearer <token>` in its error
    body does not put the token into logs, `status` or the status page."""
    scrub = Scrubber(["Bearer abc123TOPSECRETtoken", "Basic YWxpY2U6cHc="])
    text = scrub('HTTP 401: {"error":"invalid token abc123TOPSECRETtoken", "got":"YWxpY2U6cHc="}')
    assert "abc123TOPSECRETtoken" not in text
    assert "YWxpY2U6cHc=" not in text
    assert "Bearer" not in scrub("Bearer abc123TOPSECRETtoken")
    assert scrub("Bearer is a word") == "Bearer is a word"  # short words are not secrets


def test_check_config_masks_urls_in_a_command_and_the_cluster_url(tmp_path: Path) -> None:
    """A URL inside a command's arguments and the `[cluster]` URL are shown with their query
    values and passwords masked, like every sink URL."""
    config = tmp_path / "modelwatch.toml"
    config.write_text(
        f"""\
[daemon]
state_dir = "{tmp_path / "state"}"
[cluster]
backend = "redis"
url = "redis://127.0.0.1:6379/0?client_name=abcSECRETq"
[[roots]]
path = "{tmp_path / "models"}"
[[sinks]]
type = "command"
argv = ["curl", "https://hooks.example/x?code=qTOKENq"]
"""
    )
    result = modelwatch("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "qTOKENq" not in result.stdout
    assert "abcSECRETq" not in result.stdout
    assert "https://hooks.example/x?code=***" in result.stdout


def test_a_malformed_cluster_url_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "modelwatch.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        '[cluster]\nbackend = "redis"\nurl = "redis://[::1"\n'
    )
    result = modelwatch("check-config", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "cluster.url" in result.stderr
    assert "Traceback" not in result.stderr


NOT_DUMPABLE_CHILD = """\
import ctypes, subprocess, sys
from modelwatch.credentials import not_dumpable
assert not_dumpable()
libc = ctypes.CDLL(None, use_errno=True)
print(libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE: this process
child = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""


def test_the_daemon_is_not_dumpable_and_its_commands_are_as_usual() -> None:
    """`run` makes the daemon non-dumpable: a command sink's child, running as the same
    user, can then not read the daemon's environment (`/proc/PPID/environ`, where `*_env`
    secrets live) nor its memory. The child itself is an ordinary process again."""
    result = subprocess.run(
        [sys.executable, "-c", NOT_DUMPABLE_CHILD],
        capture_output=True,
        text=True,
        check=True,
        env=daemon_env(),
        timeout=30,
    )
    assert result.stdout.split() == ["0", "1"]
