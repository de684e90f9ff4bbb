"""What the running daemon shows about itself: `explain` answers on the control socket and
the status page with its JSON on the health server (SPEC §3, §9).

`Views` reads, at each request, the settle loop's latest snapshot (never the loop's own
state), the daemon's current config and watchers, and the state store of the thread that
asks (each server has a connection of its own). It keeps the latest events (`record`, called
by the settle thread) as a tuple replaced whole, so a reader never sees it change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from modelwatch import __version__, explain, statuspage
from modelwatch.clock import Clock
from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.pending import Snapshot
from modelwatch.state import Store
from modelwatch.status import live_status

RECENT_EVENTS = 50  # listed on the status page


class Views:
    """The daemon's answers about itself; see the module docstring."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        snapshot: Callable[[], Snapshot],
        observers: Callable[[], Mapping[str, str]],
        clock: Clock,
        host: str,
    ) -> None:
        self._config, self._snapshot, self._observers = config, snapshot, observers
        self._clock, self._host = clock, host
        self.recent: tuple[Mapping[str, Any], ...] = ()

    def record(self, event: Event) -> None:
        """An event was committed (called by the settle thread only)."""
        self.recent = (*self.recent[1 - RECENT_EVENTS :], statuspage.recent_entry(event))

    def answer(self, request: Mapping[str, Any], store: Store) -> Any:
        """A control-socket request, `{"explain": PATH}`: the report on PATH (None when it is
        under no root)."""
        path = request.get("explain")
        if not isinstance(path, str):
            raise ValueError('expected {"explain": "/absolute/path"}')  # noqa: TRY004
        return self.unit(path, store)

    def unit(self, path: str, store: Store) -> dict[str, Any] | None:
        """`explain`'s report on `path`; None when it is under no root."""
        return explain.answer_live(self._config(), store, self._snapshot(), path, self._clock)

    def status(self, store: Store) -> dict[str, Any]:
        """`/api/status`: the store's status with the pending units, roots and recent events."""
        return live_status(
            self._config(),
            store,
            self._snapshot(),
            observers=self._observers(),
            recent=self.recent,
            now=self._clock.time(),
            monotonic=self._clock.monotonic(),
        )

    def web(self, path: str, store: Store) -> statuspage.Response | None:
        """The status page and its JSON for `path`; None for paths that are not theirs."""
        return statuspage.route(
            path,
            status=lambda: self.status(store),
            unit=lambda target: self.unit(target, store),
            host=self._host,
            version=__version__,
        )
