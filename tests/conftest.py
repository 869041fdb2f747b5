from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from support import (
    TMP_PREFIX,
    Daemon,
    DaemonFactory,
    ExecutorRun,
    RawClient,
    RedisClusterProcs,
    RedisSentinelProcs,
    RedisServer,
    run_async,
)

# Which Redis the shared fixtures (redis_server, redis_db, daemon, with_executor) stand on:
# standalone (the default), cluster (3 primaries + 3 replicas) or sentinel (a primary, a replica,
# 3 sentinels). scripts/test runs the whole suite on standalone, then the method-level modules
# below on cluster and on sentinel.
BACKEND = os.environ.get("SFD_TEST_BACKEND", "standalone")
BACKENDS = ("standalone", "cluster", "sentinel")
# The modules whose tests call the contract's methods (and the scripts) on the shared Redis.
METHOD_MODULES = ("test_executor", "test_placement", "test_audit", "test_client.py", "test_protocol.py",
                  "test_lua_scripts.py", "test_validation.py")


def pytest_configure(config: pytest.Config) -> None:
    if BACKEND not in BACKENDS:
        raise pytest.UsageError(f"SFD_TEST_BACKEND={BACKEND!r}: expected one of {', '.join(BACKENDS)}")


def _leftovers() -> set[str]:
    base = tempfile.gettempdir()
    return {os.path.join(base, name) for name in os.listdir(base) if name.startswith(TMP_PREFIX)}


_BEFORE: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE.update(_leftovers())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run leaves nothing behind in $TMPDIR: a directory a test made and kept fails the run."""
    left = sorted(_leftovers() - _BEFORE)
    if left and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nthe tests left {len(left)} directories behind: {', '.join(left[:10])}", file=sys.stderr)


def pytest_report_header() -> str:
    return f"statefuld test backend: {BACKEND}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On cluster and sentinel, run only the method-level tests that use the shared Redis (the
    rest, e.g. a test with its own redis-server, would only repeat the standalone run)."""
    if BACKEND == "standalone":
        return
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        in_module = item.path.name.startswith(METHOD_MODULES)
        uses_backend = "redis_server" in getattr(item, "fixturenames", ())
        (selected if in_module and uses_backend else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The shared Redis of the run (SFD_TEST_BACKEND); tests that need their own start one.
    On cluster and sentinel it has the same ``url`` and ``client()`` as a RedisServer."""
    server: Any
    if BACKEND == "cluster":
        server = RedisClusterProcs().start()
    elif BACKEND == "sentinel":
        server = RedisSentinelProcs().start()
    else:
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
_P = TypeVar("_P")


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


@pytest.fixture
def start() -> Iterator[Callable[[_P], _P]]:
    """``start(process)`` starts a RedisServer, Daemon, cluster or sentinel set for this test and
    stops it (removing its files) when the test ends, whatever happened."""
    started: list[Any] = []

    def start(process: _P) -> _P:
        started.append(process)
        return process.start()  # type: ignore[no-any-return]

    yield start
    for process in reversed(started):
        process.cleanup()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    """``raw(socket_path, timeout_s=5.0)`` opens a raw MessagePack-RPC connection, closed at the end."""
    opened: list[RawClient] = []

    def connect(socket_path: str, timeout_s: float = 5.0) -> RawClient:
        opened.append(RawClient(socket_path, timeout_s))
        return opened[-1]

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def tmp_daemon() -> Iterator[DaemonFactory]:
    """``tmp_daemon(redis_url, **kwargs)`` makes a Daemon that the test starts itself (it may be
    meant to fail); it is stopped and its files removed when the test ends."""
    made: list[Daemon] = []

    def make(redis_url: str | None, **kwargs: Any) -> Daemon:
        made.append(Daemon(redis_url, **kwargs))
        return made[-1]

    yield make
    for daemon in made:
        daemon.cleanup()
