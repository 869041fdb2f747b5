from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
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
