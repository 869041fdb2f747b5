"""The multiplexed Redis connection against a real redis-server: order, errors, cancellation, loss."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from support import RedisServer, free_port, short_tmpdir

from statefuld.errors import Unavailable
from statefuld.executor import Executor, Keys
from statefuld.redis_mux import (
    CRLF,
    Endpoint,
    RedisMux,
    ReplyError,
    Waiter,
    bulk_head,
    command_head,
    encode_command,
    encode_get,
)
from statefuld.scripts import Scripts, load_scripts

_T = TypeVar("_T")


def run(scenario: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float = 20.0) -> _T:
    async def bounded() -> _T:
        async with asyncio.timeout(timeout_s):
            return await scenario()

    return uvloop.run(bounded())


async def with_mux(url: str, body: Callable[[RedisMux], Awaitable[_T]], **redis_kwargs: Any) -> _T:
    mux = RedisMux(Endpoint.from_url(url, **redis_kwargs))
    try:
        return await body(mux)
    finally:
        await mux.close()


@pytest.fixture
def url(redis_db: redis.Redis, redis_server: RedisServer) -> str:
    return redis_server.url


def test_replies_keep_their_redis_types(url: str) -> None:
    async def body(mux: RedisMux) -> None:
        assert await mux.execute("SET", "k", "välue") == b"OK"
        assert await mux.execute("GET", "k") == "välue".encode()
        assert await mux.execute("GET", "missing") is None
        assert await mux.execute("INCRBY", "n", 5) == 5
        assert await mux.execute("HSET", "h", "a", b"\x00\xff") == 1
        assert await mux.execute("HGETALL", "h") == [b"a", b"\x00\xff"]

    run(lambda: with_mux(url, body))


def test_many_concurrent_callers_each_get_their_own_reply_in_few_writes(url: str) -> None:
    callers = 2000

    async def body(mux: RedisMux) -> None:
        await mux.connect()

        async def caller(i: int) -> None:
            for round_ in range(3):
                assert await mux.execute("ECHO", f"{i}:{round_}") == f"{i}:{round_}".encode()

        await asyncio.gather(*(caller(i) for i in range(callers)))
        stats = mux.stats()
        assert stats["commands"] == 3 * callers
        # Each round of every caller is queued in one turn: batching, not one write per command.
        assert stats["writes"] <= 3 * callers // 10

    run(lambda: with_mux(url, body))


def test_an_error_reply_fails_only_its_own_command_in_a_batch(url: str) -> None:
    async def body(mux: RedisMux) -> None:
        await mux.execute("SET", "string", "x")
        before = mux.stats()["writes"]
        results = await asyncio.gather(
            mux.execute("ECHO", "a"),
            mux.execute("HGET", "string", "f"),  # WRONGTYPE
            mux.execute("EVALSHA", "0" * 40, 0),  # NOSCRIPT
            mux.execute("NOSUCHCOMMAND"),
            mux.execute("ECHO", "b"),
            return_exceptions=True,
        )
        assert mux.stats()["writes"] == before + 1, "the five commands went out in one write"
        assert results[0] == b"a" and results[4] == b"b"
        codes = [r.code if isinstance(r, ReplyError) else r for r in results[1:4]]
        assert codes == ["WRONGTYPE", "NOSCRIPT", "ERR"]
        assert await mux.execute("GET", "string") == b"x"

    run(lambda: with_mux(url, body))


def test_an_argument_resp_cannot_carry_fails_in_the_caller_and_sends_nothing(url: str) -> None:
    async def body(mux: RedisMux) -> None:
        with pytest.raises(TypeError):
            await mux.execute("SET", "k", None)
        assert await mux.execute("ECHO", "next") == b"next"

    run(lambda: with_mux(url, body))


def test_a_cancelled_caller_never_shifts_replies(url: str) -> None:
    async def body(mux: RedisMux) -> None:
        await mux.connect()
        # BLPOP holds the connection's later replies back, so the cancellations below happen
        # while their commands are written and unanswered.
        blocker = asyncio.ensure_future(mux.execute("BLPOP", "empty-list", "0.2"))
        tasks = [asyncio.ensure_future(mux.execute("ECHO", f"v{i}")) for i in range(100)]
        await asyncio.sleep(0.05)
        assert not blocker.done()
        for task in tasks[::2]:
            task.cancel()
        assert await blocker is None
        for i, task in enumerate(tasks):
            if i % 2:
                assert await task == f"v{i}".encode()
            else:
                assert task.cancelled()
        assert await mux.execute("ECHO", "after") == b"after"

    run(lambda: with_mux(url, body))


def test_large_replies_split_across_reads(url: str) -> None:
    big = os.urandom(3 * 1024 * 1024)

    async def body(mux: RedisMux) -> None:
        await mux.execute("SET", "big", big)
        replies = await asyncio.gather(*(mux.execute("GET", "big") for _ in range(4)), mux.execute("ECHO", "tail"))
        assert replies[:4] == [big] * 4
        assert replies[4] == b"tail"
        assert await mux.execute("LRANGE", "nothing", 0, -1) == []

    run(lambda: with_mux(url, body))


def test_redis_killed_fails_pending_calls_fast_and_the_next_call_after_restart_works() -> None:
    directory = short_tmpdir("sfr-")
    first = RedisServer(dir=directory).start()
    second = RedisServer(dir=directory)  # the restart: same socket path
    try:
        async def scenario() -> None:
            mux = RedisMux(Endpoint.from_url(first.url), reconnect_backoff_s=0.05)
            try:
                await mux.execute("SET", "k", "v")
                pending = [asyncio.ensure_future(mux.execute("BLPOP", "empty-list", "30")) for _ in range(5)]
                await asyncio.sleep(0.05)
                first.kill()
                # Far less than BLPOP's 30 s: the loss itself fails them.
                done, _ = await asyncio.wait(pending, timeout=5)
                assert len(done) == 5
                for task in pending:
                    assert isinstance(task.exception(), Unavailable)
                with pytest.raises(Unavailable):
                    await mux.execute("PING")  # Redis is down: a fast failure, not a hang
                with pytest.raises(Unavailable):
                    await mux.execute("PING")  # within the back-off: no connection attempt at all
                await asyncio.to_thread(second.start)
                for _ in range(100):
                    try:
                        assert await mux.execute("PING") == b"PONG"
                        break
                    except Unavailable:
                        await asyncio.sleep(0.05)
                else:
                    pytest.fail("no reconnect after Redis came back")
            finally:
                await mux.close()

        run(scenario)
    finally:
        first.stop()
        second.cleanup()


def test_no_redis_is_unavailable_fast() -> None:
    async def scenario() -> None:
        mux = RedisMux(Endpoint.from_url("unix:///tmp/statefuld-no-such-dir/redis.sock"))
        with pytest.raises(Unavailable, match="cannot connect"):
            await mux.execute("PING")
        await mux.close()
        with pytest.raises(Unavailable, match="closed"):
            await mux.execute("PING")

    run(scenario, timeout_s=5)


def test_connect_timeout_is_under_the_request_deadline_unless_the_url_sets_one() -> None:
    # redis-py's own default (5 s) would let a reconnect to a silent host outlast a request's
    # 2 s deadline; tests/test_protocol.py shows the caller's side of it.
    assert Endpoint.from_url("redis://127.0.0.1:6379/0").connect_timeout_s == 1.0
    assert Endpoint.from_url("redis://127.0.0.1:6379/0?socket_connect_timeout=3").connect_timeout_s == 3.0
    assert Endpoint.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=0.25).connect_timeout_s == 0.25


def test_close_fails_commands_in_flight(url: str) -> None:
    async def scenario() -> None:
        mux = RedisMux(Endpoint.from_url(url))
        await mux.connect()
        pending = asyncio.ensure_future(mux.execute("BLPOP", "empty-list", "30"))
        await asyncio.sleep(0.05)
        await mux.close()
        with pytest.raises(Unavailable):
            await pending

    run(scenario, timeout_s=10)


class PasswordRedis(RedisServer):
    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path, password="s3cret", socket_timeout=5)


def test_auth_database_and_tcp_come_from_redis_py_url_parsing() -> None:
    port = free_port()
    server = PasswordRedis(port=port, extra_args=["--requirepass", "s3cret"]).start()
    try:
        async def body(mux: RedisMux) -> None:
            assert await mux.execute("SET", "where", "db3") == b"OK"

        run(lambda: with_mux(f"redis://:s3cret@127.0.0.1:{port}/3", body))
        run(lambda: with_mux(f"unix://{server.socket_path}?db=3", body, password="s3cret", client_name="mux-test"))
        check = redis.Redis(unix_socket_path=server.socket_path, password="s3cret", db=3)
        assert check.get("where") == b"db3"
        check.close()

        async def refused() -> None:
            mux = RedisMux(Endpoint.from_url(f"redis://:wrong@127.0.0.1:{port}/0"))
            with pytest.raises(Unavailable, match="refused the connection set-up"):
                await mux.execute("PING")

        run(refused)
    finally:
        server.cleanup()


def test_script_flush_in_the_middle_of_a_batch_is_invisible_to_callers(url: str) -> None:
    """NOSCRIPT fails only the requests it answers; the executor's Scripts reloads and retries each."""
    from statefuld.scripts import Scripts, load_scripts

    class Routed:
        def __init__(self, mux: RedisMux) -> None:
            self.mux = mux

        def execute(self, route_key: str, *args: Any) -> Awaitable[Any]:
            return self.mux.execute(*args)

    async def body(mux: RedisMux) -> None:
        scripts = Scripts(load_scripts())
        transport = Routed(mux)
        for script in scripts.all():
            await mux.execute("SCRIPT", "LOAD", script.source)

        def link(i: int) -> Awaitable[Any]:
            keys = (f"sf:{{t:lk:u{i}}}", f"sf:{{t:lk:u{i}}}svc")
            return scripts.run(transport, "set_linked_pod", keys, ("svc", i, -1))

        # One turn's batch: links, then SCRIPT FLUSH queued in the same write, then more links.
        first = [asyncio.ensure_future(link(i)) for i in range(50)]
        flush = asyncio.ensure_future(mux.execute("SCRIPT", "FLUSH"))
        second = [asyncio.ensure_future(link(i)) for i in range(50, 100)]
        await asyncio.gather(*first, flush, *second)  # no caller sees NOSCRIPT
        assert scripts.reloads >= 1
        values = await mux.execute("MGET", *[f"sf:{{t:lk:u{i}}}svc" for i in range(100)])
        assert values == [str(i).encode() for i in range(100)]

    run(lambda: with_mux(url, body))


