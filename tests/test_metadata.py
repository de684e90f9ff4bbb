"""Metadata validation (SPEC §7): strict JSON, exact locations, metrics, schema, safe reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelwatch.errors import ConfigError, Problem

# Underscored names: the strict parser and the C fast path it guards, compared below.
from modelwatch.metadata import (
    _DEFER,
    MetadataResult,
    SchemaValidator,
    _fast_parse,
    _InvalidError,
    _Parser,
    validate_metadata_bytes,
    validate_unit_metadata,
)
from tests.conftest import examples

NAME = "gradient-model-metadata.json"
MB = 1 << 20


def check(
    data: bytes, max_depth: int = 64, schema: SchemaValidator | None = None
) -> MetadataResult:
    return validate_metadata_bytes(data, file=NAME, max_depth=max_depth, schema=schema)


def where(problem: Problem) -> tuple[str, int | None, int | None, str | None]:
    return problem.code, problem.line, problem.column, problem.pointer


def only_problem(result: MetadataResult) -> Problem:
    assert len(result.problems) == 1, result.problems
    return result.problems[0]


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def write_unit(tmp_path: Path, content: bytes) -> Path:
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / NAME).write_bytes(content)
    return unit


def read_unit(unit: Path | str, max_bytes: int = MB, filename: str = NAME) -> MetadataResult:
    return validate_unit_metadata(str(unit), filename, max_bytes=max_bytes, max_depth=64)


# --- strict JSON: one located problem per document ---------------------------------------

SYNTAX = "metadata_syntax"


def bad(
    data: bytes,
    expected: tuple[str, int, int, str | None],
    message: str,
    *,
    id: str,
    max_depth: int = 64,
) -> Any:
    """One row: the document, its problem's (code, line, column, pointer) and message part."""
    return pytest.param(data, max_depth, expected, message, id=id)


