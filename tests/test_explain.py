"""`modelwatch explain`, as a user runs it: a real daemon over real model directories, asked
through its control socket while it runs and answered from the store and a fresh check once
it has stopped. Each pending and each final state names its exact file or rule, in the text
and in the JSON form (SPEC §3)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelwatch import control
from modelwatch.errors import NoAnswer
from tests.conftest import wait_until
from tests.daemons import CLI, daemon_env, daemon_process, jsonl_records, wait_ready_line
from tests.writers import write_hf_sharded, write_onnx, write_safetensors, write_tf_checkpoint

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    """A unit, the state `explain` must report, and what it must name."""

    unit: str  # root/unit, relative to the test's directory
    state: str
    code: str | None  # the first reason's (pending) or error's (rejected) code
    files: tuple[str, ...]  # that reason's `files`, or the error's `file`
    names: tuple[str, ...]  # strings the first line of the text form must hold


CASES = [
    Case(
        "models/writing",
        "pending",
        "in_progress",
        ("model-00002.safetensors.part",),
        ("in-progress", "model-00002.safetensors.part"),
    ),
    Case(
        "models/hf",
        "pending",
        "incomplete",
        ("model-00002-of-00003.safetensors", "model.safetensors.index.json"),
        ("model-00002-of-00003.safetensors missing", "model.safetensors.index.json"),
    ),
    Case(
        "marked/exp",
        "pending",
        "missing_marker",
        ("_SUCCESS",),
        ("_SUCCESS", "require_marker"),
    ),
    Case(
        "models/tf",
        "pending",
        "incomplete",
        ("ckpt-5.data-00000-of-*", "ckpt-5.index"),
        ("ckpt-5.data-00000-of-* missing", "checkpoint"),
    ),
    Case("slow/quiet", "pending", "quiet_period", (), ("3600 s",)),
    Case("models/done", "registered", None, (), ("registered as version 1",)),
    Case(
        "models/bad-meta",
        "rejected",
        "metadata_syntax",
        ("gradient-model-metadata.json",),
        ("metadata_syntax", "gradient-model-metadata.json:1:"),
    ),
    Case("models/gone", "removed", None, (), ("removed", "version was 1")),
    Case(
        "down/exp",
        "root_unavailable",
        "root_unavailable",
        (),
        ("root_marker .ready missing",),
    ),
]


def write_units(base: Path) -> None:
    models = base / "models"
    (models / "writing").mkdir(parents=True)
    write_safetensors(models / "writing" / "model-00001.safetensors", {"w": 64})
    (models / "writing" / "model-00002.safetensors.part").write_bytes(b"\0" * 10)
    write_hf_sharded(models / "hf", skip_shard=2)
    write_tf_checkpoint(models / "tf", "ckpt-5")
    (models / "tf" / "ckpt-5.data-00000-of-00001").unlink()
    for unit in ("models/done", "models/bad-meta", "marked/exp", "slow/quiet", "down/exp"):
        (base / unit).mkdir(parents=True)
        write_onnx(base / unit / "model.onnx")
    (models / "bad-meta" / "gradient-model-metadata.json").write_text('{"metrics": [,]}')


def config_text(base: Path) -> str:
    def root(name: str, settle: float = 0.5, extra: str = "") -> str:
        return (
            f'[[roots]]\npath = "{base / name}"\nunit_depth = 1\nsettle_seconds = {settle}\n'
            f"{extra}\n"
        )

    return (
        f'[daemon]\nstate_dir = "{base / "state"}"\n'
        + root("models")
        + root("marked", extra='require_marker = "_SUCCESS"')
        + root("slow", settle=3600)
        + root("down", extra='root_marker = ".ready"')
        + f'[[sinks]]\ntype = "jsonl"\npath = "{base / "events.jsonl"}"\n'
    )


def explain_all(config: Path, base: Path) -> dict[tuple[str, str], tuple[int, str]]:
    """(unit, form) -> (exit code, stdout) of `modelwatch explain` for every case, in both
    forms; the commands run side by side."""
    procs = {
        (case.unit, form): subprocess.Popen(
            [*CLI, "explain", "--config", str(config), "--format", form, str(base / case.unit)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=daemon_env(),
        )
        for case in CASES
        for form in ("text", "json")
    }
    answers = {}
    for key, proc in procs.items():
        out, _err = proc.communicate(timeout=60)
        answers[key] = (proc.returncode, out)
    return answers


def daemon_report(base: Path, unit: str) -> dict[str, Any]:
    """What the running daemon says about `unit` (asked in-process, for waiting)."""
    try:
        answer = control.ask(str(base / "state"), {"explain": str(base / unit)})
    except NoAnswer:
        return {}
    return answer if isinstance(answer, dict) else {}


def settled_as(base: Path, case: Case) -> bool:
    """The running daemon reports `case`'s state, with its first reason or error."""
    report = daemon_report(base, case.unit)
    return report.get("state") == case.state and first_code(report) == case.code


