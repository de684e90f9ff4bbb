"""What a model is, read from its files alone (SPEC §13): the `data.model` of an event.

    describe_model(dir_fd, files, fmt, progress=None) -> dict | None
    scalar_metrics(dir_fd, event_files, progress=None) -> [{"name", "numberValue"}]
    find_event_files(dir_fd, max_files=...) -> [relative path]

The files are written by untrusted training code. Nothing here imports TensorFlow, PyTorch,
ONNX or numpy, executes anything from the unit, or unpickles with real globals; every reader
is linear in its input and bounded by `Limits` (bytes held at once, parse steps, seconds).
Bad input never raises: the description carries `error` ({"code", "file", "message"}) and
whatever could be read before it. One module per format family:

| format | module | read from |
| --- | --- | --- |
| saved_model, tf_checkpoint | `tensorflow` | `saved_model.pb`, `checkpoint`, `.index` tables |
| keras | `keras` | the `.keras` zip's `config.json` and `metadata.json` |
| onnx | `onnx` | the `.onnx` protobuf, walked without loading (`protowire`) |
| safetensors, huggingface | `safetensors` | safetensors headers, `config.json` |
| pytorch, torch_dcp | `pytorch` | `data.pkl` of torch.save zips, DCP `.metadata` (`pickles`) |
| mlflow | `mlflow` | `MLmodel` (needs PyYAML: the `describe` extra) |
| TensorBoard scalars | `events` | `events.out.tfevents.*` (TFRecord) |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from modelwatch.describe import keras, mlflow, onnx, pytorch, safetensors, tensorflow
from modelwatch.describe.events import find_event_files, scalar_metrics
from modelwatch.describe.source import DEFAULT_LIMITS, DescribeError, Limits, Source

Describer = Callable[[Source], dict[str, Any]]

DESCRIBERS: dict[str, Describer] = {
    "saved_model": tensorflow.describe_saved_model,
    "tf_checkpoint": tensorflow.describe_checkpoint,
    "keras": keras.describe_keras,
    "onnx": onnx.describe_onnx,
    "safetensors": safetensors.describe_safetensors,
    "huggingface": safetensors.describe_huggingface,
    "pytorch": pytorch.describe_pytorch,
    "torch_dcp": pytorch.describe_dcp,
    "mlflow": mlflow.describe_mlflow,
}


def describe_model(
    dir_fd: int,
    files: Mapping[str, int],
    fmt: str,
    *,
    progress: Callable[[int], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any] | None:
    """The description of the `fmt` model whose files (relative path -> size) are below
    `dir_fd`; None for a format that carries none (`unknown`). Never raises for bad input:
    `error` says which file could not be read and why."""
    describer = DESCRIBERS.get(fmt)
    if describer is None:
        return None
    source = Source(dir_fd, files, progress=progress, limits=limits)
    try:
        return describer(source)
    except DescribeError as exc:
        return {"error": {**exc.as_error(), "file": exc.file or source.file}}
    except RecursionError:
        return {"error": _error("describe_too_large", source.file, "nested too deeply")}
    except MemoryError:
        return {"error": _error("describe_too_large", source.file, "out of memory")}
    finally:
        source.flush()


def _error(code: str, file: str, message: str) -> dict[str, str]:
    return {"code": code, "file": file, "message": message}


__all__ = [
    "DESCRIBERS",
    "DescribeError",
    "Limits",
    "describe_model",
    "find_event_files",
    "scalar_metrics",
]
