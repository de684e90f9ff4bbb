"""`[cluster]` and `[[roots]] shared` (SPEC §12): defaults, every rule with the key it names,
where credentials may come from, and which roots end up shared."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelwatch.cluster.connect import backend_url, connect, shown_url
from modelwatch.cluster.report import lease_report
from modelwatch.cluster.sharing import shared_roots
from modelwatch.config import ClusterConfig, Config, load_config, render_toml
from modelwatch.errors import ConfigError
from modelwatch.status import render
from tests.daemons import CLI, daemon_env
from tests.pki import Pki

MakeConfig = Callable[..., Config]


def test_no_cluster_by_default(make_config: MakeConfig) -> None:
    """Without [cluster] every root is local, and node_id is the host name."""
    config = make_config("")
    assert config.cluster == ClusterConfig(node_id=socket.gethostname())
    assert not config.cluster.enabled
    assert shared_roots(config) == []


def test_cluster_keys_and_defaults(make_config: MakeConfig) -> None:
    """The documented defaults: lease_seconds 15, prefix "modelwatch"."""
    config = make_config('[cluster]\nbackend = "redis"\nurl = "redis://10.0.0.5:6379/0"\n')
    assert config.cluster.backend == "redis"
    assert config.cluster.lease_seconds == 15.0
    assert config.cluster.prefix == "modelwatch"
    assert config.cluster.node_id == socket.gethostname()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('backend = "etcd"', "cluster.backend: must be one of none, redis, nats"),
        ('backend = "redis"', "cluster.url: give exactly one of url, url_env, url_file"),
        (
            'backend = "redis"\nurl = "redis://h:1"\nurl_env = "X"',
            "cluster.url_env: give exactly one of",
        ),
        ('backend = "redis"\nurl = "nats://h:4222"', "cluster.url: must be a redis://"),
        ('backend = "nats"\nurl = "redis://h:1"', "cluster.url: must be a nats:// or tls://"),
        (
            'backend = "redis"\nurl = "redis://:hunter2@h:6379/0"',
            "cluster.url: a user or password in the URL .* is not allowed in the config file",
        ),
        ('backend = "nats"\nurl = "nats://tok@h:4222"', "cluster.url: a user or password"),
        (
            'backend = "redis"\nurl = "redis://h:6379/0?password=x"',
            r"cluster.url: a credential in the URL query \(password=\)",
        ),
        ('backend = "redis"\nurl = "redis://h:99999"', "cluster.url: invalid port"),
        ('url = "redis://h:1"', "cluster.url: needs cluster.backend"),
        (
            'backend = "redis"\nurl = "redis://h:1"\nlease_seconds = 2',
            "lease_seconds: must be >= 3",
        ),
        ('backend = "nats"\nurl = "nats://h:1"\nprefix = "a.b"', "cluster.prefix: must be 1-64"),
        ('backend = "nats"\nurl = "nats://h:1"\nnode_id = " "', "cluster.node_id: must be a"),
        ('backend = "nats"\nurl = "nats://h:1"\nleases = 3', "cluster.leases: unknown key"),
        # the TLS keys (SPEC §5b)
        ('ca_file = "/etc/ca.pem"', "cluster.ca_file: needs cluster.backend"),
        ('backend = "nats"\nurl = "tls://h:1"\nca_file = 5', "cluster.ca_file: must be a string"),
        (
            'backend = "nats"\nurl = "tls://h:1"\nserver_name = "not a name"',
            "cluster.server_name: must be a DNS name or an IP address",
        ),
        (
            'backend = "nats"\nurl = "tls://h:1"\ninsecure_skip_verify = "yes"',
            "cluster.insecure_skip_verify: must be true or false",
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379/0"\nclient_cert_file = "/etc/c.pem"',
            r"cluster.client_cert_file: the URL is redis:// \(no TLS\); use rediss://",
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379/0"\ninsecure_skip_verify = true',
            r"cluster.insecure_skip_verify: the URL is redis:// \(no TLS\)",
        ),
        (
            'backend = "redis"\nurl = "rediss://h:6379/0?ssl_cert_reqs=none"',
            r"cluster.url: TLS settings in the URL \(ssl_cert_reqs=\) are not used",
        ),
    ],
)
def test_cluster_errors_name_the_key(make_config: MakeConfig, table: str, message: str) -> None:
    """Each rule of [cluster] is an error naming the key, never a secret."""
    with pytest.raises(ConfigError, match=message) as failure:
        make_config(f"[cluster]\n{table}\n")
    assert "hunter2" not in str(failure.value)


def test_tls_keys_load_with_paths_relative_to_the_config_file(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """The TLS keys of [cluster]: relative paths are relative to the config file's directory,
    and check-config's text loads back to the same config."""
    config = make_config(
        '[cluster]\nbackend = "redis"\nurl = "rediss://10.0.0.5:6380/0"\nca_file = "pki/ca.pem"\n'
        'client_cert_file = "/etc/mw/client.pem"\nclient_key_file = "/run/creds/client.key"\n'
        'server_name = "redis.corp.example"\n'
    )
    tls = config.cluster.tls
    assert (tls.ca_file, tls.client_cert_file) == (
        str(tmp_path / "pki/ca.pem"),
        "/etc/mw/client.pem",
    )
    assert (tls.server_name, tls.insecure_skip_verify) == ("redis.corp.example", False)
    again = tmp_path / "again.toml"
    again.write_text(render_toml(config))
    loaded = load_config(str(again), {"MODELWATCH_STATE_DIR": config.daemon.state_dir})
    assert loaded.cluster == config.cluster


