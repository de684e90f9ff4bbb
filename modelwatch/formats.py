"""Which model format a unit holds, and whether it is completely written (SPEC §6).

Contract:

- `detect_format(paths)` names the format of a unit from the relative POSIX paths of its
  regular files (ignored and in-progress files already filtered out). Only names are looked
  at. Paired rules (`checkpoint` + `*.index`, `config.json` + weights) need both files in the
  same directory; when several formats match, the first of `_PRIORITY` wins.
- `check_complete(unit_dir, fmt, sizes)` returns None when every instance of `fmt` in the
  unit is completely written, else one `Reason` (code `incomplete`, or `unit_unavailable`
  when the unit directory cannot be opened) whose message names the file and whose `files`
  hold it first (then the file that named it: a shard index, `checkpoint`). `sizes` is the caller's
  listing (relative path -> size); existence rules are answered from it, and the files whose
  content matters are opened and read with bounded reads.
- `model_type_for(fmt)` maps a format to Gradient's model type vocabulary.

The files are written by untrusted training code, so `check_complete` never raises for what it
finds on disk. It opens paths one component at a time relative to the unit with O_NOFOLLOW (a
directory swapped for a symlink cannot lead outside the unit; `modelwatch.beneath`), and with
`follow_top=False` the unit directory itself too, below its parent. It opens nothing but
regular files, and treats a file whose size differs from `sizes` as a reason: it changed since
the listing, and "complete" must describe the listing the caller fingerprints.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from modelwatch import beneath, jsonscan, zipdir
from modelwatch.progress import progress
from modelwatch.reasons import Reason

FORMATS: tuple[str, ...] = (
    "saved_model",
    "tf_checkpoint",
    "keras",
    "onnx",
    "pytorch",
    "safetensors",
    "huggingface",
    "torch_dcp",
    "mlflow",
    "unknown",
)

# Most specific first: an MLflow model wraps any flavour, a SavedModel contains a checkpoint.
_PRIORITY = (
    "mlflow",
    "saved_model",
    "tf_checkpoint",
    "torch_dcp",
    "huggingface",
    "keras",
    "onnx",
    "safetensors",
    "pytorch",
)

# huggingface_hub reads no header longer than this (SAFETENSORS_MAX_HEADER_LENGTH): 170,000
# tensors' entries in one file. Headers are scanned in linear time and bounded memory: about
# 0.1 s per MB for real ones, 0.5 s per MB for the worst hostile shape (bench/parsers.py).
MAX_SAFETENSORS_HEADER = 25_000_000
MAX_ZIP_DIRECTORY = 100 * 1024 * 1024  # torch zips with ~100k tensors have ~15 MiB directories
MAX_TEXT_FILE = 16 * 1024 * 1024  # `checkpoint` and `*.index.json` are small text files
ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
# The JSON in model files is scanned, never built whole; one tensor's entry in a safetensors
# header (name, dtype, shape, offsets) or one weight_map entry is a few hundred bytes.
_MAX_JSON_VALUE = 64 * 1024

_NAME_FORMATS = {"MLmodel": "mlflow", "saved_model.pb": "saved_model"}
_NAME_FORMATS["saved_model.pbtxt"] = "saved_model"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_SUFFIX_FORMATS = (
    (".distcp", "torch_dcp"),
    (".keras", "keras"),
    (".onnx", "onnx"),
    (".safetensors", "safetensors"),
    *((suffix, "pytorch") for suffix in _TORCH_SUFFIXES),
)
_SHARD_SUFFIX = re.compile(r"\.data-(\d{5})-of-(\d{5})")


def detect_format(paths: Collection[str]) -> str:
    """The format of a unit whose regular files are `paths`; "unknown" when nothing matches."""
    found: set[str] = set()
    for names in _names_by_dir(paths).values():
        found.update(fmt for fmt in map(_format_of_name, names) if fmt is not None)
        if _is_tf_checkpoint_dir(names):
            found.add("tf_checkpoint")
        if _is_huggingface_dir(names):
            found.add("huggingface")
    return next((fmt for fmt in _PRIORITY if fmt in found), "unknown")


def model_type_for(fmt: str) -> str:
    """Gradient's model type for a format: Tensorflow, ONNX or Custom."""
    if fmt in ("saved_model", "tf_checkpoint", "keras"):
        return "Tensorflow"
    return "ONNX" if fmt == "onnx" else "Custom"


