"""Manifests, fingerprints, scan digests and content digests on real files."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from modelwatch.manifest import (
    Entry,
    PatternSet,
    _hash_read_ahead,
    fingerprint,
    scan_digest,
    scan_unit,
    sha256_file,
)

IGNORE = PatternSet(["*.log", "__pycache__/"])
IN_PROGRESS = PatternSet(["*.tmp"])


def _scan(unit: Path, max_files: int = 1000) -> tuple[bytes | None, bytes | None]:
    """(digest of a full scan, digest of a digest-only walk) of `unit`."""
    full = scan_unit(str(unit), ignore=IGNORE, in_progress=IN_PROGRESS, max_files=max_files)
    quick = scan_digest(str(unit), ignore=IGNORE, max_files=max_files)
    return full.scan_digest, quick


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    unit = tmp_path / "unit"
    (unit / "shards").mkdir(parents=True)
    (unit / "model.bin").write_bytes(b"m" * 100)
    (unit / "shards" / "0.bin").write_bytes(b"s" * 10)
    (unit / "train.log").write_text("epoch 1\n")
    os.symlink("model.bin", unit / "latest")
    return unit


def test_scan_digest_is_the_same_from_both_walks_and_stable(unit: Path) -> None:
    full, quick = _scan(unit)
    assert full is not None and full == quick
    assert _scan(unit) == (full, quick)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda u: (u / "train.log").write_text("epoch 2\n"), id="ignored-file"),
        pytest.param(lambda u: (u / "shards" / "1.bin").write_bytes(b""), id="new-empty-file"),
        pytest.param(lambda u: (u / "empty").mkdir(), id="new-directory"),
        pytest.param(lambda u: os.chmod(u / "model.bin", 0o600), id="chmod"),
        pytest.param(lambda u: (u / "x.tmp").write_bytes(b"x"), id="in-progress-file"),
        pytest.param(
            lambda u: (os.unlink(u / "latest"), os.symlink("shards/0.bin", u / "latest")),
            id="symlink-retargeted",
        ),
    ],
)
def test_scan_digest_moves_with_any_change(unit: Path, change: object) -> None:
    before, _ = _scan(unit)
    change(unit)  # type: ignore[operator]
    after, quick = _scan(unit)
    assert after == quick and after != before


def test_scan_digest_is_absent_when_the_walk_is_incomplete(unit: Path) -> None:
    assert _scan(unit, max_files=1) == (None, None)  # too many files for either walk
    assert scan_digest(str(unit / "missing"), ignore=IGNORE, max_files=10) is None


def test_fingerprint_keeps_its_documented_form(unit: Path) -> None:
    """Stored fingerprints stay valid across versions: the form is the documented one."""
    manifest = scan_unit(str(unit), ignore=IGNORE, in_progress=IN_PROGRESS, max_files=100)
    st = {name: os.lstat(unit / name) for name in ("latest", "model.bin", "shards/0.bin")}
    expected = hashlib.sha256(
        b"latest\x000\x00%d\x00->model.bin\n" % st["latest"].st_mtime_ns
        + b"model.bin\x00100\x00%d\n" % st["model.bin"].st_mtime_ns
        + b"shards/0.bin\x0010\x00%d\n" % st["shards/0.bin"].st_mtime_ns
    ).hexdigest()
    assert [e.path for e in manifest.entries] == ["latest", "model.bin", "shards/0.bin"]
    assert fingerprint(manifest.entries) == "sha256:" + expected
    digests = {b"model.bin": "aa", b"shards/0.bin": "bb", b"latest": ""}
    assert (
        fingerprint(manifest.entries, digests)
        == "sha256:"
        + hashlib.sha256(
            b"latest\x000\x00\x00->model.bin\nmodel.bin\x00100\x00aa\nshards/0.bin\x0010\x00bb\n"
        ).hexdigest()
    )


@pytest.mark.parametrize("size", [0, 1, (4 << 20) + 3, (20 << 20) + 12345])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    """Small files, and large ones hashed while a second thread reads ahead."""
    data = os.urandom(size)
    (tmp_path / "w.bin").write_bytes(data)
    got = sha256_file(str(tmp_path), Entry(b"w.bin", size, 0, 0))
    assert got == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("listed", [100, 12 << 20])
def test_sha256_file_hashes_only_the_bytes_the_manifest_listed(tmp_path: Path, listed: int) -> None:
    """A file still growing after the scan is hashed up to its listed size, not to its end."""
    data = os.urandom(listed + (1 << 20))
    (tmp_path / "w.bin").write_bytes(data)
    got = sha256_file(str(tmp_path), Entry(b"w.bin", listed, 0, 0))
    assert got == hashlib.sha256(data[:listed]).hexdigest()


def test_sha256_file_never_opens_a_fifo_or_follows_a_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/etc/passwd", tmp_path / "link")
    assert sha256_file(str(tmp_path), Entry(b"fifo", 0, 0, 0)) is None
    assert sha256_file(str(tmp_path), Entry(b"link", 0, 0, 0)) is None


def test_read_ahead_reader_stops_when_hashing_fails(tmp_path: Path) -> None:
    """The reader thread never outlives the call, even when the hashing side gives up."""
    (tmp_path / "w.bin").write_bytes(b"w" * (16 << 20))

    class Failing:
        calls = 0

        def update(self, _data: object) -> None:
            self.calls += 1
            if self.calls == 2:
                raise MemoryError("hashing failed")

    fd = os.open(tmp_path / "w.bin", os.O_RDONLY)
    try:
        with pytest.raises(MemoryError):
            _hash_read_ahead(fd, Failing(), 1 << 20, 16 << 20)
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "sha256-read-ahead"]


class SwapWhenVisited(PatternSet):
    """Ignore patterns that, as the walk reaches directory `name`, swap it for `replacement`
    (the moment between a directory's lstat and its listing, made deterministic)."""

    def __init__(self, unit: Path, name: str, replacement: Path, as_symlink: bool) -> None:
        super().__init__(["*.log"])
        self.unit, self.name = unit, name
        self.replacement, self.as_symlink = replacement, as_symlink

    def matches_dir(self, rel: str) -> bool:
        if rel == self.name and not (self.unit / "swapped-out").exists():
            os.rename(self.unit / self.name, self.unit / "swapped-out")
            if self.as_symlink:
                os.symlink(self.replacement, self.unit / self.name)
            else:
                os.rename(self.replacement, self.unit / self.name)
        return super().matches_dir(rel)


@pytest.mark.parametrize("as_symlink", [True, False], ids=["symlink", "other-directory"])
def test_a_directory_swapped_mid_scan_is_never_listed(
    unit: Path, tmp_path: Path, as_symlink: bool
) -> None:
    """Neither walk lists a directory that is not the one its parent listed: the names and
    sizes of what lies outside the unit never reach a manifest or a digest."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret-name.bin").write_bytes(b"s" * 4321)

    def scan() -> tuple[list[str], bytes | None]:
        ignore = SwapWhenVisited(unit, "shards", outside, as_symlink)
        manifest = scan_unit(str(unit), ignore=ignore, in_progress=IN_PROGRESS, max_files=100)
        return [e.path for e in manifest.entries], manifest.scan_digest

    names, _ = scan()
    assert not any("secret" in n for n in names)
    assert "shards/0.bin" not in names  # the swapped-out directory is not there either
    # the next scan sees the new state: a symlink (listed as an entry, never followed), or
    # the other directory, now legitimately part of the unit
    again = scan_unit(str(unit), ignore=IGNORE, in_progress=IN_PROGRESS, max_files=100)
    if as_symlink:
        assert not any("secret" in e.path for e in again.entries)
    else:
        assert "shards/secret-name.bin" in [e.path for e in again.entries]


def test_the_digest_walk_never_lists_a_swapped_directory(
    unit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelwatch.manifest

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret-name.bin").write_bytes(b"s")
    hashed: list[bytes] = []
    real = modelwatch.manifest._digest

    def spy(raw: list[tuple[bytes, int, int, int, int, int]]) -> bytes:
        hashed.extend(entry[0] for entry in raw)
        return real(raw)

    monkeypatch.setattr(modelwatch.manifest, "_digest", spy)
    ignore = SwapWhenVisited(unit, "shards", outside, True)
    assert scan_digest(str(unit), ignore=ignore, max_files=100) is not None
    assert b"shards" in hashed and b"model.bin" in hashed
    assert not [name for name in hashed if name.startswith(b"shards/")]


# --- max_files_per_unit counts every entry walked -------------------------------------------


def _make_entries(unit: Path, kind: str, count: int) -> None:
    """`count` entries of one kind that a scan lists but does not keep as files."""
    for i in range(count):
        path = unit / f"{kind}-{i}"
        if kind == "directory":
            path.mkdir()
        elif kind == "ignored":
            (unit / f"{i}.log").write_text("x")
        elif kind == "ignored-directory":
            (unit / f"{i}" / "__pycache__").mkdir(parents=True)  # two entries each
        elif kind == "in-progress":
            (unit / f"{i}.tmp").write_text("x")
        elif kind == "symlink":
            os.symlink("nowhere", path)
        elif kind == "fifo":
            os.mkfifo(path)


KINDS = ["directory", "ignored", "ignored-directory", "in-progress", "symlink", "fifo"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_walked_counts_against_max_files(tmp_path: Path, kind: str) -> None:
    """Directories, ignored and in-progress files, symlinks and FIFOs all count towards
    max_files_per_unit: one entry over the cap makes the unit too_many_files."""
    unit = tmp_path / "unit"
    unit.mkdir()
    _make_entries(unit, kind, 6)  # 6 entries, 12 for ignored directories
    cap = 12 if kind == "ignored-directory" else 6
    scan = {
        n: scan_unit(str(unit), ignore=IGNORE, in_progress=IN_PROGRESS, max_files=n)
        for n in (cap, cap - 1)
    }
    assert not scan[cap].too_many_files
    assert scan[cap - 1].too_many_files


def test_a_unit_of_many_empty_directories_is_cut_off_at_the_cap(tmp_path: Path) -> None:
    """A unit of 20,000 empty directories and no file at all is too_many_files at a cap of
    1,000: the walk stops there instead of listing every directory."""
    unit = tmp_path / "unit"
    unit.mkdir()
    for i in range(200):
        (unit / f"d{i}").mkdir()
        for j in range(100):
            (unit / f"d{i}" / f"e{j}").mkdir()
    manifest = scan_unit(str(unit), ignore=IGNORE, in_progress=IN_PROGRESS, max_files=1000)
    assert manifest.too_many_files
    assert manifest.entries == ()
    assert scan_digest(str(unit), ignore=IGNORE, max_files=1000) is None