INVALID_DOCUMENTS = [
    bad(b'{"a": NaN}', (SYNTAX, 1, 7, None), "NaN is not allowed", id="nan"),
    bad(b"[1, Infinity]", (SYNTAX, 1, 5, None), "Infinity is not allowed", id="infinity"),
    bad(b"[-Infinity]", (SYNTAX, 1, 2, None), "-Infinity is not allowed", id="negative-infinity"),
    bad(
        b'{\n  "a": 1,\n}',
        (SYNTAX, 2, 9, None),
        "trailing comma before '}'",
        id="trailing-comma-object",
    ),
    bad(b"[1, 2,]", (SYNTAX, 1, 6, None), "trailing comma before ']'", id="trailing-comma-array"),
    bad(
        b'{\n  // note\n  "a": 1\n}',
        (SYNTAX, 2, 3, None),
        "comments are not allowed",
        id="line-comment",
    ),
    bad(b"[1 /* x */]", (SYNTAX, 1, 4, None), "comments are not allowed", id="block-comment"),
    bad(
        b"{'a': 1}",
        (SYNTAX, 1, 2, None),
        "double quotes, not single quotes",
        id="single-quoted-key",
    ),
    bad(
        b"{\"a\": 'x'}",
        (SYNTAX, 1, 7, None),
        "double quotes, not single quotes",
        id="single-quoted-value",
    ),
    bad(
        b"{a: 1}",
        (SYNTAX, 1, 2, None),
        "object key 'a' must be in double quotes",
        id="unquoted-key",
    ),
    bad(b"[007]", (SYNTAX, 1, 2, None), "leading zeros", id="leading-zero"),
    bad(b"[1.]", (SYNTAX, 1, 3, None), "invalid number '1.'", id="bare-decimal-point"),
    bad(b"[1e999]", (SYNTAX, 1, 2, None), "number out of range: 1e999", id="number-out-of-range"),
    bad(
        b"[" + b"9" * 5000 + b"]",
        (SYNTAX, 1, 2, None),
        "more than 4300 digits",
        id="integer-too-long",
    ),
    bad(b'"a\tb"', (SYNTAX, 1, 3, None), "control character U+0009", id="raw-tab-in-string"),
    bad(b'["\\q"]', (SYNTAX, 1, 3, None), "backslash followed by 'q'", id="invalid-escape"),
    bad(b'"\\u12x4"', (SYNTAX, 1, 2, None), "expected 4 hex digits", id="short-unicode-escape"),
    bad(b'{"a": "b', (SYNTAX, 1, 7, None), "unterminated string", id="unterminated-string"),
    bad(b"[True]", (SYNTAX, 1, 2, None), "True is not JSON; use true", id="python-literal"),
    bad(b"", (SYNTAX, 1, 1, None), "empty document", id="empty"),
    bad(b" \r\n ", (SYNTAX, 2, 2, None), "empty document", id="whitespace-only-crlf"),
    bad(
        b"{} {}",
        (SYNTAX, 1, 4, None),
        "expected the end of the document",
        id="trailing-garbage",
    ),
    bad(b'{"a" 1}', (SYNTAX, 1, 6, None), "expected ':' after object key", id="missing-colon"),
    bad(
        b"[1 2]",
        (SYNTAX, 1, 4, None),
        "expected ',' or ']' after array element",
        id="missing-comma",
    ),
    bad(
        b'{"a": "\xff"}',
        ("metadata_encoding", 1, 8, None),
        "not valid UTF-8: byte 0xff",
        id="invalid-utf8",
    ),
    bad(
        b'\xef\xbb\xbf[\n "\xc3\xa9", "\xc3"]',
        ("metadata_encoding", 2, 8, None),
        "byte 0xc3",
        id="invalid-utf8-columns-in-characters",
    ),
    bad(
        b"[[[[1]]]]",
        ("metadata_too_deep", 1, 4, "/0/0/0"),
        "deeper than max_depth (3)",
        id="too-deep-arrays",
        max_depth=3,
    ),
    bad(
        b'{"a": {"b/": {"c~": {}}}}',
        ("metadata_too_deep", 1, 21, "/a/b~1/c~0"),
        "deeper than max_depth (3)",
        id="too-deep-objects",
        max_depth=3,
    ),
    bad(
        b"[]",
        ("metadata_too_deep", 1, 1, ""),
        "deeper than max_depth (0)",
        id="no-containers-at-depth-0",
        max_depth=0,
    ),
]


@pytest.mark.parametrize(("data", "max_depth", "expected", "message"), INVALID_DOCUMENTS)
def test_invalid_document_is_one_located_problem(
    data: bytes, max_depth: int, expected: tuple[str, int, int, str | None], message: str
) -> None:
    """A document that is not strict JSON yields exactly one problem at the right place."""
    result = check(data, max_depth=max_depth)
    problem = only_problem(result)
    assert where(problem) == expected
    assert message in problem.message
    assert problem.file == NAME
    assert problem.message and "\n" not in problem.message
    assert result.present and result.document is None and not result.ok


DUPLICATES = [
    pytest.param(b'{"a": 1, "a": 2}', [(1, 10, "/a")], id="top-level"),
    pytest.param(b'{"m": [{"x": 1}, {"k~/": 1,\n "k~/": 2}]}', [(2, 2, "/m/1/k~0~1")], id="nested"),
    pytest.param(
        b'[{"a": 1, "a": 2}, {"b": 1, "b": 2}]', [(1, 11, "/0/a"), (1, 29, "/1/b")], id="all"
    ),
]


@pytest.mark.parametrize(("data", "expected"), DUPLICATES)
def test_duplicate_keys_are_all_reported(data: bytes, expected: list[tuple[int, int, str]]) -> None:
    """Every repeated object key is reported at the second key, with its pointer."""
    result = check(data)
    assert [(p.line, p.column, p.pointer) for p in result.problems] == expected
    assert {p.code for p in result.problems} == {"metadata_duplicate_key"}
    assert result.document is None


def test_duplicate_keys_are_capped() -> None:
    """A document with thousands of repeated keys reports at most 50 of them."""
    data = b"{" + b",".join([b'"k": 1'] * 5000) + b"}"
    assert len(check(data).problems) == 50