def first_code(report: dict[str, Any]) -> str | None:
    listed = report.get("errors") or report.get("reasons") or [{}]
    code = listed[0].get("code")
    return None if code is None else str(code)


@pytest.fixture(scope="module")
def answers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, dict[tuple[str, str], tuple[int, str]]]]]:
    """Every case explained by the running daemon, then again once it has stopped."""
    base = tmp_path_factory.mktemp("explain")
    write_units(base)
    config = base / "config.toml"
    config.write_text(config_text(base))
    events = base / "events.jsonl"
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=env, stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        (base / "models" / "gone").mkdir()
        write_onnx(base / "models" / "gone" / "model.onnx")
        wait_until(lambda: len(jsonl_records(events)) >= 3, timeout=30)  # done, bad-meta, gone
        shutil.rmtree(base / "models" / "gone")
        wait_until(lambda: len(jsonl_records(events)) >= 4, timeout=30)
        for case in CASES:
            wait_until(functools.partial(settled_as, base, case), timeout=30)
        running = explain_all(config, base)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # Changed while no daemon runs: a quiet period only a fresh check can see.
    write_onnx(base / "slow" / "quiet" / "model.onnx", 2048)
    yield base, {"running": running, "stopped": explain_all(config, base)}


@pytest.mark.parametrize("mode", ["running", "stopped"])
@pytest.mark.parametrize("case", CASES, ids=[c.unit for c in CASES])
def test_explain_names_the_file_or_rule(
    answers: tuple[Path, dict[str, dict[tuple[str, str], tuple[int, str]]]],
    case: Case,
    mode: str,
) -> None:
    """For each pending and final state, with the daemon running and once it has stopped,
    `explain` exits 0, says which source answered, and names the exact file or rule first
    in the text, and in the JSON as the state, the reason's or error's code and its files."""
    base, by_mode = answers
    code, text = by_mode[mode][(case.unit, "text")]
    assert code == 0, text
    first_line = text.splitlines()[0]
    for name in case.names:
        assert name in first_line, text
    source = "the running daemon" if mode == "running" else "a fresh check (no daemon"
    assert source in text.splitlines()[-1]

    code, out = by_mode[mode][(case.unit, "json")]
    assert code == 0, out
    report = json.loads(out)
    assert report["path"] == str(base / case.unit)
    assert report["state"] == case.state
    assert report["answered_by"] == ("daemon" if mode == "running" else "check")
    assert first_code(report) == case.code
    if case.state == "root_unavailable":  # no quiet period counts while the root is down
        assert {r["code"] for r in report["reasons"][1:]} <= {"checking"}
    if case.state == "rejected":
        assert report["errors"][0]["file"] == case.files[0]
    elif case.files:
        assert tuple(report["reasons"][0]["files"]) == case.files
    if case.state in ("registered", "rejected", "removed"):
        assert [v["outcome"] for v in report["versions"]][-1:] == [
            "rejected" if case.state == "rejected" else "registered"
        ]
        assert report["delivery"] == [{"sink": "jsonl", "delivered": True, "events": []}]


