"""The status page, `GET /` on `health_listen` (SPEC §9): `status.live_status` as one small
HTML document; and `route`, which serves it with its JSON (`/api/status`,
`/api/units/<path>`) for the health server.

Server-rendered and self-contained: no script, no external style sheet, font or image, so it
reads the same in a text browser, with JavaScript off, or behind a proxy that blocks the
internet. It reloads itself every `REFRESH_SECONDS` (`<meta http-equiv="refresh">`). Every
value from the watched directories (paths, reasons, error messages) is escaped: the page
shows names, never markup written by training code. Each unit links to its
`/api/units/<percent-encoded path>` (the JSON of `explain`). Long lists are cut at
`MAX_ROWS` rows, saying how many were left out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote

import structlog

from modelwatch.events import Event

log = structlog.get_logger("modelwatch.statuspage")

REFRESH_SECONDS = 10
MAX_ROWS = 200

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.5em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;
border-bottom:1px solid #ddd;vertical-align:top}th{background:#f4f4f4}
code{font:12px ui-monospace,monospace;background:#f4f4f4;padding:0 .2em}
ul.reasons{margin:0;padding-left:1.1em}.bad{color:#b00020;font-weight:600}
.ok{color:#1b7f3b}.muted{color:#666}td.num{text-align:right;white-space:nowrap}
"""


HTML = "text/html; charset=utf-8"
JSON = "application/json"
UNITS = "/api/units/"
Response = tuple[int, str, bytes]


def route(
    path: str,
    *,
    status: Callable[[], Mapping[str, Any]],
    unit: Callable[[str], Mapping[str, Any] | None],
    host: str,
    version: str,
) -> Response | None:
    """The response for `path` (already split from its query): the page, `/api/status`
    (`status()`), `/api/units/<percent-encoded absolute path>` (`unit(path)`, None when the
    path is under no root: 404); None for any other path. A failure to build an answer (the
    state store unreadable, a bug) is a 500 naming the error, never an exception."""
    try:
        if path == "/":
            return 200, HTML, render(status(), host=host, version=version).encode()
        if path == "/api/status":
            return 200, JSON, _json(status())
        if path.startswith(UNITS):
            return _unit_answer(path[len(UNITS) :], unit)
    except Exception as exc:  # the health server must go on answering probes
        log.exception("status_page_failed", path=path)
        return 500, JSON, _json({"error": f"{type(exc).__name__}: {exc}"})
    return None


def _unit_answer(segment: str, unit: Callable[[str], Mapping[str, Any] | None]) -> Response:
    target = unquote(segment, errors="surrogateescape")  # also taken unencoded
    if not target.startswith("/"):
        message = "expected /api/units/<the unit's absolute path, percent-encoded as one segment>"
        return 404, JSON, _json({"error": message})
    report = unit(target)
    if report is None:
        return 404, JSON, _json({"error": f"{target!r} is under no watched root"})
    return 200, JSON, _json(report)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "replace")


def recent_entry(event: Event) -> dict[str, Any]:
    """What the page and `/api/status` list of an event (`recent_events`)."""
    errors = event.data.get("errors") or ()
    return {
        "time": event.time,
        "type": event.short_type,
        "unit": event.unit_path,
        "version": event.data.get("version"),
        "event_id": event.id,
        "errors": [str(e.get("code")) for e in errors if isinstance(e, Mapping)],
    }


def unit_link(path: str) -> str:
    """`/api/units/<path>`, the unit's absolute path percent-encoded as one segment."""
    return "/api/units/" + quote(path, safe="")


def render(report: Mapping[str, Any], *, host: str, version: str) -> str:
    """The page for `report` (the JSON of `/api/status`)."""
    pending = report.get("pending", [])
    sections = [
        _section("roots", "Roots", _roots(report["roots"])),
        _section("pending", f"Pending units ({len(pending)})", _pending(pending)),
        _section("events", "Recent events", _events(report.get("recent_events", []))),
        _section("sinks", "Sinks", _sinks(report["sinks"])),
    ]
    if report["dead_letters"]:
        title = f"Dead letters ({len(report['dead_letters'])})"
        sections.append(_section("dead", title, _dead(report["dead_letters"])))
    title = f"modelwatch on {host}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class=muted>version {_e(version)} · "
        f"{len(pending)} pending · refreshes every {REFRESH_SECONDS} s · "
        '<a href="/api/status">JSON</a> · <a href="/metrics">metrics</a></p></header>'
        + "".join(sections)
        + "<footer><p class=muted>Why is a model not registered? <code>modelwatch explain "
        "PATH</code>, or its link above (<code>/api/units/&lt;percent-encoded path&gt;"
        "</code>).</p></footer></body></html>\n"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _table(header: Sequence[str], rows: Iterable[str], total: int, empty: str) -> str:
    if total == 0:
        return f"<p class=muted>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    more = f"<p class=muted>and {total - MAX_ROWS} more</p>" if total > MAX_ROWS else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes} min"
        if hours
        else f"{minutes} min {secs} s"
        if minutes
        else f"{secs} s"
    )


