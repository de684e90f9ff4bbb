"""Reads of a unit never leave it, even when a directory is swapped for a symlink between the
scan and the reads (the race is played deterministically: scan, swap, then read with the stale
manifest), on real directories."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from modelwatch import beneath
from modelwatch.checks import Context, NotReady, Retry, examine
from modelwatch.config import Config, MetadataConfig, UnitPolicy
from modelwatch.errors import UnitUnavailable
from modelwatch.formats import check_complete
from modelwatch.inspection import inspect_unit, readiness
from modelwatch.manifest import Entry, Manifest, PatternSet, scan_unit, sha256_file
from modelwatch.metadata import validate_unit_metadata
from modelwatch.rules import RootRules
from modelwatch.state import StateDir, Store
from modelwatch.testing import FakeClock
from modelwatch.units import Unit
from tests.writers import write_safetensors

MARKER = "OUTSIDE-THE-UNIT-MARKER"
META = "gradient-model-metadata.json"
SHA256 = UnitPolicy(content_digest="sha256")


def scan(unit: Unit) -> Manifest:
    """The scan the pipeline makes of `unit`."""
    return scan_unit(
        unit.path,
        follow_top=unit.name == ".",
        ignore=PatternSet(()),
        in_progress=PatternSet(()),
        max_files=1000,
    )


def fill(directory: Path, description: str, sub: bytes = b"shards") -> None:
    """A complete safetensors model, a shard in `sub`, metadata naming `description`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", {"w": 256})
    shards = os.path.join(os.fsencode(directory), sub)
    os.mkdir(shards)
    with open(os.path.join(shards, b"0.bin"), "wb") as f:
        f.write(description.encode().ljust(64, b"."))
    (directory / META).write_text(json.dumps({"description": description}))


def outside_copy(unit: Path, outside: Path, sub: bytes = b"shards") -> set[str]:
    """`outside`: the unit's files with the same names and sizes but other contents (still a
    complete model); returns the digests of those contents."""
    shutil.copytree(unit, outside)
    model = outside / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # the tensor data: the file stays complete
    model.write_bytes(data)
    with open(os.path.join(os.fsencode(outside), sub, b"0.bin"), "wb") as f:
        f.write(MARKER.encode().ljust(64, b"."))
    (outside / META).write_text(json.dumps({"description": MARKER}).ljust(40))
    return {
        hashlib.sha256(path.read_bytes()).hexdigest()
        for path in outside.rglob("*")
        if path.is_file()
    }


def swap_for_symlink(directory: Path | bytes, target: Path) -> None:
    """What hostile training code does: move the directory away, leave a symlink."""
    directory = os.fsencode(directory)
    os.rename(directory, directory + b".moved")
    os.symlink(target, directory)


@pytest.mark.parametrize("name", ["exp-1", "team/exp-1"], ids=["depth-1", "depth-2"])
def test_unit_directory_swapped_after_the_scan_is_not_read(tmp_path: Path, name: str) -> None:
    """The unit directory (depth 1), or the directory above it (depth 2), is swapped for a
    symlink to a directory outside holding the same names after the scan: no digest, no
    metadata, no completeness verdict comes from outside; the unit is not ready, and
    inspecting it raises UnitUnavailable (it is looked at again later), as when it vanishes."""
    root = tmp_path / "root"
    unit = Unit(str(root), name)
    fill(Path(unit.path), "inside")
    manifest = scan(unit)
    assert readiness(unit.path, manifest, SHA256) == ()  # complete before the swap
    outside = tmp_path / "outside"
    outside_copy(Path(unit.path), outside / "exp-1")
    swap_for_symlink(root / name.split("/")[0], outside if "/" in name else outside / "exp-1")

    why = "replaced since it was scanned" if "/" in name else "is a symbolic link, not followed"
    (reason,) = readiness(unit.path, manifest, SHA256)
    assert (reason.code, reason.message) == (
        "unit_unavailable",
        f"unit directory cannot be opened ({why})",
    )
    with pytest.raises(UnitUnavailable, match=re.escape(f"cannot be opened ({why})")):
        inspect_unit(unit.path, manifest, SHA256, MetadataConfig())


@pytest.mark.parametrize("sub", [b"shards", b"sh\xffards"], ids=["utf8", "non-utf8"])
def test_subdirectory_swapped_after_the_scan_is_not_read(tmp_path: Path, sub: bytes) -> None:
    """`unit/shards` swapped for a symlink to a directory holding `0.bin` after the scan: the
    file is not hashed from outside (the last component alone having O_NOFOLLOW let
    `shards/0.bin` be read through the link), and neither metadata nor completeness reads
    through it."""
    unit = Unit(str(tmp_path / "root"), "exp-1")
    fill(Path(unit.path), "inside", sub)
    manifest = scan(unit)
    shard = next(e for e in manifest.files if e.raw == sub + b"/0.bin")
    assert sha256_file(unit.path, shard) is not None
    outside = tmp_path / "outside"
    outside_digests = outside_copy(Path(unit.path), outside, sub)
    outside_sub = outside / os.fsdecode(sub)
    (outside_sub / META).write_text(json.dumps({"description": MARKER}))
    weights = write_safetensors(outside_sub / "x.safetensors", {"w": 8})
    swap_for_symlink(os.path.join(os.fsencode(unit.path), sub), outside_sub)

    assert sha256_file(unit.path, shard) is None
    with beneath.unit_directory(unit.path, follow_top=False, identity=manifest.identity) as fd:
        assert sha256_file(unit.path, shard, dir_fd=fd) is None
        metadata = validate_unit_metadata(
            unit.path,
            os.fsdecode(sub + b"/" + META.encode()),
            max_bytes=1000,
            max_depth=8,
            dir_fd=fd,
        )
    (problem,) = metadata.problems
    assert problem.code == "metadata_not_regular_file" and "symbolic link" in problem.message
    sizes = {**manifest.sizes, os.fsdecode(sub + b"/x.safetensors"): weights}
    reason = check_complete(unit.path, "safetensors", sizes, follow_top=False)
    assert reason is not None and "not followed" in reason.message
    found = inspect_unit(unit.path, manifest, SHA256, MetadataConfig())
    rows = {row["path"]: row for row in found.files}
    assert rows[shard.path]["sha256"] == "unreadable"
    assert not {row["sha256"] for row in found.files} & outside_digests
    assert MARKER not in json.dumps(found.event_data())


