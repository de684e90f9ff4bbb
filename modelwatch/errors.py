"""Exceptions and problem records.

Exception hierarchy (only `cli.py` turns these into exit codes)::

    ModelwatchError
    ├── ConfigError          bad configuration; names the key (exit 2)
    ├── StateError           the state store cannot be used (locked, corrupt, unwritable)
    ├── NoAnswer             no daemon answered on the control socket (`explain` falls back)
    └── SinkError            a delivery attempt failed; retried (optionally after `retry_after`)
        └── PermanentSinkError   retrying cannot help; the event goes to the dead letters

Problems found in untrusted input (model directories, metadata files) are not exceptions:
they are `Problem` values that flow into `rejected` events and `validate` output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ModelwatchError(Exception):
    """Base class of every error modelwatch raises on purpose."""


class ConfigError(ModelwatchError):
    """The configuration is invalid. The message starts with the offending key."""


class StateError(ModelwatchError):
    """The state store cannot be opened or written."""


class NoAnswer(ModelwatchError):
    """No daemon answered on the control socket (none runs, or it did not answer in time)."""


class UnitUnavailable(ModelwatchError):
    """A stable unit's directory could not be opened again to inspect it (gone, swapped for a
    symlink since its scan, or a transient error such as ESTALE): it is tried again later,
    never registered or rejected from what could not be read."""


class SinkError(ModelwatchError):
    """A delivery attempt failed and may be retried.

    `retry_after` (seconds) is a hint from the receiver, such as HTTP `Retry-After`.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """A delivery attempt failed in a way retrying cannot fix (dead letter)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a unit or its metadata, as data.

    `file` is relative to the unit (or the path given to `validate`); `line` and `column`
    are 1-based; `pointer` is an RFC 6901 JSON pointer into the metadata document.
    """

    code: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    pointer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "pointer": self.pointer,
        }