def check_complete(
    unit_dir: str,
    fmt: str,
    sizes: Mapping[str, int],
    *,
    follow_top: bool = True,
    identity: tuple[int, int] | None = None,
) -> Reason | None:
    """None when the unit's `fmt` files are completely written, else one reason naming a file.

    `follow_top` and `identity` say how the unit directory is opened (`beneath.open_unit`):
    by default `unit_dir` is followed as given.
    """
    if fmt not in _CHECKS:
        raise ValueError(f"unknown format {fmt!r}")
    checks = _CHECKS[fmt]
    if not checks:
        return None
    try:
        unit_fd = beneath.open_unit(unit_dir, follow_top=follow_top, identity=identity)
    except OSError as exc:
        return Reason("unit_unavailable", f"unit directory cannot be opened ({exc.strerror})")
    try:
        unit = _Unit(unit_fd, sizes)
        for check in checks:
            check(unit)
    except _Incomplete as exc:
        return Reason("incomplete", str(exc), exc.files)
    finally:
        os.close(unit_fd)
    return None


# --- names ---------------------------------------------------------------------------------


def _names_by_dir(paths: Iterable[str]) -> dict[str, set[str]]:
    by_dir: dict[str, set[str]] = {}
    for path in paths:
        directory, _, name = path.rpartition("/")
        by_dir.setdefault(directory, set()).add(name)
    return by_dir


def _format_of_name(name: str) -> str | None:
    if name in _NAME_FORMATS:
        return _NAME_FORMATS[name]
    return next((fmt for suffix, fmt in _SUFFIX_FORMATS if name.endswith(suffix)), None)


def _is_tf_checkpoint_dir(names: Collection[str]) -> bool:
    # Data shards count too: they are unmistakably TF, and waiting for a missing index beats
    # registering the directory as "unknown" (always complete).
    return "checkpoint" in names and any(
        name.endswith(".index") or _SHARD_SUFFIX.search(name) for name in names
    )


def _is_huggingface_dir(names: Collection[str]) -> bool:
    return "config.json" in names and any(
        name.endswith((".safetensors", ".index.json"))
        or (name.startswith("pytorch_model") and name.endswith(".bin"))
        for name in names
    )


def _show(text: str, limit: int = 200) -> str:
    """`text` safe for a one-line reason: non-printable characters escaped, length capped."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# --- reading files safely -----------------------------------------------------------------


_FileCheck = Callable[[str, int, int], None]  # (path, fd, size) of an open regular file


class _Incomplete(Exception):
    """The unit is not complete; the message is the reason, `files` the files it is about.
    Carried out of nested checks."""

    def __init__(self, message: str, files: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.files = files


@dataclass(frozen=True)
class _Unit:
    fd: int
    sizes: Mapping[str, int]

    def paths(self, keep: Callable[[str], bool]) -> list[str]:
        """The listed paths for which `keep` is true, sorted so the first reason is stable."""
        return sorted(path for path in self.sizes if keep(path))

    def require(self, path: str, named_in: str | None = None) -> None:
        if path not in self.sizes:
            where = f" (named in {_show(named_in)})" if named_in else ""
            files = (path, named_in) if named_in else (path,)
            raise _Incomplete(f"{_show(path)} missing{where}", files)


def _components(path: str) -> list[str]:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts or not _encodable(path):
        raise _Incomplete(f"{_show(path)}: not a path inside the unit")
    return parts


def _encodable(path: str) -> bool:
    """False for names no file system holds (os.open raises ValueError, not OSError, on them)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return "\0" not in path


def _open_failure(path: str, exc: OSError) -> _Incomplete:
    if exc.errno == errno.ENOENT:
        return _Incomplete(f"{_show(path)} missing")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        # O_NOFOLLOW refuses a symlink anywhere on the path; so does a file swapped for a dir.
        return _Incomplete(f"{_show(path)}: {_NOT_FOLLOWED}")
    return _Incomplete(f"{_show(path)}: cannot open ({exc.strerror})")