def _unit(path: str) -> str:
    return f'<a href="{_e(unit_link(path))}">{_e(path)}</a>'


def _roots(roots: Sequence[Mapping[str, Any]]) -> str:
    rows = (
        f'<tr data-root="{_e(r["path"])}"><td>{_e(r["path"])}</td><td>{_e(r["unit_depth"])}</td>'
        f'<td class="{"ok" if r["state"] == "available" else "bad"}">{_e(r["state"])}</td>'
        f"<td>{_e(r['observer'] or '-')}</td><td>{_e(r['reason'] or '')}</td></tr>"
        for r in roots[:MAX_ROWS]
    )
    return _table(["root", "depth", "state", "observer", "why"], rows, len(roots), "no roots")


def _pending(pending: Sequence[Mapping[str, Any]]) -> str:
    def why(reasons: Sequence[Mapping[str, Any]]) -> str:
        items = "".join(
            f'<li data-code="{_e(r["code"])}"><code>{_e(r["code"])}</code> {_e(r["message"])}</li>'
            for r in reasons
        )
        return f"<ul class=reasons>{items}</ul>"

    rows = (
        f'<tr data-unit="{_e(p["path"])}"><td>{_unit(p["path"])}</td>'
        f"<td class=num>{_e(_age(p['pending_seconds']))}</td><td>{why(p['reasons'])}</td></tr>"
        for p in pending[:MAX_ROWS]
    )
    return _table(["unit", "pending for", "why"], rows, len(pending), "nothing pending")


def _events(events: Sequence[Mapping[str, Any]]) -> str:
    latest = list(reversed(events))
    rows = (
        f"<tr><td>{_e(e['time'])}</td>"
        f'<td class="{"bad" if e["type"] == "rejected" else ""}">{_e(e["type"])}</td>'
        f"<td>{_unit(e['unit'])}</td><td>{_e(e['version'] or '-')}</td>"
        f"<td>{_e(', '.join(e['errors']))}</td><td><code>{_e(e['event_id'][:12])}</code></td></tr>"
        for e in latest[:MAX_ROWS]
    )
    header = ["time", "type", "unit", "version", "errors", "event id"]
    return _table(header, rows, len(latest), "no event since the daemon started")


def _sinks(sinks: Sequence[Mapping[str, Any]]) -> str:
    rows = (
        f'<tr data-sink="{_e(s["sink"])}"><td>{_e(s["sink"])}</td>'
        f"<td class=num>{_e(s['pending'])}</td>"
        f'<td class="num{" bad" if s["dead"] else ""}">{_e(s["dead"])}</td>'
        f"<td class=num>{_e(s['discarded'])}</td>"
        f"<td class=num>{_e(_age(s['oldest_pending_seconds']))}</td></tr>"
        for s in sinks[:MAX_ROWS]
    )
    header = ["sink", "pending", "dead", "discarded", "oldest pending"]
    return _table(header, rows, len(sinks), "nothing queued for any sink yet")


def _dead(letters: Sequence[Mapping[str, Any]]) -> str:
    rows = (
        f"<tr><td>{_e(d['sink'])}</td><td>{_unit(d['unit'])}</td><td>{_e(d['type'])}</td>"
        f"<td class=num>{_e(d['attempts'])}</td><td>{_e(d['last_error'] or '')}</td>"
        f"<td><code>{_e(d['event_id'][:12])}</code></td></tr>"
        for d in letters[:MAX_ROWS]
    )
    header = ["sink", "unit", "type", "attempts", "last error", "event id"]
    return _table(header, rows, len(letters), "none")
