"""Driving the settle loop by hand: a fake clock, jobs run inline, no threads, no sleeping.

Changes are fed the way the watchers would feed them; time moves only when the test says so.
"""

from __future__ import annotations

from pathlib import Path

from modelwatch.config import Config
from modelwatch.events import Event
from modelwatch.settle_loop import Flush, SettleLoop, Stop
from modelwatch.stages import build_stages
from modelwatch.state import StateDir, Store
from modelwatch.testing import FakeClock
from modelwatch.watch import Change, Rescan

# Turns a store of the current schema back into one of schema 1 (what an old version wrote).
SCHEMA_1_AGAIN = """
ALTER TABLE fingerprints DROP COLUMN description;
ALTER TABLE fingerprints DROP COLUMN settled_at;
ALTER TABLE fingerprints DROP COLUMN errors;
ALTER TABLE units DROP COLUMN scan_digest;
ALTER TABLE units DROP COLUMN removals;
ALTER TABLE fingerprints DROP COLUMN epoch;
DROP TABLE roots;
DROP INDEX outbox_unit;
ALTER TABLE outbox DROP COLUMN unit;
PRAGMA user_version = 1;
"""


class Harness:
    """A settle loop whose clock and change feed the test drives."""

    def __init__(
        self,
        config: Config,
        wall: float | None = None,
        on_event: object | None = None,
        *,
        starting: bool = False,
    ) -> None:
        """`starting`: the loop is a daemon's at its start, whose first reconciles (until
        `started()`) remove vanished units at once; else it has started already."""
        self.config = config
        self.clock = FakeClock() if wall is None else FakeClock(wall=wall)
        self.store = Store(StateDir(config.daemon.state_dir).db_path)
        self.events: list[Event] = []
        self.stages = build_stages(
            config,
            self.store,
            clock=self.clock,
            host="testhost",
            on_event=on_event if callable(on_event) else self.events.append,
        )
        self.loop: SettleLoop = self.stages.loop
        self.root = config.roots[0].path
        if not starting:
            self.started()

    def started(self) -> None:
        """What a daemon does once its start's reconciles are queued (its `Flush`)."""
        self.loop.handle(Flush())

    def idle(self) -> None:
        """Run turns of the loop until every job submitted was handled."""
        self.loop.step()
        while not self.stages.inbox.empty():
            self.loop.step()

    def touch(self, path: Path, is_dir: bool = False) -> None:
        """What a watcher enqueues when `path` changes now."""
        self.loop.handle(Change(self.root, str(path), None, is_dir, self.clock.monotonic()))

    def rescan(self, root: str | None = None) -> None:
        self.loop.handle(Rescan(root or self.root))
        self.idle()

    def advance(self, seconds: float, step: float = 0.25) -> list[Event]:
        """Move time forward in steps, running due work; returns the new events."""
        before = len(self.events)
        elapsed = 0.0
        while elapsed < seconds - 1e-9:
            self.clock.advance(step)
            elapsed += step
            self.idle()
        return self.events[before:]

    def stop(self, gap: float = 1.0, within: float = 10.0) -> list[Event]:
        """A SIGTERM: every pending unit's last chance; returns the events it produced."""
        before = len(self.events)
        self.loop.handle(Stop(deadline=self.clock.monotonic() + within, gap=gap))
        while not self.loop.finished:
            self.clock.advance(0.25)
            self.idle()
        return self.events[before:]

    def close(self) -> None:
        self.store.close()
