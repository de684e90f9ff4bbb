"""Every parser of untrusted bytes, fuzzed with time and memory bounds asserted per example.

Each test feeds a parser arbitrary and pathological input (long runs of one byte, huge
numbers, deep nesting, huge declared lengths, truncations) and asserts, for every example,
that it returns or raises only its documented error, within:

- TIME_BOUND seconds. The parsers are linear: the largest inputs here (a few MiB) take well
  under 0.2 s each, while the quadratic regex this file was written against needed 3 s for
  14 KB and hours for 1 MiB. The bound leaves ample headroom for a loaded CI machine (three
  test workers on two cores, and tracemalloc, which slows allocation: 4 s was seen for an
  input that takes 0.1 s alone) and still catches any super-linear blow-up.
- a memory bound (tracemalloc peak) per parser, stated next to each test: the streaming
  readers (safetensors headers, `*.index.json`, zip directories) hold a bounded window
  whatever their input; the whole-file readers (`checkpoint`, metadata) a small multiple of
  the input, which their own size caps bound.

`MODELWATCH_FUZZ_EXAMPLES` scales the example counts (`tests/conftest.py`).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelwatch import completeness, formats, jsonscan, metadata, tfstate, zipdir
from modelwatch.metadata import validate_metadata_bytes
from tests.conftest import examples

MiB = 1 << 20
TIME_BOUND = 10.0

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


# A fresh interpreter with modelwatch imported peaks at about 20 MiB RSS; the bounded readers
# add a few MiB of windows. The sidecar runs in 256 MiB.
RSS_BOUND = 64 * MiB


def completeness_in_subprocess(unit: Path) -> tuple[str | None, int]:
    """`check_complete` on `unit` in a fresh interpreter: (reason, peak RSS in bytes)."""
    code = (
        "import json, os, sys\n"
        "from modelwatch.formats import check_complete, detect_format\n"
        "unit = sys.argv[1]\n"
        "sizes = {n: os.path.getsize(os.path.join(unit, n)) for n in os.listdir(unit)}\n"
        "found = check_complete(unit, detect_format(sizes), sizes)\n"
        "reason = found and found.message\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "rss = int(status.split()[0]) * 1024\n"
        "print(json.dumps([reason, rss]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(unit)], capture_output=True, check=True, timeout=120
    )
    reason, rss = json.loads(done.stdout)
    return reason, rss


def runs(pieces: list[bytes], *, max_run: int = MiB) -> st.SearchStrategy[bytes]:
    """Pathological shapes: `pieces` joined with runs (up to `max_run` bytes each) of one
    byte or one piece repeated."""
    run = st.builds(
        lambda unit, count: (unit * (count // len(unit) + 1))[:count],
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
            prefix = os.fsdecode(tfstate._unquote(string.group()))
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
        return tfstate.checkpoint_prefix(text)
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
    got = bounded(lambda: parse_checkpoint(text), peak=2 * len(text) + 64 * 1024)
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


# --- zip central directories (torch.save zips, .keras) -----------------------------------

ZIP_PEAK = 4 * MiB  # one 1 MiB window, the 64 KiB end-record search, slack: never the input
# Reading a member adds its inflater: a compressed window, up to a window of output and the
# input it has not consumed yet (what the caller keeps of the output is the caller's).
MEMBER_PEAK = 8 * MiB


def check_zip_bytes(tmp_path: Path, data: bytes) -> int | zipdir.ZipError:
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return zipdir.check_central_directory(fd, len(data), zipdir.MAX_DIRECTORY)
    except zipdir.ZipError as exc:  # the documented error
        return exc
    finally:
        os.close(fd)


@st.composite
def real_zips(draw: st.DrawFn) -> bytes:
    """Zips as zipfile writes them: UTF-8 and cp437 names, comments, ZIP64 records, extra
    fields, data prepended to the archive."""
    buffer = io.BytesIO()
    buffer.write(draw(st.sampled_from([b"", b"#!/bin/sh\nprepended\n"])))
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in draw(st.lists(st.text(min_size=1, max_size=5), max_size=4, unique=True)):
            info = zipfile.ZipInfo(name)
            info.comment = draw(st.binary(max_size=4))
            info.extra = draw(st.sampled_from([b"", b"\x99\x99\x02\x00ab"]))
            with archive.open(info, "w", force_zip64=draw(st.booleans())) as member:
                member.write(draw(st.binary(max_size=8)))
        archive.comment = draw(st.binary(max_size=8))
    return buffer.getvalue()


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    cut = st.integers(0, len(data))
    splice = st.builds(
        lambda a, junk, b: data[:a] + junk + data[b:], cut, st.binary(max_size=6), cut
    )
    return st.just(data) | splice | cut.map(lambda n: data[:n])


@fuzz
@given(data=real_zips().flatmap(mutated))
def test_zip_check_never_accepts_what_zipfile_refuses(tmp_path: Path, data: bytes) -> None:
    """A zip the check accepts opens with zipfile, with the same number of entries; real
    zips (comments, ZIP64, prepended data) are accepted."""
    result = bounded(lambda: check_zip_bytes(tmp_path, data), peak=ZIP_PEAK)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries: int | None = len(archive.infolist())
    except Exception:  # zipfile raises many types on corrupt input
        entries = None
    if not isinstance(result, zipdir.ZipError):
        assert result == entries


def read_members(tmp_path: Path, data: bytes, cap: int) -> dict[str, bytes] | zipdir.ZipError:
    """Every member of the zip `data` as `find_members` and `member_chunks` read it."""
    path = tmp_path / "m.keras"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        found = zipdir.find_members(fd, len(data), zipdir.MAX_DIRECTORY, lambda name: True)
        return {m.name: b"".join(zipdir.member_chunks(fd, len(data), m, cap)) for m in found}
    except zipdir.ZipError as exc:
        return exc
    finally:
        os.close(fd)


@fuzz
@given(
    members=st.dictionaries(st.text(min_size=1, max_size=5), st.binary(max_size=3000), max_size=4),
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
    prefix=st.sampled_from([b"", b"#!/bin/sh\nprepended\n"]),
    zip64=st.booleans(),
)
def test_zip_members_read_as_zipfile_reads_them(
    tmp_path: Path, members: dict[str, bytes], method: int, prefix: bytes, zip64: bool
) -> None:
    """Stored and deflated members (ZIP64 records, data prepended to the archive) read the
    same bytes as zipfile, within ZIP_PEAK."""
    buffer = io.BytesIO(prefix)
    buffer.seek(len(prefix))
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in members.items():
            with archive.open(zipfile.ZipInfo(name), "w", force_zip64=zip64) as member:
                member.write(content)
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        expected = {info.filename: archive.read(info) for info in archive.infolist()}
    assert bounded(lambda: read_members(tmp_path, data, MiB), peak=MEMBER_PEAK) == expected


@fuzz
@given(data=real_zips().flatmap(mutated))
def test_damaged_zip_members_are_an_error_never_a_crash(tmp_path: Path, data: bytes) -> None:
    """Cut, spliced or garbled zips: each member reads as zipfile reads it, or ZipError."""
    result = bounded(lambda: read_members(tmp_path, data, MiB), peak=MEMBER_PEAK)
    assert isinstance(result, (dict, zipdir.ZipError))


def test_a_zip_bomb_member_is_read_no_further_than_its_cap(tmp_path: Path) -> None:
    """A deflated member of 1 GiB of zeros (1 MiB in the zip) stops at the reader's cap
    (`TooLarge`), one window in memory at a time."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("config.json", "w", force_zip64=True) as member,
    ):
        for _ in range(1024):
            member.write(bytes(MiB))
    path = tmp_path / "m.keras"
    path.write_bytes(buffer.getvalue())
    fd = os.open(path, os.O_RDONLY)

    def read() -> int:
        size = os.fstat(fd).st_size
        (found,) = zipdir.find_members(fd, size, zipdir.MAX_DIRECTORY, lambda name: True)
        return sum(len(piece) for piece in zipdir.member_chunks(fd, size, found, 16 * MiB))

    try:
        with pytest.raises(zipdir.TooLarge):
            bounded(read, peak=MEMBER_PEAK)
    finally:
        os.close(fd)


