"""The client's transport against a scripted MessagePack-RPC peer.

What these tests need from the other end (replies out of order, a reply after the caller gave up,
a connection dropped between request and reply, garbage bytes) is hard to make a real daemon do on
cue, so a few lines of msgpack over a Unix socket play the peer. Everything about Redis and the
methods' meaning is tested against the real daemon in test_client.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.peer import Peer, peer

from statefuld_client import AsyncClient, Client, ClientTimeoutError, ConnectionLostError, ProtocolError


def echo(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    if message[0] == 0:
        peer.reply(conn, message[1], [message[2], *message[3]])


def drop_first_connection(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    # The daemon died between reading the request and answering it.
    if conn_no == 1:
        conn.shutdown(socket.SHUT_RDWR)
        return
    echo(peer, conn_no, message, conn)


def test_replies_out_of_order_reach_their_callers() -> None:
    count = 50

    def reverse(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
        peer.held.append((conn, message))
        if len(peer.held) == count:
            for c, m in reversed(peer.held):
                peer.reply(c, m[1], m[3][0])

    async def scenario(path: str) -> None:
        async with AsyncClient(path, timeout_s=5) as client:
            results = await asyncio.gather(*(client.call("echo", i) for i in range(count)))
            assert results == list(range(count))

    with peer(reverse) as p:
        asyncio.run(scenario(p.socket_path))
        assert {conn_no for conn_no, _ in p.seen} == {1}  # all on one connection


def test_sync_late_reply_of_a_timed_out_call_is_skipped() -> None:
    def late_first(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
        if message[3] == ["slow"]:
            peer.held.append((conn, message))
            return
        for c, m in peer.held:  # the late reply arrives first
            peer.reply(c, m[1], "slow-result")
        peer.held.clear()
        echo(peer, conn_no, message, conn)

    with peer(late_first) as p, Client(p.socket_path, timeout_s=2) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.call("get_linked_pod", "slow", timeout_s=0.2)
        assert time.monotonic() - started < 1.0
        assert client.call("get_linked_pod", "fast") == ["get_linked_pod", "fast"]
        assert {conn_no for conn_no, _ in p.seen} == {1}  # the connection was kept


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_lost_after_sending_raises_for_writes_and_retries_reads(flavour: str) -> None:
    def run(client_call: Callable[[str, tuple[Any, ...]], Any]) -> None:
        with peer(drop_first_connection) as p:
            with pytest.raises(ConnectionLostError):
                client_call(p.socket_path, ("set_linked_pod", "g", "u", "s", 1, -1))
            assert [m[2] for _, m in p.seen] == ["set_linked_pod"]  # a write is never sent twice
        with peer(drop_first_connection) as p:
            assert client_call(p.socket_path, ("get_linked_pod", "g", "u", "s")) == ["get_linked_pod", "g", "u", "s"]
            assert [(c, m[2]) for c, m in p.seen] == [(1, "get_linked_pod"), (2, "get_linked_pod")]

    if flavour == "sync":
        def sync_call(path: str, args: tuple[Any, ...]) -> Any:
            with Client(path, timeout_s=2) as client:
                return client.call(*args)
        run(sync_call)
    else:
        async def async_call(path: str, args: tuple[Any, ...]) -> Any:
            async with AsyncClient(path, timeout_s=2) as client:
                return await client.call(*args)
        run(lambda path, args: asyncio.run(async_call(path, args)))


def test_garbage_from_the_peer_is_a_protocol_error_then_the_client_reconnects() -> None:
    def garbage_first(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
        if conn_no == 1:
            conn.sendall(b"\xc1")
        else:
            echo(peer, conn_no, message, conn)

    with peer(garbage_first) as p, Client(p.socket_path, timeout_s=2) as client:
        with pytest.raises(ProtocolError):
            client.ping()
        assert client.call("ping") == ["ping"]

    async def scenario(path: str) -> None:
        async with AsyncClient(path, timeout_s=2) as client:
            with pytest.raises(ProtocolError):
                await client.ping()
            assert await client.call("ping") == ["ping"]

    with peer(garbage_first) as p:
        asyncio.run(scenario(p.socket_path))


def test_msgids_wrap_around_at_2_32() -> None:
    with peer(echo) as p:
        with Client(p.socket_path) as client:
            client._msgids.last = 2**32 - 2
            for _ in range(3):
                client.ping()

        async def scenario() -> None:
            async with AsyncClient(p.socket_path) as aclient:
                aclient._msgids.last = 2**32 - 2
                await asyncio.gather(*(aclient.ping() for _ in range(3)))

        asyncio.run(scenario())
        msgids = [m[1] for _, m in p.seen]
        assert msgids == [2**32 - 1, 0, 1] * 2


def hold_slow(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
    # Calls whose first param is "slow" are never answered; the rest are echoed.
    if message[0] == 0 and message[3][:1] == ["slow"]:
        peer.held.append((conn, message))
        return
    echo(peer, conn_no, message, conn)


def test_default_timeout_fails_each_call_at_its_own_deadline() -> None:
    # Calls with the default timeout share one sweep per connection: each must fail no sooner
    # than its own timeout after it began, and soon after it; answered calls, and calls with a
    # longer timeout_s= of their own, are left alone by the sweep.
    timeout_s = 0.4

    async def scenario(path: str) -> None:
        loop = asyncio.get_running_loop()
        async with AsyncClient(path, timeout_s=timeout_s) as client:
            own = asyncio.ensure_future(client.call("get_linked_pod", "slow", "own", timeout_s=1.2))
            failed_after: dict[int, float] = {}

            async def slow(wave: int) -> None:
                started = loop.time()
                with pytest.raises(ClientTimeoutError, match=r"get_linked_pod: no reply .* within 0\.4s"):
                    await client.get_linked_pod("slow", f"wave-{wave}", "svc")
                failed_after[wave] = loop.time() - started

            waves = []
            for wave in range(4):
                waves.append(asyncio.ensure_future(slow(wave)))
                assert await client.call("ping") == ["ping"]  # answered calls in between
                await asyncio.sleep(0.1)
            await asyncio.gather(*waves)
            for wave, elapsed in failed_after.items():
                assert timeout_s <= elapsed < timeout_s + 0.25, (wave, elapsed)
            assert not own.done()  # its own 1.2 s have not passed
            with pytest.raises(ClientTimeoutError):
                await own
            assert client._conn is not None and not client._conn.pending  # nothing left behind
            assert await client.call("ping") == ["ping"]

    with peer(hold_slow) as p:
        asyncio.run(scenario(p.socket_path))
        assert {conn_no for conn_no, _ in p.seen} == {1}  # timeouts keep the connection


def test_a_read_retried_after_a_lost_connection_keeps_its_first_deadline() -> None:
    # The first connection dies 0.35 s into the call; the retry on the second is never answered.
    # The caller asked for 0.5 s: it must hear TIMEOUT by then, not 0.5 s after the retry.
    def drop_later_then_hold(peer: Peer, conn_no: int, message: list[Any], conn: socket.socket) -> None:
        if message[2] == "ping":
            echo(peer, conn_no, message, conn)
            return
        if conn_no == 1:
            threading.Timer(0.35, conn.shutdown, (socket.SHUT_RDWR,)).start()
        peer.held.append((conn, message))

    async def scenario(path: str) -> None:
        loop = asyncio.get_running_loop()
        async with AsyncClient(path, timeout_s=0.5) as client:
            assert await client.ping() == ["ping"]  # connected: the next call takes the lean path
            started = loop.time()
            with pytest.raises(ClientTimeoutError):
                await client.get_linked_pod("g", "u", "svc")
            assert 0.5 <= loop.time() - started < 0.7

    with peer(drop_later_then_hold) as p:
        asyncio.run(scenario(p.socket_path))
        assert [(c, m[2]) for c, m in p.seen] == [(1, "ping"), (1, "get_linked_pod"), (2, "get_linked_pod")]


@pytest.mark.parametrize("write_after", [False, True], ids=["notification only", "notification then a write"])
def test_lost_with_a_notification_queued_first_retries_only_the_unsent(write_after: bool) -> None:
    # A write sent and waiting; then, in one turn, a notification and (or not) a write are queued,
    # and the connection goes before that turn's write. The sent write may have run: its caller
    # hears ConnectionLostError and it is not sent again. The queued write was never sent: it is,
    # on the next connection.
    async def scenario(path: str) -> None:
        async with AsyncClient(path, timeout_s=2) as client:
            sent = asyncio.ensure_future(client.set_linked_pod("slow", "sent", "svc", 1, -1))
            await asyncio.sleep(0.1)  # written, held by the peer
            conn = client._conn
            assert conn is not None and not conn._queue
            notified = asyncio.ensure_future(client.notify("set_service_state", "g", "svc", 1, "Ready"))
            queued = asyncio.ensure_future(client.set_linked_pod("g", "queued", "svc", 2, -1)) if write_after else None
            await asyncio.sleep(0)  # queued in this turn, the notification first; not yet written
            await notified
            assert len(conn._queue) == 1 + write_after
            assert conn.transport is not None
            conn.transport.abort()  # connection_lost() comes before the flush of this turn
            conn.connection_lost(None)
            with pytest.raises(ConnectionLostError):
                await sent
            if queued is not None:
                assert await queued == ["set_linked_pod", "g", "queued", "svc", 2, -1]
            assert await client.ping() == ["ping"]

    with peer(hold_slow) as p:
        asyncio.run(scenario(p.socket_path))
        calls = [(c, m[2], *m[3][1:2]) for c, m in p.seen if m[0] == 0]
        assert calls == [(1, "set_linked_pod", "sent"), *([(2, "set_linked_pod", "queued")] if write_after else []),
                         (2, "ping")]


def test_lost_before_writing_a_notification_and_writes_across_the_msgid_wrap_resends_them_all() -> None:
    # A connection whose first message is a notification, then five writes whose msgids wrap
    # past 2**32 - 1 (the client's count goes on from its earlier connections), all queued in
    # one turn; the connection goes before that turn's write. None of them was sent, so every
    # write goes out on the next connection, and none fails as possibly run.
    async def scenario(path: str) -> None:
        async with AsyncClient(path, timeout_s=2) as client:
            client._msgid = 2**32 - 3  # as after 4 billion calls on earlier connections
            await client.notify("set_service_state", "g", "svc", 1, "Ready")  # connects; no call yet
            await asyncio.sleep(0.05)
            conn = client._conn
            assert conn is not None and not conn._queue
            notified = asyncio.ensure_future(client.notify("set_service_state", "g", "svc", 1, "Ready"))
            writes = [asyncio.ensure_future(client.set_linked_pod("g", f"u{i}", "svc", i, -1)) for i in range(5)]
            await asyncio.sleep(0)  # queued in this turn, the notification first; not yet written
            await notified
            assert len(conn._queue) == 6
            assert conn.transport is not None
            conn.transport.abort()
            conn.connection_lost(None)
            assert await asyncio.gather(*writes) == [["set_linked_pod", "g", f"u{i}", "svc", i, -1] for i in range(5)]

    with peer(echo) as p:
        asyncio.run(scenario(p.socket_path))
        written = [(c, m[3][1]) for c, m in p.seen if m[0] == 0]
        assert written == [(2, f"u{i}") for i in range(5)]


def test_default_timeout_holds_while_calls_with_their_own_come_and_go() -> None:
    # Replies to calls with their own timeout_s= arrive while a default-timeout call waits; the
    # sweep must keep running for the waiting one, with no further calls to restart it.
    async def scenario(path: str) -> None:
        loop = asyncio.get_running_loop()
        async with AsyncClient(path, timeout_s=0.5) as client:
            assert await client.ping() == ["ping"]
            started = loop.time()
            waiting = asyncio.ensure_future(client.get_linked_pod("slow", "u", "svc"))
            while loop.time() - started < 0.3:
                assert await client.call("ping", timeout_s=5) == ["ping"]
            with pytest.raises(ClientTimeoutError):
                await asyncio.wait_for(waiting, 2)
            assert 0.5 <= loop.time() - started < 0.75

    with peer(hold_slow) as p:
        asyncio.run(scenario(p.socket_path))
