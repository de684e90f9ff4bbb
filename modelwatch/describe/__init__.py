"""What a model is, read from its files alone (SPEC §13): the readers behind `data.model`.

    describe_with(describer, dir_fd, files, progress=None) -> dict
    scalar_metrics(dir_fd, event_files, progress=None) -> [{"name", "numberValue"}]
    find_event_files(dir_fd, max_files=...) -> [relative path]

Each format's row in `modelwatch.formats` names its describer (`formats.describe_model`
picks it by format name). The files are written by untrusted training code. Nothing here
imports TensorFlow, PyTorch, ONNX or numpy, executes anything from the unit, or unpickles
with real globals; every reader is linear in its input and bounded by `Limits` (bytes held
at once, parse steps, seconds). Bad input never raises: the description carries `error`
({"code", "file", "message"}) and whatever could be read before it. One module per format
family:

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

from modelwatch.describe.events import find_event_files, scalar_metrics
from modelwatch.describe.source import DEFAULT_LIMITS, DescribeError, Limits, Source, Stopped

Describer = Callable[[Source], dict[str, Any]]


def describe_with(
    describer: Describer,
    dir_fd: int,
    files: Mapping[str, int],
    *,
    progress: Callable[[int], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """What `describer` reads from the files (relative path -> size) below `dir_fd`.

    Never raises for bad input: `error` says which file could not be read and why. `Stopped`
    raised by `progress` (the caller's budget ran out) ends the description the same way.
    """
    source = Source(dir_fd, files, progress=progress, limits=limits)
    try:
        described = describer(source)
        source.flush()
    except DescribeError as exc:
        return {"error": {**exc.as_error(), "file": exc.file or source.file}}
    except Stopped as exc:
        return {"error": _error(exc.code, source.file, exc.message)}
    except RecursionError:
        return {"error": _error("describe_too_large", source.file, "nested too deeply")}
    except MemoryError:
        return {"error": _error("describe_too_large", source.file, "out of memory")}
    return described


def _error(code: str, file: str, message: str) -> dict[str, str]:
    return {"code": code, "file": file, "message": message}


__all__ = [
    "DEFAULT_LIMITS",
    "DescribeError",
    "Describer",
    "Limits",
    "Stopped",
    "describe_with",
    "find_event_files",
    "scalar_metrics",
]
