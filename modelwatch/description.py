"""A unit's description (SPEC §13): its `data.model` and the metrics its TensorBoard logs hold.

`describe_unit(unit_fd, sizes, fmt, scalars=...)` reads the files of a settled unit in the
inspection pool, inside the unit's job: what it reads is progress (`modelwatch.progress`),
so a long read keeps its worker healthy, and once the job's budget (`inspect_timeout_seconds`)
has run out it stops, the model's `error` saying so (`describe_timeout`). A description is a
courtesy: whatever it finds, and however long it takes, the unit is never rejected for it.

It is computed once per fingerprint: stored with the fingerprint (`to_json`, `from_json`),
reused when the same files come back after a removal, and not computed at all for files
whose event was already emitted (`NOT_NEEDED`: the registry emits nothing for them).

TensorBoard event files are ignored by default (they are appended to for the whole run), so
they are found by walking the unit, not from its manifest: the metrics are what the logs
held when the files settled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelwatch.describe import Stopped, find_event_files, scalar_metrics
from modelwatch.formats import describe_model
from modelwatch.progress import OverBudget, progress

MAX_EVENT_FILES = 1000  # TensorBoard files read for metrics, the first by path


@dataclass(frozen=True, slots=True)
class Description:
    """`model`: the format's description (None for a format that carries none); `scalars`:
    the last value of each TensorBoard scalar, `[{"name", "numberValue"}]` sorted by name
    (empty when the metadata's metrics are used instead)."""

    model: dict[str, Any] | None = None
    scalars: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> str:
        """The stored form (compact JSON)."""
        body = {"model": self.model, "scalars": list(self.scalars)}
        return json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Description:
        """The stored form read back; ValueError when it is not one (a damaged store)."""
        body = json.loads(text)
        model = body.get("model") if isinstance(body, dict) else 0
        scalars = body.get("scalars") if isinstance(body, dict) else 0
        if not isinstance(model, (dict, type(None))) or not isinstance(scalars, list):
            raise ValueError("not a stored description")  # noqa: TRY004 - json.loads's error
        return cls(model, tuple(scalars))


# The description of files no event will carry (their fingerprint is current).
NOT_NEEDED = Description()

# The description stored with a fingerprint (NOT_NEEDED when no event will carry one), or
# None: the files must be described.
Prior = Callable[[str], "Description | None"]


def describe_unit(
    unit_fd: int,
    sizes: Mapping[str, int],
    fmt: str,
    *,
    scalars: bool,
    max_entries: int,
    event_files: Sequence[str] | None = None,
) -> Description:
    """The description of the `fmt` unit whose files (relative path -> size) are below
    `unit_fd`; with `scalars`, the metrics of its event files: `event_files` when the scan
    found them already, else those found in at most `max_entries` directory entries. Never
    raises for what it reads (Cancelled: the daemon is stopping)."""
    model = describe_model(unit_fd, sizes, fmt, progress=_progress)
    found: list[dict[str, Any]] = []
    if scalars:
        try:
            files = (
                list(event_files)
                if event_files is not None
                else find_event_files(unit_fd, max_files=MAX_EVENT_FILES, max_entries=max_entries)
            )
            found = scalar_metrics(unit_fd, files, progress=_progress)
        except Stopped as exc:
            error = {"code": exc.code, "file": "", "message": f"metrics {exc.message}"}
            model = {**(model or {}), "error": (model or {}).get("error", error)}
    return _representable(Description(model, tuple(found)))


# What an event's JSON carries exactly: integers of 64 bits (a crafted shape's element count
# has hundreds of digits), finite numbers, strings, lists and tables of them.
_INT_LIMIT = 2**63
_MAX_DEPTH = 32


def _representable(description: Description) -> Description:
    """`description` with every value an event's JSON can carry: an integer beyond 64 bits or
    a number that is not finite is null, and `error` says so (`describe_out_of_range`);
    anything else that is not JSON (a date an MLmodel's YAML held) is its text."""
    dropped: list[str] = []
    model = _plain(description.model, dropped, 0)
    scalars = tuple(_plain(dict(s), dropped, 0) for s in description.scalars)
    if dropped and isinstance(model, dict) and not model.get("error"):
        message = f"a value out of range is not shown ({dropped[0]})"
        model["error"] = {"code": "describe_out_of_range", "file": "", "message": message}
    return Description(model if isinstance(model, dict) or model is None else None, scalars)


def _plain(value: Any, dropped: list[str], depth: int) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if -_INT_LIMIT <= value < _INT_LIMIT:
            return value
        dropped.append(f"an integer of {value.bit_length()} bits")
        return None
    if isinstance(value, float):
        if value == value and abs(value) != float("inf"):
            return value
        dropped.append(repr(value))
        return None
    if depth >= _MAX_DEPTH:
        dropped.append(f"nesting deeper than {_MAX_DEPTH}")
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v, dropped, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, dropped, depth + 1) for v in value]
    return str(value)[:1000]


def _progress(_nbytes: int) -> None:
    """What the readers report as they go: the job's heartbeat and budget (`progress`)."""
    try:
        progress()
    except OverBudget as exc:
        message = f"not read: the unit's inspection {exc} (inspect_timeout_seconds)"
        raise Stopped("describe_timeout", message) from None
