"""`explain`'s report as text: one screen, the reason first (SPEC §3).

    huggingface incomplete: model-00002-of-00003.safetensors missing (named in ...)
    also:        in-progress files present: model-00003-of-00003.safetensors.part
    unit:        /storage/models/exp-1 (root /storage/models: available)
    state:       pending for 42 s; last change 3.0 s ago; next check in 7.0 s
    versions:    v1 registered 2026-11-27T04:05:06.789Z sha256:9a1e…
    delivery:    stdout: delivered
    answered by: the running daemon

Every value from the unit (file names, error messages) is printed on one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelwatch.explain import SOURCES
from modelwatch.status import one_line

WIDTH = 160  # one terminal line at most per value
SHOWN_VERSIONS = 3
SHOWN_EVENTS = 3


def render(report: Mapping[str, Any]) -> str:
    state = report["state"]
    first = f"{state}: {report['summary']}" if state == "pending" else report["summary"]
    lines = [one_line(first, WIDTH)]
    if state == "not_a_unit":
        return lines[0]
    for reason in report["reasons"][1:]:
        lines.append(_row("also", reason["message"]))
    root = report["root_state"]
    where = "" if root is None else ": available" if root["available"] else ": unavailable"
    lines.append(_row("unit", f"{report['path']} (root {report['root']}{where})"))
    lines.append(_row("state", _state(report)))
    lines += _rows("versions", _versions(report["versions"]))
    sinks = [_sink(s) for s in report["delivery"]] or ["no sinks"]
    lines += _rows("delivery", sinks if report["versions"] else ["no event yet"])
    source = SOURCES.get(report["answered_by"], report["answered_by"])
    if report.get("no_answer"):
        source = f"{source} ({report['no_answer']})"
    lines.append(_row("answered by", source))
    return "\n".join(lines)


def _row(key: str, value: str) -> str:
    return f"{key + ':':<13}{one_line(value, WIDTH)}"


def _rows(key: str, values: list[str]) -> list[str]:
    return [_row(key if i == 0 else "", value) for i, value in enumerate(values)]


def _state(report: Mapping[str, Any]) -> str:
    state, pending = str(report["state"]), report["pending"]
    if pending is not None and "pending_seconds" not in pending:  # a fresh check's
        ago = pending.get("last_change_seconds_ago")
        return state if ago is None else f"{state}; the newest file changed {ago:.0f} s ago"
    if pending is not None:
        parts = [f"{state} for {pending['pending_seconds']:.0f} s"]
        if pending["checking"]:
            parts.append("being checked now")
        elif pending["checked_seconds_ago"] is not None:
            parts.append(f"last checked {pending['checked_seconds_ago']:.1f} s ago")
        parts.append(f"next check in {pending['next_check_in_seconds']:.1f} s")
        if pending["overdue"]:
            parts.append("past max_wait_seconds: a not_settled event was emitted")
        return "; ".join(parts)
    version = report["version"]
    if version is not None and state == "registered":
        return f"registered; version {version}, fingerprint {report['fingerprint']}"
    return state if version is None else f"{state}; last registered version {version}"


def _versions(versions: list[Mapping[str, Any]]) -> list[str]:
    if not versions:
        return ["none"]
    shown = [
        f"{'v' + str(v['version']) if v['version'] else '--'} {v['outcome']}"
        f" {v['settled_at'] or ''} {v['fingerprint'][:20]}…"
        + (f" ({', '.join(map(str, v['errors']))})" if v["errors"] else "")
        for v in versions[-SHOWN_VERSIONS:]
    ]
    if len(versions) > SHOWN_VERSIONS:
        shown.insert(0, f"({len(versions) - SHOWN_VERSIONS} earlier)")
    return shown


def _sink(sink: Mapping[str, Any]) -> str:
    events = sink["events"]
    if not events:
        return f"{sink['sink']}: delivered"
    parts = [
        f"{e['state']} {e['type']} {e['event_id'][:12]}"
        + (f", {e['attempts']} attempts" if e["attempts"] else "")
        + (f": {e['last_error']}" if e["last_error"] else "")
        for e in events[:SHOWN_EVENTS]
    ]
    more = f" (and {len(events) - SHOWN_EVENTS} more)" if len(events) > SHOWN_EVENTS else ""
    return f"{sink['sink']}: " + "; ".join(parts) + more
