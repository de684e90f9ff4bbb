"""Descriptions checked against the frameworks themselves.

A separate venv with TensorFlow, torch, ONNX, transformers, safetensors and tensorboardX
(tests/truth/requirements.txt, built and cached by tests/truth/venv.sh, which .ci/run runs
and exports as MODELWATCH_TRUTH_PYTHON) writes real models and TensorBoard logs and records
what each framework reports (tests/truth/make_models.py). modelwatch, in this venv, must
report the same facts and exactly the same parameter counts, without importing any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.describe import find_event_files, scalar_metrics
from modelwatch.formats import describe_model
from tests.conftest import wait_until
from tests.daemons import daemon_process, jsonl_records

TRUTH = Path(__file__).parent / "truth"
_HEAVY = ("tensorflow", "torch", "numpy", "onnx", "transformers", "safetensors", "keras")


def truth_python() -> str | None:
    """The ground-truth venv's python: $MODELWATCH_TRUTH_PYTHON, else the cached venv."""
    if os.environ.get("MODELWATCH_TRUTH_PYTHON"):
        return os.environ["MODELWATCH_TRUTH_PYTHON"]
    key = hashlib.sha256((TRUTH / "requirements.txt").read_bytes()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    python = os.path.join(cache, "modelwatch", f"truth-venv-{key}", "bin", "python")
    return python if os.path.exists(python) else None


@pytest.fixture(scope="session")
def truth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(directory of units, what the frameworks said), written once per session."""
    python = truth_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the ground-truth venv: bash tests/truth/venv.sh")
        pytest.skip(
            "no ground-truth venv here: `bash tests/truth/venv.sh` builds it (.ci/run does)"
        )
    out = tmp_path_factory.mktemp("truth")
    subprocess.run(
        [python, str(TRUTH / "make_models.py"), str(out)],
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield out, json.loads((out / "truth.json").read_text())


def listing(unit: Path) -> dict[str, int]:
    return {
        str(p.relative_to(unit)): p.stat().st_size
        for p in sorted(unit.rglob("*"))
        if p.is_file() and not p.name.startswith("events.out.tfevents.")
    }


def describe(unit: Path, fmt: str) -> dict[str, Any]:
    fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
    try:
        described = describe_model(fd, listing(unit), fmt)
    finally:
        os.close(fd)
    assert described is not None and "error" not in described, described
    return described


def metrics(unit: Path) -> dict[str, float]:
    fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = scalar_metrics(fd, find_event_files(fd, max_files=100))
    finally:
        os.close(fd)
    return {m["name"]: m["numberValue"] for m in found}


def signatures(described: dict[str, Any]) -> dict[str, Any]:
    (graph,) = described["meta_graphs"]
    return {
        s["name"]: {
            side: {t["name"]: [t["dtype"], t["shape"]] for t in s[side]}
            for side in ("inputs", "outputs")
        }
        for s in graph["signatures"]
    }


def test_keras_saved_model_matches_tensorflow(truth: tuple[Path, dict[str, Any]]) -> None:
    """A Keras 3 `model.export()` SavedModel: TF's signatures, variables and count_params()."""
    out, facts = truth
    expected = facts["saved_model_keras"]
    described = describe(out / "saved_model_keras", "saved_model")
    assert described["meta_graphs"][0]["tags"] == ["serve"]
    assert described["meta_graphs"][0]["tensorflow_version"] == expected["tensorflow_version"]
    assert signatures(described) == expected["signatures"]
    assert {v["name"]: v["shape"] for v in described["variables"]} == expected["variables"]
    assert described["parameter_count"] == expected["parameter_count"]


def test_tf_module_saved_model_matches_tensorflow(truth: tuple[Path, dict[str, Any]]) -> None:
    """A plain tf.Module SavedModel: its explicit signature and its variables' sizes."""
    out, facts = truth
    expected = facts["saved_model_module"]
    described = describe(out / "saved_model_module", "saved_model")
    inputs = signatures(described)["serving_default"]["inputs"]
    assert inputs == expected["signatures"]["serving_default"]["inputs"]
    assert {v["name"]: v["shape"] for v in described["variables"]} == expected["variables"]
    assert described["parameter_count"] == expected["parameter_count"]


def test_checkpoint_counts_the_model_not_the_optimizer(truth: tuple[Path, dict[str, Any]]) -> None:
    """tf.train.Checkpoint(model, optimizer): list_variables, and count_params() as the count
    although the optimizer reached the trainable variables first."""
    out, facts = truth
    expected = facts["tf_checkpoint"]
    described = describe(out / "tf_checkpoint", "tf_checkpoint")
    assert described["checkpoint"] == expected["prefix"]
    assert {v["name"]: v["shape"] for v in described["variables"]} == expected["variables"]
    assert described["parameter_count"] == expected["parameter_count"]
    assert described["shard_count"] == 1


def test_keras_file_matches_keras(truth: tuple[Path, dict[str, Any]]) -> None:
    """A `.keras` file: Keras version, model class, layer count, loss, metrics, optimizer."""
    out, facts = truth
    expected = facts["keras"]
    described = describe(out / "keras", "keras")
    for key in ("keras_version", "class_name", "layer_count", "loss", "optimizer"):
        assert described[key] == expected[key], key
    assert described["metrics"] == ["accuracy"]


@pytest.mark.parametrize("unit", ["keras_logs", "tf2_logs", "tensorboardx_logs"])
def test_scalars_match_tensorflows_event_reader(
    truth: tuple[Path, dict[str, Any]], unit: str
) -> None:
    """Keras callback, TF2 summaries and tensorboardX logs: the last value by step of every
    scalar, named by run directory, as TensorFlow's own reader gives them."""
    out, facts = truth
    assert metrics(out / unit) == pytest.approx(facts[unit]["scalars"])
    assert facts[unit]["scalars"]


@pytest.mark.parametrize("unit", ["onnx", "onnx_external"])
def test_onnx_matches_onnx(truth: tuple[Path, dict[str, Any]], unit: str) -> None:
    """ONNX (weights inside or in an external file): what onnx.load reports."""
    out, facts = truth
    expected = facts[unit]
    described = describe(out / unit, "onnx")
    for key in ("ir_version", "producer_name", "producer_version", "opsets", "metadata_props"):
        assert described[key] == expected[key], key
    for side in ("inputs", "outputs"):
        shown = [[t["name"], t["dtype"], t["shape"]] for t in described[side]]
        assert shown == expected[side]
    assert described["parameter_count"] == expected["parameter_count"]


def test_torch_exported_onnx_counts_the_modules_parameters(
    truth: tuple[Path, dict[str, Any]],
) -> None:
    """torch.onnx.export: the initializers hold exactly the module's parameters."""
    out, facts = truth
    described = describe(out / "onnx_torch", "onnx")
    assert described["producer_name"] == facts["onnx_torch"]["producer_name"]
    assert described["parameter_count"] == facts["onnx_torch"]["parameter_count"]
    assert described["parameter_count"] == facts["onnx_torch"]["module_parameters"]
    assert [i["shape"] for i in described["inputs"]] == [["batch", 5]]


def test_torch_save_matches_torch(truth: tuple[Path, dict[str, Any]]) -> None:
    """torch.save of a state dict with float16, bfloat16, uint16 and a view: every tensor's
    dtype and shape, and each storage counted once."""
    out, facts = truth
    described = describe(out / "pytorch", "pytorch")
    shown = {t["name"]: [t["dtype"], t["shape"]] for t in described["tensors"]}
    assert shown == facts["pytorch"]["tensors"]
    assert described["parameter_count"] == facts["pytorch"]["parameter_count"]
    assert described["suspicious_globals"] == []


def test_training_checkpoint_counts_the_model(truth: tuple[Path, dict[str, Any]]) -> None:
    """A checkpoint with optimizer state: the count is the module's parameters."""
    out, facts = truth
    described = describe(out / "pytorch_training", "pytorch")
    assert described["parameter_count"] == facts["pytorch_training"]["parameter_count"]


def test_dcp_matches_torch(truth: tuple[Path, dict[str, Any]]) -> None:
    """torch.distributed.checkpoint: the tensors its `.metadata` declares."""
    out, facts = truth
    described = describe(out / "torch_dcp", "torch_dcp")
    shown = {t["name"]: [t["dtype"], t["shape"]] for t in described["tensors"]}
    assert shown == facts["torch_dcp"]["tensors"]
    assert described["parameter_count"] == facts["torch_dcp"]["parameter_count"]


def test_safetensors_matches_safetensors(truth: tuple[Path, dict[str, Any]]) -> None:
    """safetensors.torch.save_file: tensors, dtypes, count and `__metadata__`."""
    out, facts = truth
    described = describe(out / "safetensors", "safetensors")
    shown = {t["name"]: [t["dtype"], t["shape"]] for t in described["tensors"]}
    assert shown == facts["safetensors"]["tensors"]
    assert described["parameter_count"] == facts["safetensors"]["parameter_count"]
    assert described["metadata"] == {"format": "pt", "step": "42"}


def test_huggingface_matches_transformers(truth: tuple[Path, dict[str, Any]]) -> None:
    """save_pretrained with shards: config facts, shard count and num_parameters()."""
    out, facts = truth
    expected = facts["huggingface"]
    described = describe(out / "huggingface", "huggingface")
    assert described["architectures"] == expected["architectures"]
    assert described["model_type"] == expected["model_type"]
    assert described.get("dtype", described.get("torch_dtype")) == expected["dtype"]
    assert described["shard_count"] == expected["shards"]
    assert described["parameter_count"] == expected["num_parameters"]


def test_hostile_pickle_is_reported_and_never_run(truth: tuple[Path, dict[str, Any]]) -> None:
    """A torch.save zip whose pickle calls os.system: described, the global reported, and
    the command never runs."""
    out, facts = truth
    described = describe(out / "pytorch_hostile", "pytorch")
    assert described["suspicious_globals"] == [facts["pytorch_hostile"]["global"]]
    assert [t["name"] for t in described["tensors"]] == ["fc.weight"]
    assert not os.path.exists(facts["pytorch_hostile"]["marker"])


def test_describing_everything_loads_no_framework(truth: tuple[Path, dict[str, Any]]) -> None:
    """Describing every unit and reading every log in a fresh interpreter imports none of
    TensorFlow, torch, numpy or ONNX, and maps none of their libraries."""
    out, _ = truth
    formats = {
        "saved_model_keras": "saved_model",
        "tf_checkpoint": "tf_checkpoint",
        "keras": "keras",
        "onnx": "onnx",
        "pytorch": "pytorch",
        "torch_dcp": "torch_dcp",
        "safetensors": "safetensors",
        "huggingface": "huggingface",
    }
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from tests.test_describe_truth import describe, metrics
from pathlib import Path
for unit, fmt in {formats!r}.items():
    describe(Path({str(out)!r}) / unit, fmt)
for unit in ("keras_logs", "tf2_logs", "tensorboardx_logs"):
    assert metrics(Path({str(out)!r}) / unit)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {_HEAVY!r})
