"""Scanning one model unit into a manifest.

A scan walks the unit directory without ever following a symlink, records every regular file
and symlink as (relative path, size, mtime_ns, inode), and sorts them by raw path bytes so the
same files give the same manifest on every node. Files matching the `ignore` patterns are left
out; files matching `in_progress` are kept aside (they mean "still being written"). FIFOs,
sockets and device files are skipped and never opened. A file that vanishes mid-scan is simply
not listed: the next scan decides whether the unit is stable. Each directory is listed through
an fd opened with O_NOFOLLOW and checked to be the directory its parent listed (st_dev,
st_ino), so a directory swapped for a symlink mid-scan is never listed: nothing outside the
unit reaches a manifest.

Paths are handled as bytes internally, so names that are not valid UTF-8 never break anything;
`Entry.path` is a display form (invalid bytes backslash-escaped) used in events and logs.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import marshal
import os
import queue
import re
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from modelwatch import beneath
from modelwatch.progress import progress

_SEP = b"/"
_S_ISREG = stat.S_ISREG
_S_ISDIR = stat.S_ISDIR
_MEMO = 1 << 16
EVENT_PREFIX = b"events.out.tfevents."  # TensorBoard's event files
MAX_EVENT_FILES = 1000


def display(raw: bytes) -> str:
    """Text form of a path: valid UTF-8 as is, other bytes as `\\xNN` escapes."""
    return raw.decode("utf-8", "backslashreplace")


class Entry(NamedTuple):
    """One file or symlink of a unit (a tuple: created once per file on every scan)."""

    raw: bytes  # relative path, '/'-separated
    size: int
    mtime_ns: int
    inode: int
    symlink_target: str | None = None

    @property
    def path(self) -> str:
        """Display form, for events and logs."""
        return display(self.raw)

    @property
    def name(self) -> str:
        """The relative path as the OS takes it (surrogate escapes), for opening the file."""
        return self.raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Manifest:
    """The result of one scan. `exists` is False when the unit directory is gone."""

    exists: bool
    entries: tuple[Entry, ...] = ()
    in_progress: tuple[str, ...] = ()
    too_many_files: bool = False
    unreadable: tuple[str, ...] = ()
    stat_key: tuple[tuple[bytes, int, int, int], ...] | None = field(default=None, compare=False)
    # Digest of every entry's (path, inode, size, mtime_ns, ctime_ns, mode), ignored ones and
    # directories included; None when the walk was incomplete. Equal digests: nothing on disk
    # changed (any write, rename, chmod or utime moves ctime, which no caller can set).
    scan_digest: bytes | None = field(default=None, compare=False)
    # The newest ctime (ns) of the unit directory and every entry, for `scan_digest`'s users.
    newest_change_ns: int = field(default=0, compare=False)
    # How to open the unit directory again for reading (`beneath.open_unit`): followed only
    # when it is a depth-0 root, and it must still be the directory scanned (st_dev, st_ino).
    follow_top: bool = field(default=False, compare=False)
    identity: tuple[int, int] | None = field(default=None, compare=False)
    # TensorBoard event files (ignored, so not in `entries`) the walk passed, relative and as
    # the OS takes them, at most `MAX_EVENT_FILES`: their scalars are the unit's metrics when
    # its metadata has none, and the description needs no second walk to find them.
    event_files: tuple[str, ...] = field(default=(), compare=False)

    @property
    def empty(self) -> bool:
        """No files at all (not even in-progress ones), and nothing that could not be read."""
        return (
            not self.entries
            and not self.in_progress
            and not self.too_many_files
            and not self.unreadable
        )

    @property
    def files(self) -> tuple[Entry, ...]:
        """Regular files only (symlinks excluded)."""
        return tuple(e for e in self.entries if e.symlink_target is None)

    @property
    def sizes(self) -> dict[str, int]:
        """Relative name (as the OS takes it) -> size of every regular file."""
        return {e.name: e.size for e in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)


class PatternSet:
    """Glob patterns relative to a unit, compiled once.

    A pattern without '/' matches a name at any depth (`*.log`); a pattern with '/' matches
    the whole relative path (`logs/*.txt`); a trailing '/' matches directories only
    (`__pycache__/`), whose whole subtree is then skipped.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        names, paths, dirs = [], [], []
        for pattern in patterns:
            if pattern.endswith("/"):
                dirs.append(pattern.rstrip("/"))
            elif "/" in pattern:
                paths.append(pattern.lstrip("/"))
            else:
                names.append(pattern)
        self._name = _compile(names)
        self._path = _compile(paths)
        self._dir = _compile(dirs)
        self._files: dict[str, bool] = {}  # memo: the same names recur in every unit

    def matches_file(self, rel: str) -> bool:
        hit = self._files.get(rel)
        if hit is None:
            if len(self._files) >= _MEMO:
                self._files.clear()
            name = rel.rsplit("/", 1)[-1]
            hit = self._files[rel] = _hit(self._name, name) or _hit(self._path, rel)
        return hit

    def matches_dir(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return _hit(self._dir, name) or _hit(self._dir, rel) or self.matches_file(rel)

    def matches_any_part(self, rel: str) -> bool:
        """True when the path or any directory above it matches (for change events)."""
        parts = rel.split("/")
        prefixes = ("/".join(parts[: i + 1]) for i in range(len(parts) - 1))
        return self.matches_file(rel) or any(self.matches_dir(p) for p in prefixes)


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.DOTALL)


