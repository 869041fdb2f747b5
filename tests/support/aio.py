"""Running a coroutine in a test, on the daemon's own kind of loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

_T = TypeVar("_T")

# with_executor(body, **config): the fixture of that name in conftest.py.
ExecutorRun = Callable[..., Any]


def run_async(scenario: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float = 30.0) -> _T:
    """Run a coroutine on a fresh uvloop loop (the daemon's loop), bounded."""

    async def bounded() -> _T:
        async with asyncio.timeout(timeout_s):
            return await scenario()

    return uvloop.run(bounded())
