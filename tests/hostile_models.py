"""Hostile model files, one per reader, each at or near its reader's cap: what a unit written
by arbitrary code can hold to make describing it expensive. Used by tests/test_describe_memory.py
(each described in a fresh interpreter, its peak RSS measured).

`HOSTILE[name]` is (format, a builder of its files: relative path -> bytes, and the peak RSS
of a fresh interpreter describing it with the readers as they were before they were bounded:
json.loads, zipfile, a Variable per table entry, a list per graph object).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable

from tests.describe_files import field, safetensors, torch_zip, varint

MiB = 1 << 20

Files = dict[str, bytes]


def _table(blocks: list[bytes], last_keys: list[bytes]) -> bytes:
    """A TF `.index` table of the given data block bodies (entries without the trailer)."""

    def block(body: bytes) -> bytes:
        return body + struct.pack("<II", 0, 1)

    out, handles = b"", []
    for body, key in zip(blocks, last_keys, strict=True):
        data = block(body)
        handles.append((key, varint(len(out)) + varint(len(data))))
        out += data + b"\0" * 5
    index = block(b"".join(varint(0) + varint(len(k)) + varint(len(h)) + k + h for k, h in handles))
    at = len(out)
    out += index + b"\0" * 5
    footer = (varint(0) + varint(0) + varint(at) + varint(len(index))).ljust(40, b"\0")
    return out + footer + struct.pack("<Q", 0xDB4775248B80FB57)


def _checkpoint(index: bytes, data: bytes = b"") -> Files:
    return {
        "checkpoint": b'model_checkpoint_path: "ckpt-1"\n',
        "ckpt-1.index": index,
        "ckpt-1.data-00000-of-00001": data,
    }


def tiny_variables(count: int) -> Files:
    """A checkpoint of `count` variables with 4-byte names, in 256 KiB blocks like TF's."""
    entry = field(1, 1)  # dtype float32, no shape
    per_block = 256 * 1024 // (3 + 4 + len(entry))
    blocks, keys = [], []
    for start in range(0, count, per_block):
        names = [b"v%07d" % i for i in range(start, min(count, start + per_block))]
        blocks.append(b"".join(b"\x00\x08" + varint(len(entry)) + n + entry for n in names))
        keys.append(names[-1])
    return _checkpoint(_table(blocks, keys))


def growing_keys(count: int) -> Files:
    """Prefix compression: each entry's key is the last one plus a byte (quadratic keys)."""
    entry = field(1, 1)
    body = varint(0) + varint(1) + varint(len(entry)) + b"a" + entry
    grow = (varint(i + 1) + b"\x01" + varint(len(entry)) + b"b" + entry for i in range(count))
    body += b"".join(grow)
    return _checkpoint(_table([body], [b"a" + b"b" * count]))


def object_graph(nodes: int) -> Files:
    """A TF2 checkpoint whose object graph is `nodes` empty objects."""
    graph = b"\x0a\x00" * nodes
    tensor = varint(len(graph)) + b"\0\0\0\0" + graph
    entry = field(1, 7) + field(4, 0) + field(5, len(tensor))  # string, at 0, its size
    key = b"_CHECKPOINTABLE_OBJECT_GRAPH"
    body = varint(0) + varint(len(key)) + varint(len(entry)) + key + entry
    return _checkpoint(_table([body], [key]), tensor)


def json_header(text: bytes) -> Files:
    return {"model.safetensors": struct.pack("<Q", len(text)) + text}


def many_tensors(count: int) -> Files:
    entries = ",".join(
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        for i in range(count)
    )
    return {"model.safetensors": safetensors(("{" + entries + "}").encode(), bytes(4 * count))}


def hf_config(text: bytes) -> Files:
    weights = safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    return {"config.json": text, "model.safetensors": weights}


def keras_file(config: bytes, compression: int = zipfile.ZIP_DEFLATED) -> Files:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr("metadata.json", '{"keras_version": "3.11.0"}')
        archive.writestr("config.json", config)
    return {"model.keras": buffer.getvalue()}


