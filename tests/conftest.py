from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from support import Daemon, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests that need their own start one."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on the shared Redis, flushed before each test."""
    client = redis_server.client()
    client.flushall()
    client.script_flush()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def module_daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    """A daemon shared by the tests of one module, on the shared Redis."""
    daemon = Daemon(redis_server.url).start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def daemon(module_daemon: Daemon, redis_db: redis.Redis) -> Daemon:
    """The module's daemon, with Redis flushed before the test."""
    return module_daemon


_T = TypeVar("_T")


def run_async(scenario: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float = 30.0) -> _T:
    """Run a coroutine on a fresh uvloop loop (the daemon's loop), bounded."""

    async def bounded() -> _T:
        async with asyncio.timeout(timeout_s):
            return await scenario()

    return uvloop.run(bounded())


ExecutorRun = Callable[..., Any]


@pytest.fixture
def with_executor(redis_db: redis.Redis, redis_server: RedisServer) -> ExecutorRun:
    """``with_executor(body, **config)`` runs ``await body(executor)`` with an Executor connected
    to the shared (flushed) Redis, on a fresh loop, and closes it afterwards."""
    from statefuld.config import Config
    from statefuld.executor import Executor

    def run(body: Callable[[Any], Awaitable[_T]], **config: Any) -> _T:
        async def scenario() -> _T:
            executor = await Executor.connect(
                Config(redis_url=config.pop("redis_url", redis_server.url), startup_timeout_s=5.0, **config)
            )
            try:
                return await body(executor)
            finally:
                await executor.close()

        return run_async(scenario)

    return run
