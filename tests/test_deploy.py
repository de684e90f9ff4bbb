"""The deployment files: the Kubernetes sidecar manifest and the hardened systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelwatch.config import load_config
from modelwatch.health import HealthServer
from modelwatch.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "kubernetes.yaml"
UNIT = REPO / "systemd" / "modelwatch.service"
MAX_EXPOSURE = 2.0
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def manifest() -> list[dict[str, Any]]:
    with MANIFEST.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def pod_spec() -> dict[str, Any]:
    (pod,) = [doc for doc in manifest() if doc["kind"] == "Pod"]
    spec: dict[str, Any] = pod["spec"]
    return spec


def sidecar() -> dict[str, Any]:
    (container,) = [c for c in pod_spec()["initContainers"] if c["name"] == "modelwatch"]
    return container


def test_manifest_runs_modelwatch_as_a_native_sidecar() -> None:
    """modelwatch is an init container with restartPolicy Always next to the training one."""
    spec = pod_spec()
    assert sidecar()["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["train"]


def test_sidecar_sees_the_model_volume_read_only() -> None:
    """The shared model volume is read-only for modelwatch, writable for training."""
    mounts = {m["name"]: m for m in sidecar()["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/artifacts", "readOnly": True}
    train_mounts = {m["name"]: m for m in pod_spec()["containers"][0]["volumeMounts"]}
    assert not train_mounts["models"].get("readOnly", False)


def test_sidecar_state_outlives_the_pod_and_the_grace_period_covers_the_stop() -> None:
    """The outbox and pending units survive the pod (a claim, not an emptyDir), and the pod's
    grace period leaves the last chance and the deliveries room after SIGTERM."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    claim = volumes["modelwatch-state"]["persistentVolumeClaim"]["claimName"]
    claims = [d["metadata"]["name"] for d in manifest() if d["kind"] == "PersistentVolumeClaim"]
    assert claim in claims
    (config_map,) = [d for d in manifest() if d["kind"] == "ConfigMap"]
    text = config_map["data"]["config.toml"]
    timeout = float(re.search(r"shutdown_timeout_seconds = (\S+)", text)[1])  # type: ignore[index]
    assert pod_spec()["terminationGracePeriodSeconds"] >= timeout + 5


def test_sidecar_is_locked_down() -> None:
    """Read-only root file system, non-root, no privilege escalation, no capabilities."""
    context = sidecar()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def probe_command(kind: str) -> list[str]:
    """The sidecar's exec probe of `kind`."""
    command: list[str] = sidecar()[kind]["exec"]["command"]
    return command


def test_sidecar_probes_ask_the_loopback_health_port() -> None:
    """Liveness on /healthz; readiness and startup on /readyz: exec probes asking the
    loopback port, so no port of the sidecar is open to the cluster."""
    urls = {kind: probe_command(kind)[-1] for kind in PROBES}
    assert {kind: re.findall(r"'(http://[^']+)'", text) for kind, text in urls.items()} == {
        "livenessProbe": ["http://127.0.0.1:9464/healthz"],
        "readinessProbe": ["http://127.0.0.1:9464/readyz"],
        "startupProbe": ["http://127.0.0.1:9464/readyz"],
    }
    assert "ports" not in sidecar()


def test_config_map_is_a_valid_config_listening_on_loopback_only(tmp_path: Path) -> None:
    """The ConfigMap's config.toml loads and, with the container's env, watches /artifacts;
    the health server listens on the loopback port the probes ask."""
    (config_map,) = [doc for doc in manifest() if doc["kind"] == "ConfigMap"]
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    env = {e["name"]: e["value"] for e in sidecar()["env"] if "value" in e}
    config = load_config(str(path), env)
    assert config.daemon.health_listen == "127.0.0.1:9464"
    assert config.daemon.state_dir == "/var/lib/modelwatch"
    assert [root.path for root in config.roots] == ["/artifacts"]


def test_exec_probes_pass_when_healthy_and_fail_when_not() -> None:
    """Each probe command, run against a real health server (on a free port instead of
    9464), exits 0 while the answer is 200 and non-zero on 503."""
    failing: list[str] = []
    ready = threading.Event()
    metrics = Metrics(sinks=[], outbox=list)
    with HealthServer("127.0.0.1:0", alive=lambda: failing, ready=ready, metrics=metrics) as server:

        def probe(kind: str) -> int:
            python, *args = probe_command(kind)
            assert python == "python"
            args = [arg.replace(":9464/", f":{server.port}/") for arg in args]
            return subprocess.run(
                [sys.executable, *args], capture_output=True, check=False
            ).returncode

        assert [probe(kind) != 0 for kind in PROBES] == [False, True, True]  # not ready yet
        ready.set()
        assert [probe(kind) for kind in PROBES] == [0, 0, 0]
        failing.append("delivery webhook")
        assert probe("livenessProbe") != 0


def unit_section(name: str) -> dict[str, list[str]]:
    """Every `Key=Value` of one section of the unit file (keys may repeat in systemd)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == name and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_a_notify_service_with_watchdog_state_and_reload() -> None:
    """Type=notify, a watchdog, a private state directory and SIGHUP reload."""
    service = unit_section("Service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert [int(value) for value in service["WatchdogSec"]] == [30]
    assert service["StateDirectory"] == ["modelwatch"]
    assert service["StateDirectoryMode"] == ["0700"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ProtectSystem"] == ["strict"]


def test_unit_waits_for_remote_mounts_and_starts_without_a_webhook_secret() -> None:
    """After remote-fs.target; every LoadCredential= has a SetCredential= fallback, so a
    missing secret file does not fail the start."""
    after = " ".join(unit_section("Unit")["After"]).split()
    assert "remote-fs.target" in after
    service = unit_section("Service")
    loaded = {value.split(":", 1)[0] for value in service["LoadCredential"]}
    fallbacks = {value.split(":", 1)[0] for value in service["SetCredential"]}
    assert loaded and loaded <= fallbacks


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu package: systemd)",
)
def test_unit_hardening_scores_ok() -> None:
    """`systemd-analyze security --offline` passes and rates the unit's exposure <= 2.0."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_every_subpackage_ships_in_the_wheel() -> None:
    """pyproject.toml lists every package under modelwatch/ (a missing one installs fine in
    editable mode and breaks every real install)."""
    from modelwatch.config import tomllib  # tomli on Python 3.10

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "modelwatch").rglob("__init__.py")
    }
    assert found == listed
