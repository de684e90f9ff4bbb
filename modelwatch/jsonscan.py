"""Strict JSON read from a stream of byte chunks in bounded memory, building only what is asked.

Used for the JSON inside model files (safetensors headers, Hugging Face `*.index.json`), which
can be tens of MiB: `json.loads` would build the whole document, up to 25 times its size in
Python objects (a 100 MiB header of `{}`s needed 2.6 GB).

`scan(chunks, build_depth=d)` checks that the concatenated chunks are exactly one RFC 8259
JSON value in UTF-8 and yields `(path, value)` pairs, `path` being the tuple of object keys
and array indices that leads to the value:

- `(path, OBJECT)` or `(path, ARRAY)` when a container shallower than `d` starts;
- `(path, value)` for each scalar shallower than `d`, and each value at depth `d`, built as
  `json.loads` builds it (duplicate keys: the last wins), or `TOO_LARGE` when its text is
  longer than `max_value` bytes. Values deeper than `d` are checked, never yielded.

Invalid input raises `JsonError` (a ValueError) naming the byte offset, possibly after some
pairs were yielded: a caller acts on the pairs only once the scan has ended. Object keys are
cut to `max_key` bytes (the cut ones end in "..."); nesting deeper than `max_depth` is an
error. Memory is one chunk, a number literal (at most 4300 characters, CPython's limit for
integers), the value being built and the path, whatever the input; strings of any length are
streamed. Time is linear in the input. json's C scanner does most of the reading, on
bounded slices: each value at depth `d` that is valid and short (a tensor's entry), and the
members of a value too large to build, many at a time; 20 to 200 ns per byte. The rest (what
the C scanner refuses, whose error the grammar then words; a long run of tiny values to
yield) is read token by token in Python, 0.3 to 1 us per byte.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias

Path: TypeAlias = tuple[str | int, ...]

MAX_NUMBER = 4300


class JsonError(ValueError):
    """The input is not one strict JSON value; the message says what and at which byte."""


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


OBJECT = _Marker("OBJECT")
ARRAY = _Marker("ARRAY")
TOO_LARGE = _Marker("TOO_LARGE")

_WS = re.compile(rb"[ \t\n\r]*")
_WS_BYTES = frozenset(b" \t\n\r")
_PLAIN_STRING = re.compile(rb'"([^"\\\x00-\x1f]*)"')
_STRING_RUN = re.compile(rb'[^"\\\x00-\x1f]*')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = ((b"true", True), (b"false", False), (b"null", None))
_QUOTE, _BACKSLASH, _COMMA, _COLON = 0x22, 0x5C, 0x2C, 0x3A
_OPENERS = {0x7B: 0x7D, 0x5B: 0x5D}  # { -> }, [ -> ]
_NUMBER_START = frozenset(b"-0123456789")


class _Cut(str):
    """A string kept only in part: longer than it was allowed to be."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity, -Infinity are not JSON


# json's C scanner, used on bounded slices only (`_Scan._fast_value`).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SCAN_ONCE: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_NO_VALUE: Any = object()
_FIRST_WINDOW = 256  # a tensor's entry is 60 to 200 bytes
_SKIP_WINDOW = 64 * 1024


