"""The mlflow sink against a real `mlflow server` (SQLite backend, artifacts through the server)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Before MLflow is imported: no usage telemetry from the test run (and no threads sending it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
pytest.importorskip("mlflow", reason="the mlflow sink needs pip install -e '.[test]' (mlflow)")

from mlflow.exceptions import MlflowException, RestException, get_error_code

from modelwatch.config import Config
from modelwatch.daemon import Daemon
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, REJECTED, REMOVED, Event, make_event
from modelwatch.sinks import build_sink
from modelwatch.sinks.mlflow import EVENT_TAG, MlflowSink, artifact_name, classify
from modelwatch.testing import sink_config
from tests.brokers import free_port
from tests.conftest import wait_until
from tests.mlflow_server import MlflowServer
from tests.writers import write_safetensors


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the whole module: it takes seconds to start."""
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()


@dataclass(frozen=True)
class Target:
    """Where one test registers: its own experiment and model-name prefix on the shared server."""

    server: MlflowServer
    experiment: str
    prefix: str

    def options(self, **extra: Any) -> dict[str, Any]:
        return {
            "tracking_uri": self.server.uri,
            "experiment_name": self.experiment,
            "model_name": self.prefix + "-{name}",
            **extra,
        }

    def sink(self, **extra: Any) -> MlflowSink:
        return MlflowSink(sink_config("mlflow", options=self.options(**extra)))


@pytest.fixture
def target(server: MlflowServer) -> Target:
    token = uuid.uuid4().hex[:8]
    return Target(server, f"exp-{token}", f"m-{token}")


def unit(root: Path, name: str = "resnet", size: int = 1000) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", {"w": size})
    (path / "config").mkdir(exist_ok=True)
    (path / "config" / "params.json").write_text('{"layers": 50}')
    return path


def event_for(path: Path, event_type: str = REGISTERED, **data: Any) -> Event:
    """The event modelwatch would emit for the unit at `path` (depth 1), listing its files."""
    rows: list[dict[str, Any]] = []
    for parent, dirs, files in os.walk(path):
        for entry in sorted(dirs + files):
            full = Path(parent, entry)
            rel = full.relative_to(path).as_posix()
            if full.is_symlink():
                rows.append({"path": rel, "size": 0, "symlink": os.readlink(full)})
            elif full.is_file():
                rows.append({"path": rel, "size": full.stat().st_size})
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    body = {
        "experiment_id": path.name,
        "model_type": "Custom",
        "format": "safetensors",
        "version": 1,
        "fingerprint": f"sha256:{digest}",
        "files": sorted(rows, key=lambda r: r["path"]),
        "metrics": [{"name": "acc", "numberValue": 0.9}, {"name": "loss", "numberValue": 0.25}],
        "host": "testhost",
        **data,
    }
    return make_event(
        event_type,
        root=str(path.parent),
        unit_path=str(path),
        name=path.name,
        when=time.time(),
        data=body,
    )


def test_a_settled_model_becomes_a_version_and_a_rewrite_the_next(
    target: Target,
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Daemon],
) -> None:
    """End to end: version 1 with the metadata metrics and the files as artifacts; a rewrite of
    the model becomes version 2 with its own run."""
    root = tmp_path / "models"
    root.mkdir()
    options = "".join(f'{k} = "{v}"\n' for k, v in target.options().items())
    config = make_config(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout_seconds = 2\n'
        f'[defaults]\nsettle_seconds = 0.3\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "mlflow"\n{options}'
    )
    run_daemon(config, [build_sink(config.sinks[0])])
    model, server = f"{target.prefix}-resnet", target.server
    path = unit(root)
    (path / "gradient-model-metadata.json").write_text(
        '{"metrics": [{"name": "acc", "numberValue": 0.9}, {"name": "loss", "numberValue": 2}]}'
    )
    wait_until(lambda: len(server.versions(model)) == 1, timeout=30)
    (first,) = server.versions(model)
    run = server.client.get_run(first.run_id)
    assert (first.version, first.source) == ("1", run.info.artifact_uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"acc": 0.9, "loss": 2.0}
    assert first.tags[EVENT_TAG] == run.data.tags[EVENT_TAG]
    assert run.data.tags["modelwatch.path"] == str(path)
    assert run.data.tags["modelwatch.host"] == "testhost"
    assert run.data.tags["modelwatch.experiment_id"] == "resnet"
    assert server.artifacts_of(run.info.run_id) == [
        "config/params.json",
        "gradient-model-metadata.json",
        "model.safetensors",
    ]

    write_safetensors(path / "model.safetensors", {"w": 2000})
    wait_until(lambda: len(server.versions(model)) == 2, timeout=30)
    second = server.versions(model)[1]
    assert second.version == "2"
    assert second.run_id != first.run_id
    assert second.tags[EVENT_TAG] != first.tags[EVENT_TAG]


