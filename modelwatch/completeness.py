"""Whether a unit's model files are completely written (SPEC §6): the checks `formats` names.

Each check takes the unit (its directory fd and the caller's listing: relative path -> size)
and raises `_Incomplete` with one short reason naming a file (and the files it is about);
`check(unit_dir, checks, ...)` runs a format's checks and returns the first as a `Reason`,
or None when every one passes.
Existence rules are answered from the listing; the files whose content matters are opened and
read with bounded reads, each MiB read being progress (`modelwatch.progress`).

The files are written by untrusted training code, so nothing here raises for what it finds on
disk. Paths are opened one component at a time relative to the unit with O_NOFOLLOW (a
directory swapped for a symlink cannot lead outside the unit; `modelwatch.beneath`), and with
`follow_top=False` the unit directory itself too, below its parent. Only regular files are
opened, and a file whose size differs from the listing is a reason: it changed since the
listing, and "complete" must describe the listing the caller fingerprints.
"""

from __future__ import annotations

import errno
import functools
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
from modelwatch.describe import safetensors
from modelwatch.describe.pytorch import TORCH_SUFFIXES
from modelwatch.progress import progress
from modelwatch.reasons import Reason
from modelwatch.tfstate import checkpoint_prefix

# Headers are scanned in linear time and bounded memory: about 0.1 s per MB for real ones,
# 0.5 s per MB for the worst hostile shape (bench/parsers.py).
MAX_SAFETENSORS_HEADER = safetensors.MAX_HEADER
MAX_TEXT_FILE = 16 * 1024 * 1024  # `checkpoint` and `*.index.json` are small text files
ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
# The JSON in model files is scanned, never built whole; one tensor's entry in a safetensors
# header (name, dtype, shape, offsets) or one weight_map entry is a few hundred bytes.
_MAX_JSON_VALUE = safetensors.MAX_ENTRY
_SHARD_SUFFIX = re.compile(r"\.data-(\d{5})-of-(\d{5})")


def check(
    unit_dir: str,
    checks: Iterable[Check],
    sizes: Mapping[str, int],
    *,
    also: Iterable[Check] = (),
    follow_top: bool = True,
    identity: tuple[int, int] | None = None,
) -> Reason | None:
    """None when every one of `checks` passes on the unit, else the first one's reason: a
    `Reason` (code `incomplete`, or `unit_unavailable` when the unit directory cannot be
    opened) whose message names the file and whose `files` hold it first (then the file that
    named it: a shard index, `checkpoint`).

    `also`: checks of the other formats the unit holds, which judge only what was written
    (a truncated zip, a cut safetensors header): an empty file of another format does not
    hold the unit back (a stray `.bin` next to a model would keep it waiting forever).

    `follow_top` and `identity` say how the unit directory is opened (`beneath.open_unit`).
    """
    checks, also = tuple(checks), tuple(also)
    if not checks and not also:
        return None
    try:
        unit_fd = beneath.open_unit(unit_dir, follow_top=follow_top, identity=identity)
    except OSError as exc:
        return Reason("unit_unavailable", f"unit directory cannot be opened ({exc.strerror})")
    try:
        unit = _Unit(unit_fd, sizes)
        for each in checks:
            each(unit)
        written = _Unit(unit_fd, sizes, empty_is_incomplete=False)
        for each in also:
            each(written)
    except _Incomplete as exc:
        return Reason("incomplete", str(exc), exc.files)
    finally:
        os.close(unit_fd)
    return None


# --- names ---------------------------------------------------------------------------------


def names_by_dir(paths: Iterable[str]) -> dict[str, set[str]]:
    """The file names of each directory (relative POSIX paths split at their last `/`)."""
    by_dir: dict[str, set[str]] = {}
    for path in paths:
        directory, _, name = path.rpartition("/")
        by_dir.setdefault(directory, set()).add(name)
    return by_dir


def is_tf_checkpoint_dir(names: Collection[str]) -> bool:
    """`checkpoint` next to an `.index` table or a data shard (the detection rule too)."""
    # Data shards count too: they are unmistakably TF, and waiting for a missing index beats
    # registering the directory as "unknown" (always complete).
    return "checkpoint" in names and any(
        name.endswith(".index") or _SHARD_SUFFIX.search(name) for name in names
    )


def is_huggingface_dir(names: Collection[str]) -> bool:
    """`config.json` next to weights or a shard index (the detection rule)."""
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


