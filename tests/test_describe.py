"""Model descriptions of damaged, hostile and unusual files: a precise `error`, never a crash.

Real models written by the frameworks are checked in tests/test_describe_truth.py; these
tests write exact bytes (tests/describe_files.py) for what no framework would write.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelwatch.describe import find_event_files, scalar_metrics
from modelwatch.describe.source import Limits
from modelwatch.formats import describe_model
from tests.conftest import examples
from tests.describe_files import (
    bundle_entry,
    describe_unit,
    event_record,
    field,
    onnx_model,
    safetensors,
    scalar_event,
    table,
    torch_zip,
    write_unit,
)

# Per example: whatever the bytes, a description costs at most this much time and memory.
EXAMPLE_SECONDS = 2.0
EXAMPLE_BYTES = 64 << 20


def bounded(work: Callable[[], Any], seconds: float = EXAMPLE_SECONDS) -> Any:
    """Run `work`, asserting the per-example time and (traced) memory bounds."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        result = work()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < seconds
    assert peak < EXAMPLE_BYTES
    return result


def described(tmp_path: Path, fmt: str, files: dict[str, bytes]) -> dict[str, Any]:
    result = describe_unit(tmp_path, fmt, write_unit(tmp_path, files))
    assert result is not None
    json.dumps(result, allow_nan=False)  # always serialisable into an event
    return result


# --- damaged and hostile files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("saved_model", "saved_model.pb"),
        ("onnx", "model.onnx"),
        ("tf_checkpoint", "ckpt-1.index"),
        ("safetensors", "model.safetensors"),
        ("pytorch", "model.pt"),
        ("keras", "model.keras"),
        ("torch_dcp", ".metadata"),
    ],
)
def test_random_bytes_give_an_error_naming_the_file(tmp_path: Path, fmt: str, name: str) -> None:
    """Random bytes where a model file should be: `error` names the file and the problem."""
    # 0xff starts nothing valid: random bytes may otherwise be a whole pickle (`\x89.`, True)
    files = {name: b"\xff" + os.urandom(4096) + b"\xff" * 64}
    if fmt == "tf_checkpoint":
        files["checkpoint"] = b'model_checkpoint_path: "ckpt-1"\n'
    result = described(tmp_path, fmt, files)
    assert result["error"]["file"] == name
    assert result["error"]["code"] != "describe_io"
    assert result["error"]["message"]


def test_huge_safetensors_header_length_is_refused(tmp_path: Path) -> None:
    """A safetensors header length of 2^40: `describe_too_large`, nothing allocated."""
    result = bounded(
        lambda: described(tmp_path, "safetensors", {"m.safetensors": struct.pack("<Q", 2**40)})
    )
    assert result["error"]["code"] == "describe_too_large"