def test_shared_needs_a_backend(make_config: MakeConfig, tmp_path: Path) -> None:
    """`shared = true` without a backend is an error naming the root."""
    with pytest.raises(ConfigError, match=r"roots\[1\]\.shared: needs a \[cluster\] backend"):
        make_config(
            f'[[roots]]\npath = "{tmp_path}/a"\n[[roots]]\npath = "{tmp_path}/b"\nshared = true\n'
        )
    with pytest.raises(ConfigError, match=r"roots\[0\]\.shared: must be true or false"):
        make_config(f'[[roots]]\npath = "{tmp_path}/a"\nshared = "yes"\n')


def test_roots_on_network_filesystems_are_shared_unless_they_say(
    make_config: MakeConfig,
) -> None:
    """With a backend, a root that leaves `shared` unset is shared when it is on a network
    filesystem; `shared = false` keeps one local, `shared = true` shares a local disk."""
    config = make_config(
        '[cluster]\nbackend = "nats"\nurl = "nats://h:4222"\n'
        '[[roots]]\npath = "/nfs/auto"\n'
        '[[roots]]\npath = "/nfs/local"\nshared = false\n'
        '[[roots]]\npath = "/disk/auto"\n'
        '[[roots]]\npath = "/disk/shared"\nshared = true\n'
    )
    types = {"/nfs": "nfs4", "/disk": "ext4"}

    def filesystem(path: str) -> str:
        return types["/" + path.split("/")[1]]

    assert shared_roots(config, filesystem) == ["/nfs/auto", "/disk/shared"]