@dataclass
class _Unit:
    fd: int
    sizes: Mapping[str, int]
    empty_is_incomplete: bool = True  # False: an empty file is skipped (see `check`)

    def paths(self, keep: Callable[[str], bool]) -> list[str]:
        """The listed paths for which `keep` is true, sorted so the first reason is stable."""
        return sorted(path for path in self.sizes if keep(path))

    @functools.cached_property
    def by_dir(self) -> dict[str, set[str]]:
        """`names_by_dir` of the listing, made once: a check per directory that walked the
        whole listing was quadratic (4,000 checkpoint directories: 3.4 s)."""
        return names_by_dir(self.sizes)

    @functools.cached_property
    def holding(self) -> set[str]:
        """Every directory with a file somewhere below it."""
        found: set[str] = set()
        for directory in self.by_dir:
            while directory and directory not in found:
                found.add(directory)
                directory = posixpath.dirname(directory)
        return found

    def require(self, path: str, named_in: str | None = None) -> None:
        if path not in self.sizes:
            where = f" (named in {_show(named_in)})" if named_in else ""
            files = (path, named_in) if named_in else (path,)
            raise _Incomplete(f"{_show(path)} missing{where}", files)


Check = Callable[[_Unit], None]  # raises _Incomplete with the reason


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
        zipdir.check_central_directory(fd, size, zipdir.MAX_DIRECTORY)
    except zipdir.ZipError as exc:
        raise _Incomplete(f"{_show(path)}: {exc}") from None


def _resolve(directory: str, name: str) -> str | None:
    """`name` relative to `directory`, normalised; None when it leaves the unit."""
    joined = posixpath.normpath(posixpath.join(directory, name))
    if name.startswith("/") or joined in (".", "..") or joined.startswith("../"):
        return None
    return joined


# --- the checks --------------------------------------------------------------------------


def saved_models(unit: _Unit) -> None:
    pbs = unit.paths(lambda p: posixpath.basename(p) in ("saved_model.pb", "saved_model.pbtxt"))
    for model_dir in sorted({posixpath.dirname(pb) for pb in pbs}):
        variables_dir = posixpath.join(model_dir, "variables")
        if variables_dir in unit.holding:
            _check_bundle(unit, variables_dir + "/variables")


def _check_bundle(unit: _Unit, prefix: str, named_in: str | None = None) -> None:
    """A TF tensor bundle: `<prefix>.index` and every `<prefix>.data-i-of-M` shard (`named_in`:
    the file that names the prefix)."""
    unit.require(prefix + ".index", named_in)
    totals = set()
    directory, _, stem = prefix.rpartition("/")
    for name in unit.by_dir.get(directory, ()):
        match = _SHARD_SUFFIX.fullmatch(name, len(stem)) if name.startswith(stem) else None
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


def tf_checkpoints(unit: _Unit) -> None:
    by_dir = unit.by_dir
    for directory in sorted(d for d, names in by_dir.items() if is_tf_checkpoint_dir(names)):
        state = posixpath.join(directory, "checkpoint")
        try:
            named = checkpoint_prefix(_read_small(unit, state))
        except ValueError as exc:
            raise _Incomplete(f"{_show(state)}: unparseable ({exc})", (state,)) from None
        # TF records absolute paths when saving to one; the files sit beside `checkpoint`.
        prefix = _resolve(directory, posixpath.basename(named) if named.startswith("/") else named)
        if prefix is None:
            raise _Incomplete(f"{_show(state)}: model_checkpoint_path leaves the unit", (state,))
        _check_bundle(unit, prefix, state)


def _each_file(suffixes: tuple[str, ...], check_file: _FileCheck) -> Check:
    """A unit check running `check_file(path, fd, size)` on every non-empty file with a
    suffix."""

    def check_each(unit: _Unit) -> None:
        for path in unit.paths(lambda p: p.endswith(suffixes)):
            with _open_regular(unit, path) as (fd, size):
                if size == 0 and not unit.empty_is_incomplete:
                    continue
                if size == 0:
                    raise _Incomplete(f"{_show(path)}: empty")
                check_file(path, fd, size)

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


def hf_shard_indexes(unit: _Unit) -> None:
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


def dcp_metadata(unit: _Unit) -> None:
    shards = unit.paths(lambda p: p.endswith(".distcp"))
    for directory in sorted({posixpath.dirname(shard) for shard in shards}):
        unit.require(posixpath.join(directory, ".metadata"))


def _nothing(path: str, fd: int, size: int) -> None:
    """Non-empty is all an ONNX file can be checked for cheaply."""


# The checks formats.FORMATS combines. HF checkpoints also hold torch.save files
# (pytorch_model.bin, optimizer.pt, ...), so the Hugging Face format runs the torch check too.
safetensors_files = _each_file((".safetensors",), _check_safetensors_file)
torch_files = _each_file(TORCH_SUFFIXES, _check_torch_file)
keras_files = _each_file((".keras",), _check_zip)
onnx_files = _each_file((".onnx",), _nothing)
