"""CloudEvents 1.0 events, in structured JSON form (SPEC §5).

The event id is deterministic: the sha256 hex digest of
`"<type>\\n<absolute unit path>\\n<fingerprint>"`, so every node that sees the same model
version produces the same id and any consumer can deduplicate. Where one fingerprint can mean
two events (SPEC §2, §11), `"\\n<n>"` is appended when the unit had n > 0 `removed` events
before this one (a restore, a second removal), and a `rejected` event appends
`"\\n<its distinct error codes, sorted, comma-joined>"` (a `not_settled` and a later
rejection of the same files differ).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

REGISTERED = "io.modelwatch.model.registered"
REJECTED = "io.modelwatch.model.rejected"
REMOVED = "io.modelwatch.model.removed"
EVENT_TYPES = (REGISTERED, REJECTED, REMOVED)


def event_id(
    event_type: str,
    unit_path: str,
    fingerprint: str,
    *,
    removals: int = 0,
    codes: Collection[str] = (),
) -> str:
    """The deterministic id of an event (see the module docstring); `codes` only count for
    `rejected` events."""
    text = f"{event_type}\n{unit_path}\n{fingerprint}"
    if removals > 0:
        text += f"\n{removals}"
    if event_type == REJECTED:
        text += "\n" + ",".join(sorted(set(codes)))
    return hashlib.sha256(text.encode()).hexdigest()


def rfc3339(timestamp: float) -> str:
    """RFC 3339 UTC with millisecond precision, e.g. `2026-11-27T04:05:06.789Z`."""
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    """One CloudEvent. `data` follows SPEC §5; `to_json()` is the wire form (one line)."""

    id: str
    type: str
    source: str
    subject: str
    time: str
    data: Mapping[str, Any]

    @property
    def short_type(self) -> str:
        return self.type.rsplit(".", 1)[-1]

    @property
    def unit_path(self) -> str:
        return str(self.data.get("path", ""))

    def to_dict(self) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": dict(self.data),
        }

    def to_json(self) -> str:
        """Compact ASCII JSON on one line.

        ASCII keeps every line encodable whatever the metadata holds (JSON allows lone
        surrogate escapes such as "\\ud800", which no UTF-8 encoder accepts raw); newlines in
        names are escaped by JSON.
        """
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Event:
        obj = json.loads(text)
        return cls(
            id=obj["id"],
            type=obj["type"],
            source=obj["source"],
            subject=obj["subject"],
            time=obj["time"],
            data=obj["data"],
        )


DATA_FIELDS = (
    "path",
    "root",
    "name",
    "experiment_id",
    "model_type",
    "format",
    "version",
    "fingerprint",
    "files",
    "file_count",
    "total_bytes",
    "metadata",
    "metadata_ignored",
    "metrics",
    "model",
    "restored",
    "host",
    "settled_after_seconds",
    "errors",
)


def make_event(
    event_type: str,
    *,
    root: str,
    unit_path: str,
    name: str,
    when: float,
    data: Mapping[str, Any],
    subject: str | None = None,
    removals: int = 0,
) -> Event:
    """Build an event; `data` must carry `fingerprint` (and `errors` when `rejected`).

    `name` is `data.name` (SPEC §2 "Name"); `subject` the unit's path relative to the root
    ("." for a depth-0 root; default: `name`); `removals` the unit's `removed` events before
    this one.
    """
    fields = {"path": unit_path, "root": root, "name": name, **data}
    body = {key: fields[key] for key in DATA_FIELDS if key in fields}
    codes = [str(e["code"]) for e in body.get("errors") or ()]
    return Event(
        id=event_id(
            event_type, unit_path, str(body["fingerprint"]), removals=removals, codes=codes
        ),
        type=event_type,
        source="modelwatch:" + root,
        subject=name if subject is None else subject,
        time=rfc3339(when),
        data=body,
    )