class _Owner:
    def __init__(self, got: dict[int, Any]) -> None:
        self.got = got
        self.flushes: list[int] = []

    def flush(self) -> None:
        self.flushes.append(len(self.got))


class _Recorder(Waiter):
    __slots__ = ("index", "owner")

    def __init__(self, owner: _Owner, index: int) -> None:
        self.owner, self.index = owner, index

    def reply(self, value: Any) -> Any:
        self.owner.got[self.index] = value
        return self.owner  # the same owner for many replies of one read: flushed once


def test_waiters_get_replies_in_the_read_in_order_with_errors_and_one_flush_per_read(url: str) -> None:
    async def body(mux: RedisMux) -> None:
        await mux.connect()
        got: dict[int, Any] = {}
        owner = _Owner(got)
        flushes = owner.flushes
        waiters = [_Recorder(owner, i) for i in range(6)]
        # Waiters and futures interleaved in one write: each reply reaches the one it answers.
        assert mux.execute_to(waiters[0], encode_command(("SET", "w", "1")))
        future = mux.execute("GET", "w")
        assert mux.execute_to(waiters[1], encode_get("w"))
        assert mux.execute_to(waiters[2], encode_command(("EVALSHA", "0" * 40, 0)))  # NOSCRIPT, as a value
        assert mux.execute_to(waiters[3], encode_command(("INCR", "w")))
        assert await future == b"1"
        await asyncio.sleep(0.05)
        assert (got[0], got[1], got[3]) == (b"OK", b"1", 2)
        assert isinstance(got[2], ReplyError) and got[2].code == "NOSCRIPT"
        assert 1 <= len(flushes) <= 2 and flushes[-1] == 4  # each owner once per read, after the read
        # A lost connection hands each waiter still waiting an Unavailable.
        assert mux.execute_to(waiters[4], encode_command(("BLPOP", "nothing", 0)))
        await asyncio.sleep(0.05)
        await mux.close()
        await asyncio.sleep(0.05)
        assert isinstance(got[4], Unavailable)
        assert not mux.execute_to(waiters[5], encode_command(("PING",)))  # not connected: the caller uses execute()

    run(lambda: with_mux(url, body))


