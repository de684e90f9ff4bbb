"""The command sink running real scripts: exit codes, stdin, environment, timeouts."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelwatch import reaper
from modelwatch.errors import ConfigError, PermanentSinkError, SinkError
from modelwatch.events import REGISTERED, Event, make_event
from modelwatch.sinks import build_sink
from modelwatch.sinks.command import CommandSink
from modelwatch.testing import sink_config
from tests.conftest import wait_until

ScriptMaker = Callable[[str], str]


@pytest.fixture
def script(tmp_path: Path) -> ScriptMaker:
    """Write an executable /bin/sh script into tmp_path; returns its path."""
    counter = iter(range(1000))

    def write(body: str) -> str:
        path = tmp_path / f"script-{next(counter)}.sh"
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return str(path)

    return write


def command_sink(*argv: str, **options: Any) -> CommandSink:
    return CommandSink(sink_config("command", options={"argv": list(argv), **options}))


def an_event(**data: Any) -> Event:
    return make_event(
        REGISTERED,
        root="/storage/models",
        unit_path="/storage/models/resnet",
        name="resnet",
        when=1_800_000_000.0,
        data={"fingerprint": "sha256:" + "cd" * 32, "version": 3, **data},
    )


def is_gone(pid: int) -> bool:
    """True once `pid` no longer runs.

    A killed grandchild is re-parented to init, whose job it is to reap it; where init does
    not reap (some sandboxes), the dead process lingers as a zombie, which counts as gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    state, parent = fields[0], int(fields[1])
    return state == "Z" and parent != os.getpid()


@pytest.fixture
def background_pids() -> Iterator[list[int]]:
    """Processes a test leaves behind on purpose; killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_command_gets_the_event_on_stdin_and_its_ids_in_the_environment(
    script: ScriptMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event JSON arrives on stdin; MODELWATCH_* variables and pass_env names are set."""
    monkeypatch.setenv("DAEMON_SETTING", "passed on")
    copy = script(
        'cat > "$1/stdin.json"\n'
        'printf "%s\\n" "$MODELWATCH_EVENT_ID" "$MODELWATCH_EVENT_TYPE" '
        '"$MODELWATCH_UNIT_PATH" "$DAEMON_SETTING" > "$1/env.txt"\n'
    )
    event = an_event()
    command_sink(copy, str(tmp_path), pass_env=["DAEMON_SETTING", "UNSET_SETTING"]).send(event)
    assert (tmp_path / "stdin.json").read_text() == event.to_json() + "\n"
    assert Event.from_json((tmp_path / "stdin.json").read_text()) == event
    assert (tmp_path / "env.txt").read_text().splitlines() == [
        event.id,
        REGISTERED,
        "/storage/models/resnet",
        "passed on",
    ]


def dumped_environment(path: Path) -> dict[str, str]:
    """What `env -0 > path` wrote."""
    pairs = path.read_bytes().split(b"\0")[:-1]
    return dict(pair.decode().split("=", 1) for pair in pairs)


def test_the_command_gets_nothing_else_from_the_daemons_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other sinks' secrets in the daemon's environment never reach the command: it gets PATH,
    LANG, HOME, the event's variables and what pass_env names, nothing else."""
    for name, value in {
        "MODELWATCH_WEBHOOK_SECRET": "whsec_c2VjcmV0",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "REDIS_URL": "redis://:pw@redis/0",
        "LANG": "C.UTF-8",
        "HOME": "/home/modelwatch",
        "TEAM": "vision",
    }.items():
        monkeypatch.setenv(name, value)
    dump = tmp_path / "env"
    # the sink discards stdout: env's output goes to the file through a shell redirect
    command_sink("/bin/sh", "-c", 'exec env -0 > "$1"', "sh", str(dump), pass_env=["TEAM"]).send(
        an_event()
    )
    env = dumped_environment(dump)
    shell = {"PWD", "OLDPWD", "SHLVL", "_"}  # what /bin/sh adds on its own
    assert set(env) - shell == {
        "PATH",
        "LANG",
        "HOME",
        "TEAM",
        "MODELWATCH_EVENT_ID",
        "MODELWATCH_EVENT_TYPE",
        "MODELWATCH_UNIT_PATH",
    }
    assert (env["LANG"], env["HOME"], env["TEAM"]) == ("C.UTF-8", "/home/modelwatch", "vision")
    shown = dump.read_text(errors="replace")
    assert [s for s in ("c2VjcmV0", "aws-secret", ":pw@") if s in shown] == []


def test_reaping_orphans_never_takes_a_commands_exit_status() -> None:
    """While orphans are reaped without pause (PID 1's job), commands that fail still fail:
    none of their exit statuses is reaped away and read as 0 (delivered)."""
    sink = command_sink("/bin/false")
    stop = threading.Event()

    def reap() -> None:
        while not stop.is_set():
            reaper.reap_orphans()

    thread = threading.Thread(target=reap, name="reaper")
    thread.start()
    delivered = 0
    try:
        for _ in range(300):
            try:
                sink.send(an_event())
            except PermanentSinkError:
                continue
            delivered += 1
    finally:
        stop.set()
        thread.join()
    assert delivered == 0


