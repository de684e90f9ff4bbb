"""Validating `gradient-model-metadata.json` (SPEC §7) into `Problem` values.

Contract:

* `validate_unit_metadata` reads the metadata file of one unit relative to the unit directory
  (or its open fd). It never follows a symlink below that directory and never opens anything
  but a regular file (a symlink, FIFO, socket, device or directory is
  `metadata_not_regular_file`), and reads at most `max_bytes + 1` bytes. An absent file is
  `present=False` with no problems.
* `validate_metadata_bytes` is the pure core: for any input bytes it returns a
  `MetadataResult` and never raises. Every problem carries `code`, `message`, `file` and, where
  they apply, a 1-based `line`/`column` (in characters of the decoded text, after a BOM) and an
  RFC 6901 `pointer`.
* Strict RFC 8259 is decided by `_Parser`, an iterative parser with an explicit stack, so a
  hostile `[[[[...` document hits `max_depth` instead of the Python recursion limit. Because it
  is pure Python, valid documents first go through the C `json` parser with hooks that refuse
  everything `_Parser` would refuse; any doubt (or any problem to locate) defers to `_Parser`.
* The first encoding/syntax/depth error stops parsing; duplicate keys are all reported. The
  document is returned whenever it parsed; `metrics` and schema problems leave it in place but
  make the result not `ok`. Each kind of repeated problem is capped at `MAX_PROBLEMS`.

Codes: metadata_not_regular_file, metadata_too_large, metadata_unreadable, metadata_encoding,
metadata_syntax, metadata_duplicate_key, metadata_too_deep, metadata_metrics, metadata_schema.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from modelwatch import beneath
from modelwatch.errors import ConfigError, Problem

JsonPath: TypeAlias = tuple[str | int, ...]

MAX_PROBLEMS = 50  # per kind (duplicate keys, metrics, schema): events stay small
_MAX_MESSAGE = 200  # schema messages embed untrusted values
_MAX_INT_DIGITS = 4300  # CPython's default int(str) limit, enforced on every Python version

_WS = re.compile(r"[ \t\n\r]*")
_PLAIN_STRING = re.compile(r'"([^"\\\x00-\x1f]*)"')
_STRING_CHUNK = re.compile(r'[^"\\\x00-\x1f]*')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_TAIL = frozenset("0123456789.eE+-")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}


@dataclass(frozen=True, slots=True)
class MetadataResult:
    """The outcome of validating one metadata file."""

    present: bool  # False when the file does not exist
    document: Any  # the parsed JSON value; None when absent or unparseable
    problems: tuple[Problem, ...]  # empty means valid

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The validated `metrics` array; [] when there is none or the document is invalid."""
        doc = self.document
        if self.ok and isinstance(doc, dict) and isinstance(doc.get("metrics"), list):
            return list(doc["metrics"])
        return []


def validate_unit_metadata(
    unit_dir: str,
    filename: str,
    *,
    max_bytes: int,
    max_depth: int,
    schema: SchemaValidator | None = None,
    dir_fd: int | None = None,
) -> MetadataResult:
    """Read and validate `filename` inside `unit_dir` without following any symlink below it.

    `dir_fd`: the unit directory, already open (see `beneath.open_unit`); `unit_dir` is then
    not opened. Without it `unit_dir` itself is opened following symlinks.
    """
    try:
        data = _read_regular_file(unit_dir, filename, max_bytes + 1, dir_fd)
    except FileNotFoundError:
        return MetadataResult(present=False, document=None, problems=())
    except beneath.WrongTypeError as exc:
        message = f"{filename} is a {exc.kind}, not a regular file; it was not read"
        if exc.name != filename:
            message = f"{filename} is not a regular file: {exc.name!r} is a {exc.kind}"
        return _failed(Problem("metadata_not_regular_file", message, file=filename))
    except OSError as exc:
        message = f"cannot read {filename}: {exc.strerror or exc}"
        return _failed(Problem("metadata_unreadable", message, file=filename))
    if len(data) > max_bytes:
        message = f"{filename} is larger than max_bytes ({max_bytes} bytes)"
        return _failed(Problem("metadata_too_large", message, file=filename))
    return validate_metadata_bytes(data, file=filename, max_depth=max_depth, schema=schema)


