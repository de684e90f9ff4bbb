"""TensorBoard scalars from the event files inside a unit, read without TensorBoard.

An event file (`events.out.tfevents.*`) is a TFRecord stream: per record a little-endian
uint64 length, the masked CRC-32C of those 8 bytes, the data, and the masked CRC-32C of the
data. Each record is an `Event` {wall_time = 1, step = 2, summary = 5 {value = 1 [Value
{tag = 1, simple_value = 2, tensor = 8, metadata = 9 {plugin_data = 1 {plugin_name = 1}}}]}}.

A scalar is a `simple_value` (TF1, tensorboardX) or a rank-0 numeric `tensor` (TF2, Keras)
whose tag is not claimed by another plugin (TF2 writes the plugin name only with a tag's
first value). The length CRC is checked (a cheap guard against reading garbage as a length);
a record that fails it, or is cut short (a file still being written), ends that file.
"""

from __future__ import annotations

import math
import os
import posixpath
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from modelwatch import beneath
from modelwatch.describe.protowire import FIXED32, FIXED64, VARINT, Field, Region, packed_varints
from modelwatch.describe.source import DEFAULT_LIMITS, Blob, DescribeError, Limits, Source

EVENT_PREFIX = "events.out.tfevents."
MAX_RECORD = 8 << 20  # larger records hold graphs or images, never only scalars
_MAX_TAG = 1024  # characters of a tag or plugin name
_MAX_TAGS = 10_000  # tags whose plugin is remembered (real logs have hundreds)
_HEADER = 12
_NUMERIC = {1: "<f", 2: "<d", 3: "<i", 4: "<B", 5: "<h", 6: "<b", 9: "<q", 17: "<H", 19: "<e"}
_NUMERIC.update({22: "<I", 23: "<Q"})
_INT_FIELDS = {3: 7, 4: 7, 5: 7, 6: 7, 9: 10, 17: 7, 22: 16, 23: 17}  # dtype -> repeated field


def find_event_files(dir_fd: int, *, max_files: int, max_entries: int = 1_000_000) -> list[str]:
    """Relative paths of the event files below `dir_fd` (at most `max_files`, sorted),
    walked without following symlinks and looking at no more than `max_entries` entries."""
    found: list[str] = []
    budget = [max_entries]
    _walk(os.dup(dir_fd), "", found, budget, max_files)
    return sorted(found)


