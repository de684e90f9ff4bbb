"""The inspection pool: quick jobs take turns on one thread, a slow job widens the pool."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelwatch.clock import SystemClock
from modelwatch.pool import SLOW_AFTER, InspectionPool
from modelwatch.state import Store
from tests.conftest import wait_until


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    db = str(tmp_path / "state.db")
    Store(db).close()
    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    pool = InspectionPool(4, db, SystemClock(), results.put)
    pool.start()
    yield pool, results
    pool.stop(5.0)


def _take(results: queue.SimpleQueue[Any], count: int) -> list[Any]:
    return [results.get(timeout=10) for _ in range(count)]


def test_quick_jobs_never_run_side_by_side(pool: Any) -> None:
    """A burst of jobs shorter than SLOW_AFTER runs one at a time (threads taking turns at
    the GIL made a burst of a thousand models slower), whichever workers take them."""
    inspection, results = pool
    lock = threading.Lock()
    running, most = [0], [0]

    def job(_store: Store) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(SLOW_AFTER / 10)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    for _ in range(40):
        inspection.submit(job, budget=None, on_error=repr)
    names = _take(results, 40)
    assert most[0] == 1
    assert all(name.startswith("inspect-") for name in names)


def test_a_slow_job_holds_up_the_others_for_slow_after_at_most(pool: Any) -> None:
    """A job that blocks (hashing a huge file, a hung mount) lets the next job start beside it
    once it has run SLOW_AFTER; more slow jobs widen the pool to every worker."""
    inspection, results = pool
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocked(_store: Store) -> str:
        started.release()
        release.wait(30)
        return "blocked"

    def quick(_store: Store) -> float:
        return time.monotonic()

    try:
        for _ in range(3):
            inspection.submit(blocked, budget=None, on_error=repr)
            time.sleep(0.01)  # the scenario: jobs arriving one by one, not in one batch
            assert started.acquire(timeout=5)  # running, and young when the next comes
            submitted = time.monotonic()
            inspection.submit(quick, budget=None, on_error=repr)
            done = results.get(timeout=10)
            assert isinstance(done, float)
            assert done - submitted < SLOW_AFTER + 0.3
    finally:
        release.set()
    assert _take(results, 3) == ["blocked"] * 3


def test_slow_jobs_queued_together_widen_the_pool_one_step_per_slow_after(pool: Any) -> None:
    """Three blocking jobs submitted at once: each starts SLOW_AFTER after the one before,
    not when an idle worker's one-second wait happens to end."""
    inspection, results = pool
    release = threading.Event()
    starts: list[float] = []

    def blocked(_store: Store) -> str:
        starts.append(time.monotonic())
        release.wait(30)
        return "blocked"

    try:
        submitted = time.monotonic()
        for _ in range(3):
            inspection.submit(blocked, budget=None, on_error=repr)
            time.sleep(0.01)  # the scenario: jobs arriving one by one, not in one batch
        wait_until(lambda: len(starts) == 3, timeout=5)
        assert starts[2] - submitted < 2 * SLOW_AFTER + 0.2
    finally:
        release.set()
    assert _take(results, 3) == ["blocked"] * 3


def test_stop_returns_while_jobs_wait(pool: Any) -> None:
    inspection, _results = pool
    release = threading.Event()
    for _ in range(8):
        inspection.submit(lambda _s: release.wait(30), budget=None, on_error=repr)
    started = time.monotonic()
    release.set()
    inspection.stop(5.0)
    assert time.monotonic() - started < 5.0
    assert not any(thread.is_alive() for thread in inspection._threads)