def validate_metadata_bytes(
    data: bytes, *, file: str, max_depth: int, schema: SchemaValidator | None = None
) -> MetadataResult:
    """Validate a metadata document given as bytes (pure; never raises on any input)."""
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        return _failed(_encoding_problem(exc, file))
    locator = _Locator(text, max_depth)
    document = _fast_parse(text, max_depth)
    if document is _DEFER:
        document, problems = locator.parse(file)
        if problems:
            return _failed(*problems)
    problems = _metrics_problems(document, file, locator)
    if schema is not None:
        problems.extend(schema._problems_at(document, file, locator))
    return MetadataResult(present=True, document=document, problems=tuple(problems))


def _failed(*problems: Problem) -> MetadataResult:
    return MetadataResult(present=True, document=None, problems=problems)


# --- reading ------------------------------------------------------------------------------


def _read_regular_file(unit_dir: str, filename: str, limit: int, dir_fd: int | None) -> bytes:
    """At most `limit` bytes of a regular file; symlinks and special files are never opened.

    `sub/name.json` cannot escape via a symlink: every component is opened with O_NOFOLLOW.
    """
    top = beneath.open_directory(unit_dir) if dir_fd is None else dir_fd
    try:
        fd, _ = beneath.open_regular(top, filename)
    finally:
        if top != dir_fd:
            os.close(top)
    try:
        return _read_at_most(fd, limit)
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --- fast path: the C parser, trusted only when it accepts --------------------------------

_DEFER: Any = object()  # "ask the strict parser"
# Before 3.12 the C parser's nesting guard is sys.getrecursionlimit(); raised far above the
# default, a deep `[[[[` could overflow the C stack, so only the strict parser is used then.
_C_SAFE_RECURSION_LIMIT = 10_000
# The C parser's integer limit depends on PYTHONINTMAXSTRDIGITS; ours does not. The lookbehind
# starts a match only at the first digit of a run, keeping the search linear.
_LONG_DIGITS = re.compile(rf"(?<![0-9])[0-9]{{{_MAX_INT_DIGITS + 1}}}")


class _DeferError(Exception):
    pass


def _refuse(_: object) -> Any:
    raise _DeferError  # NaN, Infinity, -Infinity


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _DeferError
    return members


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):
        raise _DeferError
    return number


_C_DECODER = json.JSONDecoder(
    parse_constant=_refuse, parse_float=_finite_float, object_pairs_hook=_unique_members
)


def _fast_parse(text: str, max_depth: int) -> Any:
    """The document if the C parser accepts it within `max_depth`, else `_DEFER`."""
    if sys.getrecursionlimit() > _C_SAFE_RECURSION_LIMIT or _LONG_DIGITS.search(text):
        return _DEFER
    try:
        document = _C_DECODER.decode(text)
    except (ValueError, RecursionError, _DeferError):  # ValueError: syntax, huge integers
        return _DEFER
    level = [document] if isinstance(document, (dict, list)) else []
    for _ in range(max_depth):  # breadth-first, one nesting level per round
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (dict, list))
        ]
    return _DEFER if level else document


# --- strict parser ------------------------------------------------------------------------


