"""Model trees on disk: units of small files, written as fast as the OS allows.

A unit is a directory of `files` files: a metadata document, data shards, and (from 10 files
on) a tenth of the shards in a `shards/` subdirectory, so every walk has to recurse. The
format is "unknown" (always complete), so a unit settles as soon as it is quiet.
"""

from __future__ import annotations

import json
import os
import time

METADATA = "gradient-model-metadata.json"
PAYLOAD = bytes(range(64))
_METADATA_BYTES = json.dumps({"metrics": [{"name": "accuracy", "numberValue": 0.93}]}).encode()
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def unit_name(index: int) -> str:
    return f"unit-{index:05d}"


def file_names(files: int) -> list[str]:
    """Relative names of a unit's files, in the order they are written."""
    nested = files // 10
    flat = files - 1 - nested
    names = [METADATA]
    names += [f"part-{i:05d}.dat" for i in range(flat)]
    names += [f"shards/part-{i:05d}.dat" for i in range(nested)]
    return names


def write_file(path: str, data: bytes) -> None:
    fd = os.open(path, _FLAGS, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_unit_dir(unit_dir: str, files: int) -> None:
    """The empty directories of a unit of `files` files."""
    os.makedirs(unit_dir)
    if any("/" in name for name in file_names(files)):
        os.mkdir(os.path.join(unit_dir, "shards"))


def fill_unit(unit_dir: str, files: int) -> float:
    """Write the files of a unit whose directories exist; returns the wall time after the last."""
    for name in file_names(files):
        write_file(os.path.join(unit_dir, name), _METADATA_BYTES if name == METADATA else PAYLOAD)
    return time.time()


def make_unit_dirs(root: str, units: int, files: int) -> list[str]:
    """Create the empty directories of `units` units under `root`; returns the unit names."""
    names = [unit_name(i) for i in range(units)]
    for name in names:
        make_unit_dir(os.path.join(root, name), files)
    return names


def fill_units(root: str, names: list[str], files: int) -> dict[str, float]:
    """Fill the named units as fast as possible; unit name -> wall time of its last write."""
    return {name: fill_unit(os.path.join(root, name), files) for name in names}


def write_tree(root: str, units: int, files: int) -> int:
    """A tree of `units` complete units; returns the number of files written."""
    fill_units(root, make_unit_dirs(root, units, files), files)
    return units * files


def rewrite_in_place(path: str) -> None:
    """Overwrite a file without truncating it: exactly IN_MODIFY + IN_CLOSE_WRITE."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, PAYLOAD)
    finally:
        os.close(fd)
