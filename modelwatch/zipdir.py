"""Checking that a zip's central directory is readable, in bounded memory (SPEC §6, §10).

`check_central_directory(fd, size, max_directory)` returns the number of entries when the
file at `fd` (`size` bytes) ends with a zip end record whose central directory can be read,
else raises `ZipError` with a short reason. torch.save zips and `.keras` files are complete
exactly when this holds: the directory is written last.

It accepts what `zipfile.ZipFile` accepts on opening (the same end-record search, ZIP64
records, prepended-data offset, entry signatures, UTF-8 names and ZIP64 extra fields), but
streams the directory in 1 MiB windows and builds nothing per entry: zipfile keeps a
`ZipInfo` of about half a KiB per entry, so a 100 MiB directory of empty names (two million
entries) cost 730 MiB. Here memory is one window whatever the end record claims, and time
is linear in the directory, which may be at most `max_directory` bytes.
"""

from __future__ import annotations

import os
import struct

from modelwatch.progress import progress

_END = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes + comment)
_END_SIGNATURE = b"PK\x05\x06"
_LOCATOR64 = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_END64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header (46 bytes + names)
_ENTRY_SIGNATURE = b"PK\x01\x02"
_SEARCHED = 1 << 16  # zipfile looks for the end record in the last 64 KiB (+ the record)
_UTF8_NAME = 0x800
_ZIP64_EXTRA = 0x0001
_WINDOW = 1 << 20


class ZipError(Exception):
    """The central directory cannot be read; the message is the reason."""


def check_central_directory(fd: int, size: int, max_directory: int) -> int:
    """The number of central directory entries (see the module docstring); ZipError if not."""
    location, cd_size, zip64 = _end_record(fd, size)
    if cd_size > max_directory:
        raise ZipError("zip central directory too large")
    # Data prepended to the archive shifts every offset by the same amount (zipfile's concat).
    start = location - cd_size - (_END64.size + _LOCATOR64.size if zip64 else 0)
    if start < 0:
        raise ZipError("zip central directory unreadable (bad offset)")
    return _walk(_Window(fd, start, cd_size))


def _end_record(fd: int, size: int) -> tuple[int, int, bool]:
    """(offset of the end record, size of the central directory, whether it is ZIP64).

    The directory's own offset field is not needed: the directory ends where the end records
    start, and zipfile finds it there too (data prepended to the archive shifts every offset).
    """
    tail_start = max(0, size - _END.size - _SEARCHED)
    tail = os.pread(fd, size - tail_start, tail_start)
    # The usual case first: no archive comment, the record is the last 22 bytes.
    at = len(tail) - _END.size
    if at < 0 or tail[at : at + 4] != _END_SIGNATURE or tail[-2:] != b"\0\0":
        at = tail.rfind(_END_SIGNATURE)
    if at < 0 or at + _END.size > len(tail):
        raise ZipError("zip central directory unreadable (no end record)")
    fields = _END.unpack_from(tail, at)
    location = tail_start + at
    zip64_size = _zip64_directory_size(fd, location)
    if zip64_size is not None:
        return location, zip64_size, True
    return location, fields[5], False


def _zip64_directory_size(fd: int, location: int) -> int | None:
    """The directory size a ZIP64 end record gives, if there is one before `location`."""
    at = location - _LOCATOR64.size
    locator = os.pread(fd, _LOCATOR64.size, at) if at >= 0 else b""
    if len(locator) != _LOCATOR64.size:
        return None
    signature, disk, _, disks = _LOCATOR64.unpack(locator)
    if signature != b"PK\x06\x07":
        return None
    if disk != 0 or disks > 1:
        raise ZipError("zip central directory unreadable (spans several disks)")
    at -= _END64.size
    if at < 0:
        raise ZipError("zip central directory unreadable (truncated ZIP64 end record)")
    record = os.pread(fd, _END64.size, at)
    if len(record) != _END64.size or record[:4] != b"PK\x06\x06":
        return None
    directory_size: int = _END64.unpack(record)[8]
    return directory_size


class _Window:
    """Sequential reads of `length` bytes of `fd` from `offset`, one 1 MiB window at a time."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.next, self.left = fd, offset, length
        self.buffer = b""
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.buffer) - self.pos + self.left

    def take(self, n: int) -> bytes:
        """The next `n` bytes; ZipError if the directory ends (or the file) before them."""
        if len(self.buffer) - self.pos < n:
            self._refill(n)
        data = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return data

    def _refill(self, n: int) -> None:
        progress()  # per window: a long directory is progress, and bounded by the unit's budget
        want = min(self.left, max(n, _WINDOW))
        data = os.pread(self.fd, want, self.next) if want else b""
        self.next += len(data)
        self.left -= want
        self.buffer = self.buffer[self.pos :] + data
        self.pos = 0
        if len(self.buffer) < n:
            raise ZipError("zip central directory unreadable (truncated)")


def _walk(window: _Window) -> int:
    count = 0
    unpack, take = _ENTRY.unpack, window.take
    while window.remaining > 0:
        fields = unpack(take(_ENTRY.size))
        if fields[0] != _ENTRY_SIGNATURE:
            raise ZipError("zip central directory unreadable (bad entry signature)")
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        names = take(name_len + extra_len + comment_len)
        if fields[3] & _UTF8_NAME:
            try:
                names[:name_len].decode("utf-8")
            except UnicodeDecodeError:
                raise ZipError("zip central directory unreadable (bad UTF-8 name)") from None
        if extra_len:
            extra = names[name_len : name_len + extra_len]
            _check_extra(extra, (fields[9], fields[8], fields[16]))
        count += 1
    return count


def _check_extra(extra: bytes, sizes: tuple[int, int, int]) -> None:
    """The extra field's records fit, and its first ZIP64 record holds every 32-bit field
    that overflowed (`sizes`: uncompressed size, compressed size, local header offset)."""
    pos = 0
    while len(extra) - pos >= 4:
        kind, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise ZipError("zip central directory unreadable (corrupt extra field)")
        if kind == _ZIP64_EXTRA:
            usize, csize, offset = sizes
            needed = 8 * ((usize == 0xFFFFFFFF) + (csize == 0xFFFFFFFF) + (offset == 0xFFFFFFFF))
            if length < needed:
                raise ZipError("zip central directory unreadable (corrupt zip64 extra field)")
            sizes = (0, 0, 0)  # the values are 64-bit from here on
        pos += 4 + length