def test_pickle_calling_os_system_is_reported_not_run(tmp_path: Path) -> None:
    """A torch.save-layout zip whose pickle calls os.system: nothing runs, the global is
    reported, the rest is still described."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps({"epoch": 3, "x": Exploit()}, protocol=2)
    result = described(tmp_path / "unit", "pytorch", {"model.pt": torch_zip(data)})
    assert result["suspicious_globals"] == [f"{os.system.__module__}.system"]
    assert "error" not in result
    assert not marker.exists()


def test_pickle_memo_bomb_costs_nothing(tmp_path: Path) -> None:
    """LONG_BINPUT 0xFFFFFFFF makes pickle's C unpickler allocate 32 GiB; here it is one
    dict entry."""
    data = b"\x80\x02}r\xff\xff\xff\xff."
    result = bounded(lambda: described(tmp_path, "pytorch", {"model.pt": torch_zip(data)}))
    assert result["tensor_count"] == 0 and "error" not in result


def test_legacy_torch_file_is_unsupported(tmp_path: Path) -> None:
    """A pre-zip torch.save file: `describe_unsupported`, said plainly."""
    result = described(tmp_path, "pytorch", {"old.pt": pickle.dumps(119547037146038801333356)})
    assert result["error"]["code"] == "describe_unsupported"


def test_file_changed_since_listing(tmp_path: Path) -> None:
    """A file whose size differs from the listing is not described as if it were listed."""
    write_unit(tmp_path, {"model.onnx": onnx_model()})
    result = describe_unit(tmp_path, "onnx", {"model.onnx": 1})
    assert result is not None and result["error"]["code"] == "describe_io"


def test_symlinked_model_file_is_not_followed(tmp_path: Path) -> None:
    """A model file that is a symlink (to anywhere) is refused, never read."""
    (tmp_path / "outside.onnx").write_bytes(onnx_model())
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    result = describe_unit(unit, "onnx", {"model.onnx": len(onnx_model())})
    assert result is not None and result["error"]["code"] == "describe_io"


def test_unknown_format_has_no_description(tmp_path: Path) -> None:
    """`unknown` carries no description: None."""
    assert describe_unit(tmp_path, "unknown", {}) is None


def test_onnx_weights_are_skipped_not_read(tmp_path: Path) -> None:
    """A 24 MB ONNX file is described reading a few blocks, with progress reported."""
    reported: list[int] = []
    data = onnx_model(initializers=3, raw=8 << 20)
    write_unit(tmp_path, {"model.onnx": data})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = bounded(
            lambda: describe_model(fd, {"model.onnx": len(data)}, "onnx", progress=reported.append)
        )
    finally:
        os.close(fd)
    assert result is not None and result["parameter_count"] == 3 * (2 << 20)
    assert result["inputs"] == [{"name": "x", "dtype": "float32", "shape": [4, "batch"]}]
    assert sum(reported) < 1 << 20


def test_progress_is_reported_while_reading(tmp_path: Path) -> None:
    """A long read (a 6 MiB pickle) reports progress, so it counts as a live worker."""
    reported: list[int] = []
    data = pickle.dumps(list(range(1_500_000)), protocol=2)
    listing = write_unit(tmp_path, {"model.pt": torch_zip(data)})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        describe_model(fd, listing, "pytorch", progress=reported.append)
    finally:
        os.close(fd)
    assert sum(reported) >= 4 << 20


def test_budget_ends_a_description(tmp_path: Path) -> None:
    """Past its step budget a description stops with `describe_too_large`."""
    listing = write_unit(tmp_path, {"model.onnx": onnx_model(initializers=50)})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = describe_model(fd, listing, "onnx", limits=Limits(steps=100))
    finally:
        os.close(fd)
    assert result is not None and result["error"]["code"] == "describe_too_large"


def test_description_is_deterministic(tmp_path: Path) -> None:
    """The same files give the same description, whatever order they are listed in."""
    entries = [(f"v{i}".encode(), bundle_entry(1, [i + 1, 2])) for i in range(30)]
    files = {
        "checkpoint": b'model_checkpoint_path: "ckpt-1"\n',
        "ckpt-1.index": table([(b"", field(1, 1)), *entries]),
        "ckpt-1.data-00000-of-00001": b"",
    }
    listing = write_unit(tmp_path, files)
    first = describe_unit(tmp_path, "tf_checkpoint", listing)
    again = describe_unit(tmp_path, "tf_checkpoint", dict(reversed(listing.items())))
    assert json.dumps(first) == json.dumps(again)
    assert first is not None and first["parameter_count"] == sum(2 * (i + 1) for i in range(30))
    assert [v["name"] for v in first["variables"]] == sorted(f"v{i}" for i in range(30))


def test_compressed_table_block_is_unsupported(tmp_path: Path) -> None:
    """A `.index` block marked snappy-compressed (TF never writes one): unsupported."""
    raw = bytearray(table([(b"", field(1, 1)), (b"v", bundle_entry(1, [3]))]))
    raw[raw.index(struct.pack("<II", 0, 1)) + 8] = 1  # the first block's compression byte
    files = {"checkpoint": b'model_checkpoint_path: "c"\n', "c.index": bytes(raw)}
    result = described(tmp_path, "tf_checkpoint", files)
    assert result["error"]["code"] == "describe_unsupported"


@pytest.mark.filterwarnings("ignore::UserWarning")  # MLflow's advice on type hints
def test_mlflow_model_is_described(tmp_path: Path) -> None:
    """An MLflow pyfunc model saved by MLflow: flavors, version, run id and signature."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context: Any, model_input: Any) -> Any:
            return model_input

    path = tmp_path / "model"
    signature = infer_signature({"x": [1.0, 2.0]}, [1.0, 2.0])
    mlflow.pyfunc.save_model(str(path), python_model=Echo(), signature=signature)
    listing = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    result = describe_unit(path, "mlflow", listing)
    assert result is not None and "error" not in result, result
    assert "python_function" in result["flavors"]
    assert result["mlflow_version"] == mlflow.__version__
    assert result["signature"]["inputs"][0]["name"] == "x"