def test_effective_config_shows_the_cluster_and_loads_back(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """check-config prints [cluster] and `shared`; the text loads to the same config."""
    config = make_config(
        '[cluster]\nbackend = "nats"\nurl_env = "MW_NATS"\nnode_id = "gpu-7"\n'
        f'[[roots]]\npath = "{tmp_path}/m"\nshared = true\n'
    )
    text = render_toml(config)
    assert '[cluster]\nbackend = "nats"' in text
    assert "shared = true" in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    loaded = load_config(str(again), {"MODELWATCH_STATE_DIR": config.daemon.state_dir})
    assert (loaded.cluster, loaded.roots) == (config.cluster, config.roots)


# -- where the URL comes from ------------------------------------------------------------------


def test_url_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """url_env and url_file may carry credentials; what is shown of them is masked."""
    secret_file = tmp_path / "url"
    secret_file.write_text("redis://:pw-in-file@10.0.0.5:6379/1\n")
    from_file = ClusterConfig("redis", url_file=str(secret_file))
    assert backend_url(from_file, {}) == "redis://:pw-in-file@10.0.0.5:6379/1"
    from_env = ClusterConfig("nats", url_env="MW_NATS")
    url = backend_url(from_env, {"MW_NATS": "nats://user:pw-in-env@n1:4222,nats://n2:4222"})
    assert shown_url(url) == "nats://user:***@n1:4222,nats://n2:4222"
    assert "pw-in-file" not in shown_url("redis://:pw-in-file@10.0.0.5:6379/1")


@pytest.mark.parametrize(
    ("config", "environ", "message"),
    [
        (ClusterConfig("redis", url_env="MW_URL"), {}, "cluster.url_env: environment variable"),
        (ClusterConfig("redis", url_env="MW_URL"), {"MW_URL": "http://x"}, "must be a redis://"),
        (ClusterConfig("redis", url_file="/nonexistent/url"), {}, "cluster.url_file: cannot read"),
    ],
)
def test_url_sources_fail_naming_the_key(
    config: ClusterConfig, environ: dict[str, str], message: str
) -> None:
    """A missing variable, an unreadable file or a wrong scheme is a config error."""
    with pytest.raises(ConfigError, match=message):
        connect(config, environ)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    ("tls", "environ", "message"),
    [
        ({"ca_file": "{missing}"}, {}, "cluster.ca_file: cannot read {missing}: No such file"),
        ({"ca_file": "{client_key}"}, {}, "cluster.ca_file: {client_key} holds no PEM CA"),
        ({"client_key_file": "{client_key}"}, {}, "cluster.client_key_file: needs client_cert"),
        (
            {"client_cert_file": "{client_cert}", "client_key_file": "{missing}"},
            {},
            "cluster.client_key_file: cannot read {missing}",
        ),
        (
            {"ca_file": "{ca}", "insecure_skip_verify": True},
            {},
            "cluster.insecure_skip_verify: give ca_file or insecure_skip_verify, not both",
        ),
        (
            {"ca_file": "{ca}", "url": "", "url_env": "MW_URL"},
            {"MW_URL": "redis://:pw@10.0.0.5:6379/0"},
            "cluster.ca_file: the URL is redis:// (no TLS); use rediss://",
        ),
    ],
)
def test_tls_files_are_checked_when_the_backend_is_built(
    pki: Pki,
    tmp_path: Path,
    tls: dict[str, Any],
    environ: dict[str, str],
    message: str,
) -> None:
    """A CA, certificate or key file that is missing or unusable, or a TLS key next to a
    Redis URL without TLS (one read from url_env), is a config error naming the key and the
    path, never the key's content; nothing is connected to."""
    client = pki.client("node")
    files = {"missing": str(tmp_path / "missing.pem"), "ca": str(pki.ca.cert)}
    files.update(client_cert=str(client.cert), client_key=str(client.key))
    given = {k: v.format(**files) if isinstance(v, str) else v for k, v in tls.items()}
    config = ClusterConfig("redis", **{"url": "rediss://127.0.0.1:1/0", **given})
    with pytest.raises(ConfigError) as caught:
        connect(config, environ)
    assert str(caught.value).startswith(message.format(**files))
    assert "PRIVATE KEY" not in str(caught.value) and "pw" not in str(caught.value)


