"""The inspection pool: a few worker threads that scan, check, hash and reconcile for the
settle loop, so a slow unit delays only itself (SPEC §8).

Contract:

* `submit(job, budget=..., on_error=...)` queues `job(store)`; a worker runs it with its own
  read-only `Store` connection and posts what it returns to `post` (the settle loop's inbox).
  An exception becomes `on_error(exc)`, posted the same way: a job never kills a worker.
* Each worker has a `Heartbeat`: it beats while idle and whenever the job reports
  `progress()`; inside a job `progress()` raises `OverBudget` past `budget` seconds and
  `Cancelled` once `cancel()` was called.
* `capacity()` is how many more jobs may be submitted now (twice the workers, so none idles
  between two jobs); the settle loop keeps the rest pending, so the queue stays bounded.
* One job starts at a time while the jobs running are young: another worker starts the next
  job only once every running job has run `SLOW_AFTER` seconds. A burst of quick local jobs
  then runs on one thread at a time (workers taking turns at the GIL made a burst of 1,000
  models 20-40 % slower than one worker), while a slow job (hashing, slow storage, a hostile
  file) holds up the others for `SLOW_AFTER` at most: the pool widens as jobs turn slow.
* `InlinePool` runs each job at once on the caller's thread (tests drive the settle loop
  with a fake clock and no threads).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from modelwatch.clock import Clock
from modelwatch.progress import Heartbeat
from modelwatch.state import Store

log = structlog.get_logger("modelwatch.pool")

SLOW_AFTER = 0.05  # seconds a job runs before another may start beside it (see above)

Job = Callable[[Store], Any]
OnError = Callable[[BaseException], Any]


class Pool(Protocol):
    def submit(self, job: Job, *, budget: float | None, on_error: OnError) -> None: ...

    def capacity(self) -> int: ...


@dataclass(frozen=True, slots=True)
class _Item:
    job: Job
    budget: float | None
    on_error: OnError


class InspectionPool:
    """`workers` threads named `inspect-N`; see the module docstring."""

    def __init__(
        self, workers: int, db_path: str, clock: Clock, post: Callable[[Any], None]
    ) -> None:
        self._db_path = db_path
        self._post = post
        self._jobs: deque[_Item] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._running: dict[int, float] = {}  # worker -> when its job started (monotonic)
        self._watching = 0  # waiters waiting for the youngest running job to turn slow
        self._stopping = False
        self._cancelled = threading.Event()
        self._outstanding = 0
        self.heartbeats = [Heartbeat(f"inspect-{i}", clock) for i in range(workers)]
        self._threads = [
            threading.Thread(target=self._work, args=(i, hb), name=hb.name, daemon=True)
            for i, hb in enumerate(self.heartbeats)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def alive(self) -> list[str]:
        """Names of workers that died (never expected: jobs cannot raise out of them)."""
        return [t.name for t in self._threads if t.ident is not None and not t.is_alive()]

    def submit(self, job: Job, *, budget: float | None, on_error: OnError) -> None:
        with self._cond:
            self._outstanding += 1
            self._jobs.append(_Item(job, budget, on_error))
            # A waiter that cannot start yet would only wake to wait again; one is enough to
            # watch for the youngest job turning slow.
            if self._may_start(time.monotonic()) or not self._watching:
                self._cond.notify()

    def capacity(self) -> int:
        with self._cond:
            return max(0, 2 * len(self._threads) - self._outstanding)

    def cancel(self) -> None:
        """Make running jobs end at their next `progress()` (the daemon is stopping)."""
        self._cancelled.set()

    def stop(self, timeout: float) -> None:
        """Cancel running jobs and join the workers (a worker stuck in a system call that
        reports no progress is left behind: the threads are daemonic)."""
        self.cancel()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout)

    def _work(self, worker: int, heartbeat: Heartbeat) -> None:
        store = Store(self._db_path)
        try:
            while (item := self._next(worker, heartbeat)) is not None:
                try:
                    self._post(self._run(item, store, heartbeat))
                except Exception:  # `on_error` itself failed: a bug, logged; the worker lives
                    log.exception("inspection_result_lost")
                finally:
                    with self._cond:  # this worker looks for the next job itself: no notify
                        del self._running[worker]
                        self._outstanding -= 1
        finally:
            store.close()

    def _next(self, worker: int, heartbeat: Heartbeat) -> _Item | None:
        """The next job this worker may start (see the module docstring); None: stop.
        An idle worker beats its heartbeat at least once a second."""
        with self._cond:
            while not self._stopping:
                heartbeat.beat()
                now = time.monotonic()
                if self._jobs and self._may_start(now):
                    self._running[worker] = now
                    item = self._jobs.popleft()
                    if self._jobs and not self._watching:  # hand the watch on
                        self._cond.notify()
                    return item
                if not self._jobs:
                    self._cond.wait(1.0)
                    continue
                self._watching += 1  # until the youngest job running turns slow
                try:
                    self._cond.wait(max(self._running.values()) + SLOW_AFTER - now)
                finally:
                    self._watching -= 1
            return None

    def _may_start(self, now: float) -> bool:
        """Whether a job may start now: every running job has run `SLOW_AFTER` (lock held)."""
        return all(now - started >= SLOW_AFTER for started in self._running.values())

    def _run(self, item: _Item, store: Store, heartbeat: Heartbeat) -> Any:
        with heartbeat.job(budget=item.budget, cancelled=self._cancelled):
            try:
                return item.job(store)
            except BaseException as exc:  # a bug in a job must not kill the worker
                return item.on_error(exc)


class InlinePool:
    """Runs every job at once on the caller's thread (for tests); results go to `post`."""

    def __init__(self, store: Store, clock: Clock, post: Callable[[Any], None]) -> None:
        self._store = store
        self._post = post
        self.heartbeat = Heartbeat("inspect-inline", clock)

    def submit(self, job: Job, *, budget: float | None, on_error: OnError) -> None:
        with self.heartbeat.job(budget=budget):
            try:
                result = job(self._store)
            except BaseException as exc:
                result = on_error(exc)
        self._post(result)

    def capacity(self) -> int:
        return 1_000_000
