"""Is a root available? An unavailable root removes nothing (SPEC §11).

Network storage goes away: a mount that is not there yet at boot, or is unmounted for a
moment, leaves an empty mount point (or nothing at all); a hung server answers EIO, ESTALE
or ENOTCONN. None of that means "every model was deleted". A root is unavailable when it is
missing, unreadable, lacks its `root_marker` file, or is on another filesystem (device) than
when its units were last seen while it holds no units now. Only units absent from an
available root are `removed`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from modelwatch.config import RootConfig
from modelwatch.units import describe


@dataclass(frozen=True, slots=True)
class Availability:
    available: bool
    reason: str = ""  # why not, for logs, `status`, `explain`
    device: int | None = None  # st_dev of the root, when it could be read
    holds_units: bool = False  # anything a unit could be in (see `check_root`)


def check_root(
    root: RootConfig, known_device: int | None, *, holds_units: bool | None = None
) -> Availability:
    """The root's availability now; `known_device`: the device its units were last seen on.

    A root given as a symlink is followed (as it is watched). "Holds units": at depth 0, any
    entry at all; deeper, any subdirectory. A caller that just saw a unit in it passes
    `holds_units=True`, which spares listing a root of ten thousand units for every unit.
    """
    try:
        st = os.stat(root.path)
    except (FileNotFoundError, NotADirectoryError):
        return Availability(False, "missing")
    except OSError as exc:
        return Availability(False, f"unreadable ({exc.strerror})")
    if not stat.S_ISDIR(st.st_mode):
        return Availability(False, "not a directory")
    try:
        if holds_units is None:
            holds_units = _holds_units(root.path, root.unit_depth)
        if root.root_marker and not _exists(os.path.join(root.path, root.root_marker)):
            return Availability(False, f"root_marker {describe(root.root_marker)} missing")
    except OSError as exc:
        return Availability(False, f"unreadable ({exc.strerror})", st.st_dev)
    if known_device is not None and st.st_dev != known_device and not holds_units:
        return Availability(
            False,
            f"empty, and on another filesystem than when its units were last seen "
            f"(device {st.st_dev}, was {known_device}): a mount that went away?",
            st.st_dev,
        )
    return Availability(True, device=st.st_dev, holds_units=holds_units)


def _holds_units(path: str, depth: int) -> bool:
    with os.scandir(path) as it:
        for entry in it:
            if depth == 0 or entry.is_dir(follow_symlinks=False):
                return True
    return False


def _exists(path: str) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True