def end_record(count: int, size: int, offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, size, offset, len(comment))


def zip64_end(count: int, size: int, offset: int, disks: int = 1) -> bytes:
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    return record + struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, disks)


def central_entry(name: bytes = b"", extra: bytes = b"", flags: int = 0, sizes: int = 0) -> bytes:
    header = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, 0, 0, 0, 0, sizes, sizes,
        len(name), len(extra), 0, 0, 0, 0, sizes,
    )  # fmt: skip
    return header + name + extra


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def hostile_zips(draw: st.DrawFn) -> bytes:
    """Directories of many tiny entries and end records claiming anything at all."""
    entry = central_entry(
        draw(st.binary(max_size=3)),
        draw(st.sampled_from([b"", b"\x01\x00\x08\x00" + b"\0" * 8, b"\x01\x00\xff\xff"])),
        draw(st.sampled_from([0, 0x800])),
        draw(st.sampled_from([0, 0xFFFFFFFF])),
    )
    directory = entry * draw(st.integers(0, 20_000))
    body = b"PK\x03\x04" + b"\0" * draw(st.integers(0, 64))
    size = draw(st.sampled_from([len(directory)]) | u32)
    end = end_record(draw(st.integers(0, 0xFFFF)), size, draw(u32))
    if draw(st.booleans()):
        end = zip64_end(draw(u64), draw(st.sampled_from([len(directory)]) | u64), draw(u64)) + end
    return draw(mutated(body + directory + end))