@pytest.mark.parametrize(
    ("data", "document"),
    [
        pytest.param(b'\xef\xbb\xbf{"a": 1}', {"a": 1}, id="bom"),
        pytest.param(b'"\\ud800 lone surrogate"', "\ud800 lone surrogate", id="lone-surrogate"),
        pytest.param(b'"\\ud83d\\ude00"', "\U0001f600", id="surrogate-pair"),
        pytest.param(b" 42 ", 42, id="top-level-number"),
        pytest.param(b"[1.5e3, -0, 1E-2]", [1500.0, 0, 0.01], id="numbers"),
        pytest.param(b"[[[1]]]", [[[1]]], id="exactly-max-depth"),
    ],
)
def test_valid_document_is_accepted(data: bytes, document: Any) -> None:
    """Strict JSON, including a BOM and lone surrogate escapes, parses to the same value."""
    result = check(data, max_depth=3)
    assert result.ok and result.present
    assert result.document == document


def test_a_second_bom_before_a_bad_byte_is_an_encoding_problem() -> None:
    """Only the first BOM is skipped: after two, a bad byte is located after the second (it
    once raised UnicodeDecodeError instead)."""
    problem = only_problem(check(b"\xef\xbb\xbf\xef\xbb\xbf\xff"))
    assert where(problem) == ("metadata_encoding", 1, 2, None)
    assert problem.message == "not valid UTF-8: byte 0xff (invalid start byte)"


def test_columns_after_bom_count_characters() -> None:
    """With a BOM, columns still start at 1 on the first character after it."""
    assert where(only_problem(check(b"\xef\xbb\xbf[1,]"))) == (SYNTAX, 1, 3, None)


@pytest.mark.parametrize("opener", [b"[", b'{"a":'], ids=["arrays", "objects"])
def test_hostile_nesting_is_too_deep_quickly(opener: bytes) -> None:
    """100,000 levels of nesting are rejected fast and never hit the recursion limit."""
    closer = b"]" if opener == b"[" else b"}"
    data = opener * 100_000 + b"1" + closer * 100_000
    started = time.monotonic()
    problem = only_problem(check(data))
    assert time.monotonic() - started < 2.0
    column = 64 * len(opener) + 1  # the 65th opener
    assert (problem.code, problem.line, problem.column) == ("metadata_too_deep", 1, column)


def test_one_megabyte_document_is_fast() -> None:
    """A 1 MB document made of small values validates in about a tenth of a second alone: a
    super-linear validator would take minutes; 5 s allows for a loaded CI machine."""
    metrics = [{"name": f"m{i}", "numberValue": i / 3} for i in range(20_000)]
    data = json.dumps({"metrics": metrics, "values": list(range(90_000))}).encode()
    assert len(data) > MB
    started = time.monotonic()
    assert check(data).ok
    assert time.monotonic() - started < 5.0


# --- metrics ------------------------------------------------------------------------------

METRICS = "metadata_metrics"
BAD_METRICS = [
    pytest.param(b'{"metrics": {"acc": 1}}', [(METRICS, 1, 13, "/metrics")], id="not-array"),
    pytest.param(b'{"metrics": [1]}', [(METRICS, 1, 14, "/metrics/0")], id="element-not-object"),
    pytest.param(
        b'{"metrics": [{"name": "", "numberValue": 1}]}',
        [(METRICS, 1, 23, "/metrics/0/name")],
        id="empty-name",
    ),
    pytest.param(
        b'{"metrics": [{"numberValue": 1}]}',
        [(METRICS, 1, 14, "/metrics/0/name")],
        id="missing-name",
    ),
    pytest.param(
        b'{"metrics": [{"name": "acc", "numberValue": true}]}',
        [(METRICS, 1, 45, "/metrics/0/numberValue")],
        id="bool-number",
    ),
    pytest.param(
        b'{"metrics": [{"name": "acc", "numberValue": "0.9"}]}',
        [(METRICS, 1, 45, "/metrics/0/numberValue")],
        id="string-number",
    ),
    pytest.param(
        b'{"metrics": [\n  {"name": "ok", "numberValue": 1},\n'
        b'  {"name": 7, "numberValue": null},\n  []\n]}',
        [
            (METRICS, 3, 12, "/metrics/1/name"),
            (METRICS, 3, 30, "/metrics/1/numberValue"),
            (METRICS, 4, 3, "/metrics/2"),
        ],
        id="every-bad-metric",
    ),
]