def _walk(fd: int, prefix: str, found: list[str], budget: list[int], max_files: int) -> None:
    try:
        with os.scandir(fd) as entries:
            subdirs = []
            for entry in entries:
                budget[0] -= 1
                if budget[0] < 0 or len(found) >= max_files:
                    return
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                elif entry.name.startswith(EVENT_PREFIX) and entry.is_file(follow_symlinks=False):
                    found.append(prefix + entry.name)
        for name in sorted(subdirs):
            try:
                child = os.open(name, beneath.DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # vanished or replaced by a symlink since it was listed
            _walk(child, f"{prefix}{name}/", found, budget, max_files)
    except OSError:
        return
    finally:
        os.close(fd)


def scalar_metrics(
    dir_fd: int,
    event_files: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> list[dict[str, Any]]:
    """`[{"name", "numberValue"}]`: the last value by step of every scalar in `event_files`,
    named `<run directory>/<tag>`, sorted by name; non-finite last values are left out."""
    source = Source(dir_fd, {}, progress=progress, limits=limits)
    last: dict[str, tuple[int, int, float]] = {}
    plugins: dict[str, str] = {}
    order = 0
    for rel in sorted(event_files):
        run = posixpath.dirname(rel)
        try:
            for step, tag, value in _scalars(source, rel, plugins, run):
                name = f"{run}/{tag}" if run else tag
                order += 1
                if name not in last and len(last) >= limits.listed * 10:
                    continue
                if name not in last or (step, order) >= last[name][:2]:
                    last[name] = (step, order, value)
        except DescribeError:
            continue  # a damaged or unreadable file keeps what it gave until then
    source.flush()
    return [
        {"name": name, "numberValue": value}
        for name, (_, _, value) in sorted(last.items())
        if math.isfinite(value)
    ]


def _scalars(
    source: Source, rel: str, plugins: dict[str, str], run: str
) -> Iterator[tuple[int, str, float]]:
    with source.open(rel) as blob:
        for data in _records(blob):
            step, summary = 0, None
            for field in Region(blob, 0, len(data), data, 0).fields():
                if field.number == 2 and field.wire == VARINT:
                    step = field.signed()
                elif field.number == 5:
                    summary = field.message()
            if summary is None:
                continue
            for field in summary.fields():
                if field.number == 1:
                    found = _scalar(field.message(), plugins, run)
                    if found is not None:
                        yield step, found[0], found[1]


def _records(blob: Blob) -> Iterator[bytes]:
    pos = 0
    while pos + _HEADER <= blob.size:
        header = blob.read(pos, _HEADER)
        if masked_crc32c(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
            return
        length = struct.unpack_from("<Q", header)[0]
        if pos + _HEADER + length + 4 > blob.size:
            return
        if length <= MAX_RECORD:
            yield blob.read(pos + _HEADER, length)
        else:
            blob.source.tick()
        pos += _HEADER + length + 4


def _scalar(value: Region, plugins: dict[str, str], run: str) -> tuple[str, float] | None:
    tag, simple, tensor = "", None, None
    for field in value.fields():
        if field.number == 1:
            tag = field.text(_MAX_TAG)
        elif field.number == 2 and field.wire == FIXED32:
            simple = field.single()
        elif field.number == 8:
            tensor = field.message()
        elif field.number == 9:
            plugin = _plugin_name(field.message())
            if plugin and len(plugins) < _MAX_TAGS:
                plugins[f"{run}\0{tag}"] = plugin
    if simple is not None:
        return tag, simple
    if tensor is None or plugins.get(f"{run}\0{tag}", "scalars") != "scalars":
        return None
    number = tensor_scalar(tensor)
    return None if number is None else (tag, number)


def _plugin_name(metadata: Region) -> str:
    for field in metadata.fields():
        if field.number == 1:
            for part in field.message().fields():
                if part.number == 1:
                    return part.text(_MAX_TAG)
    return ""


def tensor_scalar(region: Region) -> float | None:
    """The number in a rank-0 numeric TF `TensorProto`, else None."""
    dtype, rank, content, fields = 0, 0, None, []
    for field in region.fields():
        if field.number == 1 and field.wire == VARINT:
            dtype = field.value
        elif field.number == 2:
            rank = sum(1 for dim in field.message().fields() if dim.number == 2)
        elif field.number == 4:
            content = field.message().data(64)
        else:
            fields.append(field)
    if rank != 0 or (dtype not in _NUMERIC and dtype != 14):
        return None
    if content is not None:
        return _from_content(dtype, content)
    return _from_values(dtype, fields)


def _from_content(dtype: int, content: bytes) -> float | None:
    if dtype == 14:  # bfloat16: the upper half of a float32
        return _bfloat16(int.from_bytes(content[:2], "little")) if len(content) >= 2 else None
    fmt = _NUMERIC[dtype]
    if len(content) < struct.calcsize(fmt):
        return None
    return float(struct.unpack_from(fmt, content)[0])


def _from_values(dtype: int, fields: list[Field]) -> float | None:
    for field in fields:
        if dtype == 1 and field.number == 5:
            return _first_fixed(field, 4, "<f")
        if dtype == 2 and field.number == 6:
            return _first_fixed(field, 8, "<d")
        if dtype in (19, 14) and field.number == 13:
            values = packed_varints(field, 64)
            if not values:
                return None
            bits = values[0] & 0xFFFF
            if dtype == 14:
                return _bfloat16(bits)
            return float(struct.unpack("<e", bits.to_bytes(2, "little"))[0])
        if _INT_FIELDS.get(dtype) == field.number:
            values = packed_varints(field, 64)
            if not values:
                return None
            value = values[0]
            return float(value - (1 << 64) if value >= 1 << 63 else value)
    return None


def _first_fixed(field: Field, width: int, fmt: str) -> float | None:
    if field.wire in (FIXED32, FIXED64):
        return float(struct.unpack(fmt, field.value.to_bytes(width, "little"))[0])
    data = field.message().data(1 << 16)
    return float(struct.unpack_from(fmt, data)[0]) if len(data) >= width else None


def _bfloat16(bits: int) -> float:
    return float(struct.unpack("<f", (bits << 16).to_bytes(4, "little"))[0])


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc_table()


def masked_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, masked the TFRecord way; for short headers only."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
