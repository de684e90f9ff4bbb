"""safetensors files and Hugging Face model directories, from headers and `config.json`.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}`) and the data;
only the header is read. A Hugging Face directory adds `config.json` (`architectures`,
`model_type`, `torch_dtype` or, from transformers 5, `dtype`); its weights are its
safetensors files, else its `torch.save` `.bin` files.

Headers (up to `MAX_HEADER` bytes) and `config.json` are scanned with `jsonscan` in 1 MiB
chunks, never built whole: `json.loads` of a 16 MiB header of `{}` held 445 MiB. Memory is
one chunk, one tensor's entry (at most 64 KiB of text) and the listed tensors (`Tensors`).
"""

from __future__ import annotations

import copy
import posixpath
import struct
from collections.abc import Iterator
from typing import Any

from modelwatch import jsonscan
from modelwatch.describe import pytorch
from modelwatch.describe.source import Blob, DescribeError, Source, malformed, too_large
from modelwatch.describe.tensors import MAX_RANK, SAFETENSORS_DTYPES, Tensors

# huggingface_hub reads no header longer than this (SAFETENSORS_MAX_HEADER_LENGTH): 170,000
# tensors' entries in one file. The completeness check (`modelwatch.completeness`) uses it too.
MAX_HEADER = 25_000_000
MAX_ENTRY = 64 * 1024  # one tensor's entry (name, dtype, shape, offsets) is a few hundred bytes
_CHUNK = 1 << 20
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
        for name, entry in header_entries(source, path):
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
    """`config.json` facts and the weights' tensors (safetensors, else torch `.bin`): those
    beside the config only, not a trainer's `checkpoint-*/` copies, `optimizer.pt` or
    `training_args.bin`. `torch_dtype` is the config's `torch_dtype` or, from transformers
    5, its `dtype`."""
    configs = source.paths(lambda p: posixpath.basename(p) == "config.json")
    out: dict[str, Any] = {}
    home = ""
    if configs:
        out["config"] = configs[0]
        home = posixpath.dirname(configs[0])
        out.update(_config(source, configs[0]))
        if "torch_dtype" not in out and "dtype" in out:
            out["torch_dtype"] = out["dtype"]
    beside = {p: n for p, n in source.files.items() if posixpath.dirname(p) == home}
    weights = copy.copy(source)
    try:
        if any(p.endswith(".safetensors") for p in beside):
            weights.files = {p: n for p, n in beside.items() if p.endswith(".safetensors")}
            out.update(describe_safetensors(weights))
        else:
            weights.files = {p: n for p, n in beside.items() if _hf_torch_weights(p)}
            found = pytorch.describe_pytorch(weights)
            found["shard_count"] = found.pop("files", len(weights.files))
            out.update(found)
    except DescribeError as exc:  # the config stands without the weights
        out["error"] = exc.as_error()
    return out


def _hf_torch_weights(path: str) -> bool:
    """`pytorch_model.bin` and its shards (`pytorch_model-00001-of-00002.bin`)."""
    name = posixpath.basename(path)
    return name.startswith("pytorch_model") and name.endswith(".bin")


def header_entries(source: Source, path: str) -> Iterator[tuple[str, Any]]:
    """(name, entry) of each member of the JSON header of the safetensors file `path`, in
    file order, one at a time. Raises at the first problem, possibly after some members: a
    caller keeps what it took from them only once the iteration ended."""
    with source.open(path) as blob:
        if blob.size < 8:
            raise malformed(path, f"{blob.size} bytes, shorter than the header length")
        length = struct.unpack("<Q", blob.read(0, 8))[0]
        if length > MAX_HEADER:
            raise too_large(path, f"header of {length} bytes, more than {MAX_HEADER}")
        if 8 + length > blob.size:
            raise malformed(path, f"header of {length} bytes passes the end of the file")
        yield from _members(source, path, _chunks(blob, 8, length))


def _members(source: Source, path: str, chunks: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    """The header's members as they are scanned; raises at the first that is not valid."""
    try:
        for key, value in jsonscan.scan(chunks, build_depth=1, max_value=MAX_ENTRY):
            source.tick()
            if not key:
                if value is not jsonscan.OBJECT:
                    raise malformed(path, "header is not a JSON object")
                continue
            name = str(key[0])
            if value is jsonscan.TOO_LARGE:
                raise too_large(path, f"entry of tensor {name[:200]!r} over {MAX_ENTRY} bytes")
            yield name, value
    except jsonscan.JsonError as exc:
        raise malformed(path, f"header is not JSON: {exc}"[:300]) from None


def _chunks(blob: Blob, start: int, length: int) -> Iterator[bytes]:
    end = start + length
    while start < end:
        piece = blob.read(start, min(_CHUNK, end - start))
        start += len(piece)
        yield piece


def _tensor(entry: Any, path: str, name: str) -> tuple[str, list[int | str | None]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise malformed(path, f"tensor {name[:200]!r} has no dtype")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
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
    """The facts of `config.json` (`_CONFIG_KEYS`), scanned: only top-level values are built,
    each at most `MAX_ENTRY` bytes of text."""
    out: dict[str, Any] = {}
    with source.open(path) as blob:
        if blob.size > source.limits.header_bytes:
            raise too_large(path, f"{blob.size} bytes, more than {source.limits.header_bytes}")
        chunks = _chunks(blob, 0, blob.size)
        try:
            for key, value in jsonscan.scan(chunks, build_depth=1, max_value=MAX_ENTRY):
                source.tick()
                if not key and value is not jsonscan.OBJECT:
                    raise malformed(path, "not a JSON object")
                if key and key[0] in _CONFIG_KEYS:
                    _config_value(out, str(key[0]), value)
        except jsonscan.JsonError as exc:
            raise malformed(path, f"not JSON: {exc}"[:300]) from None
    return {key: out[key] for key in _CONFIG_KEYS if key in out}


def _config_value(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, str):
        out[key] = value[:200]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        out[key] = [v[:200] for v in value[:20]]
    else:
        out.pop(key, None)  # a later duplicate replaces an earlier one, as json.loads does