def test_insecure_skip_verify_warns_every_time_the_backend_is_built() -> None:
    """`insecure_skip_verify = true` logs tls_verification_disabled naming the key each time
    a backend is built (every start of the daemon, of `scan`, of `status`)."""
    config = ClusterConfig("nats", url="tls://127.0.0.1:1", insecure_skip_verify=True)
    with structlog.testing.capture_logs() as logs:
        for _start in range(2):
            connect(config, {}).close()
    warnings = [entry for entry in logs if entry["event"] == "tls_verification_disabled"]
    assert [(w["log_level"], w["key"]) for w in warnings] == [
        ("warning", "cluster.insecure_skip_verify")
    ] * 2


def test_check_config_shows_what_the_cluster_trusts(pki: Pki, tmp_path: Path) -> None:
    """check-config prints under [cluster] where the backend is (directly: Redis and NATS
    are not proxied), what it trusts and which client certificate it presents: paths, never
    key material; a missing CA file exits 2 naming the key."""
    client = pki.client("node")
    config = tmp_path / "config.toml"
    table = (
        f'[cluster]\nbackend = "redis"\nurl = "rediss://127.0.0.1:6380/0"\n'
        f'server_name = "redis.corp.example"\nclient_cert_file = "{client.cert}"\n'
        f'client_key_file = "{client.key}"\n'
    )
    config.write_text(f'{table}ca_file = "{pki.ca.cert}"\n[[roots]]\npath = "{tmp_path}"\n')
    env = daemon_env(MODELWATCH_STATE_DIR=str(tmp_path / "state"), HTTPS_PROXY="http://p:3128")
    shown = subprocess.run(
        [*CLI, "check-config", "--config", str(config)], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0, shown.stderr
    cluster = shown.stdout.split("[cluster]\n", 1)[1].split("\n\n", 1)[0]
    assert cluster.endswith(
        "\n# route: rediss://127.0.0.1:6380/0 directly (the Redis protocol is not proxied)"
        f"\n# trusts: the CA certificates in {pki.ca.cert} (ca_file), for the name"
        " redis.corp.example"
        f"\n# client certificate: {client.cert} (key {client.key})"
    )
    assert "PRIVATE KEY" not in shown.stdout + shown.stderr
    config.write_text(f'{table}ca_file = "{tmp_path}/gone.pem"\n[[roots]]\npath = "{tmp_path}"\n')
    refused = subprocess.run(
        [*CLI, "check-config", "--config", str(config)], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2
    assert f"cluster.ca_file: cannot read {tmp_path}/gone.pem" in refused.stderr


def test_status_says_when_the_backend_cannot_be_asked(make_config: MakeConfig) -> None:
    """`status` reports an unreachable backend instead of failing: each shared root's role
    is "unknown" and the error is shown."""
    from tests.brokers import free_port

    config = make_config(
        f'[cluster]\nbackend = "redis"\nurl = "redis://127.0.0.1:{free_port()}/0"\n'
        'node_id = "n1"\nlease_seconds = 3\n[[roots]]\npath = "/x/models"\nshared = true\n'
    )
    report = lease_report(config)
    assert report is not None
    assert report["roots"] == [{"path": "/x/models", "role": "unknown", "holder": None}]
    assert "127.0.0.1" in report["error"]


def test_status_text_lists_who_holds_each_shared_root() -> None:
    """`modelwatch status` prints a table of shared roots with this node's role and the
    holder, and says when the backend could not be asked."""
    cluster = {
        "backend": "redis",
        "node_id": "n1",
        "error": "redis://10.0.0.5:6379/0: Timeout reading from socket",
        "roots": [
            {"path": "/storage/models", "role": "standby", "holder": "gpu-7"},
            {"path": "/shared/models", "role": "unknown", "holder": None},
        ],
    }
    report = {"roots": [], "units": [], "sinks": [], "dead_letters": [], "cluster": cluster}
    text = render(report)
    assert "SHARED ROOT      ROLE     HOLDER" in text
    assert "/storage/models  standby  gpu-7" in text
    assert "/shared/models   unknown  -" in text
    assert "this node is n1; backend unreachable: redis://10.0.0.5:6379/0: Timeout" in text
