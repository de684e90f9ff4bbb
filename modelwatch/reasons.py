"""Why a unit is not settled yet, as data (SPEC §2 "Settled", §3 `explain`, §9 status page).

A `Reason` is one fact the settle logic acts on: a `code` from `CODES`, a `message` that names
the file or the rule, and the unit-relative `files` it is about (the first is the one to look
at). The settle loop keeps the reasons its checks found, `explain` prints them, the status page
shows them and `unit_not_ready` logs them: one account of why a unit waits, never a second
one rebuilt elsewhere. Messages may hold any character a file name holds: whoever prints them
on one line escapes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# code -> what it means (the README's table of reasons is checked against this).
CODES: Mapping[str, str] = {
    "quiet_period": "files changed less than `settle_seconds` ago (or the two scans that "
    "prove them unchanged are not both done yet)",
    "checking": "the unit is being scanned or checked right now",
    "in_progress": "a file matching an `in_progress` pattern is present",
    "incomplete": "the format's completeness check fails (SPEC §6); the message names the "
    "missing or incomplete file",
    "missing_marker": "the `require_marker` file is absent",
    "unreadable": "a file or directory of the unit could not be read (an I/O error)",
    "unit_unavailable": "the unit directory could not be opened again for checking",
    "root_unavailable": "the unit's root is unavailable (missing, unreadable, its "
    "`root_marker` absent, or an empty mount point)",
    "check_failed": "checking the unit failed unexpectedly (logged as `unit_failed`); it is "
    "checked again later",
    "changed_at_stop": "files changed during the last check before the daemon stopped",
    "cluster_paused": "the unit's root is shared and registering it is paused: this node "
    "does not hold the root's lease any more, or the cluster backend failed (SPEC §12)",
    "no_daemon": "no daemon is running: files that differ from what the state store last "
    "recorded are settled once one starts",
}

# At most this many file names in one message; `files` keeps the same ones.
MAX_NAMED = 5


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason a unit is not settled: `code` (see `CODES`), `message`, `files`."""

    code: str
    message: str
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown reason code {self.code!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reason:
        return cls(str(data["code"]), str(data["message"]), tuple(map(str, data["files"])))


def naming(code: str, what: str, names: Iterable[str]) -> Reason:
    """A reason about several files: `what: a, b, c (and N more)`, the first few named."""
    every = list(names)
    shown = every[:MAX_NAMED]
    more = f" (and {len(every) - len(shown)} more)" if len(every) > len(shown) else ""
    return Reason(code, f"{what}: {', '.join(shown)}{more}", tuple(shown))


def summary(reasons: Iterable[Reason]) -> str:
    """The messages joined on one line, for a log field or a `not_settled` error."""
    return "; ".join(r.message for r in reasons)
