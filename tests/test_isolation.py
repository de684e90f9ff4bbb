"""One bad unit, file or event costs only itself (SPEC §8, §9, §10), against a real daemon.

A hostile unit next to a normal one: the normal one registers on time, `/healthz` stays 200,
the daemon is never restarted, and the hostile one ends as a precise event. A sink failing
for ever for one unit's events: the other units' events flow, and `discard` lets the unit's
next version through.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modelwatch.config import Config
from modelwatch.sinks import build_sink
from modelwatch.state import StateDir, Store
from modelwatch.testing import MemorySink
from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, jsonl_records, wait_ready_line
from tests.describe_files import torch_zip, write_unit
from tests.receiver import Receiver, Reply
from tests.writers import write_safetensors

SETTLE = 1.0
MARGIN = 3.0  # what "a small margin" over settle_seconds allows on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HealthWatch:
    """Polls /healthz every 0.2 s on a thread; remembers every answer that was not 200."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/healthz"
        self.failures: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthwatch")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:  # noqa: S310
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                self.failures.append(f"unreachable: {exc}")
                continue
            self.polls += 1
            if status != 200:
                self.failures.append(str(status))

    @contextlib.contextmanager
    def running(self) -> Iterator[HealthWatch]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def model(unit: Path, size: int = 1000) -> None:
    unit.mkdir(parents=True, exist_ok=True)
    write_safetensors(unit / "model.safetensors", {"w": size})


def hostile_checkpoint(unit: Path) -> None:
    """A TF `checkpoint` whose field value is 14,000 spaces long (quadratic in a naive regex)."""
    unit.mkdir(parents=True)
    (unit / "checkpoint").write_bytes(b'model_checkpoint_path: "x"' + b" " * 14000 + b"y\n")
    (unit / "ckpt-1.index").write_bytes(b"index")


def sparse_file(unit: Path) -> None:
    """A 20 GB file that costs no disk (`truncate -s 20G`): minutes of hashing."""
    unit.mkdir(parents=True)
    with (unit / "weights.bin").open("wb") as f:
        f.truncate(20 * 2**30)


def huge_number(unit: Path) -> None:
    """A metric whose value has 400 digits: not representable as a double."""
    model(unit)
    value = "1" + "0" * 399
    (unit / "gradient-model-metadata.json").write_text(
        f'{{"metrics":[{{"name":"a","numberValue":{value}}}]}}'
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "code"),
    [
        (hostile_checkpoint, "not_settled"),
        (sparse_file, "inspection_timeout"),
        (huge_number, "metadata_metrics"),
    ],
    ids=["quadratic-checkpoint", "sparse-20GB-sha256", "400-digit-metric"],
)
def test_a_hostile_unit_costs_only_itself(
    tmp_path: Path, make: Callable[[Path], None], code: str
) -> None:
    """A hostile unit and a normal one written together: the normal one registers within
    settle_seconds plus a small margin, /healthz answers 200 throughout, the daemon keeps
    running, and the hostile unit ends as a rejection with a precise code."""
    root, events = tmp_path / "models", tmp_path / "events.jsonl"
    root.mkdir()
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nhealth_listen = "127.0.0.1:{port}"\n'
        f'[defaults]\nsettle_seconds = {SETTLE}\nmax_wait_seconds = 4\ncontent_digest = "sha256"\n'
        "inspect_timeout_seconds = 2\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
    )
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=env, stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        threading.Thread(target=lambda: list(proc.stderr or ()), daemon=True).start()
        with HealthWatch(port).running() as health:
            make(root / "hostile")
            model(root / "normal")
            written = time.monotonic()

            def registered() -> list[dict[str, Any]]:
                return [e for e in jsonl_records(events) if e["subject"] == "normal"]

            wait_until(registered, timeout=SETTLE + MARGIN + 10)
            took = time.monotonic() - written
            wait_until(lambda: any(e["subject"] == "hostile" for e in jsonl_records(events)), 30)
            (hostile,) = [e for e in jsonl_records(events) if e["subject"] == "hostile"]
            assert proc.poll() is None, "the daemon must still run"
            # A hostile unit rejected at once leaves little time: watch health a while longer.
            wait_until(lambda: health.polls > 5, timeout=10)
        proc.terminate()
        assert proc.wait(20) == 0
    assert took <= SETTLE + MARGIN, f"the normal unit took {took:.1f} s"
    assert hostile["type"] == "io.modelwatch.model.rejected"
    assert [e["code"] for e in hostile["data"]["errors"]] == [code]
    assert health.polls > 5 and health.failures == []