@fuzz
@given(data=hostile_zips())
def test_zip_claims_cost_nothing(tmp_path: Path, data: bytes) -> None:
    """Whatever the end record claims (entry counts, 64-bit sizes and offsets) and however
    many entries there are, the check answers within the time and memory bound."""
    result = bounded(lambda: check_zip_bytes(tmp_path, data), peak=ZIP_PEAK)
    assert isinstance(result, (int, zipdir.ZipError))


def test_two_million_tiny_zip_entries_are_checked_in_bounded_memory(tmp_path: Path) -> None:
    """A torch.save zip whose central directory lists two million empty-named entries (92 MB;
    zipfile needed 730 MiB for it) is complete, checked within RSS_BOUND."""
    entries = 2_000_000
    with open(tmp_path / "w.pt", "wb") as out:
        out.write(b"PK\x03\x04" + b"\0" * 26)
        block = central_entry() * 10_000
        for _ in range(entries // 10_000):
            out.write(block)
        out.write(end_record(0xFFFF, entries * 46, 30))
    reason, rss = completeness_in_subprocess(tmp_path)
    assert reason is None
    assert rss < RSS_BOUND


# --- JSON inside model files (safetensors headers, *.index.json) --------------------------

# One 1 MiB chunk, the buffer it is appended to, its UTF-8 check, a value being built (at
# most 64 KiB of text) and slack. Never the input: the bound holds for any length.
JSON_PEAK = 8 * MiB

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
JSON_PIECES = [b"{", b"}", b"[", b"]", b",", b":", b'"', b'"k"', b"0", b"-1.5e3", b"true", b"null"]
JSON_PIECES += [b"\\u00e9", b"\\ud800", b"\\", b" ", b"\xc3\xa9", b"\xff", b"1" * 4301, b"NaN"]


def json_reference(data: bytes) -> Any:
    """What the scan must agree with: json.loads of the UTF-8 text, without NaN/Infinity."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def in_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def scan_whole(data: bytes, chunk: int) -> Any:
    pairs = list(jsonscan.scan(in_chunks(data, chunk), build_depth=0, max_depth=1000))
    assert len(pairs) == 1 and pairs[0][0] == ()
    return pairs[0][1]


def truncations(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(data)).map(lambda n: data[:n])


@fuzz
@given(
    data=json_values.map(lambda v: json.dumps(v).encode()).flatmap(
        lambda d: st.just(d) | truncations(d)
    )
    | st.lists(st.sampled_from(JSON_PIECES[:-2]), max_size=12).map(b"".join)
    | st.binary(max_size=40),
    chunk=st.integers(1, 64),
    depth=st.integers(1, 3),
)
def test_json_scan_agrees_with_json_loads(data: bytes, chunk: int, depth: int) -> None:
    """Read in chunks of any size, the scan accepts exactly the strict JSON json.loads
    accepts, and builds an equal value; so it does when values are too large to build
    (tiny max_value) and most of the input is only checked."""
    try:
        expected = json_reference(data)
    except (ValueError, RecursionError):
        expected = jsonscan.JsonError

    def whole() -> Any:
        try:
            return scan_whole(data, chunk)
        except jsonscan.JsonError:
            return jsonscan.JsonError

    def checked_only() -> bool:
        pieces = in_chunks(data, chunk)
        try:
            list(jsonscan.scan(pieces, build_depth=depth, max_depth=1000, max_value=4))
        except jsonscan.JsonError:
            return False
        return True

    assert bounded(whole, peak=JSON_PEAK) == expected
    assert bounded(checked_only, peak=JSON_PEAK) == (expected is not jsonscan.JsonError)


def test_empty_chunks_do_not_end_the_input() -> None:
    """A reader may hand over an empty piece mid-stream: the JSON goes on after it."""
    pairs = list(jsonscan.scan([b'{"a": [1,', b"", b" 2]}"], build_depth=1))
    assert pairs == [((), jsonscan.OBJECT), (("a",), [1, 2])]


@pytest.mark.parametrize("data", [b"[", b"[1,", b'{"a":', b'{"a": [1, {"b": ', b"[[]", b" "])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_json_cut_short_is_an_error(data: bytes, depth: int) -> None:
    """JSON that ends inside a container, after a comma or a colon, is an error (a cut-off
    `[1,` was once read as a complete array)."""
    with pytest.raises(jsonscan.JsonError):
        list(jsonscan.scan([data], build_depth=depth))


@settings(fuzz, max_examples=examples(40))
@given(data=runs(JSON_PIECES, max_run=64 * 1024), depth=st.integers(0, 3))
def test_json_scan_is_bounded_on_pathological_text(data: bytes, depth: int) -> None:
    """Long runs of one token, deep nesting, huge numbers: the scan ends or raises JsonError
    within the time bound, holding at most JSON_PEAK bytes."""

    def walk() -> int | jsonscan.JsonError:
        try:
            return sum(1 for _ in jsonscan.scan(in_chunks(data, MiB), build_depth=depth))
        except jsonscan.JsonError as exc:
            return exc

    bounded(walk, peak=JSON_PEAK)


def data_end_reference(header: bytes) -> int | None:
    """The safetensors check as it was (json.loads of the whole header): the data end, or None
    where it found the header malformed."""
    try:
        document = json_reference(header)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    end = 0
    for name, info in document.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not completeness._valid_offsets(offsets):
            return None
        end = max(end, offsets[1])  # type: ignore[index]
    return end


tensor_entries = st.fixed_dictionaries(
    {"dtype": st.just("F32"), "data_offsets": st.lists(st.integers(-2, 40), max_size=3)}
)
headers = st.dictionaries(
    st.sampled_from(["a", "b", "__metadata__", "w\u00e9"]) | st.text(max_size=4),
    tensor_entries | json_values,
    max_size=4,
).map(lambda d: json.dumps(d).encode()) | st.lists(
    st.sampled_from(JSON_PIECES[:-2]), max_size=10
).map(b"".join)


def write_safetensors_file(unit: Path, header: bytes, data: int, declared: int | None) -> None:
    with open(unit / "m.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(header) if declared is None else declared))
        out.write(header)
        out.truncate(8 + len(header) + data)  # sparse


@fuzz
@given(header=headers, data=st.integers(0, 64))
def test_safetensors_check_agrees_with_the_whole_header_parse(
    tmp_path_factory: pytest.TempPathFactory, header: bytes, data: int
) -> None:
    """The streamed header check finds a file complete exactly when parsing the whole header
    did (data end + header + 8 = size)."""
    unit = tmp_path_factory.mktemp("st")
    write_safetensors_file(unit, header, data, None)
    reason = bounded(lambda: check_unit(unit), peak=JSON_PEAK)
    assert (reason is None) == (data_end_reference(header) == data)


@fuzz
@given(
    header=runs(JSON_PIECES, max_run=64 * 1024) | headers,
    data=st.integers(0, 2**40),
    declared=st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 4096),
)
def test_safetensors_hostile_headers_are_bounded(
    tmp_path_factory: pytest.TempPathFactory, header: bytes, data: int, declared: int | None
) -> None:
    """Any header bytes, any declared header length (up to 2^64-1) and data size: a reason
    or complete, within the time bound and JSON_PEAK."""
    unit = tmp_path_factory.mktemp("st")
    write_safetensors_file(unit, header, data, declared)
    reason = bounded(lambda: check_unit(unit), peak=JSON_PEAK)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)


def test_a_hostile_safetensors_header_is_checked_in_bounded_memory(tmp_path: Path) -> None:
    """A 4 MiB header of empty objects (json.loads made about 100 MB of them; the issue's
    100 MiB one needed 2.6 GB) is found malformed within RSS_BOUND."""
    write_safetensors_file(tmp_path, b'{"a":[' + b"{}," * (4 * MiB // 3) + b"{}]}", 0, None)
    reason, rss = completeness_in_subprocess(tmp_path)
    assert reason is not None and reason.startswith("m.safetensors: header malformed")
    assert rss < RSS_BOUND


@fuzz
@given(
    index=st.fixed_dictionaries(
        {
            "weight_map": json_values
            | st.dictionaries(
                st.text(max_size=3),
                st.sampled_from(["s.safetensors", "../x", "gone.bin", "/abs"]),
                max_size=4,
            )
        }
    ).map(lambda d: json.dumps(d).encode())
    | runs(JSON_PIECES, max_run=64 * 1024)
)
def test_shard_indexes_are_bounded(tmp_path_factory: pytest.TempPathFactory, index: bytes) -> None:
    """Any `*.index.json`: a reason or complete, within the time bound and JSON_PEAK."""
    unit = tmp_path_factory.mktemp("hf")
    (unit / "config.json").write_bytes(b"{}")
    (unit / "s.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (unit / "model.safetensors.index.json").write_bytes(index)
    reason = bounded(lambda: check_unit(unit), peak=JSON_PEAK)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)


def check_unit(unit: Path) -> str | None:
    sizes = {p.name: p.stat().st_size for p in unit.iterdir()}
    reason = formats.check_complete(str(unit), formats.detect_format(sizes), sizes)
    return None if reason is None else reason.message


# --- metadata (gradient-model-metadata.json): strict parser and C fast path ---------------

METADATA_CODES = {"metadata_encoding", "metadata_syntax", "metadata_duplicate_key"}
METADATA_CODES |= {"metadata_too_deep", "metadata_metrics"}
METADATA_PIECES = [*JSON_PIECES, b'{"metrics":[', b'{"name":"a","numberValue":', b"1" * 400]
METADATA_PIECES += [b"1e400", b"\xef\xbb\xbf", b"\r\n"]


def metadata_peak(data: bytes) -> int:
    """The document itself, when valid, is built by the C parser: up to 28 times its text in
    Python objects (a MiB of `{},`); nothing else grows with the input. max_bytes (1 MiB by
    default) caps the input. The constant covers what the first call of a process fills once
    and keeps (compiled patterns, lazily imported modules): a few KiB over 1 MiB was seen."""
    return 32 * len(data) + MiB + 256 * 1024


@settings(fuzz, max_examples=examples(60))
@given(
    data=runs(METADATA_PIECES, max_run=16 * 1024)
    | json_values.map(lambda v: json.dumps(v).encode()),
    max_depth=st.sampled_from([4, 64, 20_000]),
)
def test_metadata_validation_is_bounded(data: bytes, max_depth: int) -> None:
    """Any bytes: a result whose problems carry only the documented codes, within the time
    bound and metadata_peak; never an exception."""
    result = bounded(
        lambda: validate_metadata_bytes(data, file="m.json", max_depth=max_depth),
        peak=metadata_peak(data),
    )
    assert {problem.code for problem in result.problems} <= METADATA_CODES


@settings(fuzz, max_examples=examples(60))
@given(text=runs(METADATA_PIECES, max_run=16 * 1024).map(lambda b: b.decode("utf-8", "replace")))
def test_strict_parser_and_fast_path_are_bounded(text: str) -> None:
    """Each parser on its own: the fast path returns a document or defers, the strict parser
    returns one or raises its own error, within the bounds."""
    bounded(lambda: metadata._fast_parse(text, 64), peak=metadata_peak(text.encode()))

    def strict() -> object:
        try:
            return metadata._Parser(text, 64, build=False).parse()
        except metadata._InvalidError as exc:
            return exc

    bounded(strict, peak=metadata_peak(text.encode()))


@pytest.mark.parametrize("unit", [b"{},", b'{"":0},'])
def test_hostile_metadata_is_checked_within_its_bound(unit: bytes) -> None:
    """256 KiB of tiny containers with one trailing comma (the strict parser kept a table of
    every value's offset: 99 MiB for 1 MiB) is a syntax problem within metadata_peak."""
    data = b"[" + unit * (256 * 1024 // len(unit)) + b"]"
    result = bounded(
        lambda: validate_metadata_bytes(data, file="m.json", max_depth=64),
        peak=metadata_peak(data),
        seconds=60,
    )
    assert [problem.code for problem in result.problems] == ["metadata_syntax"]
