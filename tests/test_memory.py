"""What local peers can make the daemon hold, and that it gives it back: idle connections cost a
few KiB each, incomplete messages are bounded across all connections (--max-buffered-bytes), the
number of connections is bounded (--max-connections), and memory returns when they go."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgpack
import pytest
from support import Daemon, RawClient, RedisServer, fd_count, open_sockets, rpc_call, rss_kib, wait_for

Start = Callable[[Daemon], Daemon]


def stats(daemon: Daemon) -> dict[str, object]:
    error, result = rpc_call(daemon.socket_path, "stats", [])
    assert error is None
    return dict(result)



@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def test_idle_connections_cost_a_few_kib_each_and_give_it_back(own_redis: RedisServer, start: Start) -> None:
    daemon = start(Daemon(own_redis.url))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    observer = RawClient(daemon.socket_path)
    msgids = iter(range(1, 10_000))

    def open_connections() -> int:
        error, result = observer.call(next(msgids), "stats", [])
        assert error is None
        return int(result["connections"])

    for _ in range(3):  # warm up: the allocator's arenas, the loop's structures
        for s in open_sockets(daemon.socket_path, 200):
            s.sendall(msgpack.packb([0, 1, "ping", []]))
            s.close()
    wait_for(lambda: open_connections() == 1, what="the warm-up connections gone (but the observer)")
    base_rss, base_fds = rss_kib(pid), fd_count(pid)
    socks = open_sockets(daemon.socket_path, 1000)
    try:
        wait_for(lambda: fd_count(pid) >= base_fds + 1000, what="1,000 connections accepted")
        grown_kib = rss_kib(pid) - base_rss
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: fd_count(pid) <= base_fds, what="the connections closed")
    observer.close()
    assert grown_kib < 16 * 1000, f"1,000 idle connections took {grown_kib} KiB"
    assert rss_kib(pid) - base_rss < 8 * 1024, "the memory of closed connections was kept"


def incomplete_message(payload_bytes: int, sent_bytes: int) -> bytes:
    """The first ``sent_bytes`` of a request whose one param is a string of ``payload_bytes``."""
    return msgpack.packb([0, 1, "get_linked_pod", ["x" * payload_bytes]])[:sent_bytes]


def test_incomplete_messages_are_bounded_across_connections(own_redis: RedisServer, start: Start) -> None:
    bound = 4 * 1024 * 1024
    daemon = start(Daemon(own_redis.url, args=["--max-buffered-bytes", str(bound)]))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    base_rss = rss_kib(pid)
    part = incomplete_message(1_000_000, 700_000)  # under --max-message-bytes (1 MiB): not malformed
    senders = open_sockets(daemon.socket_path, 12)
    try:
        for n, s in enumerate(senders, 1):
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while it was still sending: the daemon cut it
            # Each is read whole before the next: five fit under the bound, each later one takes
            # the total past it and is closed. (What the unpacker has parsed of a message's head
            # is not counted as held: a few bytes each.)
            def read(n: int = n) -> bool:
                now = stats(daemon)
                return (now["counters"]["connections_closed_buffered"] == max(0, n - 5)  # type: ignore[index]
                        and min(n, 5) * (len(part) - 100) <= now["buffered_bytes"] <= bound)  # type: ignore[operator]

            wait_for(read, what=f"sender {n} read")
        assert rss_kib(pid) - base_rss < 3 * bound // 1024, "more than the bound was held"
        with RawClient(daemon.socket_path) as bystander:
            assert bystander.call(1, "ping", []) == (None, "PONG")
    finally:
        for s in senders:
            s.close()
    wait_for(lambda: stats(daemon)["buffered_bytes"] == 0, what="the held bytes released")
    assert rss_kib(pid) - base_rss < 8 * 1024, "the memory of the closed connections was kept"
    assert "--max-buffered-bytes" in daemon.log()


def test_connections_past_the_bound_are_closed_at_once(own_redis: RedisServer, start: Start) -> None:
    daemon = start(Daemon(own_redis.url, args=["--max-connections", "20"]))
    observer = RawClient(daemon.socket_path)
    held = open_sockets(daemon.socket_path, 19)
    msgids = iter(range(1, 100))

    def seen() -> dict[str, int]:
        error, result = observer.call(next(msgids), "stats", [])
        assert error is None
        return {"connections": result["connections"], **result["counters"]}

    try:
        wait_for(lambda: seen()["connections"] == 20, what="20 connections open")
        with RawClient(daemon.socket_path) as extra:  # the 21st
            assert extra.closed_by_peer()
        assert seen()["connections_over_limit"] == 1
        held.pop().close()
        wait_for(lambda: seen()["connections"] == 19, what="one connection closed")
        with RawClient(daemon.socket_path) as again:
            assert again.call(1, "ping", []) == (None, "PONG")
    finally:
        observer.close()
        for s in held:
            s.close()
    assert "--max-connections" in daemon.log()


def test_connections_that_call_and_go_leave_no_memory_behind(own_redis: RedisServer, start: Start) -> None:
    daemon = start(Daemon(own_redis.url))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    request = msgpack.packb([0, 1, "get_linked_pod", ["game", "alice", "lobby"]])

    def cycles(count: int) -> None:
        for _ in range(count // 64):  # 64 at a time: connect, call, read the reply, close
            socks = open_sockets(daemon.socket_path, 64)
            for s in socks:
                s.sendall(request)
            for s in socks:
                assert msgpack.unpackb(s.recv(100)) == [1, 1, None, None]
                s.close()

    cycles(640)  # warm up
    base_rss = rss_kib(pid)
    cycles(4000)
    wait_for(lambda: stats(daemon)["connections"] <= 2, what="the connections closed")
    assert rss_kib(pid) - base_rss < 8 * 1024, f"{rss_kib(pid) - base_rss} KiB kept after 4,000 connections"