maps = open("/proc/self/maps").read()
mapped = sorted(n for n in ("libtorch", "libtensorflow", "numpy", "onnx") if n in maps)
print(json.dumps([heavy, mapped]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], []]


_FRAMEWORK_LIBRARIES = ("libtensorflow", "libtorch", "/numpy/", "/onnx/", "_pywrap_tensorflow")


@pytest.mark.slow
def test_the_daemon_maps_no_framework_after_describing_every_format(
    truth: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A real daemon registers a unit of every format the frameworks wrote (a SavedModel
    with its TensorBoard logs, a checkpoint, Keras, ONNX, torch.save, DCP, safetensors,
    Hugging Face, MLflow), each event describing its model, and its /proc/PID/maps shows no
    TensorFlow, torch, numpy or ONNX library afterwards (all installed next to it)."""
    out, facts = truth
    root, events = tmp_path / "models", tmp_path / "events.jsonl"
    units = {  # unit directory -> its format
        "saved_model_keras": "saved_model",
        "tf_checkpoint": "tf_checkpoint",
        "keras": "keras",
        "onnx_external": "onnx",
        "pytorch_training": "pytorch",
        "pytorch_hostile": "pytorch",
        "torch_dcp": "torch_dcp",
        "safetensors": "safetensors",
        "huggingface": "huggingface",
    }
    for unit in units:
        shutil.copytree(out / unit, root / unit)
    shutil.copytree(out / "keras_logs", root / "saved_model_keras", dirs_exist_ok=True)
    (root / "mlflow").mkdir()
    (root / "mlflow" / "MLmodel").write_text(MLMODEL)
    units["mlflow"] = "mlflow"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[defaults]\nsettle_seconds = 0.5\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
    )
    with daemon_process(config) as proc:
        wait_until(lambda: len(jsonl_records(events)) >= len(units), timeout=60)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert proc.poll() is None
    described = {e["subject"]: e["data"] for e in jsonl_records(events)}
    assert {unit: data["format"] for unit, data in described.items()} == units
    for data in described.values():
        assert data["model"] and "error" not in data["model"], data
    saved = described["saved_model_keras"]
    assert saved["model"]["parameter_count"] == facts["saved_model_keras"]["parameter_count"]
    assert {m["name"] for m in saved["metrics"]} == set(facts["keras_logs"]["scalars"])
    hostile = described["pytorch_hostile"]["model"]
    assert hostile["suspicious_globals"] == [facts["pytorch_hostile"]["global"]]
    assert not os.path.exists(facts["pytorch_hostile"]["marker"])
    assert described["mlflow"]["model"]["flavors"] == ["python_function"]
    assert [lib for lib in _FRAMEWORK_LIBRARIES if lib in maps] == []


MLMODEL = """\
artifact_path: model
flavors:
  python_function:
    loader_module: mlflow.pyfunc.model
    python_version: 3.11.7
mlflow_version: 3.7.0
run_id: 0a1b2c3d
signature:
  inputs: '[{"type": "double", "name": "x", "required": true}]'
  outputs: '[{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1]}}]'
"""
