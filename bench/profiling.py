"""Profiles behind the misses in bench/README.md, reproducible:

    python -m bench.profiling reconcile   # the reconcile job over the unchanged big tree
    python -m bench.profiling polling     # one pass of the daemon's poller (take + changes)
    python -m bench.profiling digest      # sha256_file of a 256 MB file from page cache
    python -m bench.profiling poller-memory     # tracemalloc: what the poller's record holds

Run from the repository root. CPU profiles use pyinstrument (`pip install pyinstrument`); the
big tree is the full run's (100,000 files), built in a scratch directory and removed after.
"""

from __future__ import annotations

import argparse
import hashlib
import linecache
import os
import time
import tracemalloc
from collections.abc import Callable

from bench.__main__ import scratch
from bench.bigtree import BigTree, build
from bench.plan import FULL
from bench.polling import PollingPass, reconcile_pass
from modelwatch import log
from modelwatch.manifest import Entry, sha256_file
from modelwatch.poller import take


def _profile(work: Callable[[], object]) -> None:
    from pyinstrument import Profiler  # optional: only this script needs it

    profiler = Profiler(interval=0.0005)
    profiler.start()
    work()
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=True))


def _tree(base: str) -> BigTree:
    return build(FULL, base)


def reconcile(base: str) -> None:
    one_pass = reconcile_pass(_tree(base))
    one_pass()  # warm: page cache, pattern caches, SQLite
    _profile(one_pass)


def polling(base: str) -> None:
    _profile(PollingPass(_tree(base).root))


def digest(base: str) -> None:
    """sha256_file's loop, timed piece by piece: a sampling profiler misplaces time spent in
    C calls that release the GIL (os.read, HASH.update)."""
    data = os.urandom(1 << 20) * 256
    path = os.path.join(base, "weights.bin")
    with open(path, "wb") as out:
        out.write(data)
    _profile(lambda: sha256_file(base, Entry(b"weights.bin", len(data), 0, 0)))
    reading = hashing = 0.0
    fd = os.open(path, os.O_RDONLY)
    h = hashlib.sha256()
    while True:
        started = time.perf_counter()
        block = os.read(fd, 1 << 20)
        read = time.perf_counter()
        if not block:
            break
        h.update(block)
        reading, hashing = reading + read - started, hashing + time.perf_counter() - read
    os.close(fd)
    started = time.perf_counter()
    hashlib.sha256(data)
    alone = time.perf_counter() - started
    print(f"os.read {reading * 1000:.0f} ms + update {hashing * 1000:.0f} ms; ", end="")
    print(f"hashlib.sha256 of the bytes in memory: {alone * 1000:.0f} ms")


def poller_memory(base: str) -> None:
    root = _tree(base).root
    tracemalloc.start()
    held = take(root)
    current, _ = tracemalloc.get_traced_memory()
    top = tracemalloc.take_snapshot().statistics("lineno")[:6]
    print(f"one record: {current / 2**20:.1f} MB for {len(held)} directories")
    for stat in top:
        frame = stat.traceback[0]
        line = linecache.getline(frame.filename, frame.lineno).strip()
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        print(f"{stat.size / 2**20:7.1f} MB {stat.count:9d} blocks  {where}  {line}")


PROFILES = {
    "reconcile": reconcile,
    "polling": polling,
    "digest": digest,
    "poller-memory": poller_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description="profile one benchmark's hot path")
    parser.add_argument("name", choices=sorted(PROFILES))
    args = parser.parse_args()
    log.configure("warning", "json")
    with scratch() as base:
        PROFILES[args.name](base)


if __name__ == "__main__":
    main()