@pytest.mark.parametrize(("data", "expected"), BAD_METRICS)
def test_bad_metrics_are_reported_with_pointers(data: bytes, expected: list[Any]) -> None:
    """Each bad metric is its own problem, pointing at the offending value."""
    result = check(data)
    assert [where(p) for p in result.problems] == expected
    assert result.metrics == []
    assert result.document == json.loads(data)  # still parsed: the content was valid JSON


def test_nan_metric_value_is_a_syntax_error() -> None:
    """NaN cannot reach the metrics check: strict JSON rejects it first."""
    result = check(b'{"metrics": [{"name": "loss", "numberValue": NaN}]}')
    assert where(only_problem(result)) == (SYNTAX, 1, 46, None)


def test_valid_metrics_are_returned() -> None:
    """Valid metrics (extra keys allowed) are exposed as `.metrics`."""
    doc = {
        "metrics": [{"name": "acc", "numberValue": 0.93}, {"name": "n", "numberValue": 3, "x": 1}]
    }
    result = check(json.dumps(doc).encode())
    assert result.ok
    assert result.metrics == doc["metrics"]


HUGE = b"1" + b"0" * 400  # a JSON integer no double holds: float() overflows


@pytest.mark.parametrize("digits", [400, 4300])
def test_integer_too_large_for_a_double_is_a_metrics_problem(digits: int) -> None:
    """A numberValue of hundreds (or 4300) digits is not finite: metadata_metrics at its
    pointer, never an OverflowError."""
    data = b'{"metrics": [{"name": "a", "numberValue": 1' + b"0" * (digits - 1) + b"}]}"
    problem = only_problem(check(data))
    assert where(problem) == (METRICS, 1, 43, "/metrics/0/numberValue")
    assert f"an integer of {digits} digits, too large for a double" in problem.message


def test_huge_integers_elsewhere_are_valid_json() -> None:
    """Outside metrics any JSON number is allowed: a 4300-digit integer parses (one more digit
    is out of range: CPython's int limit, held to whatever PYTHONINTMAXSTRDIGITS says)."""
    result = check(b'{"seed": ' + b"7" * 4300 + b"}")
    assert result.ok and result.document == {"seed": int("7" * 4300)}


@pytest.mark.parametrize("data", [b'{"other": 1}', b"[1, 2]", b'"metrics"', b"null"])
def test_documents_without_metrics_have_none(data: bytes) -> None:
    """Any JSON value is allowed at the top level; without `metrics` the list is empty."""
    result = check(data)
    assert result.ok and result.metrics == []


# --- reading from a unit ------------------------------------------------------------------


def test_absent_file_is_not_a_problem(tmp_path: Path) -> None:
    """A unit without a metadata file is fine: not present, no problems."""
    result = read_unit(tmp_path)
    assert result == MetadataResult(present=False, document=None, problems=())


def test_file_in_unit_is_validated(tmp_path: Path) -> None:
    """A regular metadata file is read and validated; problems name it relative to the unit."""
    assert read_unit(write_unit(tmp_path, b'{"a": 1}')).document == {"a": 1}
    (tmp_path / "unit" / NAME).write_bytes(b"[1,]")
    problem = only_problem(read_unit(tmp_path / "unit"))
    assert where(problem) == (SYNTAX, 1, 3, None) and problem.file == NAME


@pytest.mark.parametrize(("extra", "code"), [(0, None), (1, "metadata_too_large")])
def test_size_limit(tmp_path: Path, extra: int, code: str | None) -> None:
    """A file of exactly max_bytes is read; one byte more is metadata_too_large."""
    max_bytes = 1000
    content = b'"' + b"x" * (max_bytes - 2 + extra) + b'"'
    result = read_unit(write_unit(tmp_path, content), max_bytes=max_bytes)
    assert [p.code for p in result.problems] == ([code] if code else [])