class _InvalidError(Exception):
    """Parsing stopped at character offset `pos`."""

    def __init__(self, code: str, message: str, pos: int, pointer: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.pos, self.pointer = code, message, pos, pointer


def _syntax(message: str, pos: int) -> _InvalidError:
    return _InvalidError("metadata_syntax", message, pos)


def _skip(text: str, pos: int) -> int:
    """The offset of the first non-whitespace character at or after `pos`."""
    match = _WS.match(text, pos)
    return match.end() if match else pos


class _ObjectFrame:
    __slots__ = ("container", "key", "keys", "path", "start")
    closer = "}"

    def __init__(self, start: int, build: bool, path: JsonPath | None) -> None:
        self.container: dict[str, Any] | None = {} if build else None
        self.keys: set[str] = set()  # for duplicates, also when nothing is built
        self.start, self.key, self.path = start, "", path

    def add(self, value: Any) -> None:
        if self.container is not None:
            self.container[self.key] = value

    def token(self) -> str | int:
        return self.key


class _ArrayFrame:
    __slots__ = ("container", "count", "path", "start")
    closer = "]"

    def __init__(self, start: int, build: bool, path: JsonPath | None) -> None:
        self.container: list[Any] | None = [] if build else None
        self.start, self.count, self.path = start, 0, path

    def add(self, value: Any) -> None:
        self.count += 1
        if self.container is not None:
            self.container.append(value)

    def token(self) -> str | int:
        return self.count


class _Parser:
    """Strict RFC 8259 parser with an explicit stack.

    With `build`, `parse()` returns the document; without it the text is only checked (memory:
    the open containers' keys, whatever the size of the document). `targets`: paths whose
    values' start offsets to record in `found`; only containers on the way to one track
    their path, so locating costs one pass and no per-value memory.
    """

    def __init__(
        self,
        text: str,
        max_depth: int,
        *,
        build: bool = True,
        targets: Iterable[JsonPath] = (),
    ) -> None:
        self.text, self.max_depth, self.build = text, max_depth, build
        self.stack: list[_ObjectFrame | _ArrayFrame] = []
        self.duplicates: list[tuple[JsonPath, int]] = []  # (path, offset of the repeated key)
        self.targets = set(targets)
        self.prefixes = {path[:i] for path in self.targets for i in range(len(path) + 1)}
        self.found: dict[JsonPath, int] = {}  # target path -> where its value starts
        self.root_start = 0
        self.result: Any = None

    def parse(self) -> Any:
        text = self.text
        pos = self.root_start = _skip(text, 0)
        if pos == len(text):
            raise _syntax("empty document; expected a JSON value", pos)
        while True:
            start, ch = pos, text[pos : pos + 1]
            path = self._arrive(start) if self.prefixes else None
            if ch in ("{", "["):
                frame = self._push(ch, pos, path)
                pos = _skip(text, pos + 1)
                if not text.startswith(frame.closer, pos):
                    pos = self._member(pos, comma=None)
                    continue
                value, pos = self._pop(pos)
            else:
                value, pos = self._scalar(pos)
            next_pos = self._after_value(value, pos)
            if next_pos is None:
                return self.result
            pos = next_pos

    def _arrive(self, start: int) -> JsonPath | None:
        """The path of the value starting at `start`, if it leads to a target (else None);
        records the offset of a target."""
        if not self.stack:
            path: JsonPath = ()
        else:
            parent = self.stack[-1]
            if parent.path is None:
                return None
            path = (*parent.path, parent.token())
        if path in self.targets:
            self.found[path] = start
        return path if path in self.prefixes else None

    def _after_value(self, value: Any, pos: int) -> int | None:
        """Attach a finished value, consume separators and closers; None at document end."""
        text = self.text
        while self.stack:
            frame = self.stack[-1]
            frame.add(value)
            pos = _skip(text, pos)
            ch = text[pos : pos + 1]
            if ch == ",":
                return self._member(_skip(text, pos + 1), comma=pos)
            if ch != frame.closer:
                after = "object member" if frame.closer == "}" else "array element"
                raise _syntax(_unexpected(ch, f"',' or '{frame.closer}' after {after}"), pos)
            value, pos = self._pop(pos)
        pos = _skip(text, pos)
        if pos < len(text):
            raise _syntax(_unexpected(text[pos], "the end of the document"), pos)
        self.result = value
        return None

    def _push(self, ch: str, pos: int, path: JsonPath | None) -> _ObjectFrame | _ArrayFrame:
        if len(self.stack) >= self.max_depth:
            message = f"nesting is deeper than max_depth ({self.max_depth})"
            raise _InvalidError("metadata_too_deep", message, pos, pointer(self._path()))
        frame_type = _ObjectFrame if ch == "{" else _ArrayFrame
        frame = frame_type(pos, self.build, path)
        self.stack.append(frame)
        return frame

    def _pop(self, pos: int) -> tuple[Any, int]:
        return self.stack.pop().container, pos + 1

    def _path(self) -> JsonPath:
        return tuple(frame.token() for frame in self.stack)

    def _member(self, pos: int, comma: int | None) -> int:
        """Where the next member's value starts; for objects, after its key and colon."""
        frame, text = self.stack[-1], self.text
        if comma is not None and text.startswith(frame.closer, pos):
            raise _syntax(f"trailing comma before '{frame.closer}'", comma)
        if isinstance(frame, _ArrayFrame):
            return pos
        if not text.startswith('"', pos):
            word = _WORD.match(text, pos)
            if word is not None:
                raise _syntax(f"object key {word.group()[:40]!r} must be in double quotes", pos)
            raise _syntax(_unexpected(text[pos : pos + 1], "a string object key"), pos)
        key, end = self._string(pos)
        if key in frame.keys:
            if len(self.duplicates) < MAX_PROBLEMS:
                self.duplicates.append(((*self._path()[:-1], key), pos))
        else:
            frame.keys.add(key)
        frame.key = key
        pos = _skip(text, end)
        if not text.startswith(":", pos):
            raise _syntax(_unexpected(text[pos : pos + 1], "':' after object key"), pos)
        return _skip(text, pos + 1)

    def _scalar(self, pos: int) -> tuple[Any, int]:
        text = self.text
        ch = text[pos : pos + 1]
        if ch == '"':
            return self._string(pos)
        if ch == "-" or "0" <= ch <= "9":
            return self._number(pos)
        word = _WORD.match(text, pos)
        if word is None:
            raise _syntax(_unexpected(ch, "a JSON value"), pos)
        name = word.group()
        if name in _LITERALS:
            return _LITERALS[name], word.end()
        if name in ("NaN", "Infinity"):
            raise _syntax(f"{name} is not allowed in JSON", pos)
        if name in _PYTHON_LITERALS:
            raise _syntax(f"{name} is not JSON; use {_PYTHON_LITERALS[name]}", pos)
        raise _syntax(f"unexpected {name[:40]!r}; expected a JSON value", pos)

    def _number(self, pos: int) -> tuple[int | float, int]:
        text = self.text
        match = _NUMBER.match(text, pos)
        if match is None:
            if text.startswith("-Infinity", pos):
                raise _syntax("-Infinity is not allowed in JSON", pos)
            raise _syntax("invalid number: expected a digit after '-'", pos)
        literal, end = match.group(), match.end()
        if text[end : end + 1] in _NUMBER_TAIL:
            if literal.lstrip("-") == "0" and text[end : end + 1].isdigit():
                raise _syntax("numbers must not have leading zeros", pos)
            raise _syntax(f"invalid number {text[pos : end + 1][:40]!r}", end)
        if match.group(1) or match.group(2):
            number = float(literal)
            if math.isinf(number):
                raise _syntax(f"number out of range: {literal[:40]}", pos)
            return number, end
        if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
            raise _syntax(f"number out of range: more than {_MAX_INT_DIGITS} digits", pos)
        try:
            return int(literal), end
        except ValueError:  # PYTHONINTMAXSTRDIGITS may set a lower limit
            raise _syntax("number out of range: too many digits", pos) from None

    def _string(self, pos: int) -> tuple[str, int]:
        """Decode the string whose opening quote is at `pos`; returns (value, end offset)."""
        text = self.text
        plain = _PLAIN_STRING.match(text, pos)
        if plain is not None:  # fast path: no escapes
            return plain.group(1), plain.end()
        parts: list[str] = []
        i = pos + 1
        while True:
            chunk = _STRING_CHUNK.match(text, i)
            chunk_end = chunk.end() if chunk else i
            parts.append(text[i:chunk_end])
            i, ch = chunk_end, text[chunk_end : chunk_end + 1]
            if ch == '"':
                return "".join(parts), i + 1
            if ch == "":
                raise _syntax("unterminated string", pos)
            if ch != "\\":
                raise _syntax(f"control character U+{ord(ch):04X} in string must be escaped", i)
            char, i = self._escape(i)
            parts.append(char)

    def _escape(self, i: int) -> tuple[str, int]:
        text = self.text
        esc = text[i + 1 : i + 2]
        if esc in _ESCAPES:
            return _ESCAPES[esc], i + 2
        if esc != "u":
            raise _syntax(f"invalid escape: backslash followed by {esc!r}", i)
        if _HEX4.match(text, i + 2) is None:
            raise _syntax("invalid \\u escape: expected 4 hex digits", i)
        code = int(text[i + 2 : i + 6], 16)
        # A high surrogate followed by a low one is one character; lone ones are kept (RFC 8259).
        if 0xD800 <= code <= 0xDBFF and text.startswith("\\u", i + 6) and _HEX4.match(text, i + 8):
            low = int(text[i + 8 : i + 12], 16)
            if 0xDC00 <= low <= 0xDFFF:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), i + 12
        return chr(code), i + 6


