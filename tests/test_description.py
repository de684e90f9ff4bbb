"""`data.model` and TensorBoard metrics in events (SPEC §5, §13), through the settle loop.

Driven with a fake clock and inline jobs (tests/harness.py): the units are real directories
written the way the frameworks lay them out; the events are what the sinks would receive.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import modelwatch.description
from modelwatch.config import Config
from modelwatch.describe import describe_with
from modelwatch.events import Event
from modelwatch.state import StateDir, Store
from tests.describe_files import field, onnx_model, scalar_event, torch_zip, write_unit
from tests.harness import Harness
from tests.writers import write_safetensors

METADATA = "gradient-model-metadata.json"


@pytest.fixture
def loop(tmp_path: Path, make_config: Callable[..., Config]) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(defaults: str = "", max_wait: int = 600) -> Harness:
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        h = Harness(
            make_config(
                f"[defaults]\nsettle_seconds = 30\nmax_wait_seconds = {max_wait}\n{defaults}\n"
                f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
            )
        )
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def settle(h: Harness, unit: Path, files: dict[str, bytes]) -> Event:
    """Write `files` into `unit` and let it settle: its one event."""
    write_unit(unit, files)
    h.rescan()
    (event,) = h.advance(31)
    return event


def logs(run: str, *scalars: tuple[int, str, float]) -> dict[str, bytes]:
    """A TensorBoard event file in the run directory `run`, of (step, tag, value) scalars."""
    name = f"{run}/events.out.tfevents.1.host" if run else "events.out.tfevents.1.host"
    return {name: b"".join(scalar_event(*s) for s in scalars)}


SAVED_MODEL = {"saved_model.pb": field(1, 1) + field(2, field(1, field(4, "serve")))}


def removed_and_restored(h: Harness, unit: Path) -> Event:
    """Move `unit` away (its `removed`), then back: the `registered` event of the restore."""
    aside = Path(h.root).parent / "aside"
    shutil.move(unit, aside)
    h.touch(unit, is_dir=True)
    assert [e.short_type for e in h.advance(31)] == ["removed"]
    shutil.move(aside, unit)
    h.rescan()
    (restored,) = h.advance(31)
    return restored


def test_a_registered_event_describes_the_model(loop: Callable[..., Harness]) -> None:
    """A safetensors unit's `registered` event carries `data.model`: tensors, dtypes and the
    parameter count read from its header."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    unit.mkdir()
    write_safetensors(unit / "model.safetensors", {"w": 100, "b": 3})
    h.rescan()
    (event,) = h.advance(31)
    model = event.data["model"]
    assert event.short_type == "registered"
    assert (model["tensor_count"], model["parameter_count"]) == (2, 103)
    assert [t["name"] for t in model["tensors"]] == ["b", "w"]


def test_a_rejected_event_describes_the_model_too(loop: Callable[..., Harness]) -> None:
    """Metadata that breaks a rule rejects the unit; the event still describes its files."""
    h = loop()
    event = settle(h, Path(h.root) / "exp-1", {"model.onnx": onnx_model(), METADATA: b"{,}"})
    assert event.short_type == "rejected"
    assert event.data["model"]["producer_name"] == "tests"
    assert event.data["model"]["parameter_count"] == 8


def test_a_file_that_cannot_be_read_is_an_error_not_a_rejection(
    loop: Callable[..., Harness],
) -> None:
    """Random bytes as `saved_model.pb`: registered, `data.model.error` names the file."""
    h = loop()
    event = settle(h, Path(h.root) / "exp-1", {"saved_model.pb": os.urandom(512) + b"\xff" * 16})
    assert event.short_type == "registered" and event.data["version"] == 1
    error = event.data["model"]["error"]
    assert error["file"] == "saved_model.pb" and error["code"] == "describe_malformed"


def test_a_pickle_calling_os_system_is_registered_and_reported(
    loop: Callable[..., Harness], tmp_path: Path
) -> None:
    """A torch.save zip whose pickle calls os.system: nothing runs, the unit is registered,
    the global is in `data.model.suspicious_globals`."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    h = loop()
    data = pickle.dumps({"epoch": 3, "x": Exploit()}, protocol=2)
    event = settle(h, Path(h.root) / "exp-1", {"model.pt": torch_zip(data)})
    assert event.short_type == "registered"
    assert event.data["model"]["suspicious_globals"] == [f"{os.system.__module__}.system"]
    assert not marker.exists()


def test_a_tensorflow_model_gets_its_metrics_from_its_logs(loop: Callable[..., Harness]) -> None:
    """A SavedModel with TensorBoard logs: `data.metrics` holds the last value by step of each
    scalar, named by run directory; the custom metadata is ignored (the seed's rule)."""
    h = loop()
    files = {
        **SAVED_MODEL,
        **logs("train", (1, "epoch_loss", 0.9), (2, "epoch_loss", 0.5)),
        **logs("validation", (2, "epoch_accuracy", 0.75), (1, "epoch_accuracy", 0.5)),
        METADATA: json.dumps({"metrics": [{"name": "mine", "numberValue": 1}]}).encode(),
    }
    event = settle(h, Path(h.root) / "exp-1", files)
    assert event.data["model_type"] == "Tensorflow" and event.data["metadata_ignored"]
    assert event.data["metrics"] == [
        {"name": "train/epoch_loss", "numberValue": 0.5},
        {"name": "validation/epoch_accuracy", "numberValue": 0.75},
    ]
    assert event.data["model"]["meta_graphs"][0]["tags"] == ["serve"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, [{"name": "loss", "numberValue": 0.25}]),
        ({"framework": "torch"}, [{"name": "loss", "numberValue": 0.25}]),
        ({"metrics": [{"name": "f1", "numberValue": 0.8}]}, [{"name": "f1", "numberValue": 0.8}]),
        ({"metrics": []}, []),
    ],
    ids=["no-metadata", "metadata-without-metrics", "metadata-metrics", "empty-metrics"],
)
def test_other_models_take_log_metrics_only_when_their_metadata_has_none(
    loop: Callable[..., Harness], metadata: Any, expected: list[dict[str, Any]]
) -> None:
    """An ONNX model with logs: the metadata's `metrics` when it has that key, else the
    TensorBoard scalars."""
    h = loop()
    files = {"model.onnx": onnx_model(), **logs("", (5, "loss", 0.25))}
    if metadata is not None:
        files[METADATA] = json.dumps(metadata).encode()
    event = settle(h, Path(h.root) / "exp-1", files)
    assert event.short_type == "registered"
    assert event.data["metrics"] == expected


