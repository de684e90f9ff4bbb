"""Model formats (SPEC §6, §13): one row per format, so adding a format is adding one `Format`.

A row says how the format is recognised from file names, Gradient's model type for it, the
completeness checks its files must pass (`modelwatch.completeness`) and the reader that
describes it (`modelwatch.describe`). Three operations read the table:

- `detect_format(paths)` names the format of a unit from the relative POSIX paths of its
  regular files (ignored and in-progress files already filtered out). Only names are looked
  at, one directory at a time: paired rules (`checkpoint` + `*.index`, `config.json` +
  weights) need both files in the same directory. When several formats match, the first row
  of `FORMATS` wins: the most specific (an MLflow model wraps any flavour, a SavedModel
  contains a checkpoint).
- `check_complete(unit_dir, fmt, sizes)` returns None when every instance of `fmt` in the
  unit is completely written, and, unless `fmt` is settle-only (`mlflow`, `unknown`), every
  file of any other format found in it too (an ONNX model beside a half-written `model.pt`
  is not complete), else one `Reason` (code
  `incomplete`, or `unit_unavailable` when the unit directory cannot be opened) whose
  message names the file and whose `files` hold it first (then the file that named it: a
  shard index, `checkpoint`). It never raises for what it finds on disk; see
  `modelwatch.completeness`.
- `describe_model(dir_fd, files, fmt)` is the format's `data.model`, or None for a format
  that carries none (`unknown`); never raises for bad input (see `modelwatch.describe`).

`model_type_for(fmt)` maps a format to Gradient's model type vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from modelwatch import completeness
from modelwatch.completeness import Check, is_huggingface_dir, is_tf_checkpoint_dir, names_by_dir
from modelwatch.describe import (
    DEFAULT_LIMITS,
    Describer,
    Limits,
    describe_with,
    keras,
    mlflow,
    onnx,
    pytorch,
    safetensors,
    tensorflow,
)
from modelwatch.reasons import Reason

Detector = Callable[[Collection[str]], bool]  # the file names of one directory -> a match


@dataclass(frozen=True, slots=True)
class Format:
    """One model format: its name (`data.format`), Gradient's model type for it, how it is
    recognised, what "completely written" means for it and what describes it."""

    name: str
    model_type: str  # Tensorflow | ONNX | Custom
    detect: Detector
    complete: tuple[Check, ...] = ()  # all must pass; none: settle only
    describe: Describer | None = None  # None: no description (`data.model` is null)


def named(*names: str) -> Detector:
    """Matches a directory holding a file of one of these names."""
    return lambda found: any(name in found for name in names)


def suffixed(*suffixes: str) -> Detector:
    """Matches a directory holding a file whose name ends with one of these suffixes."""
    return lambda found: any(name.endswith(suffixes) for name in found)


_ROWS = (
    Format("mlflow", "Custom", named("MLmodel"), (), mlflow.describe_mlflow),
    Format(
        "saved_model",
        "Tensorflow",
        named("saved_model.pb", "saved_model.pbtxt"),
        (completeness.saved_models,),
        tensorflow.describe_saved_model,
    ),
    Format(
        "tf_checkpoint",
        "Tensorflow",
        is_tf_checkpoint_dir,
        (completeness.tf_checkpoints,),
        tensorflow.describe_checkpoint,
    ),
    Format(
        "torch_dcp",
        "Custom",
        suffixed(".distcp"),
        (completeness.dcp_metadata,),
        pytorch.describe_dcp,
    ),
    Format(
        "huggingface",
        "Custom",
        is_huggingface_dir,
        (
            completeness.hf_shard_indexes,
            completeness.safetensors_files,
            completeness.torch_files,
        ),
        safetensors.describe_huggingface,
    ),
    Format(
        "keras", "Tensorflow", suffixed(".keras"), (completeness.keras_files,), keras.describe_keras
    ),
    Format("onnx", "ONNX", suffixed(".onnx"), (completeness.onnx_files,), onnx.describe_onnx),
    Format(
        "safetensors",
        "Custom",
        suffixed(".safetensors"),
        (completeness.safetensors_files,),
        safetensors.describe_safetensors,
    ),
    Format(
        "pytorch",
        "Custom",
        suffixed(*pytorch.TORCH_SUFFIXES),
        (completeness.torch_files,),
        pytorch.describe_pytorch,
    ),
    Format("unknown", "Custom", lambda found: False),
)

# Every format by name, most specific first: detection takes the first that matches.
FORMATS: dict[str, Format] = {row.name: row for row in _ROWS}


def detect_format(paths: Collection[str]) -> str:
    """The format of a unit whose regular files are `paths`; "unknown" when nothing matches.

    Remembered for the last few file lists: a settling unit is asked about twice (its
    completeness, then its event) with the same files."""
    return _detect(tuple(paths))


def _detect(paths: tuple[str, ...]) -> str:
    return next(iter(_matching(paths)), "unknown")


@functools.lru_cache(maxsize=4)  # one or two per inspection worker
def _matching(paths: tuple[str, ...]) -> tuple[str, ...]:
    """Every format some directory of the unit matches, most specific first."""
    directories = names_by_dir(paths).values()
    return tuple(row.name for row in _ROWS if any(row.detect(names) for names in directories))


def model_type_for(fmt: str) -> str:
    """Gradient's model type for a format: Tensorflow, ONNX or Custom."""
    return FORMATS[fmt].model_type


def check_complete(
    unit_dir: str,
    fmt: str,
    sizes: Mapping[str, int],
    *,
    follow_top: bool = True,
    identity: tuple[int, int] | None = None,
) -> Reason | None:
    """None when the unit's `fmt` files are completely written, else the reason naming a file.

    `follow_top` and `identity` say how the unit directory is opened (`beneath.open_unit`):
    by default `unit_dir` is followed as given.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    checks = FORMATS[fmt].complete
    # A half-written file of another format counts too (what was written of it is judged,
    # an empty one is not); a settle-only format (an MLflow model, whatever its flavour's
    # files) stays settle-only (SPEC §6).
    also: list[completeness.Check] = []
    for other in _matching(tuple(sizes)) if checks else ():
        also += [each for each in FORMATS[other].complete if each not in (*checks, *also)]
    return completeness.check(
        unit_dir, checks, sizes, also=also, follow_top=follow_top, identity=identity
    )


def describe_model(
    dir_fd: int,
    files: Mapping[str, int],
    fmt: str,
    *,
    progress: Callable[[int], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Any] | None:
    """The description of the `fmt` model whose files (relative path -> size) are below
    `dir_fd`; None for a format that carries none. `progress(nbytes)` is called as the files
    are read (see `modelwatch.describe.source`)."""
    describer = FORMATS[fmt].describe
    if describer is None:
        return None
    return describe_with(describer, dir_fd, files, progress=progress, limits=limits)