def test_the_pipeline_records_nothing_for_a_unit_swapped_after_its_scan(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """The daemon's own path (`checks.examine` with the manifest of the scan that settled the
    unit, its directory swapped since): nothing is registered or rejected from what could
    not be read (the settle loop retries the unit; its next scan finds it gone)."""
    root = tmp_path / "models"
    config = make_config(
        '[defaults]\ncontent_digest = "sha256"\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n[[sinks]]\ntype = "memory"\n'
    )
    unit = Unit(str(root), "exp-1")
    fill(Path(unit.path), "inside")
    store = Store(StateDir(config.daemon.state_dir).db_path)
    try:
        rules = RootRules(config.roots[0])
        ctx = Context(rules, config.metadata, None, None, FakeClock())
        manifest = rules.scan(unit)
        outside_copy(Path(unit.path), tmp_path / "outside")
        swap_for_symlink(Path(unit.path), tmp_path / "outside")
        assert readiness(unit.path, manifest, rules.config.policy) != ()
        result = examine(ctx, unit, 1, manifest)
        assert isinstance(result.outcome, NotReady | Retry)
        assert store.units.all() == []
        assert rules.scan(unit).exists is False  # the next scan: a symlink is no unit
    finally:
        store.close()


def test_depth_zero_root_given_as_a_symlink_is_read(tmp_path: Path) -> None:
    """The configured root may be a symlink: a depth-0 unit is read through it."""
    real = tmp_path / "real"
    fill(real, "inside")
    link = tmp_path / "artifacts"
    link.symlink_to(real)
    unit = Unit(str(link), ".")
    manifest = scan(unit)
    assert readiness(unit.path, manifest, SHA256) == ()
    found = inspect_unit(unit.path, manifest, SHA256, MetadataConfig())
    assert found.problems == () and found.metadata == {"description": "inside"}
    expected = hashlib.sha256((real / "model.safetensors").read_bytes()).hexdigest()
    assert {r["path"]: r["sha256"] for r in found.files}["model.safetensors"] == expected


def test_a_unit_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """Below the root, the unit directory itself is opened with O_NOFOLLOW."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "exp").symlink_to(tmp_path / "outside")
    with pytest.raises(beneath.WrongTypeError) as caught:
        beneath.open_unit(str(tmp_path / "root" / "exp"), follow_top=False)
    assert caught.value.name == "exp" and stat.S_ISLNK(caught.value.mode)
    fd = beneath.open_unit(str(tmp_path / "root" / "exp"))  # followed when it is the root
    os.close(fd)
    for path in ("/", ".", "..", f"{tmp_path}/root/."):  # paths `modelwatch validate` may get
        os.close(beneath.open_unit(path, follow_top=False))


def test_open_regular_walks_one_component_at_a_time(tmp_path: Path) -> None:
    """Symlinked components are named, `..` is refused, a FIFO is never opened (no blocking),
    and non-UTF-8 names work."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text(MARKER)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "outside")
    os.mkfifo(tmp_path / "d" / "fifo")
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"\xfe"))
    with open(os.path.join(os.fsencode(tmp_path), b"\xfe", b"\xff.bin"), "wb") as f:
        f.write(b"weights")
    top = beneath.open_directory(str(tmp_path))
    try:
        with pytest.raises(beneath.WrongTypeError) as caught:
            beneath.open_regular(top, "d/link/f")
        assert (caught.value.name, caught.value.final) == ("d/link", False)
        assert stat.S_ISLNK(caught.value.mode)
        with pytest.raises(OSError) as refused:
            beneath.open_regular(top, "d/../outside/f")
        assert refused.value.errno == errno.EINVAL

        result: list[BaseException] = []

        def open_fifo() -> None:
            try:
                beneath.open_regular(top, "d/fifo")
            except BaseException as exc:
                result.append(exc)

        opener = threading.Thread(target=open_fifo)
        opener.start()
        opener.join(5)
        assert not opener.is_alive()
        (failure,) = result
        assert isinstance(failure, beneath.WrongTypeError) and stat.S_ISFIFO(failure.mode)

        fd, before = beneath.open_regular(top, b"\xfe/\xff.bin")
        with os.fdopen(fd, "rb") as f:
            assert f.read() == b"weights"
        entry = Entry(b"\xfe/\xff.bin", 7, 0, before.st_ino)
        assert sha256_file(str(tmp_path), entry) == hashlib.sha256(b"weights").hexdigest()
    finally:
        os.close(top)
