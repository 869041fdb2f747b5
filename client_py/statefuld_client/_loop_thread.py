"""A private event loop on a daemon thread: how the blocking client runs the async pod hold and
watch (`PodHold`, `Watch`) without a second implementation of either."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from statefuld_client.errors import StatefuldError

_T = TypeVar("_T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._pid = os.getpid()

    @property
    def forked(self) -> bool:
        """True in a forked child: the thread (and whatever ran on it) is the parent's."""
        return os.getpid() != self._pid

    def run(self, coro: Coroutine[Any, Any, _T], what: str) -> _T:
        """Run ``coro`` on the thread's loop and wait for its result."""
        if self.forked:
            coro.close()
            raise StatefuldError(f"this {what} belongs to the parent process; a forked child does not inherit it")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self) -> None:
        """End whatever still runs there (a call blocked in another thread raises CancelledError),
        then the loop and the thread."""
        if self.forked:
            return
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _cancel_the_rest() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
