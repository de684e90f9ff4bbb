"""Every parser of untrusted bytes, fuzzed with time and memory bounds asserted per example.

Each test feeds a parser arbitrary and pathological input (long runs of one byte, huge
numbers, deep nesting, huge declared lengths, truncations) and asserts, for every example,
that it returns or raises only its documented error, within:

- TIME_BOUND seconds. The parsers are linear: the largest inputs here (a few MiB) take well
  under 0.2 s each, while the quadratic regex this file was written against needed 3 s for
  14 KB and hours for 1 MiB. The bound leaves ample headroom for a loaded CI machine (and for
  tracemalloc, which slows allocation) and still catches any super-linear blow-up.
- a memory bound (tracemalloc peak) per parser, stated next to each test: the streaming
  readers (safetensors headers, `*.index.json`, zip directories) hold a bounded window
  whatever their input; the whole-file readers (`checkpoint`, metadata) a small multiple of
  the input, which their own size caps bound.

`MODELWATCH_FUZZ_EXAMPLES` scales the example counts (`tests/conftest.py`).
"""

from __future__ import annotations

import os
import re
import time
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelwatch import formats
from tests.conftest import examples

MiB = 1 << 20
TIME_BOUND = 2.0

T = TypeVar("T")

fuzz = settings(
    max_examples=examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def bounded(call: Callable[[], T], *, peak: int, seconds: float = TIME_BOUND) -> T:
    """`call()`, asserting it took less than `seconds` and allocated at most `peak` bytes at
    its high-water mark (exceptions propagate: the caller says which ones are documented)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        return call()
    finally:
        took = time.perf_counter() - started
        high = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert took < seconds, f"took {took:.2f} s (bound {seconds} s)"
        assert high <= peak, f"peak {high} bytes (bound {peak})"


def runs(pieces: list[bytes], *, max_run: int = MiB) -> st.SearchStrategy[bytes]:
    """Pathological shapes: `pieces` joined with long runs of one byte or one piece."""
    run = st.builds(
        lambda unit, count: unit * count,
        st.sampled_from([*pieces, b" ", b"\n", b"0", b"\\", b'"', b"[", b"{", b"\xff", b"\0"]),
        st.integers(0, max_run),
    )
    return st.lists(st.sampled_from(pieces) | run, max_size=6).map(b"".join)


# --- TF `checkpoint` (CheckpointState text proto) ----------------------------------------


def checkpoint_prefix_reference(text: bytes) -> str:
    """The parser as it was before it was made linear (quadratic on long lines): the accepted
    language the new one must keep. Used on short inputs only."""
    field_re = re.compile(rb"\s*([A-Za-z_]\w*)\s*:\s*(.*?)\s*")
    string_re = re.compile(rb'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'', re.DOTALL)
    prefix = None
    for line in text.split(b"\n"):
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        field = field_re.fullmatch(line)
        if field is None:
            raise ValueError("not a text-format line")
        if field.group(1) == b"model_checkpoint_path":
            string = string_re.fullmatch(field.group(2))
            if string is None:
                raise ValueError("value is not one quoted string")
            prefix = os.fsdecode(formats._unquote(string.group()))
    if not prefix:
        raise ValueError("no model_checkpoint_path")
    return prefix


CHECKPOINT_PIECES = [
    b"model_checkpoint_path",
    b"all_model_checkpoint_paths",
    b"last_preserved_timestamp: 1.5e9",
    b": ",
    b":",
    b'"',
    b"'",
    b"ckpt-1",
    b"\\303\\250",
    b"\\x4",
    b"\\q",
    b"\\",
    b"\n",
    b"# comment",
    b"\t",
    b"\r",
]


def checkpoint_text() -> st.SearchStrategy[bytes]:
    line = st.builds(
        lambda key, quote, body: key + b": " + quote + body + quote + b"\n",
        st.sampled_from([b"model_checkpoint_path", b"all_model_checkpoint_paths", b" x"]),
        st.sampled_from([b'"', b"'", b""]),
        st.lists(st.sampled_from(CHECKPOINT_PIECES[5:]), max_size=6).map(b"".join),
    )
    return st.lists(line | st.sampled_from(CHECKPOINT_PIECES), max_size=8).map(b"".join)


def parse_checkpoint(text: bytes) -> str | ValueError:
    try:
        return formats._checkpoint_prefix(text)
    except ValueError as exc:  # the documented error
        return exc


@fuzz
@given(text=checkpoint_text() | st.binary(max_size=200))
def test_checkpoint_parser_accepts_what_it_always_accepted(text: bytes) -> None:
    """The linear `checkpoint` parser accepts exactly the files the old one did, with the
    same prefix."""
    try:
        expected: str | None = checkpoint_prefix_reference(text)
    except ValueError:
        expected = None
    got = parse_checkpoint(text)
    assert (None if isinstance(got, ValueError) else got) == expected


@fuzz
@given(text=runs(CHECKPOINT_PIECES))
def test_checkpoint_parser_is_linear_on_pathological_text(text: bytes) -> None:
    """Long runs (a MiB of spaces inside a field, of backslashes, of newlines) parse within
    the time bound; memory stays within a small multiple of the text (the file cap is
    16 MiB)."""
    result = bounded(lambda: parse_checkpoint(text), peak=2 * len(text) + 64 * 1024)
    assert isinstance(result, (str, ValueError))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b'model_checkpoint_path: "x"' + b" " * 32 * 1024 + b"y\n", "not one quoted string"),
        (b'model_checkpoint_path: "x"' + b" " * MiB + b"y\n", "not one quoted string"),
        (b'model_checkpoint_path: "' + b"\\n" * MiB + b'"\n', "longer than any path"),
        (b"\n" * (16 * MiB), "no model_checkpoint_path"),
    ],
    ids=["spaces-32k", "spaces-1m", "escapes", "newlines"],
)
def test_hostile_checkpoint_is_refused_quickly(text: bytes, why: str) -> None:
    """The `checkpoint` that took 3 s per 14 KB (hours per MiB) is refused within the bound."""
    result = bounded(lambda: parse_checkpoint(text), peak=2 * len(text) + 64 * 1024)
    assert isinstance(result, ValueError) and why in str(result)
