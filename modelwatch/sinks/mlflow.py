"""`mlflow` sink: registers each settled model as an MLflow model version (SPEC §5b).

Keys: `MlflowSink.OPTIONS` (`tracking_uri`, also the registry URI; `model_name`, a template
over the event's `name`, `experiment_id`, `host`, `format`, `model_type`, `version`,
`fingerprint`, `path`, `root`; `experiment_name`). Needs `pip install 'modelwatch[mlflow]'`
(MLflow's client). Credentials come from MLflow's own environment variables,
`MLFLOW_TRACKING_TOKEN` or `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD`; a URI that
carries one (`user:pass@`, a token in the query) is refused.

A `registered` event is delivered when its model version exists. Each step first looks for
the result of an earlier attempt, by the tag `modelwatch.event_id`:

1. the run in the experiment, created with the tags `modelwatch.event_id` and
   `modelwatch.<field>` for fingerprint, path, host, experiment_id, format, model_type, version;
2. unless that run is FINISHED: the metadata metrics (step 0, the event's time as timestamp,
   so logging them again adds nothing) and the unit's listed files as artifacts; then FINISHED;
3. the registered model (created if missing) and a version with the run's artifact location
   as source, tagged `modelwatch.event_id`.

So a redelivered event creates nothing, and an attempt that died after creating the run is
completed with that run. (Two daemons sending the same event at the same moment can still both
create a version: MLflow has no unique keys to lean on.) `removed` tags the version it undoes
`modelwatch.removed = "true"` (a no-op without one). `rejected` has nothing to register and is
acknowledged without contacting the server; leave it out with `event_types`.

Files are opened without following any symlink on the way and uploaded from the open file via
`/proc/self/fd` (Linux), so a directory swapped for a symlink cannot make the sink read outside
the unit. Each is staged as a link in a directory with a generated name, the link named as the
artifact. A name that is not UTF-8 (shown as `\\xNN` in the event) is uploaded under its shown
name, unless two files show as that name (which one is listed is then unknown). A shown name
longer than a file name may be (255 bytes: only names that are not UTF-8 get there, each such
byte being shown as four characters) is uploaded as its start, `~` and 16 hex digits of its
SHA-256, and the run is tagged `modelwatch.renamed_artifacts` with what became what. A listed file
that is gone, ambiguous or has changed size is skipped, as are metrics MLflow would refuse;
the run is then tagged `modelwatch.incomplete_artifacts` or `modelwatch.skipped_metrics`
(retrying would not help; a newer version has its own event).

Errors: 5xx, 408, 409, 429 and connection failures are `SinkError` (retried); other 4xx
(authentication, permission, invalid name, not an MLflow API) and a model name MLflow refuses
(empty, "/" or ":") are `PermanentSinkError`. Messages never contain the token or password.
TLS and proxies: MLflow's client reads them from the daemon's environment
(`MLFLOW_TRACKING_SERVER_CERT_PATH`, `MLFLOW_TRACKING_CLIENT_CERT_PATH`,
`MLFLOW_TRACKING_INSECURE_TLS`, `REQUESTS_CA_BUNDLE`, `HTTPS_PROXY`, `NO_PROXY`), so the shared
TLS and proxy keys are refused here, naming the variable to set (`mlflow_env`).
MLflow's client retries each request itself before failing: bound one attempt with
`MLFLOW_HTTP_REQUEST_MAX_RETRIES` and `MLFLOW_HTTP_REQUEST_TIMEOUT`. It also sends usage
telemetry unless `MLFLOW_DISABLE_TELEMETRY=true` is set in the daemon's environment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
import re
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from mlflow.entities import Metric, Run, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from modelwatch import beneath
from modelwatch.config import SinkConfig
from modelwatch.credentials import Scrubber
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, REJECTED, REMOVED, Event, event_id
from modelwatch.progress import progress
from modelwatch.sinks import mlflow_env
from modelwatch.sinks.options import NONEMPTY, REQUIRED, STRING, Option, SinkOptions, url

_TEMPLATE_FIELDS: tuple[str, ...] = ("name", "experiment_id", "host", "format", "model_type")
_TEMPLATE_FIELDS += ("version", "fingerprint", "path", "root")
EVENT_TAG = "modelwatch.event_id"
_RUN_TAGS = ("fingerprint", "path", "host", "experiment_id", "format", "model_type", "version")
_RETRY_STATUSES = (408, 409, 429, 499)
_SECRET_VARIABLES = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
# MLflow's own rule for metric names (mlflow.utils.validation), checked here so that one odd
# name in untrusted metadata cannot turn the whole registration into a permanent failure.
_METRIC_NAME = re.compile(r"[/\w.\- :]{1,250}")
_METRIC_BATCH = 1000
_NAME_MAX = 255  # bytes in one file name (Linux, and the artifact stores MLflow serves from)
_TAG_CHARS = 5000


class MlflowSink:
    """Delivered when the model version tagged with the event id exists."""

    # Progress is reported per file uploaded; one multi-GB file (and MLflow's own retries) is
    # a single call without progress: the daemon's health check allows a send this long.
    max_send_seconds = 3600.0

    OPTIONS: ClassVar[SinkOptions] = SinkOptions(
        Option(
            "tracking_uri",
            url(
                "http",
                "https",
                alternative="MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and"
                " MLFLOW_TRACKING_PASSWORD",
            ),
            "the MLflow server (also the model registry); credentials from MLflow's variables",
            REQUIRED,
            show="url",
        ),
        Option("model_name", STRING, "the registered model's name, a template", "{name}"),
        Option("experiment_name", NONEMPTY, "the experiment runs are created in", "modelwatch"),
    )

    def __init__(self, config: SinkConfig) -> None:
        mlflow_env.refuse_shared_keys(config)
        values = self.OPTIONS.parse(config)
        mlflow_env.check_environment(config.key)
        if not os.path.isdir("/proc/self/fd"):
            raise ConfigError(f"{config.key}.type: the mlflow sink needs Linux /proc")
        self.name = config.name
        self._uri = str(values["tracking_uri"]).rstrip("/")
        self._template, self._fields = _template(config.key, values["model_name"])
        self._experiment_name: str = values["experiment_name"]
        self._client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"MlflowSink(name={self.name!r}, tracking_uri={self._uri!r}, "
            f"model_name={self._template!r}, experiment_name={self._experiment_name!r})"
        )

    def network_summary(self) -> list[str]:
        """How MLflow's client reaches the server, for `check-config`."""
        return mlflow_env.summary(self.name, self._uri)

    def send(self, event: Event) -> None:
        if event.type == REJECTED:
            return
        try:
            if event.type == REMOVED:
                self._mark_removed(event)
            elif event.type == REGISTERED:
                model = self._model_name(event)
                self._ensure_version(model, event, self._ensure_run(event))
            else:
                raise PermanentSinkError(f"unsupported event type {event.type!r}")
        except MlflowException as exc:
            raise classify(exc) from exc

    def close(self) -> None:
        """Nothing to release: MLflow's client shares its HTTP sessions process-wide."""

    # --- the steps, each finding the result of an earlier attempt --------------------------

    def _ensure_run(self, event: Event) -> Run:
        """The event's run, with its metrics and artifacts, FINISHED."""
        run = self._find_or_create_run(event)
        if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            self._fill_run(run.info.run_id, event)
            self._client.update_run(run.info.run_id, status="FINISHED")
        return run

    def _find_or_create_run(self, event: Event) -> Run:
        experiment_id = self._experiment()
        found = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`{EVENT_TAG}` = '{event.id}'", max_results=1
        )
        if found:
            return found[0]
        tags = {EVENT_TAG: event.id}
        tags |= {f"modelwatch.{k}": str(event.data[k]) for k in _RUN_TAGS if event.data.get(k)}
        name = f"{event.subject} v{event.data.get('version', '?')}"
        return self._client.create_run(experiment_id, tags=tags, run_name=name)

    def _fill_run(self, run_id: str, event: Event) -> None:
        metrics, skipped = _metrics(event)
        for start in range(0, len(metrics), _METRIC_BATCH):
            self._client.log_batch(run_id, metrics=metrics[start : start + _METRIC_BATCH])
        if skipped:
            self._client.set_tag(run_id, "modelwatch.skipped_metrics", ", ".join(skipped)[:5000])
        if not self._log_files(run_id, event):
            self._client.set_tag(run_id, "modelwatch.incomplete_artifacts", "true")

    def _ensure_version(self, model: str, event: Event, run: Run) -> ModelVersion:
        version = self._find_version(model, event.id)
        if version is not None:
            return version
        try:
            self._client.create_registered_model(model)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # no waiting for READY: the open-source registry creates versions READY at once, and
        # waiting (up to 300 s by default) would outlast the delivery worker's heartbeat
        return self._client.create_model_version(
            model,
            source=run.info.artifact_uri,
            run_id=run.info.run_id,
            tags={EVENT_TAG: event.id},
            await_creation_for=0,
        )

    def _find_version(self, model: str, registered_id: str) -> ModelVersion | None:
        # filtered by tag only: a name cannot be quoted safely in MLflow's filter syntax
        found = self._client.search_model_versions(f"tags.`{EVENT_TAG}` = '{registered_id}'")
        return next((v for v in found if v.name == model), None)

    def _mark_removed(self, event: Event) -> None:
        registered = event_id(REGISTERED, event.unit_path, str(event.data["fingerprint"]))
        version = self._find_version(self._model_name(event), registered)
        if version is not None:
            for key, value in (("removed", "true"), ("removed_event_id", event.id)):
                self._client.set_model_version_tag(
                    version.name, version.version, f"modelwatch.{key}", value
                )

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment()
        return self._experiment_id

    def _find_or_create_experiment(self) -> str:
        name = self._experiment_name
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name)
            except MlflowException as exc:  # unless created meanwhile by someone else
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            experiment = self._client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise PermanentSinkError(f"experiment {name!r} is deleted; restore it in MLflow")
        return str(experiment.experiment_id)

    def _model_name(self, event: Event) -> str:
        fields = {key: event.data.get(key) for key in _TEMPLATE_FIELDS}
        missing = [f"{{{key}}}" for key in self._fields if fields[key] is None]
        if missing:
            raise PermanentSinkError(f"model_name: {', '.join(missing)} is null for this event")
        try:
            model = self._template.format_map(fields)
        except (ValueError, TypeError) as exc:
            raise PermanentSinkError(f"model_name {self._template!r}: {exc}") from None
        if model.strip() in ("", ".", "..") or "/" in model or ":" in model:
            raise PermanentSinkError(
                f"model_name {self._template!r} gives {model!r}: MLflow model names must be"
                ' non-empty without "/" or ":" (set model_name for nested units)'
            )
        return model

    # --- artifacts ---------------------------------------------------------------------------

    def _log_files(self, run_id: str, event: Event) -> bool:
        """Upload the unit's listed regular files; False if any was gone or had changed."""
        complete = True
        renamed: list[str] = []
        unit = [] if event.data.get("name") in (None, ".") else str(event.data["name"]).split("/")
        with tempfile.TemporaryDirectory(prefix="modelwatch-mlflow-") as staging:
            for index, entry in enumerate(event.data.get("files") or ()):
                if "symlink" in entry:
                    continue
                rel = str(entry["path"])
                with _open_listed(str(event.data["root"]), [*unit, *rel.split("/")]) as fd:
                    if fd is None or os.fstat(fd).st_size != entry["size"]:
                        complete = False
                        continue
                    name = artifact_name(posixpath.basename(rel))
                    if name != posixpath.basename(rel):
                        renamed.append(f"{posixpath.join(posixpath.dirname(rel), name)} <- {rel}")
                    self._upload(run_id, fd, os.path.join(staging, str(index)), rel, name)
                progress()  # a model of a thousand files uploads for long: that is progress
        if renamed:
            self._client.set_tag(run_id, "modelwatch.renamed_artifacts", _tag(renamed))
        return complete

    def _upload(self, run_id: str, fd: int, folder: str, rel: str, name: str) -> None:
        """Upload the open file `fd` as the artifact `rel`'s directory + `name`, through a link
        named `name` in `folder` (a generated name: short, and unique per file)."""
        os.mkdir(folder)
        link = os.path.join(folder, name)  # the link's name becomes the artifact's file name
        os.symlink(f"/proc/self/fd/{fd}", link)
        try:
            directory = posixpath.dirname(rel) or None
            self._client.log_artifact(run_id, link, artifact_path=directory)
        finally:
            os.unlink(link)
            os.rmdir(folder)


