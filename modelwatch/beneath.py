"""Opening files beneath a directory without ever leaving it.

Everything below a watched root is written by untrusted training code, which may swap any
directory for a symlink between a scan and a read. Python's `os` has no openat2 with
RESOLVE_BENEATH, so paths are opened one component at a time, each relative to its parent's
fd with O_NOFOLLOW: a symlink anywhere below the starting directory is refused, never followed.

* `open_directory(root, rel)`: `root` is opened following symlinks (an operator chose it, and
  `/artifacts -> /mnt/x` is legitimate); every component of `rel` is a real directory.
* `open_unit(unit_dir, follow_top=..., identity=...)` / `unit_directory(...)`: a unit's
  directory as a scan saw it (see `open_unit`).
* `open_regular(dir_fd, rel)`: a regular file below `dir_fd`. The last component is lstat-ed
  before it is opened, so FIFOs and devices are never opened; O_NONBLOCK covers one swapped in
  after the lstat, and an fstat after the open makes sure a regular file is what was opened.

Names are `str` (surrogate escapes) or raw `bytes`; `/` separates components, empty and `.`
components are skipped, and `..` is refused (EINVAL). A component of the wrong type raises
`WrongTypeError`, an `OSError` naming the path up to that component; every other failure is
the `OSError` of the failing call (ENOENT when something vanished). Names the OS cannot take
(NUL bytes, unencodable text) raise `ValueError`, as `os.open` does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_SEP = b"/"


_KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class WrongTypeError(OSError):
    """`name` (the path up to the offending component) is a `kind` (file type `mode`), but a
    directory (`final` False: a component on the way) or a regular file (`final` True) was
    needed. errno is ELOOP for a symlink, else ENOTDIR, EISDIR or EINVAL."""

    def __init__(self, mode: int, name: str, final: bool) -> None:
        self.mode, self.name, self.final = mode, name, final
        self.kind = _KINDS.get(stat.S_IFMT(mode), "special file")
        if stat.S_ISLNK(mode):
            code, text = errno.ELOOP, f"is a {self.kind}, not followed"
        else:
            code = (
                (errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL) if final else errno.ENOTDIR
            )
            text = f"is a {self.kind}, not a {'regular file' if final else 'directory'}"
        super().__init__(code, text, name)


def open_directory(root: str | bytes, rel: str | bytes = b"") -> int:
    """An fd of the directory `rel` below `root`: `root` followed, nothing below it."""
    parts = _parts(rel)
    return _walk(os.open(root, _ROOT_FLAGS), parts)


def open_unit(
    unit_dir: str, *, follow_top: bool = True, identity: tuple[int, int] | None = None
) -> int:
    """An fd of the unit directory `unit_dir`.

    `follow_top` (a depth-0 root: the unit is the configured root, which may be a symlink):
    `unit_dir` is opened following symlinks. Otherwise its last component is opened below its
    parent with O_NOFOLLOW, so a unit directory swapped for a symlink is refused (ENOTDIR).
    `identity`, the (st_dev, st_ino) a scan recorded, must match the directory opened (else
    ESTALE): a directory above the unit (depth 2 and more) or the unit itself swapped since
    the scan can only lead to another directory.
    """
    parent, name = os.path.split(unit_dir.rstrip(os.sep) or os.sep)
    # "/" and paths ending in "." or ".." (`modelwatch validate ..`) have no last name to refuse
    if follow_top or name in ("", os.curdir, os.pardir):
        fd = open_directory(unit_dir)
    else:
        fd = open_directory(parent or os.curdir, name)
    if identity is not None and not is_identity(fd, identity):
        raise OSError(errno.ESTALE, "replaced since it was scanned", unit_dir)
    return fd


def is_identity(fd: int, identity: tuple[int, int]) -> bool:
    """True when `fd` is the file (st_dev, st_ino) `identity`; otherwise the fd is closed (also
    when fstat fails, which raises)."""
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        return False
    return True


@contextmanager
def unit_directory(
    unit_dir: str, *, follow_top: bool = True, identity: tuple[int, int] | None = None
) -> Iterator[int]:
    """`open_unit` as a context manager: the fd is closed on exit."""
    fd = open_unit(unit_dir, follow_top=follow_top, identity=identity)
    try:
        yield fd
    finally:
        os.close(fd)


def open_regular(dir_fd: int, rel: str | bytes) -> tuple[int, os.stat_result]:
    """(fd, lstat before the open) of the regular file `rel` below `dir_fd`, no symlink followed.

    The fd is a regular file (checked with fstat); the caller closes it. Comparing the lstat
    result with a later fstat tells whether the file was replaced by another one meanwhile.
    """
    parts = _parts(rel)
    if not parts:
        raise OSError(errno.EINVAL, "no file name", os.fsdecode(rel))
    *parents, name = parts
    parent_fd = _walk(os.dup(dir_fd), parents) if parents else dir_fd
    try:
        shown = os.fsdecode(_SEP.join([*parents, name]))
        before = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISREG(before.st_mode):
            raise WrongTypeError(before.st_mode, shown, final=True)
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symlink since the lstat
                raise WrongTypeError(stat.S_IFLNK, shown, final=True) from None
            raise
    finally:
        if parent_fd != dir_fd:
            os.close(parent_fd)
    try:
        mode = os.fstat(fd).st_mode  # or replaced by something else
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise WrongTypeError(mode, shown, final=True)
    return fd, before


def _parts(rel: str | bytes) -> list[bytes]:
    raw = os.fsencode(rel)
    parts = [part for part in raw.split(_SEP) if part not in (b"", b".")]
    if b".." in parts:
        raise OSError(errno.EINVAL, "'..' leads out of the directory", os.fsdecode(raw))
    return parts


def _walk(fd: int, parts: list[bytes]) -> int:
    """Descend from `fd` (consumed: closed unless returned) through the directories `parts`."""
    for i, part in enumerate(parts):
        try:
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            failure: OSError = exc
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # not a directory, or a symlink
                try:
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                except OSError:
                    mode = stat.S_IFDIR
                if not stat.S_ISDIR(mode):
                    shown = os.fsdecode(_SEP.join(parts[: i + 1]))
                    failure = WrongTypeError(mode, shown, final=False)
            os.close(fd)
            raise failure from None
        os.close(fd)
        fd = child
    return fd
