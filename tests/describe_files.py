"""Small writers of the binary formats the describers read, for tests that need exact bytes
(hostile or damaged files; real files come from tests/truth)."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from modelwatch.formats import describe_model


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an int as a varint, bytes/str length-delimited."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def onnx_model(initializers: int = 2, raw: int = 16) -> bytes:
    """A small ONNX ModelProto: one input, one output, `initializers` float tensors."""
    dim = field(1, field(1, 4)) + field(1, field(2, "batch"))
    tensor_type = field(1, field(1, 1) + field(2, dim))
    graph = field(11, field(1, "x") + field(2, tensor_type))
    graph += field(12, field(1, "y") + field(2, tensor_type))
    for i in range(initializers):
        weights = field(9, bytes(raw))  # raw_data: `raw` bytes of weights to skip
        graph += field(
            5, field(1, 2) + field(1, raw // 8) + field(2, 1) + field(8, f"w{i}") + weights
        )
    return field(1, 8) + field(2, "tests") + field(7, graph) + field(8, field(2, 17))


def table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A TF `.index` table: one uncompressed data block, an index block, the footer."""

    def block(items: list[tuple[bytes, bytes]]) -> bytes:
        body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in items)
        return body + struct.pack("<II", 0, 1)

    data = block(sorted(entries))
    out = data + b"\0\0\0\0\0"
    index = block([(b"\xff", varint(0) + varint(len(data)))])
    index_at = len(out)
    out += index + b"\0\0\0\0\0"
    handles = varint(0) + varint(0) + varint(index_at) + varint(len(index))
    return out + handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)


def bundle_entry(dtype: int, dims: list[int]) -> bytes:
    shape = b"".join(field(2, field(1, d)) for d in dims)
    return field(1, dtype) + field(2, shape)


def torch_zip(pickle_bytes: bytes) -> bytes:
    """A zip laid out as torch.save writes it, with `pickle_bytes` as its data.pkl."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def safetensors(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def event_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data and (unchecked) a data CRC."""
    from modelwatch.describe.events import masked_crc32c

    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + b"\0\0\0\0"


def scalar_event(step: int, tag: str, value: float) -> bytes:
    summary_value = field(1, tag) + varint(2 << 3 | 5) + struct.pack("<f", value)
    return event_record(field(2, step) + field(5, field(1, summary_value)))


def write_unit(unit: Path, files: dict[str, bytes]) -> dict[str, int]:
    for rel, content in files.items():
        path = unit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return {rel: len(content) for rel, content in files.items()}


def describe_unit(unit: Path, fmt: str, listing: dict[str, int]) -> dict[str, Any] | None:
    fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return describe_model(fd, listing, fmt)
    finally:
        os.close(fd)