def _unexpected(ch: str, expected: str) -> str:
    if ch == "":
        return f"unexpected end of document; expected {expected}"
    if ch == "'":
        return "strings must use double quotes, not single quotes"
    if ch == "/":
        return "comments are not allowed in JSON"
    return f"unexpected character {ch!r}; expected {expected}"


# --- locations ----------------------------------------------------------------------------


class _Locator:
    """The strict parser's verdict on a text, and where its values start.

    Each question is one pass of `_Parser` that builds nothing it was not asked for, so a
    hostile document costs time linear in its length and memory for its nesting, not for
    every value it holds. Lines and columns are counted on demand (no table of line starts).
    """

    def __init__(self, text: str, max_depth: int) -> None:
        self.text, self.max_depth = text, max_depth

    def parse(self, file: str) -> tuple[Any, list[Problem]]:
        """(document, []) when the text is strict JSON, else (None, problems). The text is
        checked first; the document is built only when it is valid."""
        checker = _Parser(self.text, self.max_depth, build=False)
        try:
            checker.parse()
        except _InvalidError as err:
            line, column = self.line_column(err.pos)
            return None, [Problem(err.code, err.message, file, line, column, err.pointer)]
        problems = []
        for path, offset in checker.duplicates:
            line, column = self.line_column(offset)
            message = f"duplicate object key {str(path[-1])[:80]!r}"
            problems.append(
                Problem("metadata_duplicate_key", message, file, line, column, pointer(path))
            )
        if problems:
            return None, problems
        return _Parser(self.text, self.max_depth).parse(), []

    def locate(self, paths: Iterable[JsonPath]) -> dict[JsonPath, tuple[int, int]]:
        """Line and column where the value at each path starts; paths the document does not
        have are left out. Only asked about documents that parsed."""
        parser = _Parser(self.text, self.max_depth, build=False, targets=paths)
        try:
            parser.parse()
        except _InvalidError:
            return {}
        return {path: self.line_column(offset) for path, offset in parser.found.items()}

    def line_column(self, offset: int) -> tuple[int, int]:
        return _line_column(self.text, offset)


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of `offset`; CR, LF and CRLF end lines."""
    breaks = text.count("\n", 0, offset) + text.count("\r", 0, offset)
    breaks -= text.count("\r\n", 0, offset)
    line_start = max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1
    return breaks + 1, offset - line_start + 1


def pointer(path: Iterable[str | int]) -> str:
    """The RFC 6901 JSON pointer for `path` (`~` and `/` escaped)."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in path)


