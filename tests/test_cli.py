"""The command line as a user runs it: real subprocesses, real files, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from modelwatch.state import SCHEMA_VERSION
from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, wait_ready_line
from tests.harness import SCHEMA_1_AGAIN
from tests.writers import write_hf_sharded, write_safetensors


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    defaults = {"MODELWATCH_STATE_DIR": str(tmp_path / "state"), "MODELWATCH_LOG_FORMAT": "json"}
    return daemon_env(**{**defaults, **extra})


def mw(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=env_for(tmp_path, **env),
        timeout=60,
        check=False,
    )


def test_run_prints_the_event_for_a_model_copied_in(tmp_path: Path) -> None:
    """`modelwatch run ./dir`: a model written into the folder appears on stdout; Ctrl-C exits 0."""
    models = tmp_path / "models"
    models.mkdir()
    with daemon_process(
        ["run", str(models)],
        env=env_for(tmp_path, MODELWATCH_SETTLE_SECONDS="0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        wait_ready_line(proc.stderr)
        write_hf_sharded(models, shards=2)
        event = json.loads(proc.stdout.readline())
        assert event["type"] == "io.modelwatch.model.registered"
        assert event["data"]["format"] == "huggingface"
        assert event["data"]["version"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0


def test_second_daemon_on_the_same_state_refuses(tmp_path: Path) -> None:
    """A second `run` on the same state_dir exits 1 with a clear error instead of corrupting it."""
    (tmp_path / "m").mkdir()
    with daemon_process(
        ["run", str(tmp_path / "m")], env=env_for(tmp_path), stderr=subprocess.PIPE
    ) as first:
        try:
            wait_ready_line(first.stderr)
            second = mw(tmp_path, "run", str(tmp_path / "m"))
            assert second.returncode == 1
            assert "in use by another modelwatch process" in second.stderr
        finally:
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=15) == 0


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    """check-config on a bad file exits 2 and names the key and the rule."""
    config = tmp_path / "bad.toml"
    config.write_text('[[roots]]\npath = "/a"\n[[roots]]\npath = "/b"\nunit_depth = -1\n')
    result = mw(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 2
    assert "roots[1].unit_depth: must be >= 0" in result.stderr


def test_check_config_suggests_the_key_meant(tmp_path: Path) -> None:
    """A typo gets a did-you-mean hint."""
    config = tmp_path / "typo.toml"
    config.write_text("[defaults]\nsetle_seconds = 3\n")
    result = mw(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 2
    assert "did you mean 'settle_seconds'" in result.stderr


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    """A good file prints the full effective config as TOML, defaults filled in."""
    config = tmp_path / "ok.toml"
    config.write_text(f'[[roots]]\npath = "{tmp_path}"\nunit_depth = 1\n')
    result = mw(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "settle_seconds = 5.0" in result.stdout
    assert "unit_depth = 1" in result.stdout


def test_unknown_sink_type_lists_the_known_ones(tmp_path: Path) -> None:
    """An unknown sink type names the key and the installed types (found via entry points)."""
    config = tmp_path / "sink.toml"
    config.write_text('[[sinks]]\ntype = "kafkaa"\n')
    result = mw(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 2
    assert "sinks[0].type: unknown sink type 'kafkaa'" in result.stderr
    assert "jsonl" in result.stderr and "stdout" in result.stderr


def test_jsonl_sink_requires_its_path(tmp_path: Path) -> None:
    """A sink's own keys are validated with the full key name."""
    config = tmp_path / "sink.toml"
    config.write_text('[[sinks]]\ntype = "jsonl"\nfsynk = true\n')
    result = mw(tmp_path, "check-config", "--config", str(config))
    assert result.returncode == 2
    assert "sinks[0].fsynk: unknown key" in result.stderr


def test_validate_prints_file_line_column_code(tmp_path: Path) -> None:
    """`validate` prints FILE:LINE:COLUMN: CODE: message and exits 1 for invalid metadata."""
    meta = tmp_path / "gradient-model-metadata.json"
    meta.write_text('{\n  "metrics": [\n    {"name": "acc", "numberValue": NaN}\n  ]\n}\n')
    result = mw(tmp_path, "validate", str(meta))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{meta}:3:36: metadata_syntax: ")


def test_validate_json_report_for_a_model_directory(tmp_path: Path) -> None:
    """`validate --format json DIR` reports metadata problems with pointers."""
    unit = tmp_path / "unit"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 10})
    (unit / "gradient-model-metadata.json").write_text(
        '{"metrics": [{"name": "", "numberValue": 1}]}'
    )
    result = mw(tmp_path, "validate", "--format", "json", str(unit))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False
    (problem,) = report["results"][0]["problems"]
    assert problem["code"] == "metadata_metrics"
    assert problem["pointer"] == "/metrics/0/name"


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    """Valid metadata exits 0."""
    meta = tmp_path / "m.json"
    meta.write_text('{"metrics": [{"name": "acc", "numberValue": 0.5}]}')
    assert mw(tmp_path, "validate", str(meta)).returncode == 0


def test_scan_dry_run_prints_and_records_nothing(tmp_path: Path) -> None:
    """`scan --dry-run` prints the events; a real scan afterwards still emits them."""
    models = tmp_path / "models"
    write_hf_sharded(models / "exp-1", shards=1)
    dry = mw(tmp_path, "scan", "--dry-run", f"{models}:1", MODELWATCH_SETTLE_SECONDS="0.2")
    assert dry.returncode == 0, dry.stderr
    (line,) = dry.stdout.splitlines()
    assert json.loads(line)["subject"] == "exp-1"
    real = mw(tmp_path, "scan", f"{models}:1", MODELWATCH_SETTLE_SECONDS="0.2")
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["id"] == json.loads(line)["id"]
    again = mw(tmp_path, "scan", f"{models}:1", MODELWATCH_SETTLE_SECONDS="0.2")
    assert again.stdout == ""


