"""`stdout` sink: one JSON line per event on standard output, flushed."""

from __future__ import annotations

import sys
from typing import ClassVar

from modelwatch.config import SinkConfig
from modelwatch.errors import SinkError
from modelwatch.events import Event
from modelwatch.sinks.options import SinkOptions


class StdoutSink:
    """Delivered when the line is written and flushed."""

    OPTIONS: ClassVar[SinkOptions] = SinkOptions()

    def __init__(self, config: SinkConfig) -> None:
        self.OPTIONS.parse(config)
        self.name = config.name

    def send(self, event: Event) -> None:
        try:
            sys.stdout.write(event.to_json() + "\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:  # closed pipe or closed file
            raise SinkError(f"stdout: {exc}") from exc

    def close(self) -> None:
        return None