def _encoding_problem(exc: UnicodeDecodeError, file: str) -> Problem:
    body = exc.object  # what was decoded: the BOM, if any, is already gone (a second one stays)
    valid = body[: exc.start].decode("utf-8")  # cannot fail: the first bad byte is at start
    line, column = _line_column(valid, len(valid))
    message = f"not valid UTF-8: byte 0x{body[exc.start]:02x} ({exc.reason})"
    return Problem("metadata_encoding", message, file, line, column)


# --- metrics ------------------------------------------------------------------------------

_Found: TypeAlias = tuple[JsonPath, JsonPath, str]  # (pointer path, path located, message)


def _metrics_problems(document: Any, file: str, locator: _Locator) -> list[Problem]:
    """SPEC §7: `metrics`, when present, is an array of {name, numberValue} objects."""
    if not isinstance(document, dict) or "metrics" not in document:
        return []
    metrics = document["metrics"]
    found: list[_Found] = []
    if not isinstance(metrics, list):
        here: JsonPath = ("metrics",)
        found.append((here, here, f"metrics must be an array, got {_type(metrics)}"))
    else:
        for i, item in enumerate(metrics):
            found.extend(_metric_problems(i, item))
    found = found[:MAX_PROBLEMS]
    if not found:  # valid metrics: nothing to locate, no second parse
        return []
    where = locator.locate(located for _, located, _ in found)
    problems = []
    for path, located, message in found:
        line, column = where.get(located, (None, None))
        problems.append(Problem("metadata_metrics", message, file, line, column, pointer(path)))
    return problems