_NOT_FOLLOWED = "a symlink or non-directory on the path, not followed"
_KINDS = {stat.S_IFLNK: "a symlink, not followed", stat.S_IFDIR: "a directory"}
_KINDS |= {stat.S_IFIFO: "a FIFO, not opened", stat.S_IFSOCK: "a socket, not opened"}
_KINDS |= {stat.S_IFCHR: "a device, not opened", stat.S_IFBLK: "a device, not opened"}


@contextmanager
def _open_regular(unit: _Unit, path: str) -> Iterator[tuple[int, int]]:
    """Yield (fd, size) of the listed regular file `path`; every failure is `_Incomplete`,
    about `path` unless it names other files."""
    try:
        with _opened_regular(unit, path) as opened:
            yield opened
    except _Incomplete as exc:
        exc.files = exc.files or (path,)
        raise


@contextmanager
def _opened_regular(unit: _Unit, path: str) -> Iterator[tuple[int, int]]:
    parts = _components(path)
    try:
        # lstat first so FIFOs and devices are never opened at all; fstat below catches a swap.
        fd, before = beneath.open_regular(unit.fd, "/".join(parts))
    except beneath.WrongTypeError as exc:
        if not exc.final:
            raise _Incomplete(f"{_show(path)}: {_NOT_FOLLOWED}") from None
        kind = _KINDS.get(stat.S_IFMT(exc.mode), "not a regular file")
        raise _Incomplete(f"{_show(path)}: is {kind}") from None
    except OSError as exc:
        raise _open_failure(path, exc) from None
    try:
        yield fd, _checked_size(unit, path, fd, before)
    except OSError as exc:
        raise _Incomplete(f"{_show(path)}: read failed ({exc.strerror})") from None
    finally:
        os.close(fd)


def _checked_size(unit: _Unit, path: str, fd: int, before: os.stat_result) -> int:
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
        raise _Incomplete(f"{_show(path)}: replaced while checking")
    listed = unit.sizes.get(path)
    if listed is not None and listed != now.st_size:
        change = f"{listed} bytes, now {now.st_size}"
        raise _Incomplete(f"{_show(path)}: changed since listed ({change})")
    return now.st_size


def _read_exact(fd: int, offset: int, length: int, path: str) -> bytes:
    return b"".join(_chunks(fd, offset, length, path))


def _chunks(fd: int, offset: int, length: int, path: str) -> Iterator[bytes]:
    """`length` bytes of `fd` from `offset`, in pieces of at most 1 MiB. Each piece is
    progress (`modelwatch.progress`): a long scan keeps its worker alive, and past the unit's
    inspection budget it stops here (OverBudget)."""
    while length > 0:
        progress()
        data = os.pread(fd, min(length, _CHUNK), offset)
        if not data:
            raise _Incomplete(f"{_show(path)}: shrank while checking")
        offset += len(data)
        length -= len(data)
        yield data


def _read_small(unit: _Unit, path: str) -> bytes:
    """The whole content of a small text file (`checkpoint`, `*.index.json`)."""
    with _open_regular(unit, path) as (fd, size):
        if size > MAX_TEXT_FILE:
            raise _Incomplete(f"{_show(path)}: too large ({size} bytes)")
        return _read_exact(fd, 0, size, path)


def _check_zip(path: str, fd: int, size: int) -> None:
    try:
        zipdir.check_central_directory(fd, size, MAX_ZIP_DIRECTORY)
    except zipdir.ZipError as exc:
        raise _Incomplete(f"{_show(path)}: {exc}") from None


def _resolve(directory: str, name: str) -> str | None:
    """`name` relative to `directory`, normalised; None when it leaves the unit."""
    joined = posixpath.normpath(posixpath.join(directory, name))
    if name.startswith("/") or joined in (".", "..") or joined.startswith("../"):
        return None
    return joined


# --- completeness checks, one per format -----------------------------------------------------


def _check_saved_models(unit: _Unit) -> None:
    pbs = unit.paths(lambda p: posixpath.basename(p) in ("saved_model.pb", "saved_model.pbtxt"))
    for model_dir in sorted({posixpath.dirname(pb) for pb in pbs}):
        variables_dir = posixpath.join(model_dir, "variables") + "/"
        if any(path.startswith(variables_dir) for path in unit.sizes):
            _check_bundle(unit, variables_dir + "variables")