def test_scan_delivers_to_a_jsonl_file_and_status_shows_it(tmp_path: Path) -> None:
    """A scan with a jsonl sink appends one line; `status --format json` shows the version."""
    models = tmp_path / "models"
    write_hf_sharded(models / "exp-1", shards=1)
    out = tmp_path / "events.jsonl"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[defaults]\nsettle_seconds = 0.2\n[[roots]]\npath = "{models}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{out}"\n'
    )
    assert mw(tmp_path, "scan", "--config", str(config)).returncode == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["data"]["experiment_id"] == "exp-1"
    status = mw(tmp_path, "status", "--config", str(config), "--format", "json")
    body = json.loads(status.stdout)
    assert [(u["version"], u["state"]) for u in body["units"]] == [(1, "present")]


def test_version() -> None:
    """`--version` prints the version."""
    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("modelwatch ")


@pytest.mark.parametrize("args", [["frobnicate"], ["run", "--bogus"]])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    """Bad usage exits 2."""
    assert mw(tmp_path, *args).returncode == 2


def test_redeliver_requeues_dead_letters(tmp_path: Path) -> None:
    """A jsonl sink that cannot write dead-letters after max_attempts; redeliver requeues it."""
    models = tmp_path / "models"
    write_hf_sharded(models, shards=1)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[defaults]\nsettle_seconds = 0.2\n[[roots]]\npath = "{models}"\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{blocked}/events.jsonl"\nmax_attempts = 1\n'
    )
    assert mw(tmp_path, "scan", "--config", str(config)).returncode == 1  # went dead
    status = json.loads(mw(tmp_path, "status", "--config", str(config), "--format", "json").stdout)
    assert status["sinks"] == [
        {"sink": "jsonl", "pending": 0, "dead": 1, "discarded": 0, "oldest_pending_seconds": None}
    ]
    blocked.unlink()
    result = mw(tmp_path, "redeliver", "--config", str(config))
    assert "1 event(s)" in result.stdout
    assert mw(tmp_path, "scan", "--config", str(config)).returncode == 0
    assert (blocked / "events.jsonl").read_text().count("\n") == 1


def test_validate_never_opens_a_fifo(tmp_path: Path) -> None:
    """`validate` on a FIFO reports it as not a regular file instead of hanging."""
    fifo = tmp_path / "gradient-model-metadata.json"
    os.mkfifo(fifo)
    result = mw(tmp_path, "validate", str(fifo))
    assert result.returncode == 1
    assert "metadata_not_regular_file" in result.stdout


def test_an_older_store_is_read_by_status_and_dry_run_and_migrated_only_by_scan(
    tmp_path: Path,
) -> None:
    """After an upgrade, on a store of schema 1 (the previous version's daemon may still run on
    it): `status` and `scan --dry-run` work and leave it as it is; a real `scan`, which takes
    the state lock, migrates it."""
    import sqlite3

    models = tmp_path / "models"
    write_hf_sharded(models / "exp-1", shards=1)
    settle = {"MODELWATCH_SETTLE_SECONDS": "0.2"}
    assert mw(tmp_path, "scan", f"{models}:1", **settle).returncode == 0
    db_path = tmp_path / "state" / "state.db"

    def schema() -> int:
        db = sqlite3.connect(db_path)
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()

    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA_1_AGAIN)
    db.close()
    status = mw(tmp_path, "status", "--format", "json")
    assert status.returncode == 0, status.stderr
    assert [u["version"] for u in json.loads(status.stdout)["units"]] == [1]
    write_hf_sharded(models / "exp-1", shards=2)
    dry = mw(tmp_path, "scan", "--dry-run", f"{models}:1", **settle)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["data"]["version"] == 2
    assert schema() == 1
    real = mw(tmp_path, "scan", f"{models}:1", **settle)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["data"]["version"] == 2
    assert schema() == SCHEMA_VERSION


def test_validate_places_whole_file_problems_at_1_1(tmp_path: Path) -> None:
    """A problem of the whole file (its size) is printed as FILE:1:1:, like every other, so
    editors and CI annotations can jump to it."""
    big = tmp_path / "gradient-model-metadata.json"
    big.write_text('{"x": "' + "a" * 1_100_000 + '"}')
    result = mw(tmp_path, "validate", str(big))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{big}:1:1: metadata_too_large: ")


def test_status_shows_how_each_root_is_watched_and_creates_nothing(tmp_path: Path) -> None:
    """Before any daemon ran, `status` reads an empty store and leaves no state directory
    behind; after a polling daemon ran, it shows the root's observer."""
    models = tmp_path / "models"
    models.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{state}"\n[defaults]\nobserver = "polling"\n'
        f'[[roots]]\npath = "{models}"\nunit_depth = 1\n'
    )
    before = mw(tmp_path, "status", "--config", str(config), "--format", "json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["units"] == []
    assert not state.exists()
    with daemon_process(
        ["run", "--config", str(config)], env=env_for(tmp_path), stderr=subprocess.PIPE
    ) as daemon:
        try:
            wait_ready_line(daemon.stderr)

            def observers() -> list[str | None]:
                body = mw(tmp_path, "status", "--config", str(config), "--format", "json")
                return [root["observer"] for root in json.loads(body.stdout)["roots"]]

            wait_until(lambda: observers() == ["polling"], timeout=20)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=15) == 0
    after = mw(tmp_path, "status", "--config", str(config))
    assert "polling" in after.stdout