def test_huge_file_is_not_read_whole(tmp_path: Path) -> None:
    """A 100 MB file is rejected as too large promptly, after reading at most max_bytes + 1."""
    unit = tmp_path / "unit"
    unit.mkdir()
    with open(unit / NAME, "wb") as f:
        f.truncate(100 * MB)
    started = time.monotonic()
    assert only_problem(read_unit(unit)).code == "metadata_too_large"
    assert time.monotonic() - started < 1.0


def fifo_with_data(path: Path, data: bytes) -> int:
    """A FIFO holding `data`; the returned fd keeps it open (read it to see what is left)."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR: no reader needed to open
    os.write(fd, data)
    return fd


def assert_still_unread(fd: int, data: bytes) -> None:
    try:
        assert os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("target", ["elsewhere", "/etc/passwd"])
def test_symlinked_file_is_not_followed(tmp_path: Path, target: str) -> None:
    """A metadata symlink (to a valid file elsewhere or a system file) is rejected unread."""
    unit = tmp_path / "unit"
    unit.mkdir()
    if target == "elsewhere":
        target = str(tmp_path / "real.json")
        Path(target).write_text('{"a": 1}')
    (unit / NAME).symlink_to(target)
    result = read_unit(unit)
    problem = only_problem(result)
    assert (problem.code, problem.file) == ("metadata_not_regular_file", NAME)
    assert "symbolic link" in problem.message and result.document is None


def test_symlink_target_is_never_opened(tmp_path: Path) -> None:
    """The target of a metadata symlink is not read: a FIFO behind it keeps its data."""
    data = b'{"a": 1}'
    fd = fifo_with_data(tmp_path / "pipe", data)
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / NAME).symlink_to(tmp_path / "pipe")
    assert only_problem(read_unit(unit)).code == "metadata_not_regular_file"
    assert_still_unread(fd, data)


def test_symlinked_parent_directory_is_not_followed(tmp_path: Path) -> None:
    """A configured `sub/file.json` whose `sub` is a symlink is rejected, not followed."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "m.json").write_text("{}")
    unit = tmp_path / "unit"
    unit.mkdir()
    (unit / "sub").symlink_to(tmp_path / "real")
    problem = only_problem(read_unit(unit, filename="sub/m.json"))
    assert problem.code == "metadata_not_regular_file"
    assert "'sub' is a symbolic link" in problem.message
    os.mkdir(unit / "dir")  # a real subdirectory is fine
    (unit / "dir" / "m.json").write_text("{}")
    assert read_unit(unit, filename="dir/m.json").document == {}


def test_directory_named_like_the_file(tmp_path: Path) -> None:
    """A directory where the metadata file should be is metadata_not_regular_file."""
    (tmp_path / NAME).mkdir()
    problem = only_problem(read_unit(tmp_path))
    assert problem.code == "metadata_not_regular_file" and "directory" in problem.message


