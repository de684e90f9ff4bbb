"""A reader of the protobuf wire format that walks a file without loading it.

`protobuf` (and `onnx.load`) parse a whole message into memory: about twice the file for a
200 MB ONNX model. Describing a model needs a few small fields (names, dtypes, shapes) next to
large ones (weights, graph definitions) that only have to be skipped. `Region` is a byte range
of a `Blob`; `Region.fields()` yields its fields in order, and a length-delimited field is
again a `Region`, read only if asked for (`.message()`, `.text()`, `.data()`). A region of at
most `INLINE` bytes is read once and parsed in memory; a larger one is walked through the
blob's block cache, so skipping a 1 GB `raw_data` costs one header read.

Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Groups (3, 4) are
deprecated and never written by the formats read here: they are malformed. Every field
counts one step of the source's budget, so a walk is linear in the fields read and capped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from modelwatch.describe.source import Blob, malformed, too_large

INLINE = 1 << 20
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
_MAX_VARINT = 10


@dataclass(frozen=True, slots=True)
class Field:
    """One field: `number`, `wire` type, and `value` (varint or fixed as an unsigned int) or,
    for length-delimited fields, the `Region` of its payload (`value` is its length)."""

    number: int
    wire: int
    value: int
    region: Region | None

    def message(self) -> Region:
        """The payload as a nested message (malformed if this is not length-delimited)."""
        if self.region is None:
            raise malformed("", f"field {self.number} is not a message (wire type {self.wire})")
        return self.region

    def text(self, cap: int = 1 << 16) -> str:
        """The payload as UTF-8 text (invalid bytes replaced), at most `cap` bytes read."""
        return self.message().data(cap).decode("utf-8", "replace")

    def signed(self) -> int:
        """The varint as a two's-complement int64 (protobuf `int64` / `int32`)."""
        return self.value - (1 << 64) if self.value >= 1 << 63 else self.value

    def double(self) -> float:
        return float(struct.unpack("<d", self.value.to_bytes(8, "little"))[0])

    def single(self) -> float:
        return float(struct.unpack("<f", self.value.to_bytes(4, "little"))[0])


class Region:
    """The bytes [start, end) of `blob`; `buf` holds them (from `base`) once read."""

    __slots__ = ("base", "blob", "buf", "end", "start")

    def __init__(
        self, blob: Blob, start: int, end: int, buf: bytes | None = None, base: int = 0
    ) -> None:
        self.blob, self.start, self.end, self.buf, self.base = blob, start, end, buf, base

    @classmethod
    def whole(cls, blob: Blob) -> Region:
        return cls(blob, 0, blob.size)

    def __len__(self) -> int:
        return self.end - self.start

    def data(self, cap: int) -> bytes:
        """The region's bytes; `describe_too_large` when it is longer than `cap`."""
        if len(self) > cap:
            raise too_large(self.blob.name, f"a field of {len(self)} bytes at {self.start}")
        if self.buf is not None:
            return self.buf[self.start - self.base : self.end - self.base]
        return self.blob.read(self.start, len(self))

    def fields(self) -> Iterator[Field]:
        """The fields in file order."""
        if self.buf is None and len(self) <= INLINE:
            self.buf, self.base = self.blob.read(self.start, len(self)), self.start
        if self.buf is not None:
            return self._fields_in_memory()
        return self._fields_streamed()

    def _fields_in_memory(self) -> Iterator[Field]:
        buf, base, blob = self.buf or b"", self.base, self.blob
        pos, end = self.start - base, self.end - base
        tick = blob.source.tick
        while pos < end:
            tick()
            key, pos = _varint(buf, pos, end, blob.name, base)
            number, wire = key >> 3, key & 7
            if wire == VARINT:
                value, pos = _varint(buf, pos, end, blob.name, base)
                yield Field(number, wire, value, None)
            elif wire == LENGTH:
                length, pos = _varint(buf, pos, end, blob.name, base)
                if length > end - pos:
                    raise _past_end(blob.name, number, base + pos)
                region = Region(blob, base + pos, base + pos + length, buf, base)
                pos += length
                yield Field(number, wire, length, region)
            else:
                width = _fixed_width(wire, number, blob.name, base + pos)
                if width > end - pos:
                    raise _past_end(blob.name, number, base + pos)
                value = int.from_bytes(buf[pos : pos + width], "little")
                pos += width
                yield Field(number, wire, value, None)

    def _fields_streamed(self) -> Iterator[Field]:
        blob, pos, end = self.blob, self.start, self.end
        while pos < end:
            blob.source.tick()
            head = blob.read(pos, min(2 * _MAX_VARINT, end - pos))
            key, at = _varint(head, 0, len(head), blob.name, pos)
            number, wire = key >> 3, key & 7
            if wire in (VARINT, LENGTH):
                value, at = _varint(head, at, len(head), blob.name, pos)
            else:
                at_file = pos + at
                width = _fixed_width(wire, number, blob.name, at_file)
                if width > end - at_file:
                    raise _past_end(blob.name, number, at_file)
                value = int.from_bytes(blob.read(at_file, width), "little")
                at += width
            pos += at
            if wire != LENGTH:
                yield Field(number, wire, value, None)
                continue
            if value > end - pos:
                raise _past_end(blob.name, number, pos)
            region = Region(blob, pos, pos + value)
            pos += value
            yield Field(number, wire, value, region)


def packed_varints(field: Field, cap: int) -> list[int]:
    """A repeated varint field: packed (one length-delimited field) or a single varint."""
    if field.wire == VARINT:
        return [field.value]
    data = field.message().data(cap)
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos, len(data), field.message().blob.name, 0)
        values.append(value)
    field.message().blob.source.tick(0, len(values))
    return values


def signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _varint(buf: bytes, pos: int, end: int, name: str, base: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT)):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i + 1
        shift += 7
    if end - pos < _MAX_VARINT:
        raise malformed(name, f"varint at byte {base + pos} passes the end")
    raise malformed(name, f"varint at byte {base + pos} is longer than 10 bytes")


def _fixed_width(wire: int, number: int, name: str, at: int) -> int:
    if wire == FIXED64:
        return 8
    if wire == FIXED32:
        return 4
    raise malformed(name, f"field {number} at byte {at} has wire type {wire}")


def _past_end(name: str, number: int, at: int) -> Exception:
    return malformed(name, f"field {number} at byte {at} passes the end of its message")
