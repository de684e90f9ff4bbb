"""A zip's central directory and members, read in bounded memory (SPEC §6, §10, §13).

`check_central_directory(fd, size, max_directory)` returns the number of entries when the
file at `fd` (`size` bytes) ends with a zip end record whose central directory can be read,
else raises `ZipError` with a short reason. torch.save zips and `.keras` files are complete
exactly when this holds: the directory is written last.

`find_members(fd, size, max_directory, wanted)` walks the same way and returns the entries
whose names `wanted` accepts (a `Member`: name, method, sizes, where its data is);
`member_chunks(fd, size, member, cap)` yields a stored or deflated member's bytes in pieces
of at most 1 MiB, never more than `cap` in all. The describers read `data.pkl`,
`config.json` and `metadata.json` this way instead of with `zipfile`, which builds a
`ZipInfo` per entry before anything can be looked up.

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
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from modelwatch.progress import progress

_END = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes + comment)
_END_SIGNATURE = b"PK\x05\x06"
_LOCATOR64 = struct.Struct("<4sLQL")  # ZIP64 end of central directory locator
_END64 = struct.Struct("<4sQ2H2L4Q")  # ZIP64 end of central directory record
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header (46 bytes + names)
_ENTRY_SIGNATURE = b"PK\x01\x02"
_SEARCHED = 1 << 16  # zipfile looks for the end record in the last 64 KiB (+ the record)
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header (30 bytes + name + extra)
_UTF8_NAME = 0x800
_ENCRYPTED = 0x1
_ZIP64_EXTRA = 0x0001
_WINDOW = 1 << 20
STORED, DEFLATED = 0, 8
_MAX_FOUND = 64  # members `find_members` returns at most
MAX_DIRECTORY = 100 * 1024 * 1024  # torch zips with ~100k tensors have ~15 MiB directories


class ZipError(Exception):
    """The central directory or a member cannot be read; the message is the reason."""


class TooLarge(ZipError):
    """A member holds more bytes than the reader's cap."""


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of the central directory: its data starts after the local header at
    `header` (an offset in the file, prepended data accounted for)."""

    name: str
    method: int
    compressed: int
    size: int
    header: int
    flags: int


def check_central_directory(fd: int, size: int, max_directory: int) -> int:
    """The number of central directory entries (see the module docstring); ZipError if not."""
    window, _ = _directory(fd, size, max_directory)
    return _walk(window)


def find_members(
    fd: int, size: int, max_directory: int, wanted: Callable[[str], bool]
) -> list[Member]:
    """The entries whose names `wanted` accepts, in directory order (at most 64), after the
    same checks as `check_central_directory`; ZipError if the directory is unreadable."""
    window, concat = _directory(fd, size, max_directory)
    found: list[Member] = []

    def visit(fields: tuple[int, ...], names: bytes) -> None:
        name_len, extra_len = fields[10], fields[11]
        encoding = "utf-8" if fields[3] & _UTF8_NAME else "cp437"
        name = names[:name_len].decode(encoding, "replace")
        if len(found) < _MAX_FOUND and wanted(name):
            extra = names[name_len : name_len + extra_len]
            usize, csize, offset = _zip64_values(extra, fields)
            found.append(Member(name, fields[4], csize, usize, offset + concat, fields[3]))

    _walk(window, visit)
    return found


def member_chunks(fd: int, size: int, member: Member, cap: int) -> Iterator[bytes]:
    """The bytes of a stored or deflated `member`, in pieces of at most 1 MiB; ZipError when
    it holds more than `cap` bytes, is encrypted, compressed another way, or its local
    header or data are damaged. Each piece read is progress (`modelwatch.progress`)."""
    if member.flags & _ENCRYPTED or member.method not in (STORED, DEFLATED):
        raise ZipError(f"zip member {member.name[:200]!r} is encrypted or compressed otherwise")
    header = os.pread(fd, _LOCAL.size, member.header) if 0 <= member.header < size else b""
    if len(header) != _LOCAL.size or header[:4] != b"PK\x03\x04":
        raise ZipError(f"zip member {member.name[:200]!r} has no local header")
    fields = _LOCAL.unpack(header)
    start = member.header + _LOCAL.size + fields[9] + fields[10]
    if start + member.compressed > size:
        raise ZipError(f"zip member {member.name[:200]!r} passes the end of the file")
    pieces = _Window(fd, start, member.compressed).pieces()
    if member.method == STORED:
        yield from _capped(pieces, cap, member.name)
    else:
        yield from _capped(_inflate(pieces, member.name, cap), cap, member.name)


def _capped(pieces: Iterator[bytes], cap: int, name: str) -> Iterator[bytes]:
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > cap:
            raise TooLarge(f"zip member {name[:200]!r} holds more than {cap} bytes")
        yield piece


def _inflate(pieces: Iterator[bytes], name: str, cap: int) -> Iterator[bytes]:
    """Raw deflate, never more than one window of output per call (a zip bomb inflates 1000
    to 1: it is stopped at `cap` by the caller, one window at a time)."""
    inflater = zlib.decompressobj(-15)
    try:
        for piece in pieces:
            data = piece
            while data:
                out = inflater.decompress(data, _WINDOW)
                data = inflater.unconsumed_tail
                if out:
                    yield out
            if inflater.eof:
                return
        if not inflater.eof:
            raise ZipError(f"zip member {name[:200]!r} is cut short")
    except zlib.error as exc:
        raise ZipError(f"zip member {name[:200]!r} does not inflate ({exc})") from None


def _directory(fd: int, size: int, max_directory: int) -> tuple[_Window, int]:
    """The central directory as a window, and the offset of data prepended to the archive."""
    location, cd_size, zip64, cd_offset = _end_record(fd, size)
    if cd_size > max_directory:
        raise ZipError("zip central directory too large")
    # Data prepended to the archive shifts every offset by the same amount (zipfile's concat).
    start = location - cd_size - (_END64.size + _LOCATOR64.size if zip64 else 0)
    if start < 0:
        raise ZipError("zip central directory unreadable (bad offset)")
    return _Window(fd, start, cd_size), start - cd_offset


def _end_record(fd: int, size: int) -> tuple[int, int, bool, int]:
    """(offset of the end record, size of the central directory, whether it is ZIP64, the
    offset of the directory the record states).

    The directory ends where the end records start, and zipfile finds it there too: the
    stated offset only tells how much data was prepended to the archive.
    """
    tail_start = max(0, size - _END.size - _SEARCHED)
    tail = os.pread(fd, size - tail_start, tail_start)
    # The usual case first: no archive comment, the record is the last 22 bytes.
    at = len(tail) - _END.size
    if at < 0 or tail[at : at + 4] != _END_SIGNATURE or tail[-2:] != b"\0\0":
        # Else the last signature, as zipfile takes it, and only if its comment ends the
        # file: the signature alone may be data (a zip stored inside the archive, near whose
        # own record a truncated file may end).
        at = tail.rfind(_END_SIGNATURE)
        if at >= 0 and not _ends_the_file(tail, at):
            at = -1
    if at < 0 or at + _END.size > len(tail):
        raise ZipError("zip central directory unreadable (no end record)")
    fields = _END.unpack_from(tail, at)
    location = tail_start + at
    zip64 = _zip64_directory(fd, location)
    if zip64 is not None:
        return location, zip64[0], True, zip64[1]
    return location, fields[5], False, fields[6]


def _ends_the_file(tail: bytes, at: int) -> bool:
    """Whether an end record at `at` of the file's `tail`, with its comment, ends the file."""
    if at + _END.size > len(tail):
        return False
    comment: int = _END.unpack_from(tail, at)[-1]
    return at + _END.size + comment == len(tail)


def _zip64_directory(fd: int, location: int) -> tuple[int, int] | None:
    """The directory's (size, offset) a ZIP64 end record gives, if one precedes `location`."""
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
    values = _END64.unpack(record)
    return values[8], values[9]


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

    def pieces(self) -> Iterator[bytes]:
        """What is left, one window at a time."""
        while self.remaining > 0:
            yield self.take(min(self.remaining, _WINDOW))

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


Visit = Callable[[tuple[int, ...], bytes], None]  # (header fields, name + extra + comment)


def _walk(window: _Window, visit: Visit | None = None) -> int:
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
        if visit is not None:
            visit(fields, names)
        count += 1
    return count


def _zip64_values(extra: bytes, fields: tuple[int, ...]) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, local header offset), each from the ZIP64 extra
    record when its 32-bit field overflowed (already checked by `_check_extra`)."""
    values = [fields[9], fields[8], fields[16]]
    pos = 0
    while len(extra) - pos >= 4:
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == _ZIP64_EXTRA:
            at = pos + 4
            for i, value in enumerate(values):
                if value == 0xFFFFFFFF:
                    values[i] = struct.unpack_from("<Q", extra, at)[0]
                    at += 8
            break
        pos += 4 + length
    return values[0], values[1], values[2]


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