def _metric_problems(i: int, item: Any) -> list[_Found]:
    here: JsonPath = ("metrics", i)
    if not isinstance(item, dict):
        return [(here, here, f"metrics[{i}] must be an object, got {_type(item)}")]
    found: list[_Found] = []
    name, value = item.get("name"), item.get("numberValue")
    if not isinstance(name, str) or not name:
        found.append(_member_problem(item, here, "name", "a non-empty string"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        found.append(_member_problem(item, here, "numberValue", "a finite number"))
    return found


def _finite(value: float) -> bool:
    """True for a number a double holds finitely: an integer too large for one is not."""
    try:
        return math.isfinite(value)
    except OverflowError:  # the conversion of an int beyond about 1.8e308 to a double
        return False


def _member_problem(item: dict[str, Any], here: JsonPath, key: str, rule: str) -> _Found:
    """Locate the member's value when it exists, else the metric object itself."""
    message = f"metrics[{here[1]}].{key} must be {rule}"
    if key not in item:
        return (*here, key), here, f"{message}, but it is missing"
    got = "an empty string" if item[key] == "" else _type(item[key])
    if got == "number":  # the only numbers that fail: integers beyond a double's range
        got = f"an integer of {len(str(abs(item[key])))} digits, too large for a double"
    return (*here, key), (*here, key), f"{message}, got {got}"


def _type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# --- schema -------------------------------------------------------------------------------


class SchemaValidator:
    """A JSON Schema (`metadata.schema`) every metadata document must satisfy.

    The schema must be self-contained: `$ref`s to other files or URLs are not fetched, and a
    document that reaches one gets a `metadata_schema` problem saying so.
    """

    __slots__ = ("_unresolvable", "_validator", "path")

    def __init__(self, validator: Any, path: str) -> None:
        self._validator = validator  # a jsonschema validator instance
        references = importlib.import_module("referencing.exceptions")  # jsonschema's dependency
        self._unresolvable: type[Exception] = references.Unresolvable
        self.path = path

    @classmethod
    def from_file(cls, path: str) -> SchemaValidator:
        """Load and check a schema; errors are `ConfigError("metadata.schema: <path>: ...")`."""
        jsonschema = _import_jsonschema()
        try:
            with open(path, "rb") as f:
                schema = json.loads(f.read())
        except OSError as exc:
            raise ConfigError(f"metadata.schema: {path}: {exc.strerror or exc}") from None
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"metadata.schema: {path}: not valid JSON: {exc}") from None
        validator_cls = _validator_class(jsonschema, schema, path)
        try:
            validator_cls.check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            where = pointer(exc.absolute_path) or "/"
            message = f"metadata.schema: {path}: invalid JSON Schema at {where}: {exc.message}"
            raise ConfigError(message) from None
        # An empty registry: `$ref`s resolve within the schema only, never over the network
        # (jsonschema's default still fetches remote URLs, deprecated).
        registry = importlib.import_module("referencing").Registry()
        return cls(validator_cls(schema, registry=registry), path)

    def problems(self, document: Any, *, file: str) -> list[Problem]:
        """One `metadata_schema` problem per violation, sorted by pointer, at most 50."""
        return self._problems_at(document, file, None)

    def _problems_at(self, document: Any, file: str, locator: _Locator | None) -> list[Problem]:
        """`problems`, with line/column when `locator` knows where the values are."""
        try:
            errors = sorted(self._validator.iter_errors(document), key=_error_order)
        except self._unresolvable as exc:  # the schema's fault: report it, do not crash
            message = f"schema {self.path} has a $ref that cannot be resolved: {exc}"
            return [Problem("metadata_schema", _shorten(message), file)]
        except (OverflowError, RecursionError, ValueError):
            # jsonschema converts numbers to doubles (multipleOf) and recurses once per level:
            # the document holds a value it cannot check. Name the numbers, where there are.
            return _unchecked(document, file, locator, self.path)
        errors = errors[:MAX_PROBLEMS]
        paths = [tuple(error.absolute_path) for error in errors]
        where = locator.locate(paths) if locator else {}
        problems = []
        for error, path in zip(errors, paths, strict=True):
            line, column = where.get(path, (None, None))
            message = _shorten(error.message)
            problems.append(Problem("metadata_schema", message, file, line, column, pointer(path)))
        return problems


def _unchecked(document: Any, file: str, locator: _Locator | None, schema: str) -> list[Problem]:
    """Problems for a document the schema validator failed on (see `_problems_at`)."""
    paths = _huge_integers(document)
    if not paths:
        message = f"the document cannot be checked against schema {schema} (nested too deeply)"
        return [Problem("metadata_schema", message, file)]
    where = locator.locate(paths) if locator else {}
    problems = []
    for path in paths:
        line, column = where.get(path, (None, None))
        message = "integer too large for a double; it cannot be checked against the schema"
        problems.append(Problem("metadata_schema", message, file, line, column, pointer(path)))
    return problems


def _huge_integers(document: Any) -> list[JsonPath]:
    """Where the document holds integers beyond a double's range (at most MAX_PROBLEMS)."""
    found: list[JsonPath] = []
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack and len(found) < MAX_PROBLEMS:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend(((*path, key), child) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), child) for index, child in enumerate(value))
        elif type(value) is int and not _finite(value):
            found.append(path)
    return sorted(found, key=pointer)


