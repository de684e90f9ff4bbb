"""A real `mlflow server` for tests: SQLite backend, artifacts proxied into a local directory.

The server runs as a child process (in its own process group: it starts uvicorn workers) on a
free port of 127.0.0.1, with MLflow's telemetry and job runner off. Clients upload artifacts
through the server (`mlflow-artifacts:/`), as they would to a remote registry.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from tests.brokers import free_port, wait_started

START_SECONDS = 60.0


class MlflowServer:
    """One `mlflow server` process; `uri` is its tracking and registry URI."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = workdir / "artifacts"
        self._log_path = workdir / "server.log"
        self._argv = [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}"),
            *("--artifacts-destination", str(self.artifacts)),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
        ]
        self._process: subprocess.Popen[bytes] | None = None
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def start(self) -> None:
        """Start the server and return once `GET /health` answers 200."""
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_started(
            self._process,
            self._healthy,
            self._log_path,
            "mlflow server",
            self.stop,
            timeout=START_SECONDS,
            step=0.1,  # each check is an HTTP request
        )

    def stop(self) -> None:
        """Terminate the whole process group and wait for the server."""
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        _signal_group(process.pid, signal.SIGKILL)  # workers that outlived the leader
        process.wait()

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    # --- reading what the sink did ---------------------------------------------------------

    def runs(self, experiment_name: str, event_id: str) -> list[Run]:
        """Every run in the experiment tagged with `event_id`."""
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        found = self.client.search_runs(
            [experiment.experiment_id], f"tags.`modelwatch.event_id` = '{event_id}'"
        )
        return list(found)

    def versions(self, model: str) -> list[ModelVersion]:
        """Every version of the registered model, oldest first."""
        found = self.client.search_model_versions(f"name='{model}'")
        return sorted(found, key=lambda v: int(v.version))

    def artifacts_of(self, run_id: str, path: str | None = None) -> list[str]:
        """Relative paths of every artifact file of the run."""
        out: list[str] = []
        for info in self.client.list_artifacts(run_id, path):
            out += self.artifacts_of(run_id, info.path) if info.is_dir else [info.path]
        return sorted(out)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