def _hit(pattern: re.Pattern[str] | None, text: str) -> bool:
    return pattern is not None and pattern.match(text) is not None


def scan_unit(
    unit_dir: str,
    *,
    ignore: PatternSet,
    in_progress: PatternSet,
    max_files: int,
    follow_top: bool = False,
    watched_root: str | None = None,
) -> Manifest:
    """Scan `unit_dir` (see the module docstring). Never raises for what is on disk.

    `max_files` caps every entry the walk lists, not only the files kept: directories,
    symlinks, ignored and in-progress files, FIFOs, sockets and devices all count, so a unit
    of a million empty directories stops at the cap too (`too_many_files`, the walk cut
    short there).

    `follow_top`: the unit directory itself may be a symlink (a depth-0 root given as one);
    nothing below it is ever followed. `watched_root`: the root `unit_dir` lies more than one
    level below; the directories between are then found without following symlinks either.
    Only ENOENT/ENOTDIR mean "gone": any other error (EIO, ESTALE on NFS, EACCES) is reported
    as unreadable, so a hiccup never looks like a removal.
    """
    root = os.fsencode(unit_dir)
    try:
        st = _unit_stat(unit_dir, follow_top, watched_root)
    except (FileNotFoundError, NotADirectoryError, beneath.WrongTypeError):
        return Manifest(exists=False)
    except OSError as exc:
        reason = f". ({exc.strerror})"
        return Manifest(exists=True, unreadable=(reason,), stat_key=((reason.encode(), 0, 0, 0),))
    if not stat.S_ISDIR(st.st_mode):
        return Manifest(exists=False)
    walker = _Walker(root, ignore, in_progress, max_files)
    walker.walk((st.st_dev, st.st_ino), follow_top)
    complete = not walker.too_many and not walker.unreadable
    entries = tuple(sorted(walker.entries))  # raw paths are unique: tuple order is path order
    key = tuple(e[:4] for e in entries)
    key += tuple((p.encode("utf-8", "surrogateescape"), 0, 0, 0) for p in walker.in_progress)
    key += tuple((p.encode("utf-8", "surrogateescape"), -1, 0, 0) for p in walker.unreadable)
    return Manifest(
        exists=True,
        entries=entries,
        in_progress=tuple(sorted(walker.in_progress)),
        event_files=tuple(sorted(walker.event_files)),
        too_many_files=walker.too_many,
        unreadable=tuple(sorted(walker.unreadable)),
        stat_key=key,
        scan_digest=walker.digest() if complete else None,
        newest_change_ns=max([st.st_ctime_ns, *(r[4] for r in walker.raw)]),
        follow_top=follow_top,
        identity=(st.st_dev, st.st_ino),
    )


