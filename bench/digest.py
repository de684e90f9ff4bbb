"""6. `content_digest = "sha256"`: `modelwatch.manifest.sha256_file` throughput from page cache,
against `hashlib.sha256` over the same bytes already in memory (the hashing alone).

One file of `digest_mb` MB on the run's tmpfs (so it is in page cache); wall-clock seconds,
best of `plan.repeats + 2`, taken alternately. For context the note also gives the standard
library's own way to hash a file, `hashlib.file_digest`, over the same file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from bench.plan import Plan
from bench.report import Result
from modelwatch.manifest import Entry, sha256_file

TARGET_SHARE = 0.90
_NAME = b"weights.bin"


def _write_blob(work: str, size: int) -> bytes:
    os.makedirs(work)
    data = os.urandom(1 << 20) * (size >> 20)
    with open(os.path.join(work, os.fsdecode(_NAME)), "wb") as out:
        out.write(data)
    return data


def _timed(work: Callable[[], str], expected: str) -> float:
    started = time.perf_counter()
    digest = work()
    elapsed = time.perf_counter() - started
    if digest != expected:
        raise RuntimeError("the digests disagree")
    return elapsed


def _file_digest(path: str) -> str:
    file_digest = getattr(hashlib, "file_digest", None)  # Python >= 3.11
    if file_digest is None:
        return ""
    with open(path, "rb") as stream:
        return str(file_digest(stream, "sha256").hexdigest())


def run(plan: Plan, base: str) -> list[Result]:
    work = os.path.join(base, "digest")
    size = plan.digest_mb << 20
    data = _write_blob(work, size)
    entry = Entry(_NAME, size, 0, 0)
    expected = hashlib.sha256(data).hexdigest()
    path = os.path.join(work, os.fsdecode(_NAME))
    ours, theirs, stdlib = [], [], []
    for _ in range(plan.repeats + 2):
        ours.append(_timed(lambda: sha256_file(work, entry) or "", expected))
        theirs.append(_timed(lambda: hashlib.sha256(data).hexdigest(), expected))
        if hasattr(hashlib, "file_digest"):
            stdlib.append(_timed(lambda: _file_digest(path), expected))
    mb = size / 2**20
    ours_rate, theirs_rate = mb / min(ours), mb / min(theirs)
    stdlib_note = f"; hashlib.file_digest: {mb / min(stdlib):.0f} MB/s" if stdlib else ""
    return [
        Result(
            "6. sha256 throughput (content_digest)",
            ours_rate,
            theirs_rate,
            "MB/s",
            f">= {TARGET_SHARE:.2f}x",
            ours_rate >= TARGET_SHARE * theirs_rate,
            f"{mb:.0f} MB file from page cache; baseline: hashlib.sha256 over the same bytes "
            f"in memory; best of {plan.repeats + 2}{stdlib_note}",
        )
    ]
