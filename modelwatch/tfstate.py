"""TF's CheckpointState text proto (the `checkpoint` file next to a checkpoint's shards).

`checkpoint_prefix(text)` is the value of its last `model_checkpoint_path`, the prefix of the
checkpoint's `.index` and data files, as TF wrote it (absolute when TF saved to an absolute
path); ValueError when the text is not a CheckpointState. Linear in the text: the completeness
check and the describer both read the file through it.
"""

from __future__ import annotations

import os
import re

# TF's CheckpointState text proto, one field per line. Every pattern below is anchored at a
# line start and built from disjoint character classes, so a match attempt never backtracks
# over more than one line's leading whitespace and field name: the parse is linear in the file.
_NOT_A_FIELD = re.compile(rb"^(?![ \t\r\f\v]*(?:#|[A-Za-z_]\w*[ \t\r\f\v]*:|$))", re.MULTILINE)
_PATH_FIELD = re.compile(rb"^[ \t\r\f\v]*model_checkpoint_path[ \t\r\f\v]*:([^\n]*)", re.MULTILINE)
_IN_STRING = {
    quote: re.compile(
        rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.)|\Z)|" + re.escape(quote), re.DOTALL
    )
    for quote in (b'"', b"'")
}
_SIMPLE_ESCAPES = dict(zip(b"ntrabfv\\'\"?", b"\n\t\r\a\b\f\v\\'\"?", strict=True))
# No file name is longer than PATH_MAX (4096 bytes), and text format spends at most 4 bytes on
# one (`\ooo`): a longer literal names no file, and is refused before it is decoded.
_MAX_PATH_LITERAL = 4 * 4096 + 2


def checkpoint_prefix(text: bytes) -> str:
    """`model_checkpoint_path` of TF's CheckpointState text proto; ValueError if unparseable.

    Every line must be blank, a `#` comment or `name: value`; only the value of the last
    `model_checkpoint_path` matters, and every one of them must be one quoted string.
    """
    if _NOT_A_FIELD.search(text) is not None:
        raise ValueError("not a text-format line")
    prefix: str | None = None
    for field in _PATH_FIELD.finditer(text):
        prefix = os.fsdecode(_unquote(field.group(1).strip()))
    if not prefix:
        raise ValueError("no model_checkpoint_path")
    return prefix


def _unquote(literal: bytes) -> bytes:
    """The bytes of a protobuf text-format string literal (C escapes, octal for non-ASCII)."""
    quote = literal[:1]
    if quote not in _IN_STRING or len(literal) < 2 or not literal.endswith(quote):
        raise ValueError("value is not one quoted string")
    if len(literal) > _MAX_PATH_LITERAL:
        raise ValueError(f"value longer than any path ({len(literal)} bytes)")
    return _IN_STRING[quote].sub(_unescape, literal[1:-1])


def _unescape(match: re.Match[bytes]) -> bytes:
    if not match.group().startswith(b"\\"):
        raise ValueError("value is not one quoted string")  # the closing quote came early
    octal, hexadecimal, char = match.groups()
    if octal is not None and int(octal, 8) < 256:
        return bytes([int(octal, 8)])
    if hexadecimal is not None:
        return bytes([int(hexadecimal, 16)])
    if char is not None and char[0] in _SIMPLE_ESCAPES:
        return bytes([_SIMPLE_ESCAPES[char[0]]])
    if octal is None and char is None:
        raise ValueError("value is not one quoted string")  # a backslash escaping the end
    raise ValueError("bad escape in string")