# -- a sink failing for one unit ------------------------------------------------------------------

POISON = "poison.bin"
REFUSE = (
    "import sys; data = sys.stdin.buffer.read(); "
    f"sys.exit(75 if b'{POISON}' in data else 0)"  # EX_TEMPFAIL: retry later, for ever
)


def mw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=daemon_env())


def test_a_sink_failing_for_one_unit_holds_back_only_that_unit(
    tmp_path: Path,
    make_config: Callable[..., Config],
    run_daemon: Callable[..., Any],
    receiver: Receiver,
) -> None:
    """Unit a's first version fails for ever on two sinks (webhook 500 until dead-lettered,
    command exit 75): unit b is delivered at once; `status` lists the dead letter with its
    error; `discard` of a's failures lets a's next version through on both sinks."""
    root = tmp_path / "models"
    root.mkdir()
    receiver.refuse(POISON.encode(), Reply(500))
    text = (
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[defaults]\nsettle_seconds = 0.3\n[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        '[[sinks]]\ntype = "memory"\n'
        f'[[sinks]]\ntype = "webhook"\nname = "hook"\nurl = "{receiver.url}"\n'
        "max_attempts = 3\n"
        f'[[sinks]]\ntype = "command"\nname = "cmd"\n'
        f'argv = ["{sys.executable}", "-c", "{REFUSE}"]\n'
    )
    config_path = tmp_path / "config.toml"
    config_path.write_text(text)
    config = make_config(text)
    memory = MemorySink()
    daemon = run_daemon(config, [memory, *(build_sink(s) for s in config.sinks[1:])])
    model(root / "a")
    (root / "a" / POISON).write_bytes(b"x")
    model(root / "b")
    memory.wait_for(2)
    store = Store(StateDir(daemon.config.daemon.state_dir).db_path)
    try:

        def undelivered() -> dict[str, list[str]]:
            rows = store.db.query(
                "SELECT o.sink, e.unit FROM outbox o JOIN events e ON e.seq = o.seq"
                " WHERE o.state IN ('pending', 'dead') ORDER BY o.seq"
            )
            found: dict[str, list[str]] = {}
            for sink, unit in rows:
                found.setdefault(sink, []).append(Path(unit).name)
            return found

        wait_until(lambda: undelivered() == {"hook": ["a"], "cmd": ["a"]}, timeout=5)
        wait_until(
            lambda: [s.dead for s in store.outbox.sink_stats() if s.sink == "hook"] == [1], 20
        )
        env_config = ("--config", str(config_path))
        status = json.loads(mw("status", *env_config, "--format", "json").stdout)
        (dead,) = status["dead_letters"]
        assert (dead["sink"], Path(dead["unit"]).name, dead["type"]) == ("hook", "a", "registered")
        assert dead["attempts"] == 3 and "500" in dead["last_error"]
        (root / "a" / POISON).unlink()  # version 2 of a: fine for both sinks
        memory.wait_for(3)
        threading.Event().wait(0.5)
        assert undelivered() == {"hook": ["a", "a"], "cmd": ["a", "a"]}  # v2 waits behind v1
        for sink in ("hook", "cmd"):
            result = mw("discard", *env_config, "--sink", sink, "--unit", str(root / "a"))
            assert result.returncode == 0, result.stderr
            assert "discarded" in result.stdout
        wait_until(lambda: undelivered() == {}, timeout=10)
        final = {s.sink: s for s in store.outbox.sink_stats()}
        assert (final["hook"].discarded, final["cmd"].discarded) == (1, 1)
    finally:
        store.close()
    versions = [
        json.loads(r.body)["data"]["version"]
        for r in receiver.requests
        if json.loads(r.body)["subject"] == "a" and POISON.encode() not in r.body
    ]
    assert versions == [2]


def test_discard_and_redeliver_refuse_what_does_not_exist(
    tmp_path: Path, make_config: Callable[..., Config]
) -> None:
    """An unknown sink or event id is an error (exit 1) naming it, not "0 events"."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    Store(StateDir(str(tmp_path / "state")).db_path).close()
    for args, message in [
        (("redeliver", "--sink", "nope"), "unknown sink 'nope'"),
        (("redeliver", "--event", "abc"), "no dead letter with event id 'abc'"),
        (("discard", "--sink", "nope", "--event", "abc"), "unknown sink 'nope'"),
        (("discard", "--sink", "stdout", "--event", "abc"), "nothing to discard"),
    ]:
        result = mw(*args, "--config", str(config))
        assert result.returncode == 1, args
        assert message in result.stderr, result.stderr


# -- hostile model files -------------------------------------------------------------------------


def hostile_models(root: Path, marker: Path) -> dict[str, str]:
    """Units whose model files are hostile or garbage; returns unit -> expected error code
    (or the suspicious global for the pickle)."""

    class Exploit:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    write_unit(root / "pickle", {"model.pt": torch_zip(pickle.dumps({"x": Exploit()}, protocol=2))})
    junk = os.urandom(4096) + b"\xff" * 64
    write_unit(root / "saved-model", {"saved_model.pb": junk})
    write_unit(root / "onnx", {"model.onnx": junk})
    checkpoint = b'model_checkpoint_path: "ckpt-1"\n'
    write_unit(
        root / "index",
        {"checkpoint": checkpoint, "ckpt-1.index": junk, "ckpt-1.data-00000-of-00001": b"w"},
    )
    write_unit(root / "header", {"model.safetensors": struct.pack("<Q", 2**40) + b"{}"})
    return {
        "pickle": f"{os.system.__module__}.system",
        "saved-model": "describe_malformed",
        "onnx": "describe_malformed",
        "index": "describe_malformed",
        "header": "describe_too_large",
    }


@pytest.mark.slow
def test_hostile_model_files_are_described_as_errors_and_nothing_runs(tmp_path: Path) -> None:
    """A torch.save zip whose pickle calls os.system, random bytes as `saved_model.pb`,
    `.onnx` and `.index`, a safetensors header length of 2^40: a real daemon registers the
    first four (the pickle's global reported, nothing run; `data.model.error` for the
    others), reports the never-complete safetensors file `not_settled` with its
    `model.error`, and keeps running: a normal unit written afterwards registers."""
    root, events, marker = tmp_path / "models", tmp_path / "events.jsonl", tmp_path / "ran"
    root.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[defaults]\nsettle_seconds = {SETTLE}\nmax_wait_seconds = 4\n"
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
    )
    with daemon_process(config) as proc:
        expected = hostile_models(root, marker)
        wait_until(lambda: len(jsonl_records(events)) >= len(expected), timeout=60)
        model(root / "normal")
        wait_until(lambda: any(e["subject"] == "normal" for e in jsonl_records(events)), 30)
        assert proc.poll() is None, "the daemon must still run"
    found = {e["subject"]: e for e in jsonl_records(events)}
    assert found["pickle"]["type"] == "io.modelwatch.model.registered"
    assert found["pickle"]["data"]["model"]["suspicious_globals"] == [expected.pop("pickle")]
    assert not marker.exists()
    assert [e["code"] for e in found["header"]["data"]["errors"]] == ["not_settled"]
    for unit, code in expected.items():
        error = found[unit]["data"]["model"]["error"]
        assert (error["code"], bool(error["file"])) == (code, True), unit
    registered = {u for u, e in found.items() if e["type"] == "io.modelwatch.model.registered"}
    assert registered == {"pickle", "saved-model", "onnx", "index", "normal"}