def test_a_redelivered_event_creates_nothing_new(target: Target, tmp_path: Path) -> None:
    """The same event sent again, by the same sink and after a restart, leaves one run and one
    version."""
    event = event_for(unit(tmp_path))
    with closing(target.sink()) as sink:
        sink.send(event)
        sink.send(event)
    with closing(target.sink()) as restarted:
        restarted.send(event)
    assert len(target.server.runs(target.experiment, event.id)) == 1
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    assert version.tags[EVENT_TAG] == event.id


@pytest.mark.parametrize(
    "died_after",
    ["_find_or_create_run", "_ensure_run"],
    ids=["run-created-nothing-logged", "run-finished-no-version"],
)
def test_an_attempt_that_died_midway_is_completed_not_duplicated(
    target: Target, tmp_path: Path, died_after: str
) -> None:
    """A process killed after creating the run (before logging, or before the version): the
    next attempt, in a fresh sink, completes that run and registers exactly one version."""
    event = event_for(unit(tmp_path))
    with closing(target.sink()) as dying:
        getattr(dying, died_after)(event)
    with closing(target.sink()) as restarted:
        restarted.send(event)
    (run,) = target.server.runs(target.experiment, event.id)
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    assert version.run_id == run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"acc": 0.9, "loss": 0.25}
    assert target.server.artifacts_of(run.info.run_id) == [
        "config/params.json",
        "model.safetensors",
    ]


def test_removed_tags_the_version_it_undoes(target: Target, tmp_path: Path) -> None:
    """`removed` marks the registered version; sending it again, or for a unit never registered
    here, changes nothing and succeeds."""
    path = unit(tmp_path)
    registered = event_for(path)
    removed = event_for(path, REMOVED, fingerprint=registered.data["fingerprint"], files=[])
    with closing(target.sink()) as sink:
        sink.send(registered)
        sink.send(removed)
        sink.send(removed)
        sink.send(event_for(unit(tmp_path, "never-registered"), REMOVED))
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    assert version.tags["modelwatch.removed"] == "true"
    assert version.tags["modelwatch.removed_event_id"] == removed.id
    assert target.server.versions(f"{target.prefix}-never-registered") == []