def _check_bundle(unit: _Unit, prefix: str, named_in: str | None = None) -> None:
    """A TF tensor bundle: `<prefix>.index` and every `<prefix>.data-i-of-M` shard (`named_in`:
    the file that names the prefix)."""
    unit.require(prefix + ".index", named_in)
    totals = set()
    for path in unit.sizes:
        match = _SHARD_SUFFIX.fullmatch(path, len(prefix)) if path.startswith(prefix) else None
        if match is not None:
            totals.add(int(match.group(2)))
    if not totals:
        # A bundle always has at least one data file, even with no variables.
        where = f" (named in {_show(named_in)})" if named_in else ""
        first = f"{prefix}.data-00000-of-*"
        raise _Incomplete(f"{_show(first)} missing{where}", (first, prefix + ".index"))
    for total in sorted(totals):
        if total == 0:
            impossible = f"{_show(prefix)}.data-*-of-00000: impossible shard count"
            raise _Incomplete(impossible, (prefix + ".index",))
        for index in range(total):
            unit.require(f"{prefix}.data-{index:05d}-of-{total:05d}", named_in)


def _check_tf_checkpoints(unit: _Unit) -> None:
    by_dir = _names_by_dir(unit.sizes)
    for directory in sorted(d for d, names in by_dir.items() if _is_tf_checkpoint_dir(names)):
        state = posixpath.join(directory, "checkpoint")
        try:
            named = _checkpoint_prefix(_read_small(unit, state))
        except ValueError as exc:
            raise _Incomplete(f"{_show(state)}: unparseable ({exc})", (state,)) from None
        # TF records absolute paths when saving to one; the files sit beside `checkpoint`.
        prefix = _resolve(directory, posixpath.basename(named) if named.startswith("/") else named)
        if prefix is None:
            raise _Incomplete(f"{_show(state)}: model_checkpoint_path leaves the unit", (state,))
        _check_bundle(unit, prefix, state)


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


def _checkpoint_prefix(text: bytes) -> str:
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


def _each_file(suffixes: tuple[str, ...], check: _FileCheck) -> Callable[[_Unit], None]:
    """A unit check running `check(path, fd, size)` on every non-empty file with a suffix."""

    def check_each(unit: _Unit) -> None:
        for path in unit.paths(lambda p: p.endswith(suffixes)):
            with _open_regular(unit, path) as (fd, size):
                if size == 0:
                    raise _Incomplete(f"{_show(path)}: empty")
                check(path, fd, size)

    return check_each


def _check_safetensors_file(path: str, fd: int, size: int) -> None:
    shown = _show(path)
    if size < 8:
        raise _Incomplete(f"{shown}: truncated ({size} bytes, no header length)")
    (header_len,) = struct.unpack("<Q", _read_exact(fd, 0, 8, path))
    if header_len > MAX_SAFETENSORS_HEADER:
        raise _Incomplete(f"{shown}: header too large ({header_len} bytes)")
    if 8 + header_len > size:
        ends = f"header ends at {8 + header_len}, file has {size}"
        raise _Incomplete(f"{shown}: truncated ({ends})")
    try:
        data_end = _data_end(_chunks(fd, 8, header_len, path))
    except ValueError as exc:  # jsonscan.JsonError, or what the header says
        raise _Incomplete(f"{shown}: header malformed ({exc})") from None
    expected = 8 + header_len + data_end
    if expected > size:
        raise _Incomplete(f"{shown}: truncated (header says {expected} bytes, file has {size})")
    if expected < size:
        raise _Incomplete(f"{shown}: size mismatch (header says {expected} bytes, file has {size})")


def _data_end(header: Iterable[bytes]) -> int:
    """The end of the data section a safetensors header describes; ValueError if it does not
    describe one. Streamed: only one tensor's entry is built at a time."""
    end, problem = 0, ""
    for path, value in jsonscan.scan(header, build_depth=1, max_value=_MAX_JSON_VALUE):
        if not path:
            problem = "" if value is jsonscan.OBJECT else "not a JSON object"
        elif not problem and path[0] != "__metadata__":
            name = _show(str(path[0]), 60)
            offsets = value.get("data_offsets") if isinstance(value, dict) else None
            if value is jsonscan.TOO_LARGE:
                problem = f"entry of tensor {name!r} longer than {_MAX_JSON_VALUE} bytes"
            elif offsets is not None and _valid_offsets(offsets):
                end = max(end, offsets[1])
            else:
                problem = f"bad data_offsets for tensor {name!r}"
    # Reported once the whole header has been read: a syntax error anywhere comes first.
    if problem:
        raise ValueError(problem)
    return end


