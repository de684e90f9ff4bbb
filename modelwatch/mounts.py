"""Which observer suits a root: inotify on local filesystems, polling on network ones.

inotify only reports changes made through the local kernel: writes by other NFS clients,
another node on shared storage, or the host side of a FUSE or 9p share are never seen. So
`observer = "auto"` reads the mount table and polls roots on such filesystems. The decision is
pure (`choose_observer`) and the mount table parsing is pure (`filesystem_type`) so both are
tested on literal text.
"""

from __future__ import annotations

import os

# Filesystems whose changes may come from outside this kernel.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "9p",
        "afs",
        "ocfs2",
        "gfs2",
        "virtiofs",
        "vboxsf",
        "davfs",
        "fuseblk",
        "fuse",
        "orangefs",
        "pvfs2",
        "panfs",
        "wekafs",
        "quobyte",
        "juicefs",
    }
)

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    r"""Mount points in mountinfo escape space, tab, newline and backslash as \ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) for each line of /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mounts.append((_unescape(fields[4]), tail[0]))
    return mounts


def filesystem_type(path: str, mountinfo: str) -> str | None:
    """The type of the filesystem holding `path` (an absolute, resolved path)."""
    best: tuple[int, str] | None = None
    for point, fstype in parse_mountinfo(mountinfo):
        inside = path == point or path.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fstype)
    return best[1] if best else None


def is_network(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse."))


def choose_observer(configured: str, fstype: str | None) -> str:
    """`inotify` or `polling` for a root, given its configured `observer` and filesystem."""
    if configured != "auto":
        return configured
    return "polling" if is_network(fstype) else "inotify"


def root_filesystem(path: str) -> str | None:
    """The filesystem type of an existing root, from this process's mount table."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return None
    return filesystem_type(os.path.realpath(path), text)