def test_exit_75_means_try_again_later(script: ScriptMaker) -> None:
    """EX_TEMPFAIL (75) is a retryable failure."""
    with pytest.raises(SinkError, match="status 75") as caught:
        command_sink(script("exit 75\n")).send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)


def test_other_exit_codes_are_permanent_and_quote_stderr(script: ScriptMaker) -> None:
    """Any other non-zero status dead-letters the event, with stderr in the message and log."""
    failing = script('echo "registry said no" >&2\necho "version 3 exists" >&2\nexit 3\n')
    sink = command_sink(failing)
    event = an_event()
    with structlog.testing.capture_logs() as logs, pytest.raises(PermanentSinkError) as caught:
        sink.send(event)
    message = str(caught.value)
    assert "status 3" in message
    assert message.endswith("registry said no\\nversion 3 exists")
    assert [(e["event"], e["sink"], e["event_id"]) for e in logs] == [
        ("command_stderr", "command", event.id)
    ]


def test_huge_stderr_is_kept_to_its_tail(script: ScriptMaker) -> None:
    """Only the end of a flood of stderr is kept: the message stays short and shows the end."""
    noisy = script("head -c 200000 /dev/zero | tr '\\000' x >&2\necho THE END >&2\nexit 1\n")
    with structlog.testing.capture_logs() as logs, pytest.raises(PermanentSinkError) as caught:
        command_sink(noisy).send(an_event())
    assert str(caught.value).endswith("THE END")
    assert len(str(caught.value)) < 1000
    assert 8000 < len(logs[0]["stderr"]) <= 8 * 1024


def test_killed_by_a_signal_is_retried(script: ScriptMaker) -> None:
    """A command that dies from a signal (OOM killer, operator) is retried."""
    with pytest.raises(SinkError, match="SIGTERM") as caught:
        command_sink(script("kill -TERM $$\n")).send(an_event())
    assert not isinstance(caught.value, PermanentSinkError)


def test_timeout_kills_the_command_and_everything_it_started(
    script: ScriptMaker, tmp_path: Path
) -> None:
    """At the timeout the whole process group dies: no orphan or zombie stays behind."""
    hang = script('sleep 60 &\necho $! > "$1/pids"\necho $$ >> "$1/pids"\nsleep 60\n')
    sink = command_sink(hang, str(tmp_path), timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(SinkError, match=r"timed out after 0\.5 s") as caught:
        sink.send(an_event())
    assert time.monotonic() - started < 5
    assert not isinstance(caught.value, PermanentSinkError)
    grandchild, child = (int(line) for line in (tmp_path / "pids").read_text().split())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # reaped by the sink itself, not even a zombie
    wait_until(lambda: is_gone(grandchild), timeout=5)


def test_background_children_do_not_hold_up_delivery(
    script: ScriptMaker, tmp_path: Path, background_pids: list[int]
) -> None:
    """A command that exits 0 leaving a background job (holding stderr) is delivered at once."""
    forks = script('sleep 30 &\necho $! > "$1/pid"\nexit 0\n')
    started = time.monotonic()
    try:
        command_sink(forks, str(tmp_path), timeout_seconds=20).send(an_event())
    finally:
        background_pids.append(int((tmp_path / "pid").read_text()))
    assert time.monotonic() - started < 5


def test_command_ignoring_its_stdin_is_still_delivered(script: ScriptMaker) -> None:
    """A command that exits 0 without reading a large event is delivered, not a broken pipe."""
    big = an_event(metadata={"notes": "x" * 500_000})
    command_sink(script("exit 0\n")).send(big)


@pytest.mark.parametrize("mode", [None, 0o644])
def test_program_that_cannot_run_is_permanent(tmp_path: Path, mode: int | None) -> None:
    """A missing or non-executable program is a permanent failure naming it."""
    program = tmp_path / "register-model"
    if mode is not None:
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(mode)
    with pytest.raises(PermanentSinkError, match="register-model"):
        command_sink(str(program)).send(an_event())


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "sinks[0].argv: required"),
        ({"argv": []}, "sinks[0].argv: must not be empty"),
        ({"argv": "/bin/true"}, "sinks[0].argv: must be an array"),
        ({"argv": ["/bin/true"], "pass_env": ["A=B"]}, "sinks[0].pass_env[0]: must be the name"),
        ({"argv": ["/bin/echo", 3]}, "sinks[0].argv[1]: must be a string"),
        ({"argv": [""]}, "sinks[0].argv[0]: must name the program"),
        ({"argv": ["/bin/true"], "timeout_seconds": 0}, "sinks[0].timeout_seconds: must be > 0"),
        ({"argv": ["/bin/true"], "shell": True}, "sinks[0].shell: unknown key"),
    ],
)
def test_bad_configuration_names_the_key(options: dict[str, Any], expected: str) -> None:
    """Configuration mistakes are ConfigErrors starting with the full key."""
    with pytest.raises(ConfigError) as caught:
        CommandSink(sink_config("command", options=options))
    assert str(caught.value).startswith(expected)


def test_build_sink_finds_the_command_sink_through_entry_points() -> None:
    """`type = "command"` in the config resolves to this sink via the entry points."""
    sink = build_sink(sink_config("command", options={"argv": ["/bin/true"]}))
    assert isinstance(sink, CommandSink)
    sink.send(an_event())
    sink.close()