def scan_digest(
    unit_dir: str,
    *,
    ignore: PatternSet,
    max_files: int,
    follow_top: bool = False,
    watched_root: str | None = None,
) -> bytes | None:
    """`Manifest.scan_digest` of `unit_dir` now, from a walk that builds nothing else.

    None when the unit is gone or unreadable, or has more than twice `max_files` entries (a
    memory bound): there is no shortcut for it, the caller scans it in full. This is the
    periodic reconcile's inner loop, kept as tight as the bare walk it is measured against.
    """
    root = os.fsencode(unit_dir)
    try:
        st = _unit_stat(unit_dir, follow_top, watched_root)
    except OSError:
        return None
    if not _S_ISDIR(st.st_mode):
        return None
    limit = 2 * max_files
    raw: list[tuple[bytes, int, int, int, int, int]] = []
    append = raw.append
    stack = [(b"", (st.st_dev, st.st_ino))]
    while stack:
        rel_dir, identity = stack.pop()
        progress()
        prefix = rel_dir + _SEP if rel_dir else b""
        try:
            fd = _open_listed(root + _SEP + rel_dir if rel_dir else root, identity, follow_top)
            if fd is None:
                continue  # as in a full scan: removed or replaced while we looked
            try:
                with os.scandir(fd) as it:
                    for dirent in it:
                        try:
                            st = dirent.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        rel = prefix + dirent.name.encode("utf-8", "surrogateescape")
                        mode = st.st_mode
                        append((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode))
                        if len(raw) > limit:
                            return None  # within one directory too: a memory bound
                        if _S_ISDIR(mode) and not ignore.matches_dir(
                            rel.decode("utf-8", "surrogateescape")
                        ):
                            stack.append((rel, (st.st_dev, st.st_ino)))
            finally:
                os.close(fd)
        except OSError:
            return None
        follow_top = False
    return _digest(raw)


