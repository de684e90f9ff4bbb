"""Crash safety: a daemon killed with SIGKILL at random moments loses and renumbers nothing.

A real `modelwatch run` subprocess watches a root while a writer keeps creating and rewriting
models; the daemon is killed (SIGKILL) at seeded random moments and restarted, at least 30
times. Afterwards every settled model version must have been delivered to every sink, with
one id per version, no version number given to two fingerprints and no fingerprint given two
versions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from modelwatch.config import DEFAULT_IGNORE, DEFAULT_IN_PROGRESS
from modelwatch.manifest import PatternSet, fingerprint, scan_unit
from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, jsonl_records, wait_ready_line
from tests.receiver import Receiver
from tests.writers import write_safetensors

KILLS = 30
SEED = int(os.environ.get("MODELWATCH_CRASH_SEED", "20261127"))


def registered_in_store(state: Path) -> dict[tuple[str, int], str]:
    """(unit path, version) -> fingerprint, as the state store recorded them."""
    db = sqlite3.connect(state / "state.db")
    try:
        rows = db.execute(
            "SELECT unit, version, fingerprint FROM fingerprints WHERE outcome = 'registered'"
        ).fetchall()
    finally:
        db.close()
    return {(unit, version): fp for unit, version, fp in rows}


def outbox_empty(state: Path) -> bool:
    db = sqlite3.connect(state / "state.db")
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    finally:
        db.close()


def current_fingerprints(root: Path) -> dict[str, str]:
    """unit path -> fingerprint of what is on disk now (as the daemon computes it)."""
    patterns = PatternSet(DEFAULT_IGNORE), PatternSet(DEFAULT_IN_PROGRESS)
    found = {}
    for unit in root.iterdir():
        manifest = scan_unit(str(unit), ignore=patterns[0], in_progress=patterns[1], max_files=1000)
        found[str(unit)] = fingerprint(manifest.entries)
    return found


class Writer(threading.Thread):
    """Creates and rewrites models in 8 units until stopped."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        super().__init__(name="model-writer")
        self.root = root
        self.rng = rng
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.05, 0.4)):
            unit = self.root / f"exp-{self.rng.randrange(8)}"
            unit.mkdir(exist_ok=True)
            size = self.rng.randrange(1, 200_000)
            if self.rng.random() < 0.5:  # written in place, in chunks
                write_safetensors(unit / "model.safetensors", {"w": size}, chunk=16384)
            else:  # written aside, renamed into place
                write_safetensors(unit / ".model.tmp.safetensors.partial", {"w": size})
                os.replace(unit / ".model.tmp.safetensors.partial", unit / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_renumbers_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    """30+ SIGKILLs while models are written: every version delivered, ids and versions sound."""
    rng = random.Random(SEED)
    root, state, out = tmp_path / "models", tmp_path / "state", tmp_path / "events.jsonl"
    root.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{state}"\n'
        "[defaults]\nsettle_seconds = 0.3\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{out}"\n'
        f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\ntimeout_seconds = 5\n'
    )
    env = daemon_env(MODELWATCH_LOG_LEVEL="warning")
    writer = Writer(root, random.Random(rng.random()))
    writer.start()
    try:
        for _ in range(KILLS):
            with daemon_process(config, env=env) as proc:
                time.sleep(rng.uniform(0.1, 1.5))  # the kill moment is the point of the test
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    finally:
        writer.stopping.set()
        writer.join()

    on_disk = current_fingerprints(root)
    final_env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=final_env, stderr=subprocess.PIPE) as proc:
        # SIGTERM only once it handles signals: the store may look complete already
        wait_ready_line(proc.stderr)
        threading.Thread(target=lambda: list(proc.stderr or ()), daemon=True).start()
        try:
            wait_until(
                lambda: (
                    (state / "state.db").exists()
                    and set(on_disk.items())
                    <= {(u, fp) for (u, _), fp in registered_in_store(state).items()}
                    and outbox_empty(state)
                ),
                timeout=60,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

    events = jsonl_records(out)
    posted = [json.loads(r.body) for r in list(receiver.requests)]
    assert {e["id"] for e in posted} == {e["id"] for e in events}, "both sinks got everything"
    store = registered_in_store(state)
    assert len(store) >= 8, "the writer should have produced versions in every unit"

    versions_of: dict[tuple[str, str], set[int]] = defaultdict(set)
    fingerprints_of: dict[tuple[str, int], set[str]] = defaultdict(set)
    ids_of: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for e in events:
        data = e["data"]
        ids_of[(e["type"], data["path"], data["fingerprint"])].add(e["id"])
        if e["type"].endswith("registered"):
            versions_of[(data["path"], data["fingerprint"])].add(data["version"])
            fingerprints_of[(data["path"], data["version"])].add(data["fingerprint"])
    assert all(len(ids) == 1 for ids in ids_of.values()), "one id per version"
    assert all(len(v) == 1 for v in versions_of.values()), "a fingerprint got two versions"
    assert all(len(f) == 1 for f in fingerprints_of.values()), "a version got two fingerprints"
    delivered = {k: next(iter(v)) for k, v in fingerprints_of.items()}
    missing = {k: fp for k, fp in store.items() if delivered.get(k) != fp}
    assert not missing, f"settled versions never delivered: {missing}"
    for unit in {path for path, _ in store}:
        numbers = sorted(v for path, v in store if path == unit)
        assert numbers == list(range(1, len(numbers) + 1)), f"{unit}: versions {numbers}"