def test_fifo_does_not_block_and_is_not_read(tmp_path: Path) -> None:
    """A FIFO named like the metadata file is rejected at once, without reading from it."""
    data = b'{"a": 1}'
    fd = fifo_with_data(tmp_path / NAME, data)
    results: list[MetadataResult] = []
    worker = threading.Thread(target=lambda: results.append(read_unit(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "validating a FIFO blocked"
    assert only_problem(results[0]).code == "metadata_not_regular_file"
    assert "FIFO" in results[0].problems[0].message
    assert_still_unread(fd, data)


def test_unreadable_unit_is_reported(tmp_path: Path) -> None:
    """An OS error other than 'absent' is metadata_unreadable with the OS reason."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    problem = only_problem(read_unit(not_a_dir))
    assert problem.code == "metadata_unreadable"
    assert "Not a directory" in problem.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied_is_unreadable(tmp_path: Path) -> None:
    """A metadata file the daemon may not read is metadata_unreadable."""
    unit = write_unit(tmp_path, b"{}")
    (unit / NAME).chmod(0)
    assert only_problem(read_unit(unit)).code == "metadata_unreadable"


# --- schema -------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "required": ["framework"],
    "properties": {
        "framework": {"enum": ["pytorch", "tensorflow"]},
        "metrics": {"items": {"properties": {"name": {"pattern": "^[a-z_]+$"}}}},
    },
}


def schema_file(tmp_path: Path, schema: Any, text: str | None = None) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema) if text is None else text)
    return str(path)


def test_schema_violations_have_pointers_and_locations(tmp_path: Path) -> None:
    """Schema violations are metadata_schema problems, sorted by pointer, located in the file."""
    schema = SchemaValidator.from_file(schema_file(tmp_path, SCHEMA))
    metrics = [{"name": "ok", "numberValue": 1}] * 10 + [{"name": "Bad", "numberValue": 1}]
    metrics[2] = {"name": "Also Bad", "numberValue": 2}
    data = json.dumps({"framework": "jax", "metrics": metrics}, indent=1).encode()
    result = check(data, schema=schema)
    found = [(p.code, p.pointer) for p in result.problems]
    assert found == [
        ("metadata_schema", "/framework"),
        ("metadata_schema", "/metrics/2/name"),
        ("metadata_schema", "/metrics/10/name"),
    ]
    assert (result.problems[0].line, result.problems[0].column) == (2, 15)
    assert "'jax' is not one of" in result.problems[0].message
    assert result.document is not None and not result.ok


def test_schema_problems_without_a_file(tmp_path: Path) -> None:
    """`SchemaValidator.problems` checks a plain value; a missing property points at its parent."""
    schema = SchemaValidator.from_file(schema_file(tmp_path, SCHEMA))
    problems = schema.problems({"metrics": []}, file="x.json")
    assert [(p.code, p.pointer, p.file, p.line) for p in problems] == [
        ("metadata_schema", "", "x.json", None)
    ]
    assert schema.problems({"framework": "pytorch"}, file="x.json") == []


def test_unresolvable_schema_reference_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """Local $refs work; a remote $ref is never fetched and is reported per document."""
    remote = {"$ref": "https://example.com/schema.json"}  # exists, but must not be fetched
    local = {"$ref": "#/$defs/positive"}
    path = schema_file(
        tmp_path,
        {"$defs": {"positive": {"minimum": 0}}, "properties": {"a": remote, "n": local}},
    )
    schema = SchemaValidator.from_file(path)
    assert check(b'{"n": 1}', schema=schema).ok
    assert only_problem(check(b'{"n": -1}', schema=schema)).pointer == "/n"
    problem = only_problem(check(b'{"a": 1}', schema=schema))
    assert problem.code == "metadata_schema" and "cannot be resolved" in problem.message


def test_schema_with_a_huge_integer_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """jsonschema cannot divide a 400-digit integer by a float `multipleOf` (OverflowError):
    that is a located metadata_schema problem."""
    schema = SchemaValidator.from_file(
        schema_file(tmp_path, {"properties": {"seed": {"multipleOf": 0.5}}})
    )
    problem = only_problem(check(b'{"a": 1,\n "seed": ' + HUGE + b"}", schema=schema))
    assert where(problem) == ("metadata_schema", 2, 10, "/seed")
    assert "too large for a double" in problem.message


def test_schema_not_checked_on_syntax_error(tmp_path: Path) -> None:
    """A document that does not parse reports only its syntax error."""
    schema = SchemaValidator.from_file(schema_file(tmp_path, SCHEMA))
    assert only_problem(check(b"[1,]", schema=schema)).code == SYNTAX


@pytest.mark.parametrize(
    ("schema", "text", "reason"),
    [
        pytest.param(None, "{not json", "not valid JSON", id="invalid-json"),
        pytest.param({"type": 12}, None, "invalid JSON Schema at /type", id="invalid-schema"),
        pytest.param([1], None, "must be an object or boolean", id="not-an-object"),
        pytest.param({"$schema": "https://example.com/s"}, None, "unknown $schema", id="dialect"),
    ],
)
def test_bad_schema_file_is_a_config_error(
    tmp_path: Path, schema: Any, text: str | None, reason: str
) -> None:
    """A schema file that cannot be used is a ConfigError naming metadata.schema and the path."""
    path = schema_file(tmp_path, schema, text)
    with pytest.raises(ConfigError, match=r"^metadata\.schema: ") as caught:
        SchemaValidator.from_file(path)
    assert path in str(caught.value) and reason in str(caught.value)


def test_missing_schema_file_is_a_config_error(tmp_path: Path) -> None:
    """A schema path that does not exist is a ConfigError naming metadata.schema."""
    with pytest.raises(ConfigError, match=r"^metadata\.schema: .*No such file"):
        SchemaValidator.from_file(str(tmp_path / "nope.json"))


def test_schema_without_jsonschema_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the optional jsonschema package, a schema is a ConfigError saying what to install."""
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # makes `import jsonschema` fail
    with pytest.raises(
        ConfigError, match=r"requires the 'jsonschema' package \(pip install modelwatch\[schema\]\)"
    ):
        SchemaValidator.from_file(schema_file(tmp_path, SCHEMA))


# --- properties ---------------------------------------------------------------------------

keys = st.text().filter(lambda key: key != "metrics")  # `metrics` has rules of its own
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
json_ish_text = st.text(alphabet="{}[],:\"\\ \n\t01-.eE+tfalsenuNI/'x\u00e9\x00", max_size=60)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any bytes at all give a result, never an exception."""
    assert isinstance(check(data, max_depth=4), MetadataResult)


@settings(max_examples=examples(300), deadline=None)
@given(json_ish_text)
def test_json_like_text_never_raises(text: str) -> None:
    """Near-JSON text (the likely mistakes) gives a result with a located problem or none."""
    result = check(text.encode("utf-8", "surrogatepass"), max_depth=4)
    for problem in result.problems:
        assert problem.line is not None and problem.column is not None


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.booleans(), st.sampled_from([None, 1]))
def test_serialised_json_round_trips(value: Any, ascii_only: bool, indent: int | None) -> None:
    """Whatever json.dumps writes (finite floats) is valid and parses back to an equal value."""
    data = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()
    result = check(data, max_depth=max(depth(value), 1))
    assert result.ok, result.problems
    assert result.document == value
    if depth(value) > 1:
        assert only_problem(check(data, max_depth=depth(value) - 1)).code == "metadata_too_deep"


@settings(max_examples=examples(300), deadline=None)
@given(st.one_of(json_ish_text, json_values.map(json.dumps)))
def test_strict_parser_agrees_with_fast_path(text: str) -> None:
    """The C fast path accepts a text only if the strict parser does, with an equal value."""
    strict = _Parser(text, 4)
    try:
        strict_value, strict_ok = strict.parse(), not strict.duplicates
    except _InvalidError:
        strict_value, strict_ok = None, False
    fast_value = _fast_parse(text, 4)
    assert (fast_value is not _DEFER) == strict_ok
    if strict_ok:
        assert fast_value == strict_value


# --- through the command line ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["file", "unit"])
def test_validate_prints_the_problem_of_a_huge_number_without_a_traceback(
    tmp_path: Path, target: str
) -> None:
    """`modelwatch validate` on metadata with a 400-digit numberValue prints the located
    problem and exits 1: no traceback."""
    unit = write_unit(tmp_path, b'{"metrics": [{"name": "a", "numberValue": ' + HUGE + b"}]}")
    (unit / "model.onnx").write_bytes(b"onnx")
    path = unit / NAME if target == "file" else unit
    done = subprocess.run(
        [sys.executable, "-m", "modelwatch", "validate", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELWATCH_STATE_DIR": str(tmp_path / "state")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert done.stdout == (
        f"{unit / NAME}:1:43: metadata_metrics: metrics[0].numberValue must be a finite number,"
        " got an integer of 401 digits, too large for a double (at /metrics/0/numberValue)\n"
    )
