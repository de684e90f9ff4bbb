"""The status page's routes and HTML, without a server: escaping of what training code
names, the unit links, and errors as answers instead of exceptions."""

from __future__ import annotations

import json
from typing import Any

from modelwatch import statuspage
from modelwatch.errors import StateError


def report(pending: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "roots": [
            {
                "path": "/storage/models",
                "unit_depth": 1,
                "state": "available",
                "reason": None,
                "observer": "inotify",
                "since": None,
            }
        ],
        "units": [],
        "sinks": [
            {
                "sink": "webhook",
                "pending": 2,
                "dead": 1,
                "discarded": 0,
                "oldest_pending_seconds": 125.0,
            }
        ],
        "dead_letters": [
            {
                "sink": "webhook",
                "event_id": "ab" * 32,
                "unit": "/storage/models/exp-1",
                "type": "registered",
                "attempts": 10,
                "last_error": "HTTP 400",
            }
        ],
        "pending": pending or [],
        "recent_events": [],
    }


def pending_unit(path: str, message: str) -> dict[str, Any]:
    reason = {"code": "in_progress", "message": message, "files": []}
    return {"path": path, "root": "/storage/models", "pending_seconds": 61.0, "reasons": [reason]}


def route(path: str, status: Any = None, unit: Any = None) -> statuspage.Response | None:
    return statuspage.route(
        path,
        status=status or report,
        unit=unit or (lambda _path: None),
        host="node-1",
        version="1.0",
    )


def test_names_from_model_directories_are_shown_never_run_as_markup() -> None:
    """A unit and a file named with HTML and script tags appear as text on the page."""
    hostile = "/storage/models/<script>alert(1)</script>"
    page = statuspage.render(
        report([pending_unit(hostile, 'in-progress files present: "><img src=x onerror=y>')]),
        host="node-1",
        version="1.0",
    )
    assert "<script>alert" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert statuspage.unit_link(hostile) == (
        "/api/units/%2Fstorage%2Fmodels%2F%3Cscript%3Ealert%281%29%3C%2Fscript%3E"
    )


def test_the_page_refreshes_itself_and_loads_nothing_from_elsewhere() -> None:
    """The page reloads itself, and holds no script and no link to another host."""
    page = statuspage.render(report(), host="node-1", version="1.0")
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "2 min 5 s" in page  # the age of the oldest pending delivery, readable


def test_a_unit_is_asked_for_by_its_percent_encoded_path() -> None:
    """`/api/units/%2F...` asks for the decoded absolute path and answers its JSON; a path
    under no root is a 404 that says so; a relative one a 404 that says what is expected."""
    asked: list[str] = []

    def unit(path: str) -> dict[str, Any] | None:
        asked.append(path)
        return {"state": "registered"} if path == "/storage/models/exp 1" else None

    answer = route("/api/units/%2Fstorage%2Fmodels%2Fexp%201", unit=unit)
    assert answer is not None and answer[:2] == (200, "application/json")
    assert json.loads(answer[2]) == {"state": "registered"}
    assert asked == ["/storage/models/exp 1"]
    missing = route("/api/units/%2Felsewhere", unit=unit)
    assert missing is not None and missing[0] == 404
    assert "under no watched root" in json.loads(missing[2])["error"]
    relative = route("/api/units/exp-1", unit=unit)
    assert relative is not None and relative[0] == 404 and "percent-encoded" in relative[2].decode()


def test_a_failure_is_a_500_answer_not_an_exception() -> None:
    """A state store that cannot be read makes the page a 500 naming the error; the health
    server goes on."""

    def broken() -> dict[str, Any]:
        raise StateError("state store: disk I/O error")

    answer = route("/", status=broken)
    assert answer is not None and answer[0] == 500
    assert "disk I/O error" in json.loads(answer[2])["error"]


def test_other_paths_are_left_to_the_health_server() -> None:
    """Paths that are not the page's are not answered here (the server has /healthz ...)."""
    assert route("/healthz") is None and route("/api") is None


def test_long_lists_are_cut_and_say_how_many_were_left_out() -> None:
    """With more pending units than MAX_ROWS, the page shows MAX_ROWS and the count left."""
    many = [pending_unit(f"/storage/models/exp-{i}", "x.part") for i in range(250)]
    page = statuspage.render(report(many), host="node-1", version="1.0")
    assert page.count('data-unit="') == statuspage.MAX_ROWS
    assert "and 50 more" in page and "Pending units (250)" in page