def test_a_description_out_of_time_is_an_error_and_the_unit_registers(
    loop: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A description still reading when the unit's inspect_timeout_seconds runs out stops
    there: registered, `data.model.error` says `describe_timeout`; the read was progress."""
    h = loop(defaults="inspect_timeout_seconds = 5")

    def slow(dir_fd: int, files: Any, fmt: str, **kwargs: Any) -> Any:
        def reading(source: Any) -> dict[str, Any]:
            while True:  # a 1 TB header, say: each MiB is progress, each takes a second
                h.clock.advance(1.0)
                source.tick(1 << 20)

        return describe_with(reading, dir_fd, files, **kwargs)

    monkeypatch.setattr(modelwatch.description, "describe_model", slow)
    event = settle(h, Path(h.root) / "exp-1", {"model.onnx": onnx_model()})
    assert event.short_type == "registered"
    error = event.data["model"]["error"]
    assert error["code"] == "describe_timeout" and "took longer than 5 s" in error["message"]


def test_each_fingerprint_is_described_once_and_a_restore_reuses_it(
    loop: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same files settling again describe nothing; removed and restored, the event
    carries the stored description without reading the files again."""
    h = loop()
    calls: list[str] = []
    real = modelwatch.description.describe_model

    def counted(dir_fd: int, files: Any, fmt: str, **kwargs: Any) -> Any:
        calls.append(fmt)
        return real(dir_fd, files, fmt, **kwargs)

    monkeypatch.setattr(modelwatch.description, "describe_model", counted)
    unit = Path(h.root) / "exp-1"
    first = settle(h, unit, {"model.onnx": onnx_model()})
    h.touch(unit / "model.onnx")  # an event, but the same files: nothing to emit
    assert h.advance(31) == [] and calls == ["onnx"]
    restored = removed_and_restored(h, unit)
    assert restored.data["restored"] is True
    assert restored.data["model"] == first.data["model"] and calls == ["onnx"]


def test_the_description_is_stored_with_its_fingerprint(loop: Callable[..., Harness]) -> None:
    """The state store keeps each fingerprint's description (schema 5)."""
    h = loop()
    event = settle(h, Path(h.root) / "exp-1", {"model.onnx": onnx_model()})
    store = Store(StateDir(h.config.daemon.state_dir).db_path)
    try:
        stored = store.units.description(event.data["path"], event.data["fingerprint"])
    finally:
        store.close()
    assert stored is not None and json.loads(stored)["model"] == event.data["model"]


def test_a_unit_not_settled_in_time_is_described_as_it_is(loop: Callable[..., Harness]) -> None:
    """A unit whose safetensors header claims 2^40 bytes never completes: its `not_settled`
    rejection describes what is there (`describe_too_large`)."""
    h = loop(max_wait=60)
    unit = Path(h.root) / "exp-1"
    write_unit(unit, {"model.safetensors": (2**40).to_bytes(8, "little") + b"{}"})
    h.rescan()
    events = h.advance(90)
    (event,) = [e for e in events if e.short_type == "rejected"]
    assert [e["code"] for e in event.data["errors"]] == ["not_settled"]
    assert event.data["model"]["error"]["code"] == "describe_too_large"


def test_a_damaged_stored_description_is_computed_again(loop: Callable[..., Harness]) -> None:
    """A store whose description of a fingerprint is damaged: the restore describes the files
    again instead of failing."""
    h = loop()
    unit = Path(h.root) / "exp-1"
    first = settle(h, unit, {"model.onnx": onnx_model()})
    db = sqlite3.connect(StateDir(h.config.daemon.state_dir).db_path)
    try:  # (a connection's `with` commits but does not close it)
        with db:
            db.execute("UPDATE fingerprints SET description = '[1, 2'")
    finally:
        db.close()
    restored = removed_and_restored(h, unit)
    assert restored.data["restored"] is True
    assert restored.data["model"] == first.data["model"]
