"""safetensors files and Hugging Face model directories, from headers and `config.json`.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`) and the data;
only the header is read. A Hugging Face directory adds `config.json` (`architectures`,
`model_type`, `torch_dtype` or, from transformers 5, `dtype`); its weights are its
safetensors files, else its `torch.save` `.bin` files.
"""

from __future__ import annotations

import json
import posixpath
import struct
from typing import Any

from modelwatch.describe import pytorch
from modelwatch.describe.source import DescribeError, Source, malformed, too_large
from modelwatch.describe.tensors import SAFETENSORS_DTYPES, Tensors

_METADATA_ENTRIES = 100
_METADATA_TEXT = 4096
_CONFIG_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


def describe_safetensors(source: Source) -> dict[str, Any]:
    """Tensor count, dtypes, parameter count and `__metadata__` of every safetensors file."""
    paths = source.paths(lambda p: p.endswith(".safetensors"))
    tensors = Tensors(source.limits.listed)
    metadata: dict[str, str] = {}
    prefix = len(paths) > 1
    for path in paths:
        header = read_header(source, path)
        for name, entry in header.items():
            if name == "__metadata__":
                metadata.update(_metadata(entry))
                continue
            dtype, shape = _tensor(entry, path, name)
            tensors.add(f"{path}:{name}" if prefix else name, dtype, shape)
    out = {"shard_count": len(paths), **tensors.summary()}
    if metadata:
        out["metadata"] = dict(sorted(metadata.items())[:_METADATA_ENTRIES])
    return out


def describe_huggingface(source: Source) -> dict[str, Any]:
    """`config.json` facts and the weights' tensors (safetensors, else torch `.bin`)."""
    configs = source.paths(lambda p: posixpath.basename(p) == "config.json")
    out: dict[str, Any] = {}
    if configs:
        out["config"] = configs[0]
        out.update(_config(source, configs[0]))
    try:
        if any(p.endswith(".safetensors") for p in source.files):
            out.update(describe_safetensors(source))
        else:
            out.update(pytorch.describe_pytorch(source))
    except DescribeError as exc:  # the config stands without the weights
        out["error"] = exc.as_error()
    return out


def read_header(source: Source, path: str) -> dict[str, Any]:
    """The JSON header of the safetensors file `path`, as an object."""
    cap = source.limits.header_bytes
    with source.open(path) as blob:
        if blob.size < 8:
            raise malformed(path, f"{blob.size} bytes, shorter than the header length")
        length = struct.unpack("<Q", blob.read(0, 8))[0]
        if length > cap:
            raise too_large(path, f"header of {length} bytes, more than {cap}")
        raw = blob.read(8, length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise malformed(path, f"header is not JSON: {exc}"[:300]) from None
    if not isinstance(header, dict):
        raise malformed(path, "header is not a JSON object")
    source.tick(0, len(header))
    return header


def _tensor(entry: Any, path: str, name: str) -> tuple[str, list[int | str | None]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise malformed(path, f"tensor {name[:200]!r} has no dtype")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise malformed(path, f"tensor {name[:200]!r} has a bad shape")
    dtype = entry["dtype"]
    return SAFETENSORS_DTYPES.get(dtype, dtype[:40].lower()), list(shape)


def _metadata(entry: Any) -> dict[str, str]:
    if not isinstance(entry, dict):
        return {}
    return {
        str(k)[:_METADATA_TEXT]: v[:_METADATA_TEXT] for k, v in entry.items() if isinstance(v, str)
    }


def _config(source: Source, path: str) -> dict[str, Any]:
    try:
        config = json.loads(source.read_small(path))
    except (ValueError, RecursionError) as exc:
        raise malformed(path, f"not JSON: {exc}"[:300]) from None
    if not isinstance(config, dict):
        raise malformed(path, "not a JSON object")
    out: dict[str, Any] = {}
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, str):
            out[key] = value[:200]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = [v[:200] for v in value[:20]]
    return out