def _valid_offsets(offsets: Any) -> bool:
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(offset) is int and offset >= 0 for offset in offsets)
        and offsets[0] <= offsets[1]
    )


def _check_hf_indexes(unit: _Unit) -> None:
    for index in unit.paths(lambda p: p.endswith(".index.json")):
        with _open_regular(unit, index) as (fd, size):
            if size > MAX_TEXT_FILE:
                raise _Incomplete(f"{_show(index)}: too large ({size} bytes)")
            try:
                problem = _shard_index_problem(unit, index, _chunks(fd, 0, size, index))
            except jsonscan.JsonError:
                raise _Incomplete(f"{_show(index)}: not valid JSON") from None
        if problem is not None:
            raise problem
    # Shards that exist are checked by the safetensors and pytorch checks that follow.


def _shard_index_problem(unit: _Unit, index: str, text: Iterable[bytes]) -> _Incomplete | None:
    """What keeps a shard index's checkpoint incomplete (None for nothing, or when the JSON
    is not a shard index: some other file). Streamed: one weight_map entry at a time; of the
    shards that are missing, the one first by name is reported."""
    is_object = has_map = not_names = False
    first_bad: tuple[str, _Incomplete] | None = None
    for path, value in jsonscan.scan(text, build_depth=2, max_value=_MAX_JSON_VALUE):
        if not path:
            is_object = value is jsonscan.OBJECT
        elif path == ("weight_map",):
            has_map = True
            not_names = not_names or value is not jsonscan.OBJECT
        elif len(path) == 2 and path[0] == "weight_map" and not not_names:
            if not isinstance(value, str):
                not_names = True
            elif first_bad is None or value < first_bad[0]:
                problem = _missing_shard(unit, index, value)
                first_bad = (value, problem) if problem is not None else first_bad
    if not (is_object and has_map):
        return None  # some other JSON file; a partly written shard index is never valid JSON
    if not_names:
        return _Incomplete(f"{_show(index)}: weight_map is not an object of file names", (index,))
    return first_bad[1] if first_bad else None


def _missing_shard(unit: _Unit, index: str, shard: str) -> _Incomplete | None:
    path = _resolve(posixpath.dirname(index), shard)
    if path is None:
        outside = f"weight_map names {_show(shard) or repr(shard)} outside the unit"
        return _Incomplete(f"{_show(index)}: {outside}", (index,))
    try:
        unit.require(path, named_in=index)
    except _Incomplete as exc:
        return exc
    return None


def _check_torch_file(path: str, fd: int, size: int) -> None:
    magic = _read_exact(fd, 0, min(size, len(ZIP_MAGIC)), path)
    if magic == ZIP_MAGIC:
        _check_zip(path, fd, size)
    elif size < len(ZIP_MAGIC) and ZIP_MAGIC.startswith(magic):
        raise _Incomplete(f"{_show(path)}: truncated zip ({size} bytes)")
    # Anything else is a legacy pickle: non-empty is all that can be checked cheaply.


def _check_torch_dcp(unit: _Unit) -> None:
    shards = unit.paths(lambda p: p.endswith(".distcp"))
    for directory in sorted({posixpath.dirname(shard) for shard in shards}):
        unit.require(posixpath.join(directory, ".metadata"))


_check_safetensors = _each_file((".safetensors",), _check_safetensors_file)
_check_torch_files = _each_file(_TORCH_SUFFIXES, _check_torch_file)

_CHECKS: dict[str, tuple[Callable[[_Unit], None], ...]] = {
    "saved_model": (_check_saved_models,),
    "tf_checkpoint": (_check_tf_checkpoints,),
    "keras": (_each_file((".keras",), _check_zip),),
    "onnx": (_each_file((".onnx",), lambda path, fd, size: None),),
    "pytorch": (_check_torch_files,),
    "safetensors": (_check_safetensors,),
    # HF checkpoints also hold torch.save files (pytorch_model.bin, optimizer.pt, ...).
    "huggingface": (_check_hf_indexes, _check_safetensors, _check_torch_files),
    "torch_dcp": (_check_torch_dcp,),
    "mlflow": (),
    "unknown": (),
}
