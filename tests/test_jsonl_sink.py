"""The jsonl sink on real files: every event's line stands alone, even after a full disk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from modelwatch.errors import SinkError
from modelwatch.events import Event
from modelwatch.sinks.jsonl import JsonlSink
from modelwatch.testing import sample_event, sink_config
from tests.conftest import fill_disk


def big_event(name: str) -> Event:
    """An event whose line spans several pages (a unit with many files)."""
    event = sample_event(name)
    files = [{"path": f"shard-{i:05d}.bin", "size": i} for i in range(400)]
    return dataclasses.replace(event, data={**event.data, "files": files})


def lines(path: Path) -> list[str]:
    return path.read_text().split("\n")


def test_a_short_write_on_a_full_disk_leaves_the_retried_line_whole(small_disk: Path) -> None:
    """The disk fills in the middle of a line: the delivery fails (and is retried); once
    there is room again, the event's line is whole and on its own, after the torn start."""
    out = small_disk / "events.jsonl"
    sink = JsonlSink(sink_config("jsonl", "jsonl", {"path": str(out)}))
    try:
        sink.send(sample_event("first"))
        filler = fill_disk(small_disk)
        event = big_event("second")
        size = len(event.to_json()) + 1
        # free less room than the line needs, but some: the write is cut short
        with filler.open("r+b") as f:
            f.truncate(filler.stat().st_size - 4096)
        with pytest.raises(SinkError, match="short write"):
            sink.send(event)
        assert 0 < out.stat().st_size - len(lines(out)[0]) - 1 < size  # a torn start is there
        filler.unlink()
        sink.send(event)
    finally:
        sink.close()
    first, torn, whole, end = lines(out)
    assert json.loads(first)["subject"] == "first"
    assert event.to_json().startswith(torn) and torn != event.to_json()
    assert json.loads(whole) == event.to_dict()
    assert end == ""


def test_a_line_left_unfinished_before_a_restart_is_ended_first(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    out.write_text('{"specversion":"1.0","id":"cut sh')  # a previous run's torn line
    sink = JsonlSink(sink_config("jsonl", "jsonl", {"path": str(out)}))
    try:
        sink.send(sample_event("next"))
    finally:
        sink.close()
    torn, whole, end = lines(out)
    assert torn.endswith("cut sh") and json.loads(whole)["subject"] == "next" and end == ""


def test_appending_to_a_complete_file_adds_no_blank_line(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    for name in ("a", "b"):
        sink = JsonlSink(sink_config("jsonl", "jsonl", {"path": str(out)}))
        try:
            sink.send(sample_event(name))
        finally:
            sink.close()
    assert [json.loads(x)["subject"] for x in lines(out)[:-1]] == ["a", "b"]