class _Lexer:
    """Tokens of a chunked byte stream; holds the unread part of the current chunk."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._base = 0  # stream offset of buf[0]
        self._eof = False
        self.buf = b""
        self.pos = 0

    def error(self, message: str) -> JsonError:
        return JsonError(f"{message} at byte {self._base + self.pos}")

    @property
    def offset(self) -> int:
        return self._base + self.pos

    def more(self) -> bool:
        """Append the next chunk, dropping what was read; False at the end of the input."""
        if self._eof:
            return False
        chunk = next((piece for piece in self._chunks if piece), b"")  # empty pieces: none
        pending = len(self._utf8.getstate()[0])  # bytes of a character cut by the last chunk
        try:  # decoding checks every byte is UTF-8 (a str of one chunk, dropped at once)
            self._utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            at = self._base + len(self.buf) - pending + exc.start
            raise JsonError(f"not valid UTF-8 ({exc.reason}) at byte {at}") from None
        if not chunk:
            self._eof = True
            return False
        self._base += self.pos
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    def need(self, n: int) -> None:
        """Have `n` unread bytes buffered, or all that is left."""
        while len(self.buf) - self.pos < n and self.more():
            pass

    def peek(self) -> int:
        """The next byte after whitespace (not consumed), or -1 at the end of the input."""
        buf, pos = self.buf, self.pos
        if pos < len(buf) and buf[pos] not in _WS_BYTES:  # the common case, without a regex
            return buf[pos]
        while True:
            match = _WS.match(self.buf, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return -1

    def string(self, keep: int) -> str | None:
        """The string starting at the cursor: None when `keep` is 0, a `_Cut` when its text is
        longer than `keep` bytes. Strings of any length are read chunk by chunk."""
        plain = _PLAIN_STRING.match(self.buf, self.pos)
        if plain is not None and (not keep or plain.end() - self.pos - 2 <= keep):
            self.pos = plain.end()  # the common case: no escapes, within this chunk
            return plain.group(1).decode("utf-8") if keep else None
        self.pos += 1
        kept: list[bytes] = []
        room = keep  # bytes that may still be kept; -1 once the string is cut
        while True:
            end = _STRING_RUN.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if keep and room >= 0 and end > self.pos:
                room = _keep(kept, room, self.buf[self.pos : end])
            self.pos = end
            if end == len(self.buf):
                if not self.more():
                    raise self.error("unterminated string")
                continue
            byte = self.buf[end]
            if byte == _QUOTE:
                self.pos += 1
                return _decoded(kept, keep, room)
            if byte != _BACKSLASH:
                raise self.error(f"control character 0x{byte:02x} in a string")
            escape = self._escape()
            if keep and room >= 0:
                room = _keep(kept, room, escape)

    def _escape(self) -> bytes:
        self.need(6)
        kind = self.buf[self.pos + 1 : self.pos + 2]
        if kind == b"u" and _HEX4.match(self.buf, self.pos + 2):
            length = 6
        elif kind and kind[0] in _SIMPLE_ESCAPES:
            length = 2
        else:
            raise self.error("invalid escape in a string")
        self.pos += length
        return self.buf[self.pos - length : self.pos]

    def number(self, keep: bool) -> int | float | None:
        """The number starting at the cursor (None unless `keep`)."""
        if len(self.buf) - self.pos <= MAX_NUMBER:
            self.need(MAX_NUMBER + 1)
        match = _NUMBER.match(self.buf, self.pos)
        if match is None:
            raise self.error("invalid number")
        if match.end() - self.pos > MAX_NUMBER:
            raise self.error(f"number longer than {MAX_NUMBER} characters")
        self.pos = match.end()
        if not keep:
            return None
        literal = match.group()
        if match.end() - match.start() > 20 or not literal.lstrip(b"-").isdigit():
            try:  # json's own conversion: floats too large for a double become inf
                value: int | float = json.loads(literal)
            except ValueError:  # an integer above a lowered PYTHONINTMAXSTRDIGITS
                raise self.error("number out of range") from None
            return value
        return int(literal)

    def literal(self) -> bool | None:
        self.need(5)
        for word, value in _LITERALS:
            if self.buf.startswith(word, self.pos):
                self.pos += len(word)
                return value
        raise self.error(f"unexpected {self.buf[self.pos : self.pos + 1]!r}")


def _nesting(value: Any, limit: int) -> int:
    """How many containers deep `value` is (0 for a scalar), counted up to `limit` + 1."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, (dict, list))
        ]
    return depth


def _keep(kept: list[bytes], room: int, piece: bytes) -> int:
    """Keep what fits of `piece` in `room` bytes; the room left, or -1 when it did not fit."""
    kept.append(piece[:room])
    return room - len(piece) if len(piece) <= room else -1


def _decoded(kept: list[bytes], keep: int, room: int) -> str | None:
    if keep == 0:
        return None
    raw = b"".join(kept)
    if room < 0:
        return _Cut(raw.decode("utf-8", "replace") + "...")
    text: str = json.loads(b'"' + raw + b'"')  # escapes decoded by json itself
    return text


class _Frame:
    """An open container: its closing byte, and the value being built for it, if any."""

    __slots__ = ("built", "closer", "is_object")

    def __init__(self, opener: int, built: dict[str, Any] | list[Any] | None) -> None:
        self.closer = _OPENERS[opener]
        self.is_object = opener == 0x7B
        self.built = built


def scan(
    chunks: Iterable[bytes],
    *,
    build_depth: int,
    max_depth: int = 64,
    max_value: int = 1 << 16,
    max_key: int = 1 << 10,
) -> Iterator[tuple[Path, Any]]:
    """Check and walk one JSON value (see the module docstring)."""
    return _Scan(_Lexer(iter(chunks)), build_depth, max_depth, max_value, max_key).run()