def test_rejected_events_are_acknowledged_without_contacting_the_server(tmp_path: Path) -> None:
    """A rejected model has nothing to register: `send` returns even with no server at all."""
    sink = MlflowSink(
        sink_config("mlflow", options={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    )
    sink.send(event_for(unit(tmp_path), REJECTED, errors=[]))


def test_symlinks_and_files_changed_since_the_event_are_not_uploaded(
    target: Target, tmp_path: Path
) -> None:
    """Listed symlinks are skipped; a directory swapped for a symlink and a file of another size
    are not uploaded, and the run says its artifacts are incomplete."""
    path = unit(tmp_path / "models")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the model")
    (path / "link").symlink_to(outside / "secret")
    event = event_for(path)
    (path / "config" / "params.json").rename(outside / "params.json")
    (path / "config").rmdir()
    (path / "config").symlink_to(outside)  # same name, same size, outside the unit
    with closing(target.sink()) as sink:
        sink.send(event)
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    run = target.server.client.get_run(version.run_id)
    assert target.server.artifacts_of(run.info.run_id) == ["model.safetensors"]
    assert run.data.tags["modelwatch.incomplete_artifacts"] == "true"


def test_metrics_mlflow_refuses_are_skipped_not_fatal(target: Target, tmp_path: Path) -> None:
    """Metric names MLflow rejects are left out and listed; the version is still registered."""
    metrics = [{"name": "top@1", "numberValue": 0.7}, {"name": "acc", "numberValue": 0.9}]
    event = event_for(unit(tmp_path), metrics=metrics)
    with closing(target.sink()) as sink:
        sink.send(event)
    (run,) = target.server.runs(target.experiment, event.id)
    assert run.data.metrics == {"acc": 0.9}
    assert run.data.tags["modelwatch.skipped_metrics"] == "top@1"
    assert len(target.server.versions(f"{target.prefix}-resnet")) == 1


def test_a_name_mlflow_refuses_is_permanent_and_creates_nothing(
    target: Target, tmp_path: Path
) -> None:
    """A nested unit with the default `{name}` template would be named "team/resnet": permanent,
    before any run is created."""
    path = unit(tmp_path / "team")
    event = make_event(
        REGISTERED,
        root=str(tmp_path),
        unit_path=str(path),
        name="team/resnet",
        when=time.time(),
        data={k: v for k, v in event_for(path).data.items() if k not in ("path", "root", "name")},
    )
    with (
        closing(target.sink(model_name="{name}")) as sink,
        pytest.raises(PermanentSinkError, match=r"'team/resnet'.*\"/\""),
    ):
        sink.send(event)
    assert target.server.runs(target.experiment, event.id) == []


def test_a_url_that_is_not_an_mlflow_api_is_permanent(target: Target, tmp_path: Path) -> None:
    """The server answers 404 for a wrong path prefix: retrying cannot help."""
    sink = MlflowSink(
        sink_config("mlflow", options={"tracking_uri": target.server.uri + "/not-mlflow"})
    )
    with closing(sink), pytest.raises(PermanentSinkError, match="404"):
        sink.send(event_for(unit(tmp_path)))


def test_an_unreachable_server_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection refused is a retryable SinkError, not a dead letter."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sink = MlflowSink(
        sink_config("mlflow", options={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    )
    with closing(sink), pytest.raises(SinkError) as caught:
        sink.send(event_for(unit(tmp_path)))
    assert not isinstance(caught.value, PermanentSinkError)


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (RestException({"error_code": "PERMISSION_DENIED", "message": "no"}), True),
        (RestException({"error_code": "UNAUTHENTICATED", "message": "who"}), True),
        (RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"}), True),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "oops"}), False),
        (RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "later"}), False),
        (RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow"}), False),
        (MlflowException("proxy: 502 Bad Gateway", error_code=get_error_code(502)), False),
        (MlflowException("proxy: 401", error_code=get_error_code(401)), True),
    ],
    ids=lambda value: getattr(value, "error_code", str(value)),
)
def test_mlflow_errors_map_to_retry_or_dead_letter(error: MlflowException, permanent: bool) -> None:
    """Server trouble is retried; authentication, permissions and invalid requests are not."""
    assert isinstance(classify(error), PermanentSinkError) is permanent


def test_error_messages_never_contain_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token echoed back by a server is masked in the delivery error."""
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-very-secret")
    error = RestException({"error_code": "UNAUTHENTICATED", "message": "bad tok-very-secret"})
    assert "tok-very-secret" not in str(classify(error))


URI = "http://mlflow.example:5000"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, r"sinks\[0\]\.tracking_uri: required"),
        ({"tracking_uri": "file:///tmp/mlruns"}, r"tracking_uri: must be a URL \(http://"),
        ({"tracking_uri": "https://u:p@mlflow.example"}, r"tracking_uri: a user or password"),
        ({"tracking_uri": URI + "/?token=t"}, r"tracking_uri: a credential .* MLFLOW_TRACKING"),
        ({"tracking_uri": URI, "model_name": "{team}"}, r"model_name: unknown field \{team\}"),
        ({"tracking_uri": URI, "model_name": "{name.__class__}"}, r"model_name: unknown field"),
        ({"tracking_uri": URI, "model_name": "{name"}, r"model_name: not a valid template"),
        ({"tracking_uri": URI, "experiment_name": " "}, r"experiment_name: must not be empty"),
        ({"tracking_uri": URI, "registry_uri": URI}, r"registry_uri: unknown key"),
    ],
)
def test_bad_configuration_names_the_key(options: dict[str, Any], expected: str) -> None:
    """Every configuration mistake is a ConfigError starting with the offending key."""
    with pytest.raises(ConfigError, match=expected):
        MlflowSink(sink_config("mlflow", options=options))


def test_build_sink_finds_the_mlflow_sink_through_entry_points() -> None:
    """`type = "mlflow"` resolves through the modelwatch.sinks entry points; repr shows no
    credentials (there are none to show: they come from the environment)."""
    config = sink_config("mlflow", options={"tracking_uri": URI + "/"})
    with closing(build_sink(config)) as sink:
        assert isinstance(sink, MlflowSink)
        assert f"tracking_uri='{URI}'" in repr(sink)


def with_extra_file(path: Path, raw: bytes, shown: str, size: int) -> Event:
    """The event of the unit at `path` once it also holds a file named `raw` (bytes) of
    `size` bytes, listed under its display name `shown`, as the scan would list it."""
    event = event_for(path)
    with open(os.fsencode(path) + b"/" + raw, "wb") as f:
        f.write(b"x" * size)
    files = [*event.data["files"], {"path": shown, "size": size}]
    return make_event(
        REGISTERED,
        root=str(path.parent),
        unit_path=str(path),
        name=path.name,
        when=time.time(),
        data={**event.data, "files": files},
    )


def test_files_whose_names_are_not_utf8_are_uploaded(target: Target, tmp_path: Path) -> None:
    """Events carry display names (`\\xff` for a byte that is not UTF-8); the sink finds the
    file behind one, and uploads it under that name, instead of calling the run incomplete."""
    event = with_extra_file(unit(tmp_path / "models"), b"extra-\xff.bin", "extra-\\xff.bin", 12)
    with closing(target.sink()) as sink:
        sink.send(event)
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    run = target.server.client.get_run(version.run_id)
    assert "extra-\\xff.bin" in target.server.artifacts_of(run.info.run_id)
    assert "modelwatch.incomplete_artifacts" not in run.data.tags


def test_a_name_too_long_to_stage_is_uploaded_shortened(target: Target, tmp_path: Path) -> None:
    """A 255-byte name that is not UTF-8 shows as 1,020 characters, too long for any file name:
    it is staged and uploaded as a shortened unique name the run's tag maps back, instead of
    failing with ENAMETOOLONG on every attempt."""
    shown = "\\xff" * 255
    event = with_extra_file(unit(tmp_path / "models"), b"\xff" * 255, shown, 7)
    with closing(target.sink()) as sink:
        sink.send(event)
    (version,) = target.server.versions(f"{target.prefix}-resnet")
    run = target.server.client.get_run(version.run_id)
    uploaded = artifact_name(shown)
    assert len(uploaded.encode()) <= 255 and uploaded.startswith("\\xff")
    assert uploaded in target.server.artifacts_of(run.info.run_id)
    assert run.data.tags["modelwatch.renamed_artifacts"] == f"{uploaded} <- {shown}"
    assert "modelwatch.incomplete_artifacts" not in run.data.tags


def test_two_files_behind_one_shown_name_are_neither_uploaded(tmp_path: Path) -> None:
    """A file literally named `x\\xff` and one whose name has the byte 0xff both show as
    `x\\xff`: which one the event listed is unknown, so neither is opened for upload."""
    from modelwatch.sinks.mlflow import _open_listed

    unit_dir = tmp_path / "models" / "exp"
    unit_dir.mkdir(parents=True)
    (unit_dir / "x\\xff").write_bytes(b"literal")
    with _open_listed(str(tmp_path / "models"), ["exp", "x\\xff"]) as fd:
        assert fd is not None and os.read(fd, 100) == b"literal"
    with open(os.fsencode(unit_dir) + b"/x\xff", "wb") as f:
        f.write(b"raw-bytes")
    with _open_listed(str(tmp_path / "models"), ["exp", "x\\xff"]) as fd:
        assert fd is None


def test_the_default_model_name_works_for_a_depth_zero_root(
    target: Target,
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Daemon],
) -> None:
    """/artifacts and $PS_MODEL_PATH are depth-0 roots: with the default model_name "{name}",
    the model is registered under the root directory's name (it used to be ".", refused)."""
    root = tmp_path / f"artifacts-{target.prefix}"
    config = make_config(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nshutdown_timeout_seconds = 2\n'
        f'[defaults]\nsettle_seconds = 0.3\n[[roots]]\npath = "{root}"\nunit_depth = 0\n'
        f'[[sinks]]\ntype = "mlflow"\ntracking_uri = "{target.server.uri}"\n'
        f'experiment_name = "{target.experiment}"\n'
    )
    run_daemon(config, [build_sink(config.sinks[0])])
    write_safetensors(unit(tmp_path, root.name) / "model.safetensors", {"w": 10})
    wait_until(lambda: len(target.server.versions(root.name)) == 1, timeout=30)
