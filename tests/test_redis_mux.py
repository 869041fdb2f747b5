"""The multiplexed Redis connection against a real redis-server: order, errors, cancellation, loss."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis
import uvloop
from support import RedisServer, free_port, short_tmpdir

from statefuld.errors import Internal, Unavailable
from statefuld.redis_mux import Endpoint, RedisMux, ReplyError

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
        codes = [r.kind if isinstance(r, ReplyError) else r for r in results[1:4]]
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

        def execute(self, route_key: str, *args: Any, decode: Any = None, recover: Any = None) -> Awaitable[Any]:
            return self.mux.execute(*args, decode=decode, recover=recover)

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


def test_a_decoder_shapes_its_own_reply_in_order_and_fails_only_its_own_command(url: str) -> None:
    def must_be_digits(raw: bytes) -> int:
        if not raw.isdigit():
            raise Internal("not digits")
        return int(raw)

    async def body(mux: RedisMux) -> None:
        await mux.connect()
        replies = await asyncio.gather(
            mux.execute("SET", "d", "41"),
            mux.execute("INCR", "d", decode=lambda n: n * 10),
            mux.execute("GET", "d", decode=must_be_digits),
            mux.execute("SET", "e", "x", decode=lambda _: None),
            mux.execute("GET", "e", decode=must_be_digits),  # the decoder refuses: this command alone fails
            mux.execute("EVALSHA", "0" * 40, 0, decode=must_be_digits),  # an error reply never reaches decode
            mux.execute("GET", "d"),
            return_exceptions=True,
        )
        assert replies[:4] == [b"OK", 420, 42, None]
        assert isinstance(replies[4], Internal) and replies[4].message == "not digits"
        assert isinstance(replies[5], ReplyError) and replies[5].kind == "NOSCRIPT"
        assert replies[6] == b"42"

    run(lambda: with_mux(url, body))