class _Scan:
    """The grammar over the lexer's tokens, with an explicit stack (no recursion).

    The value at `build_depth` being built starts at stream offset `build_start`; once its
    text passes `max_value` bytes it is `failed`: what was built is dropped and it ends as
    TOO_LARGE.
    """

    def __init__(
        self, lexer: _Lexer, build_depth: int, max_depth: int, max_value: int, max_key: int
    ) -> None:
        self.lex = lexer
        self.build_depth, self.max_depth = build_depth, max_depth
        self.max_value, self.max_key = max_value, max_key
        self.frames: list[_Frame] = []
        self.path: list[str | int] = []
        self.build_start = 0
        self.failed = False
        self.skip_after = 0  # no skipping by slices before this stream offset

    def run(self) -> Iterator[tuple[Path, Any]]:
        lex = self.lex
        byte = lex.peek()
        if byte == -1:
            raise lex.error("no JSON value")
        while True:  # a value starts with `byte`, at depth len(frames)
            value = _NO_VALUE
            if byte in _OPENERS and len(self.frames) == self.build_depth:
                value = self._fast_value()
            is_container = False
            if value is _NO_VALUE:
                is_container = byte in _OPENERS
                if is_container:
                    marker = self._open(byte)
                    if marker is not None:
                        yield marker
                    byte = self._first_member()
                    if byte != -1:
                        continue  # the first member's value starts
                    value = self._close()
                else:
                    value = self._scalar(byte)
            while True:  # `value` has ended, at depth len(frames)
                pair = self._complete(value, is_container)
                if pair is not None:
                    yield pair
                if not self.frames:
                    if lex.peek() != -1:
                        raise lex.error("data after the JSON value")
                    return
                byte = self._next_member()
                if byte != -1:
                    break  # the next member's value starts
                value, is_container = self._close(), True

    # --- containers ---

    def _open(self, opener: int) -> tuple[Path, Any] | None:
        depth = len(self.frames)
        if depth >= self.max_depth:
            raise self.lex.error(f"nested deeper than {self.max_depth} levels")
        if depth == self.build_depth:
            self._start_build()
        built: dict[str, Any] | list[Any] | None = None
        if depth >= self.build_depth and self._within_budget():
            built = {} if opener == 0x7B else []
        self.frames.append(_Frame(opener, built))
        self.path.append(0)
        self.lex.pos += 1
        if depth < self.build_depth:
            return tuple(self.path[:-1]), OBJECT if opener == 0x7B else ARRAY
        return None

    def _first_member(self) -> int:
        """After an opener: the first byte of the first member's value, or -1 when the
        container is empty (its closer is then consumed)."""
        frame = self.frames[-1]
        byte = self.lex.peek()
        if byte == frame.closer:
            self.lex.pos += 1
            return -1
        return self._key() if frame.is_object else self._value_start()

    def _next_member(self) -> int:
        """After a member: the first byte of the next member's value, or -1 when the container
        closed."""
        frame, lex = self.frames[-1], self.lex
        byte = lex.peek()
        if byte == frame.closer:
            lex.pos += 1
            return -1
        if byte != _COMMA:
            raise lex.error(f"expected ',' or {chr(frame.closer)!r}")
        lex.pos += 1
        if self.failed and len(self.frames) > self.build_depth:
            while self._skip_members(frame):
                lex.pos += 1  # the comma after the members skipped
        if frame.is_object:
            return self._key()
        self.path[-1] = int(self.path[-1]) + 1
        return self._value_start()

    def _key(self) -> int:
        lex = self.lex
        if lex.peek() != _QUOTE:
            raise lex.error("expected a string key")
        building = len(self.frames) > self.build_depth
        key = lex.string(self._keep() if building else self.max_key)
        if building and isinstance(key, _Cut):
            self._fail()
        self.path[-1] = key or ""
        if lex.peek() != _COLON:
            raise lex.error("expected ':' after a key")
        lex.pos += 1
        return self._value_start()

    def _value_start(self) -> int:
        """The first byte of a value that must follow (-1 is reserved for "closed")."""
        byte = self.lex.peek()
        if byte == -1:
            raise self.lex.error("unexpected end of input")
        return byte

    def _close(self) -> Any:
        self.path.pop()
        return self.frames.pop().built

    # --- values ---

    def _scalar(self, byte: int) -> Any:
        lex, depth = self.lex, len(self.frames)
        if depth == self.build_depth:
            self._start_build()
        keep = self.max_value if depth < self.build_depth else self._keep()
        if byte == _QUOTE:
            return lex.string(keep)
        if byte in _NUMBER_START:
            return lex.number(keep > 0)
        return lex.literal()

    def _complete(self, value: Any, is_container: bool) -> tuple[Path, Any] | None:
        """Attach a value that ended to the one being built, or say what to yield for it."""
        depth = len(self.frames)
        if depth > self.build_depth:
            parent = self.frames[-1].built
            if isinstance(value, _Cut):
                self._fail()
            elif self._within_budget() and parent is not None:
                if isinstance(parent, dict):
                    parent[str(self.path[-1])] = value
                else:
                    parent.append(value)
            return None
        if depth == self.build_depth:
            if not self._within_budget() or isinstance(value, _Cut):
                value = TOO_LARGE
            return tuple(self.path), value
        if is_container:
            return None  # its marker was yielded when it started
        return tuple(self.path), TOO_LARGE if isinstance(value, _Cut) else value

    def _skip_members(self, frame: _Frame) -> bool:
        """Inside a value too large to build, jump over the members that follow, up to the
        last comma of a bounded slice, when json's C scanner finds them valid wrapped in the
        container's brackets; True when it did (the cursor is then on that comma).

        A comma inside a string or a nested value cannot end a valid wrapped prefix, so
        success means the members are whole and valid. After a failure the grammar reads at
        least half a slice token by token before the next try: time stays linear."""
        lex = self.lex
        if lex.offset < self.skip_after:
            return False
        lex.need(_SKIP_WINDOW)
        piece = lex.buf[lex.pos : lex.pos + _SKIP_WINDOW]
        cut = piece.rfind(b",")
        text = piece[: max(cut, 0)].decode("utf-8", "ignore")
        if cut > 0:
            opener, closer = ("{", "}") if frame.is_object else ("[", "]")
            try:
                members, end = _SCAN_ONCE(opener + text + closer, 0)
            except (ValueError, StopIteration, RecursionError):
                end = -1
            # The wrapper stands for this container: its members sit one level deeper.
            room = self.max_depth - len(self.frames) + 1
            if end == len(text) + 2 and _nesting(members, room) <= room:
                lex.pos += cut
                return True
        self.skip_after = lex.offset + _SKIP_WINDOW // 2
        return False

    # --- the value being built ---

    def _fast_value(self) -> Any:
        """The container starting at the cursor (at `build_depth`), decoded by json's C scanner
        when its text fits in `max_value` bytes, is valid and no deeper than allowed; else
        `_NO_VALUE`, and the grammar reads it (and says what is wrong with it).

        The C scanner reads a slice that grows fourfold from 256 B while the value may go on
        past it, so a value costs time in proportion to its own size and memory to at most
        `max_value` bytes of text."""
        lex, window = self.lex, _FIRST_WINDOW
        while True:
            lex.need(window)
            piece = lex.buf[lex.pos : lex.pos + window]
            text = piece.decode("utf-8", "ignore")  # only a character cut at the end is lost
            try:
                value, end = _SCAN_ONCE(text, 0)
                break
            except (ValueError, StopIteration, RecursionError):
                if len(piece) < window or window >= self.max_value:
                    return _NO_VALUE  # not valid JSON, or too large to build
                window = min(4 * window, self.max_value)
        taken = text[:end]
        room = self.max_depth - self.build_depth
        if _nesting(value, room) > room:
            return _NO_VALUE  # the grammar reports where it is nested too deeply
        self._start_build()
        lex.pos += end if piece.isascii() else len(taken.encode("utf-8"))
        return value

    def _start_build(self) -> None:
        self.build_start, self.failed = self.lex.offset, False

    def _within_budget(self) -> bool:
        if not self.failed and self.lex.offset - self.build_start > self.max_value:
            self._fail()
        return not self.failed

    def _keep(self) -> int:
        """How many bytes of a string inside the value being built to keep (one more than
        the budget left, so that a string too long for it comes back cut); 0 once failed."""
        if not self._within_budget():
            return 0
        return self.max_value - (self.lex.offset - self.build_start) + 1

    def _fail(self) -> None:
        self.failed = True
        for frame in self.frames[self.build_depth :]:
            frame.built = None  # dropped at once: memory stays within max_value