def artifact_name(shown: str) -> str:
    """The file name an artifact shown as `shown` is uploaded under: `shown` itself when it
    fits in a file name, else its start, `~` and 16 hex digits of its SHA-256."""
    encoded = os.fsencode(shown)
    if len(encoded) <= _NAME_MAX:
        return shown
    suffix = "~" + hashlib.sha256(encoded).hexdigest()[:16]
    start = encoded[: _NAME_MAX - len(suffix)].decode("utf-8", "ignore")  # whole characters
    return start + suffix


def _tag(items: list[str]) -> str:
    text = ", ".join(items)
    return text if len(text) <= _TAG_CHARS else text[: _TAG_CHARS - 3] + "..."


def classify(exc: MlflowException) -> SinkError:
    """The modelwatch error for an MLflow failure: retried, or permanent."""
    status: int = exc.get_http_status_code()  # type: ignore[no-untyped-call]
    scrub = Scrubber(os.environ.get(variable, "") for variable in _SECRET_VARIABLES)
    message = f"MLflow {exc.error_code} (HTTP {status}): {scrub(exc.message)}"
    if status >= 500 or status in _RETRY_STATUSES:
        return SinkError(message)
    return PermanentSinkError(message)


def _metrics(event: Event) -> tuple[list[Metric], list[str]]:
    """(metrics MLflow accepts, names of those it would refuse) from the event's metadata."""
    when = dt.datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    timestamp = int(when.timestamp() * 1000)
    metrics: list[Metric] = []
    skipped: list[str] = []
    for item in event.data.get("metrics") or ():
        name, value = (
            (item.get("name"), item.get("numberValue")) if isinstance(item, dict) else (None, None)
        )
        if (
            isinstance(name, str)
            and _METRIC_NAME.fullmatch(name)
            and posixpath.normpath(name) == name
            and not name.startswith(("/", ".."))
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            metrics.append(Metric(name, float(value), timestamp, 0))
        else:
            skipped.append(str(name))
    return metrics, skipped


@contextmanager
def _open_listed(root: str, parts: list[str]) -> Iterator[int | None]:
    """An fd of the regular file at `parts` below `root`, no symlink followed; None if none.

    Event paths are display forms: bytes that are not UTF-8 appear as `\\xNN` escapes. The
    path is tried as written and with those escapes turned back into bytes; when both exist
    and are different files, the shown name is ambiguous and None is returned.
    """
    if not parts or any(part in ("", ".", "..") for part in parts):
        yield None
        return
    found: list[int] = []
    for top, rel in dict.fromkeys(
        [(os.fsencode(root), os.fsencode("/".join(parts))), (_undisplay(root), _undisplay(*parts))]
    ):
        try:
            root_fd = beneath.open_directory(top)
            try:
                found.append(beneath.open_regular(root_fd, rel)[0])
            finally:
                os.close(root_fd)
        except (OSError, ValueError):  # gone, swapped for a symlink, or an unencodable name
            continue
    if len(found) == 2 and _same_file(*found):
        os.close(found.pop())
    if len(found) != 1:  # none, or two files behind one shown name: which is listed is unknown
        for fd in found:
            os.close(fd)
        yield None
        return
    fd = found[0]
    try:
        yield fd
    finally:
        os.close(fd)


def _same_file(a: int, b: int) -> bool:
    first, second = os.fstat(a), os.fstat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


_ESCAPED = re.compile(rb"\\x([0-9a-f]{2})")


def _undisplay(*parts: str) -> bytes:
    """The raw bytes behind a display path (`modelwatch.manifest.display`), parts joined."""
    raw = "/".join(parts).encode("utf-8", "surrogateescape")
    return _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


# --- configuration -----------------------------------------------------------------------


def _template(key: str, template: str) -> tuple[str, tuple[str, ...]]:
    """The `model_name` template and the event fields it uses."""
    where = f"{key}.model_name"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}: not a valid template: {exc}") from None
    for field in fields:
        if field not in _TEMPLATE_FIELDS:
            valid = ", ".join(f"{{{f}}}" for f in _TEMPLATE_FIELDS)
            raise ConfigError(f"{where}: unknown field {{{field}}} (valid: {valid})")
    if not template.strip():
        raise ConfigError(f"{where}: must not be empty")
    return template, tuple(fields)
