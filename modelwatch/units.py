"""Model units: which directory a changed path belongs to, and listing a root's units.

A root with `unit_depth = 0` is itself the unit; with depth N every directory exactly N levels
below it is a unit. Paths are `str` as the OS gives them (undecodable bytes kept as surrogate
escapes); `Unit.display` is the text form for events, logs and the state store.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from modelwatch.manifest import display


@dataclass(frozen=True, slots=True, order=True)
class Unit:
    """One model unit: `root` path and `name` relative to it ('.' for a depth-0 root)."""

    root: str
    name: str

    @property
    def path(self) -> str:
        return self.root if self.name == "." else os.path.join(self.root, self.name)

    @property
    def display(self) -> str:
        return display(os.fsencode(self.path))

    @property
    def display_name(self) -> str:
        return display(os.fsencode(self.name))


@dataclass(frozen=True, slots=True)
class Located:
    """Where a changed path falls relative to a root's units."""

    unit: Unit | None = None  # the unit the path is inside (or is)
    above: str | None = None  # a directory above unit depth that may hold units (relative)
    rel_in_unit: str = ""  # the path relative to its unit ('' for the unit itself)


def locate(root: str, depth: int, path: str, is_dir: bool) -> Located:
    """Map an absolute `path` under `root` to its unit (pure; no I/O)."""
    rel = _relative(root, path)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return Located(unit=Unit(root, ".")) if depth == 0 and rel == "." else Located()
    parts = rel.split(os.sep)
    if depth == 0:
        return Located(unit=Unit(root, "."), rel_in_unit=rel)
    if len(parts) > depth:
        name = os.sep.join(parts[:depth])
        return Located(unit=Unit(root, name), rel_in_unit=os.sep.join(parts[depth:]))
    if len(parts) == depth:
        return Located(unit=Unit(root, rel)) if is_dir else Located()
    return Located(above=rel) if is_dir else Located()


def _relative(root: str, path: str) -> str:
    """`os.path.relpath(path, root)`, by slicing when `path` is plainly below `root` (the
    settle loop maps every event's path: relpath normalises both paths first, each time)."""
    prefix = root if root.endswith(os.sep) else root + os.sep
    if path.startswith(prefix):
        rel = path[len(prefix) :]
        parts = rel.split(os.sep)
        if rel and "" not in parts and "." not in parts and ".." not in parts:
            return rel
    return os.path.relpath(path, root)


def list_units(root: str, depth: int, below: str = "") -> Iterator[Unit]:
    """Every unit directory currently under `root` (optionally only under `below`).

    Symlinked directories are not units and are not descended into.
    """
    if depth == 0:
        if not below and _is_dir(root):
            yield Unit(root, ".")
        return
    start_parts = below.split(os.sep) if below else []
    stack = [(os.path.join(root, below) if below else root, start_parts)]
    while stack:
        path, parts = stack.pop()
        try:
            with os.scandir(path) as it:
                children = [d.name for d in it if d.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for child in sorted(children, reverse=True):
            child_parts = [*parts, child]
            if len(child_parts) == depth:
                yield Unit(root, os.sep.join(child_parts))
            else:
                stack.append((os.path.join(path, child), child_parts))


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def describe(path: str) -> str:
    """Display form of an arbitrary path string."""
    return display(os.fsencode(path))