def test_an_mlflow_signature_with_nan_stays_json(tmp_path: Path) -> None:
    """A signature whose JSON holds NaN is kept as text: an event must stay valid JSON."""
    text = b'flavors: {}\nsignature:\n  inputs: \'[{"name": "x", "default": NaN}]\'\n'
    result = described(tmp_path, "mlflow", {"MLmodel": text})
    assert result["signature"]["inputs"] == '[{"name": "x", "default": NaN}]'


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    """An `MLmodel` whose aliases expand to billions of nodes: `describe_too_large`."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    result = bounded(lambda: described(tmp_path, "mlflow", {"MLmodel": "\n".join(lines).encode()}))
    assert result["error"]["code"] == "describe_too_large"


# --- TensorBoard event files -----------------------------------------------------------------


def test_event_files_below_symlinks_are_not_found(tmp_path: Path) -> None:
    """Event files are found in run directories, never through a symlinked directory."""
    write_unit(tmp_path / "outside", {"events.out.tfevents.1": scalar_event(1, "x", 1.0)})
    unit = tmp_path / "unit"
    write_unit(unit, {"train/events.out.tfevents.1": scalar_event(1, "loss", 0.5)})
    (unit / "linked").symlink_to(tmp_path / "outside")
    fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = find_event_files(fd, max_files=10)
        assert found == ["train/events.out.tfevents.1"]
        assert scalar_metrics(fd, found) == [{"name": "train/loss", "numberValue": 0.5}]
    finally:
        os.close(fd)


def test_a_cut_event_file_keeps_what_was_written(tmp_path: Path) -> None:
    """A file still being written (its last record cut short) gives the values before it."""
    data = scalar_event(1, "acc", 0.5) + scalar_event(2, "acc", 0.75)
    write_unit(tmp_path, {"events.out.tfevents.1": data + scalar_event(3, "acc", 0.9)[:-6]})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert scalar_metrics(fd, ["events.out.tfevents.1"]) == [
            {"name": "acc", "numberValue": 0.75}
        ]
    finally:
        os.close(fd)


# --- fuzzing: any bytes, bounded time and memory ---------------------------------------------

_TARGETS = {
    "saved_model.pb": ("saved_model", st.binary(max_size=512)),
    "model.onnx": (
        "onnx",
        st.builds(
            lambda cut, junk: onnx_model()[:cut] + junk, st.integers(0, 400), st.binary(max_size=64)
        ),
    ),
    "c.index": ("tf_checkpoint", st.binary(max_size=512)),
    "m.safetensors": (
        "safetensors",
        st.builds(safetensors, st.binary(max_size=256))
        | st.builds(
            lambda d: safetensors({"t": d}),
            st.dictionaries(
                st.sampled_from(["dtype", "shape", "data_offsets"]),
                st.from_type(type(None))
                | st.integers()
                | st.text(max_size=5)
                | st.lists(st.integers(-3, 9), max_size=4),
            ),
        ),
    ),
    "model.pt": ("pytorch", st.builds(torch_zip, st.binary(max_size=256))),
    "model.keras": ("keras", st.binary(max_size=256)),
    "MLmodel": ("mlflow", st.binary(max_size=256)),
}


@pytest.mark.parametrize("name", sorted(_TARGETS))
@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_bytes_describe_within_bounds(tmp_path: Path, name: str, data: st.DataObject) -> None:
    """Whatever bytes training code writes, describing them returns a serialisable
    description within the time and memory bounds, and never raises."""
    fmt, strategy = _TARGETS[name]
    files = {name: data.draw(strategy)}
    if fmt == "tf_checkpoint":
        files["checkpoint"] = b'model_checkpoint_path: "c"\n'
    bounded(lambda: described(tmp_path, fmt, files))


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=400))
def test_any_pickle_bytes_are_bounded(tmp_path: Path, data: bytes) -> None:
    """Arbitrary pickle opcodes (after a valid protocol header) never run or raise."""
    bounded(lambda: described(tmp_path, "pytorch", {"model.pt": torch_zip(b"\x80\x02" + data)}))


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.binary(max_size=80)
        | st.builds(
            scalar_event, st.integers(-5, 5), st.sampled_from(["a", "b"]), st.floats(width=32)
        ),
        max_size=6,
    )
)
def test_any_event_records_are_bounded(tmp_path: Path, records: list[bytes]) -> None:
    """Event files of arbitrary records (valid length CRCs) give finite metrics only."""
    write_unit(
        tmp_path,
        {"events.out.tfevents.1": b"".join(event_record(r) if not r[:1] else r for r in records)},
    )
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = bounded(lambda: scalar_metrics(fd, ["events.out.tfevents.1"]))
    finally:
        os.close(fd)
    json.dumps(found, allow_nan=False)


@pytest.mark.parametrize(
    ("name", "fmt", "content"),
    [
        ("saved_model.pb", "saved_model", b"\x80" * (1 << 20)),  # one endless varint
        ("saved_model.pb", "saved_model", b"\x12\x00" * (1 << 16)),  # 64k empty meta graphs
        ("model.onnx", "onnx", field(7, b"\x0a\x00" * (1 << 16))),  # 64k empty nodes
        ("model.pt", "pytorch", torch_zip(b"\x80\x02" + b"(" * (1 << 16) + b"N.")),  # marks
        ("model.pt", "pytorch", torch_zip(b"\x80\x02" + b"]" * 30_000 + b"a" * 29_999 + b".")),
        ("m.safetensors", "safetensors", safetensors(b"[" * 200_000)),  # deep nesting
        (
            "m.safetensors",
            "safetensors",
            safetensors(b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b"]}}"),
        ),
    ],
)
def test_pathological_shapes_stay_bounded(
    tmp_path: Path, name: str, fmt: str, content: bytes
) -> None:
    """Long runs of one byte, deep nesting and huge numbers: a result within the bounds
    (these inputs are larger than fuzz examples, so their time bound is too)."""
    bounded(lambda: described(tmp_path, fmt, {name: content}), seconds=5.0)


def test_describing_imports_no_framework(tmp_path: Path) -> None:
    """Describing every format in a fresh interpreter imports none of TensorFlow, torch,
    numpy or ONNX (installed here or not)."""
    units = {
        "onnx": {"model.onnx": onnx_model()},
        "pytorch": {"model.pt": torch_zip(pickle.dumps({"a": 1}, protocol=2))},
        "safetensors": {
            "m.safetensors": safetensors(
                {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
            )
        },
        "saved_model": {"saved_model.pb": field(1, 1)},
    }
    for fmt, files in units.items():
        write_unit(tmp_path / fmt, files)
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from tests.describe_files import describe_unit
from pathlib import Path
for fmt, names in { ({f: list(v) for f, v in units.items()})!r}.items():
    unit = Path({str(tmp_path)!r}) / fmt
    assert "error" not in describe_unit(unit, fmt, {{n: (unit / n).stat().st_size for n in names}})
heavy = ("tensorflow", "torch", "numpy", "onnx")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_empty_packed_tensor_values_are_no_scalar(tmp_path: Path) -> None:
    """A TF2 scalar tensor whose packed int values are empty gives no metric, no crash."""
    tensor = field(1, 9) + field(2, b"") + field(10, b"")  # int64, rank 0, empty int64_val
    value = field(1, "steps") + field(8, tensor)
    data = event_record(field(2, 1) + field(5, field(1, value)))
    write_unit(tmp_path, {"events.out.tfevents.1": data})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert scalar_metrics(fd, ["events.out.tfevents.1"]) == []
    finally:
        os.close(fd)


def test_a_huggingface_description_counts_the_model_beside_its_config(tmp_path: Path) -> None:
    """A trainer's output: the model beside `config.json` (transformers 5 writes `dtype`),
    its `checkpoint-*/` copies and `optimizer.pt`: the parameters and shards are the model's
    own (they were summed over every copy), and `torch_dtype` is given."""
    weights = safetensors({"w": {"dtype": "F32", "shape": [10, 100], "data_offsets": [0, 4000]}})
    weights += b"\0" * 4000
    config = json.dumps({"architectures": ["M"], "model_type": "m", "dtype": "float32"})
    files = {
        "config.json": config.encode(),
        "model.safetensors": weights,
        "checkpoint-500/config.json": config.encode(),
        "checkpoint-500/model.safetensors": weights,
        "checkpoint-1000/model.safetensors": weights,
        "optimizer.pt": torch_zip(pickle.dumps({}, protocol=2)),
    }
    result = described(tmp_path, "huggingface", files)
    assert result["parameter_count"] == 1000
    assert result["shard_count"] == 1
    assert result["torch_dtype"] == "float32"
