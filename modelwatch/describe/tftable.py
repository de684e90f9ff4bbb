"""TensorFlow checkpoint `.index` files: the variables a checkpoint holds, without TensorFlow.

An `.index` file is a LevelDB-style sorted table (tensorflow/core/lib/io/table_builder): data
blocks of prefix-compressed key/value entries, an index block pointing at them, and a 48-byte
footer (two block handles, padding, magic `0xdb4775248b80fb57`). Each block is followed by a
compression byte and a CRC. TensorFlow writes these tables uncompressed: `BundleWriter::Finish`
and `MergeBundles` (tensorflow/core/util/tensor_bundle/tensor_bundle.cc) both set
`kNoCompression`, so a block of another type is reported as unsupported, and no snappy
decoder is needed.

Values are `BundleEntryProto`s (dtype = 1, shape = 2, shard_id = 3, offset = 4, size = 5,
slices = 7); the entry with the empty key is the `BundleHeaderProto` (num_shards = 1).
Keys starting with a NUL byte name slices of partitioned variables and are not variables.

The table is streamed, one block at a time (TF writes 256 KiB blocks; at most `MAX_BLOCK`),
and never kept: `read_bundle` reads the header and finds the object graph's entry,
`variables` walks the entries again for the caller to count. Keys are at most `MAX_KEY`
bytes: prefix compression lets each entry grow the key by one byte for the cost of one, so
a table of 200,000 entries could otherwise name 20 GB of keys.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from modelwatch.describe.protowire import VARINT, Field, Region
from modelwatch.describe.source import Blob, DescribeError, malformed, too_large
from modelwatch.describe.tensors import MAX_RANK, TF_DTYPES, Dim

MAGIC = 0xDB4775248B80FB57
FOOTER = 48
MAX_BLOCK = 16 << 20
MAX_KEY = 4096
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_TRAILER = 5  # compression type byte + crc32c


@dataclass(frozen=True, slots=True)
class Variable:
    """One entry: where its bytes are (`shard`, `offset`, `size`) in the data files."""

    name: str
    dtype: str
    shape: list[Dim] | None
    shard: int = 0
    offset: int = 0
    size: int = 0


@dataclass(frozen=True, slots=True)
class Bundle:
    num_shards: int
    object_graph: Variable | None  # the TF2 object graph's entry (`tfgraph`), if any


def read_bundle(blob: Blob, cap: int) -> Bundle:
    """The header of the `.index` table in `blob` (at most `cap` bytes) and its object graph
    entry; every entry is checked on the way."""
    if blob.size > cap:
        raise too_large(blob.name, f"{blob.size} bytes, more than {cap}")
    num_shards, graph = 1, None
    for key, value in _entries(blob):
        entry = Region(blob, 0, len(value), value, 0)
        if key == b"":
            num_shards = _header_shards(entry)
        elif key == OBJECT_GRAPH.encode():
            graph = _variable(OBJECT_GRAPH, entry)
    return Bundle(num_shards, graph)


def variables(blob: Blob) -> Iterator[Variable]:
    """Every variable of the table, in key order, one at a time."""
    for key, value in _entries(blob):
        if key and not key.startswith(b"\x00"):
            yield _variable(key.decode("utf-8", "replace"), Region(blob, 0, len(value), value, 0))


def _variable(name: str, entry: Region) -> Variable:
    dtype, shape = tensor_meta(entry.fields(), dtype_field=1, shape_field=2)
    place = {3: 0, 4: 0, 5: 0}
    for field in entry.fields():
        if field.number in place and field.wire == VARINT:
            place[field.number] = field.signed()
    return Variable(name, dtype, shape, place[3], place[4], place[5])


def tensor_meta(
    fields: Iterator[Field], *, dtype_field: int, shape_field: int
) -> tuple[str, list[Dim] | None]:
    """(dtype name, shape) from a message with a TF DataType and a TensorShapeProto field."""
    dtype, shape = "invalid", None
    for field in fields:
        if field.number == dtype_field and field.wire == VARINT:
            dtype = TF_DTYPES.get(field.value, f"unknown({field.value})")
        elif field.number == shape_field:
            shape = tensor_shape(field.message())
    return dtype, shape


def tensor_shape(region: Region) -> list[Dim] | None:
    """A `TensorShapeProto` (dim = 2 {size = 1, name = 2}, unknown_rank = 3): the dims, with
    None for an unknown (-1) size; None for an unknown rank."""
    dims: list[Dim] = []
    for field in region.fields():
        if field.number == 3 and field.wire == VARINT and field.value:
            return None
        if field.number == 2:
            if len(dims) >= MAX_RANK:
                raise too_large(region.blob.name, f"a shape of more than {MAX_RANK} dimensions")
            size = 0
            for part in field.message().fields():
                if part.number == 1 and part.wire == VARINT:
                    size = part.signed()
            dims.append(None if size < 0 else size)
    return dims


def _header_shards(entry: Region) -> int:
    for field in entry.fields():
        if field.number == 1 and field.wire == VARINT:
            return field.signed()
    return 1


def _entries(blob: Blob) -> Iterator[tuple[bytes, bytes]]:
    if blob.size < FOOTER:
        raise malformed(blob.name, f"{blob.size} bytes, shorter than a table footer")
    footer = blob.read(blob.size - FOOTER, FOOTER)
    if struct.unpack("<Q", footer[-8:])[0] != MAGIC:
        raise malformed(blob.name, "not a TensorFlow table (bad magic number)")
    footer_region = Region(blob, 0, FOOTER - 8, footer[:-8], 0)
    _, after_meta = _handle(footer_region, 0, blob.name)
    index, _ = _handle(footer_region, after_meta, blob.name)
    # Each data block is read once in a table TF wrote; an index that points many times at
    # one block would make the walk quadratic, so block bytes are capped by the file size.
    budget = blob.size
    for _, handle in _block_entries(blob, index):
        data = Region(blob, 0, len(handle), handle, 0)
        block, _ = _handle(data, 0, blob.name)
        budget -= block[1]
        if budget < 0:
            raise malformed(blob.name, "the index points at more block bytes than the file has")
        yield from _block_entries(blob, block)


def _handle(region: Region, at: int, name: str) -> tuple[tuple[int, int], int]:
    """A BlockHandle (offset, size varints) at `at` of an in-memory region; and what follows."""
    buf = region.buf or b""
    values = []
    pos = at
    for _ in range(2):
        value = shift = 0
        while True:
            if pos >= len(buf) or shift > 63:
                raise malformed(name, "truncated block handle")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return (values[0], values[1]), pos


def _block_entries(blob: Blob, handle: tuple[int, int]) -> Iterator[tuple[bytes, bytes]]:
    offset, size = handle
    if offset + size + _TRAILER > blob.size:
        raise malformed(blob.name, f"block at {offset} of {size} bytes passes the end")
    if size > MAX_BLOCK:
        raise too_large(blob.name, f"block at {offset} of {size} bytes (TF writes 256 KiB)")
    raw = blob.read(offset, size + _TRAILER)
    if raw[size] != 0:
        raise DescribeError(
            "describe_unsupported",
            blob.name,
            f"block at {offset} is compressed (type {raw[size]}); TensorFlow writes none",
        )
    yield from _parse_block(raw[:size], blob, offset)


def _parse_block(block: bytes, blob: Blob, offset: int) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise malformed(blob.name, f"block at {offset} is too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * restarts
    if restarts > len(block) // 4 or limit < 0:
        raise malformed(blob.name, f"block at {offset} has a bad restart count")
    key = b""
    pos = 0
    while pos < limit:
        blob.source.tick()
        shared, pos = _small_varint(block, pos, limit, blob.name)
        unshared, pos = _small_varint(block, pos, limit, blob.name)
        length, pos = _small_varint(block, pos, limit, blob.name)
        if shared > len(key) or unshared + length > limit - pos:
            raise malformed(blob.name, f"bad entry at byte {offset + pos} of a block")
        if shared + unshared > MAX_KEY:
            raise too_large(blob.name, f"key longer than {MAX_KEY} bytes at {offset + pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + length]
        pos += length


def _small_varint(buf: bytes, pos: int, end: int, name: str) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift <= 28:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise malformed(name, f"bad varint at byte {pos} of a block")