def zip_entries(count: int, name: str) -> Files:
    """A torch.save zip whose data.pkl is followed by `count` empty entries."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    data = buffer.getvalue()
    end = data.rindex(b"PK\x05\x06")
    directory_at = struct.unpack_from("<L", data, end + 16)[0]
    body, directory = data[:directory_at], data[directory_at:end]
    empty = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *[0] * 14)  # no name, at 0
    directory += empty * count
    total = count + 1
    record = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, min(total, 0xFFFF), min(total, 0xFFFF), len(directory),
        directory_at, 0,
    )  # fmt: skip
    return {name: body + directory + record}


def onnx_inputs(count: int) -> Files:
    graph = field(11, field(1, "x")) * count
    return {"model.onnx": field(1, 8) + field(7, graph)}


def signature_inputs(count: int) -> Files:
    entry = field(1, field(1, "k") + field(2, field(1, "t")))
    meta_graph = field(5, field(1, "serving_default") + field(2, entry * count))
    return {"saved_model.pb": field(2, meta_graph)}


def pickle_of(body: bytes) -> Files:
    return {"model.pt": torch_zip(b"\x80\x02" + body + b".")}


HOSTILE: dict[str, tuple[str, Callable[[], Files], str]] = {
    "safetensors header of {}": (
        "safetensors",
        lambda: json_header(b'{"a":[' + b"{}," * (16 * MiB // 3 - 4) + b"{}]}"),
        "json.loads: 444 MiB peak RSS",
    ),
    "safetensors header of 200,000 tensors": (
        "safetensors",
        lambda: many_tensors(200_000),
        "json.loads: 197 MiB",
    ),
    "config.json of []": (
        "huggingface",
        lambda: hf_config(b'{"x":[' + b"[]," * (16 * MiB // 3 - 4) + b"[]]}"),
        "json.loads: 431 MiB",
    ),
    "keras config.json of 1.4 million layers": (
        "keras",
        lambda: keras_file(
            b'{"class_name":"Sequential","config":{"layers":['
            + b"[]," * (4 * MiB // 3)
            + b'[]]},"compile_config":{"loss":"mse"}}'
        ),
        "zipfile + json.loads: 123 MiB",
    ),
    "torch zip of 1,000,000 entries": (
        "pytorch",
        lambda: zip_entries(1_000_000, "model.pt"),
        "zipfile: not described (its directory was over the read budget)",
    ),
    "pickle of 8 MiB of []": (
        "pytorch",
        lambda: pickle_of(b"](" + b"]" * (8 * MiB - 64) + b"e"),
        "2.5 GiB, 41 s",
    ),
    "pickle memoizing 1,000,000 lists": (
        "pytorch",
        lambda: pickle_of(b"".join(b"]r" + struct.pack("<I", i) for i in range(1_000_000))[:-5]),
        "163 MiB",
    ),
    "checkpoint of 1,000,000 variables": (
        "tf_checkpoint",
        lambda: tiny_variables(1_000_000),
        "368 MiB",
    ),
    "checkpoint keys growing a byte per entry": (
        "tf_checkpoint",
        lambda: growing_keys(200_000),
        "21 GiB, 66 s",
    ),
    "object graph of 8 million objects": (
        "tf_checkpoint",
        lambda: object_graph(8_000_000),
        "1.6 GiB, 28 s",
    ),
    "ONNX graph of 500,000 inputs": ("onnx", lambda: onnx_inputs(500_000), "115 MiB"),
    "signature of 300,000 inputs": (
        "saved_model",
        lambda: signature_inputs(300_000),
        "75 MiB",
    ),
    "MLmodel of 1 MiB of []": (
        "mlflow",
        lambda: {"MLmodel": b"a: [" + b"[]," * (MiB // 3 - 4) + b"[]]\n"},
        "PyYAML: 260 MiB",
    ),
}
