"""Calling asyncio code (nats-py) from plain threads: one event loop on a thread of its own.

The loop thread starts at the first call and runs until `close`. Any thread may `call` a
coroutine function and wait for its result up to a timeout; past it the coroutine is
cancelled and `TimeoutError` raised, so no caller waits on the backend for ever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Lock()

    def call(self, work: Callable[[], Awaitable[T]], timeout: float) -> T:
        """`await work()` on the loop thread; TimeoutError after `timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(_run(work), self._running())
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout:g} s") from None

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._started:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name=self.name, daemon=True
                )
                self._thread.start()
            return self._loop

    def close(self, last: Callable[[], Awaitable[None]], timeout: float) -> None:
        """Run `last()` on the loop (failures ignored), then stop and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        closing = asyncio.run_coroutine_threadsafe(_run(last), loop)
        with contextlib.suppress(Exception):  # a close that fails still stops the loop
            closing.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        self._loop = self._thread = None


async def _run(work: Callable[[], Awaitable[T]]) -> T:
    return await work()