# --- RESP for the hot path: the same bytes hiredis.pack_command sends ----------------------------

# Any text a key can hold; lone surrogates are not text (the daemon refuses them before here).
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
_WORD = st.one_of(_TEXT, st.integers(min_value=-(2**63), max_value=2**63 - 1))


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_encode_get_is_what_hiredis_encodes(key: str) -> None:
    assert encode_get(key) == encode_command(("GET", key))


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORD, min_size=1, max_size=8), st.integers(min_value=0, max_value=8))
def test_a_command_head_and_bulks_are_what_hiredis_encodes(words: list[str | int], fixed: int) -> None:
    fixed = min(fixed, len(words))
    rest = [w.encode() if isinstance(w, str) else b"%d" % w for w in words[fixed:]]
    encoded = command_head(len(words), *words[:fixed]) + b"".join(bulk_head(len(data)) + data + CRLF for data in rest)
    assert encoded == encode_command(tuple(words))


@pytest.mark.parametrize("size", [0, 1, 9, 10, 255, 256, 257, 1000, 70000])
def test_a_key_of_any_length_is_encoded_as_hiredis_would(size: int) -> None:
    # Lengths below 256 come from a table, longer ones are formatted: both sides of the seam.
    key = "k" * size
    assert encode_get(key) == encode_command(("GET", key))
    assert command_head(3, "SET", key) + bulk_head(size) + key.encode() + CRLF == encode_command(("SET", key, key))