def test_a_path_under_no_root_exits_1(tmp_path: Path) -> None:
    """A path no configured root contains is an error (exit 1), with or without a daemon."""
    config = tmp_path / "config.toml"
    (tmp_path / "models").mkdir()
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[roots]]\npath = "{tmp_path / "models"}"\nunit_depth = 1\n'
    )
    command = [*CLI, "explain", "--config", str(config), str(tmp_path / "elsewhere")]
    stopped = subprocess.run(command, capture_output=True, text=True, env=daemon_env())
    assert stopped.returncode == 1 and "under no watched root" in stopped.stderr
    with daemon_process(config, stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        running = subprocess.run(command, capture_output=True, text=True, env=daemon_env())
    assert running.returncode == 1 and "under no watched root" in running.stderr


def test_the_control_socket_is_owner_only_and_refuses_bad_requests(tmp_path: Path) -> None:
    """The socket in state_dir is 0600; a request that is not one JSON object gets an error
    answer, and the daemon goes on answering the next client."""
    config = tmp_path / "config.toml"
    (tmp_path / "models").mkdir()
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[roots]]\npath = "{tmp_path / "models"}"\nunit_depth = 1\n'
    )
    with daemon_process(config, env=daemon_env(), stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        path = control.socket_path(str(tmp_path / "state"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for request in (b"[1, 2]\n", b"not json\n", b'{"explain": 7}\n'):
            with contextlib.closing(socket.socket(socket.AF_UNIX)) as conn:
                conn.settimeout(10)
                with control._address(path) as address:
                    conn.connect(address)
                conn.sendall(request)
                reply = json.loads(conn.makefile().readline())
            assert reply["ok"] is False and reply["error"]
        answer = control.ask(str(tmp_path / "state"), {"explain": str(tmp_path / "models" / "x")})
        assert answer["state"] == "unknown"


def test_a_sink_that_refuses_an_event_is_named_with_its_error(tmp_path: Path) -> None:
    """A registered model whose event one sink refused for good shows, per sink, delivered on
    the one and dead with the command's error on the other, while the daemon runs and once
    it has stopped."""
    root = tmp_path / "models"
    (root / "exp-1").mkdir(parents=True)
    write_onnx(root / "exp-1" / "model.onnx")
    events = tmp_path / "events.jsonl"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\nsettle_seconds = 0.5\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
        '[[sinks]]\ntype = "command"\nname = "refuser"\n'
        'argv = ["sh", "-c", "echo no such model registry >&2; exit 3"]\n'
    )
    command = [*CLI, "explain", "--config", str(config), str(root / "exp-1")]

    def refused() -> bool:
        report = daemon_report(tmp_path, "models/exp-1")
        sinks = {s["sink"]: s for s in report.get("delivery", [])}
        return (
            "refuser" in sinks
            and bool(sinks["refuser"]["events"])
            and (sinks["refuser"]["events"][0]["state"] == "dead")
        )

    outputs = []
    with daemon_process(config, env=daemon_env(), stderr=subprocess.PIPE) as proc:
        wait_ready_line(proc.stderr)
        wait_until(refused, timeout=30)
        outputs.append(subprocess.run(command, capture_output=True, text=True, env=daemon_env()))
        outputs.append(
            subprocess.run(
                [*command, "--format", "json"], capture_output=True, text=True, env=daemon_env()
            )
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    outputs.append(subprocess.run(command, capture_output=True, text=True, env=daemon_env()))
    outputs.append(
        subprocess.run(
            [*command, "--format", "json"], capture_output=True, text=True, env=daemon_env()
        )
    )
    for text, as_json in (outputs[0:2], outputs[2:4]):
        assert text.returncode == 0 and as_json.returncode == 0
        assert "jsonl: delivered" in text.stdout
        assert "refuser: dead registered" in text.stdout
        assert "exited with status 3" in text.stdout and "no such model registry" in text.stdout
        sinks = {s["sink"]: s for s in json.loads(as_json.stdout)["delivery"]}
        assert sinks["jsonl"] == {"sink": "jsonl", "delivered": True, "events": []}
        (dead,) = sinks["refuser"]["events"]
        assert (dead["state"], dead["type"], dead["attempts"]) == ("dead", "registered", 1)
        assert "no such model registry" in dead["last_error"]


def test_the_control_socket_works_in_a_state_dir_too_long_for_a_socket_address(
    tmp_path: Path,
) -> None:
    """A state_dir whose socket path is longer than a Unix socket address (108 bytes) still
    gets its control socket, reached through the directory; stop() removes it."""
    state = tmp_path / ("deep-" * 12) / "state"
    state.mkdir(parents=True)
    assert len(os.fsencode(control.socket_path(str(state)))) > 108
    server = control.ControlServer(
        str(state), str(state / "state.db"), lambda request, _store: {"echo": request}
    )
    server.start()
    try:
        assert control.ask(str(state), {"explain": "/x"}) == {"echo": {"explain": "/x"}}
    finally:
        server.stop()
    assert not os.path.exists(control.socket_path(str(state)))
    with pytest.raises(NoAnswer, match="no daemon is running"):
        control.ask(str(state), {"explain": "/x"})