_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _unit_stat(unit_dir: str, follow_top: bool, watched_root: str | None) -> os.stat_result:
    """The unit directory's stat; its (st_dev, st_ino) is what every later open must find.

    Below a `watched_root`, every directory on the way is opened with O_NOFOLLOW (a unit two
    levels down whose parent was swapped for a symlink is gone, not read elsewhere).
    """
    if watched_root is None:
        return os.stat(unit_dir) if follow_top else os.lstat(unit_dir)
    fd = beneath.open_directory(watched_root, os.path.relpath(unit_dir, watched_root))
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _open_listed(path: bytes, identity: tuple[int, int], follow: bool) -> int | None:
    """An fd of the directory `path` if it is still the one its parent listed (st_dev, st_ino).

    None when it vanished or was replaced since: a symlink swapped in for it is refused
    (O_NOFOLLOW), one swapped in higher up leads to another directory, so a walk never lists
    anything outside the unit. Other errors raise OSError. Listing through the fd is also
    cheaper than by path: each entry is then stat-ed relative to it (fstatat).
    """
    try:
        fd = os.open(path, _LIST_FLAGS if follow else _LIST_FLAGS | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    return fd if beneath.is_identity(fd, identity) else None


def _digest(raw: list[tuple[bytes, int, int, int, int, int]]) -> bytes:
    """marshal version 2: no back-references, so equal lists always give equal bytes (from
    version 3 on, the output depends on reference counts)."""
    raw.sort()
    return hashlib.blake2b(marshal.dumps(raw, 2), digest_size=16).digest()


class _Walker:
    """Iterative directory walk with an explicit stack (deep trees cannot overflow it)."""

    def __init__(
        self,
        root: bytes,
        ignore: PatternSet,
        in_progress: PatternSet,
        max_files: int,
    ) -> None:
        self.root = root
        self.raw: list[tuple[bytes, int, int, int, int, int]] = []
        self.ignore = ignore
        self.in_progress_patterns = in_progress
        self.max_files = max_files
        self.entries: list[Entry] = []
        self.in_progress: list[str] = []
        self.event_files: list[str] = []
        self.unreadable: list[str] = []
        self.too_many = False
        self.walked = 0  # every entry listed: files, directories, links, ignored, special
        self._fd = -1  # the directory being listed

    def walk(self, identity: tuple[int, int], follow_top: bool) -> None:
        """Walk from the unit directory, `identity` its (st_dev, st_ino) as stat-ed."""
        stack: list[tuple[bytes, tuple[int, int]]] = [(b"", identity)]
        while stack and not self.too_many:
            rel_dir, identity = stack.pop()
            stack.extend(self._scan_dir(rel_dir, identity, follow_top))
            follow_top = False

    def _scan_dir(
        self, rel_dir: bytes, identity: tuple[int, int], follow: bool
    ) -> list[tuple[bytes, tuple[int, int]]]:
        path = self.root + _SEP + rel_dir if rel_dir else self.root
        subdirs: list[tuple[bytes, tuple[int, int]]] = []
        progress()  # a walk of a million directories is long work, and bounded by a budget
        try:
            fd = _open_listed(path, identity, follow)
            if fd is None:
                return subdirs  # removed or replaced while we looked; the next scan sees it
            self._fd = fd
            try:
                with os.scandir(fd) as it:
                    for dirent in it:
                        # Everything listed counts, so the cap bounds the walk's time and
                        # memory too (a million empty directories or ignored files).
                        self.walked += 1
                        if self.walked > self.max_files:
                            self.too_many = True
                            break
                        name = dirent.name.encode("utf-8", "surrogateescape")
                        rel = rel_dir + _SEP + name if rel_dir else name
                        sub = self._visit(dirent, rel)
                        if sub is not None:
                            subdirs.append(sub)
            finally:
                os.close(fd)
        except OSError as exc:
            self.unreadable.append(f"{display(rel_dir) or '.'} ({exc.strerror})")
        return subdirs

    def digest(self) -> bytes:
        """The scan digest of every entry seen (see `scan_digest`)."""
        return _digest(self.raw)

    def _visit(self, dirent: os.DirEntry[str], rel: bytes) -> tuple[bytes, tuple[int, int]] | None:
        try:
            st = dirent.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.unreadable.append(f"{display(rel)} ({exc.strerror})")
            return None
        mode = st.st_mode
        self.raw.append((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode))
        text = rel.decode("utf-8", "surrogateescape")
        if _S_ISDIR(mode):
            return None if self.ignore.matches_dir(text) else (rel, (st.st_dev, st.st_ino))
        ignored = self.ignore.matches_file(text)
        if _S_ISREG(mode) and not ignored and not self.in_progress_patterns.matches_file(text):
            self._add_file(rel, st)  # the common case, first
            return None
        if ignored:
            name = rel.rpartition(_SEP)[2]
            scalars = name.startswith(EVENT_PREFIX) and _S_ISREG(mode)
            if scalars and len(self.event_files) < MAX_EVENT_FILES:
                self.event_files.append(text)
            return None
        if self.in_progress_patterns.matches_file(text):
            self.in_progress.append(display(rel))
            return None
        if stat.S_ISLNK(mode):
            self._add_link(rel, st)
        return None  # FIFOs, sockets, devices: skipped, never opened

    def _add_file(self, rel: bytes, st: os.stat_result) -> None:
        self.entries.append(Entry(rel, st.st_size, st.st_mtime_ns, st.st_ino))

    def _add_link(self, rel: bytes, st: os.stat_result) -> None:
        try:  # relative to the directory being listed: its name is the last component
            target = display(os.readlink(rel.rpartition(_SEP)[2], dir_fd=self._fd))
        except OSError:
            target = ""
        self.entries.append(Entry(rel, 0, st.st_mtime_ns, st.st_ino, target))


def fingerprint(entries: Sequence[Entry], digests: dict[bytes, str] | None = None) -> str:
    """`sha256:<hex>` over the sorted manifest.

    Each entry contributes `path NUL size NUL (mtime_ns | content digest) [NUL "->" target] LF`.
    With `digests` (content_digest = "sha256") the content digest replaces mtime_ns, so the
    fingerprint survives copies that do not preserve modification times.
    """
    lines = []
    for e in sorted(entries, key=lambda e: e.raw):
        second = digests.get(e.raw, "").encode() if digests is not None else b"%d" % e.mtime_ns
        line = b"%s\0%d\0%s" % (e.raw, e.size, second)
        if e.symlink_target is not None:
            line += b"\0->" + e.symlink_target.encode("utf-8", "surrogateescape")
        lines.append(line)
    lines.append(b"")
    return "sha256:" + hashlib.sha256(b"\n".join(lines)).hexdigest()


def pending_fingerprint(manifest: Manifest) -> str:
    """A fingerprint that also covers in-progress file names (for `not_settled` events)."""
    marks = [Entry(p.encode("utf-8", "surrogateescape"), 0, 0, 0) for p in manifest.in_progress]
    return fingerprint([*manifest.entries, *marks])


def sha256_file(
    unit_dir: str, entry: Entry, chunk: int = 4 << 20, *, dir_fd: int | None = None
) -> str | None:
    """Content digest of the `entry.size` bytes the manifest lists of one regular file (a file
    that grew since the scan is not read without bound: the next scan sees its new size);
    None when it cannot be read as one.

    The file is opened below `unit_dir` (or the unit directory open as `dir_fd`, when given)
    one component at a time, never following a symlink below that directory
    (`beneath.open_regular`); FIFOs and devices are never opened.

    Reads into one reused buffer (no per-chunk allocation). Large files are read ahead on a
    second thread into reused 1 MiB buffers: the copy out of the page cache (about a sixth of
    the hashing time) then overlaps the hashing instead of adding to it.
    """
    try:
        top = beneath.open_directory(unit_dir) if dir_fd is None else dir_fd
        try:
            fd, _ = beneath.open_regular(top, entry.raw)
        finally:
            if top != dir_fd:
                os.close(top)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        if st.st_size >= _READ_AHEAD_FROM:
            _hash_read_ahead(fd, h, 1 << 20, entry.size)
            return h.hexdigest()
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        left = entry.size
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            while left > 0 and (n := f.readinto(view[: min(chunk, left)])):
                h.update(view[:n])
                left -= n
                progress()
        return h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


_READ_AHEAD_FROM = 8 << 20


def _hash_read_ahead(fd: int, h: Any, chunk: int, limit: int, depth: int = 3) -> None:
    """Hash the first `limit` bytes of `fd` while a reader thread fills the next buffers.

    The reader stops at end of file, on a read error (raised here) or when it takes the
    `None` this side puts back on any exit, so it never outlives the call (the fd is closed
    right after).
    """
    free: queue.Queue[bytearray | None] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
    for _ in range(depth):
        free.put(bytearray(chunk))

    left = limit

    def read() -> None:
        nonlocal left
        while (buf := free.get()) is not None:
            try:
                n = os.readv(fd, [memoryview(buf)[: min(chunk, left)]]) if left > 0 else 0
                left -= n
            except BaseException as exc:  # forwarded: the hashing side must not wait forever
                full.put(exc)
                return
            full.put((buf, n))
            if n == 0:
                return

    reader = threading.Thread(target=read, name="sha256-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = full.get()
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            if n == 0:
                return
            h.update(memoryview(buf)[:n])
            free.put(buf)
            progress()  # hashing 500 GB is progress; past the unit's budget it stops here
    finally:
        free.put(None)
        reader.join()