class _Recording:
    """A one-node transport that only records what the executor hands its execute_to."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def execute_to(self, waiter: Waiter, command: bytes) -> bool:
        self.sent.append(command)
        return True


@settings(max_examples=200, deadline=None)
@given(ns=_TEXT.filter(bool), uid=_TEXT.filter(bool), service=_TEXT.filter(bool),
       pod_id=st.integers(min_value=0, max_value=2**31 - 1),
       persist_seconds=st.one_of(st.just(-1), st.integers(min_value=1, max_value=2**31 - 1)))
def test_the_executor_sends_the_hot_commands_as_hiredis_would(ns: str, uid: str, service: str, pod_id: int,
                                                              persist_seconds: int) -> None:
    scripts = Scripts(load_scripts())
    transport = _Recording()
    executor = Executor(transport, scripts, Keys("sf"))  # type: ignore[arg-type]
    waiter = Waiter()
    executor.begin_get_linked_pod(ns, uid, service, waiter)
    executor.begin_set_linked_pod(ns, uid, service, pod_id, persist_seconds, waiter)
    keys = Keys("sf")
    assert transport.sent == [
        encode_command(("GET", keys.link(ns, uid, service))),
        encode_command(("EVALSHA", scripts["set_linked_pod"].sha, 2, keys.link_hash(ns, uid),
                        keys.link(ns, uid, service), service, pod_id, persist_seconds)),
    ]