def _import_jsonschema() -> Any:
    # An optional extra: imported only when a schema is configured.
    try:
        return importlib.import_module("jsonschema")
    except ImportError:
        message = (
            "metadata.schema: requires the 'jsonschema' package (pip install modelwatch[schema])"
        )
        raise ConfigError(message) from None


def _validator_class(jsonschema: Any, schema: Any, path: str) -> Any:
    """The validator for the schema's `$schema` dialect (2020-12 when it names none)."""
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"metadata.schema: {path}: a JSON Schema must be an object or boolean")
    uri = schema.get("$schema") if isinstance(schema, dict) else None
    if uri is None:
        return jsonschema.Draft202012Validator
    # An explicit default stops jsonschema silently using the latest draft for unknown URIs.
    found = (
        jsonschema.validators.validator_for(schema, default=None) if isinstance(uri, str) else None
    )
    if found is None:
        raise ConfigError(f"metadata.schema: {path}: unknown $schema {uri!r}")
    return found


def _error_order(error: Any) -> tuple[list[tuple[int, int, str]], str]:
    # Array indices sort numerically (/metrics/2 before /metrics/10).
    path = [(0, t, "") if isinstance(t, int) else (1, 0, str(t)) for t in error.absolute_path]
    return path, str(error.message)


def _shorten(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"
