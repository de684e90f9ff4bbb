"""`modelwatch inspect`: what modelwatch sees in a directory, as a user runs it (real
subprocesses, real files), without a daemon or a store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.daemons import CLI, daemon_env
from tests.describe_files import onnx_model, scalar_event, write_unit
from tests.writers import write_hf_sharded


def mw(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = daemon_env(MODELWATCH_STATE_DIR=str(tmp_path / "state"), MODELWATCH_SETTLE_SECONDS="0.2")
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def onnx_unit(unit: Path) -> None:
    """An ONNX model with TensorBoard logs and metadata without metrics."""
    write_unit(
        unit,
        {
            "model.onnx": onnx_model(),
            "logs/validation/events.out.tfevents.1": scalar_event(3, "epoch_accuracy", 0.75),
            "gradient-model-metadata.json": b'{"framework": "onnx"}',
        },
    )


def test_json_model_is_the_events_description(tmp_path: Path) -> None:
    """`inspect --format json` reports the same `model` and `metrics` as the event these
    files get (`scan --dry-run`), with the format and completeness."""
    unit = tmp_path / "exp"
    onnx_unit(unit)
    inspected = mw(tmp_path, "inspect", "--format", "json", str(unit))
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    scanned = mw(tmp_path, "scan", "--dry-run", str(unit))
    assert scanned.returncode == 0, scanned.stderr
    (event,) = [json.loads(line) for line in scanned.stdout.splitlines()]
    assert report["model"] == event["data"]["model"]
    assert report["metrics"] == event["data"]["metrics"]
    assert report["metrics"] == [{"name": "logs/validation/epoch_accuracy", "numberValue": 0.75}]
    assert (report["format"], report["model_type"], report["complete"]) == ("onnx", "ONNX", True)
    assert report["fingerprint"] == event["data"]["fingerprint"]


def test_text_is_a_short_table(tmp_path: Path) -> None:
    """The human form names the format, completeness, parameters, inputs and outputs and
    metrics, one per line."""
    unit = tmp_path / "exp"
    onnx_unit(unit)
    done = mw(tmp_path, "inspect", str(unit))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(unit)
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert table["format"] == "onnx (ONNX)"
    assert table["complete"] == "yes"
    assert table["parameters"] == "8 in 2 initializers (float32 8)"
    assert table["inputs"] == "x: float32[4, batch]"
    assert table["metrics"] == "logs/validation/epoch_accuracy 0.75"
    assert table["metadata"] == "valid"


def test_an_incomplete_unit_says_what_is_missing(tmp_path: Path) -> None:
    """A sharded Hugging Face checkpoint missing a shard: `complete: no` and the reason
    naming the shard; inspecting it still exits 0."""
    write_hf_sharded(tmp_path / "hf", shards=2)
    next((tmp_path / "hf").glob("model-00002-of-*.safetensors")).unlink()
    done = mw(tmp_path, "inspect", "--format", "json", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["complete"] is False
    (reason,) = report["reasons"]
    assert reason["code"] == "incomplete"
    assert reason["files"][0] == "model-00002-of-00002.safetensors"
    text = mw(tmp_path, "inspect", str(tmp_path / "hf")).stdout
    assert f"  complete      no: {reason['message']}\n" in text


def test_a_path_that_is_no_directory_exits_1(tmp_path: Path) -> None:
    """Nothing to inspect: exit 1, the path named."""
    done = mw(tmp_path, "inspect", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert str(tmp_path / "nowhere") in done.stderr
