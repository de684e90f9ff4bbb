"""Bounded reads of a unit's files for the describers: caps, a deadline and progress.

Every describer reads through one `Source`, which owns what a description may cost:

* files are opened below the unit's directory fd with `beneath.open_regular` (no symlink
  followed, no FIFO opened) and must still have the size the manifest listed;
* reads use `os.pread`, never `mmap`: a file truncated while it is read ends as a
  `DescribeError`, not as a SIGBUS that would kill the process;
* `Blob.read` serves small reads (protobuf field headers) from a one-block cache, so a walk
  that skips the weight bytes of a 1 GB file reads only the pages it looks at;
* `tick` counts bytes and steps: `progress(n)` is called every `PROGRESS_BYTES` read and
  every 4096 steps or 64 KiB block (n: the bytes read since the last call), and a describer
  past its deadline or its step budget stops with `describe_too_large`.

`DescribeError` is the one exception a describer raises for bad input; `describe_with`
turns it into the description's `error`. A `progress` callback raises `Stopped` to end a
description at once (the job it runs in is out of time): that too becomes its `error`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from modelwatch import beneath

PROGRESS_BYTES = 4 << 20
_BLOCK = 64 << 10


@dataclass(frozen=True, slots=True)
class Limits:
    """What one description may cost. The defaults fit a 256 MiB sidecar running 4 pool
    workers: the largest structure held in memory at once is one pickle and what it builds
    (about 45 MiB at worst); JSON is scanned (`jsonscan`), zips streamed (`zipdir`),
    protobufs walked (`protowire`), and listings capped (`Tensors`)."""

    seconds: float = 120.0
    steps: int = 50_000_000  # protobuf fields, table entries, pickle opcodes, records
    header_bytes: int = 16 << 20  # a JSON file or member (scanned, never held whole)
    pickle_bytes: int = 8 << 20  # a pickle, held whole while it is interpreted
    index_bytes: int = 256 << 20  # a TF `.index` table
    message_bytes: int = 64 << 20  # one protobuf message read whole (a signature, a shape)
    listed: int = 1000  # tensors / variables listed by name; counts cover all of them
    # Opcodes of one pickle: each builds or keeps at most one object, about 40 bytes in a
    # torch.save pickle (32 opcodes per tensor: 15,000 tensors), 70 at worst (`]` repeated).
    pickle_ops: int = 500_000


DEFAULT_LIMITS = Limits()


class DescribeError(ValueError):
    """A file could not be described: `code` (`describe_malformed`, `describe_too_large`,
    `describe_io`, `describe_unsupported`), the file relative to the unit, and why."""

    def __init__(self, code: str, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.code, self.file, self.message = code, file, message

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "file": self.file, "message": self.message}


class Stopped(Exception):
    """Raised by a `progress` callback: the description ends at once, `code` and `message`
    becoming its `error` about the file being read. Readers never catch it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def malformed(file: str, message: str) -> DescribeError:
    return DescribeError("describe_malformed", file, message)


def too_large(file: str, message: str) -> DescribeError:
    return DescribeError("describe_too_large", file, message)


class Source:
    """The files of one unit (`files`: relative path -> manifest size) below `dir_fd`."""

    def __init__(
        self,
        dir_fd: int,
        files: Mapping[str, int],
        *,
        progress: Callable[[int], None] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir_fd, self.files, self.limits = dir_fd, files, limits
        self._progress, self._clock = progress, clock
        self._deadline = clock() + limits.seconds
        self._unreported = 0
        self._steps = 0
        self.file = ""  # the file being read, for errors raised by the budget

    def tick(self, nbytes: int = 0, steps: int = 1) -> None:
        """Account for `nbytes` read and `steps` parsed; report progress, enforce the budget."""
        self._unreported += nbytes
        self._steps += steps
        if self._unreported >= PROGRESS_BYTES:
            self.flush()
        if self._steps > self.limits.steps:
            raise too_large(self.file, f"more than {self.limits.steps} parse steps")
        if (self._steps & 0xFFF) < steps or nbytes >= _BLOCK:
            if self._clock() > self._deadline:
                raise too_large(self.file, f"not described within {self.limits.seconds:g} s")
            if self._progress is not None:  # parsing without reading is progress too
                self._progress(self._unreported)
                self._unreported = 0

    def flush(self) -> None:
        """Report the bytes read since the last report."""
        if self._unreported and self._progress is not None:
            self._progress(self._unreported)
        self._unreported = 0

    @contextmanager
    def open(self, rel: str) -> Iterator[Blob]:
        """The file `rel` as a `Blob`; it must be a regular file of its manifest size."""
        self.file = rel
        try:
            fd, _ = beneath.open_regular(self.dir_fd, rel)
        except (OSError, ValueError) as exc:
            raise DescribeError("describe_io", rel, _reason(exc)) from None
        try:
            size = os.fstat(fd).st_size
            listed = self.files.get(rel)
            if listed is not None and size != listed:
                raise DescribeError(
                    "describe_io", rel, f"changed since it was listed ({listed} -> {size} bytes)"
                )
            yield Blob(self, fd, size, rel)
        finally:
            os.close(fd)

    def paths(self, keep: Callable[[str], bool]) -> list[str]:
        """The listed files `keep` accepts, shallowest first, then by path."""
        return sorted((p for p in self.files if keep(p)), key=lambda p: (p.count("/"), p))

    def first(self, keep: Callable[[str], bool], what: str) -> str:
        """The first of `paths(keep)`; `describe_malformed` when there is none."""
        found = self.paths(keep)
        if not found:
            raise malformed("", f"no {what} in the unit")
        return found[0]

    def read_small(self, rel: str, cap: int | None = None) -> bytes:
        """The whole content of `rel`, which must be at most `cap` (header_bytes) bytes."""
        cap = self.limits.header_bytes if cap is None else cap
        with self.open(rel) as blob:
            if blob.size > cap:
                raise too_large(rel, f"{blob.size} bytes, more than the {cap} read whole")
            return blob.read(0, blob.size)


class Blob:
    """Random access to one open file through `pread`, bounds-checked against its size."""

    def __init__(self, source: Source, fd: int, size: int, name: str) -> None:
        self.source, self.fd, self.size, self.name = source, fd, size, name
        self._block_at = -1
        self._block = b""

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or `describe_malformed` (past the end)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise malformed(self.name, f"{length} bytes at offset {offset} pass the end")
        if length <= 256:
            return self._cached(offset, length)
        chunks = []
        done = 0
        while done < length:
            want = min(length - done, 8 << 20)
            chunk = _pread(self, want, offset + done)
            chunks.append(chunk)
            done += len(chunk)
            self.source.tick(len(chunk), 0)
        return b"".join(chunks)

    def _cached(self, offset: int, length: int) -> bytes:
        start = offset - self._block_at
        if self._block_at < 0 or start < 0 or start + length > len(self._block):
            self._block_at = offset
            self._block = _pread(self, min(_BLOCK, self.size - offset), offset)
            self.source.tick(len(self._block), 0)
            start = 0
        return self._block[start : start + length]


def _pread(blob: Blob, length: int, offset: int) -> bytes:
    try:
        data = os.pread(blob.fd, length, offset)
    except OSError as exc:
        raise DescribeError("describe_io", blob.name, _reason(exc)) from None
    if len(data) < length:  # shrank under us: never trust the earlier size again
        raise DescribeError("describe_io", blob.name, "truncated while it was read")
    return data


def _reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return str(exc)
