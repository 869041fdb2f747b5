"""The client's transport against a scripted MessagePack-RPC peer.

What these tests need from the other end (replies out of order, a reply after the caller gave up,
a connection dropped between request and reply, garbage bytes) is hard to make a real daemon do on
cue, so a few lines of msgpack over a Unix socket play the peer. Everything about Redis and the
methods' meaning is tested against the real daemon in test_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from support import short_tmpdir

from statefuld_client import AsyncClient, Client, ConnectionLostError, ProtocolError

Handler = Callable[["Peer", int, list[Any], socket.socket], None]


class Peer:
    """A Unix-socket server on a thread; ``handler(peer, conn_no, message, conn)`` answers each message."""

    def __init__(self, handler: Handler) -> None:
        self.dir = short_tmpdir("sfc-")
        self.socket_path = os.path.join(self.dir, "peer.sock")
        self.handler = handler
        self.seen: list[tuple[int, list[Any]]] = []
        self.held: list[tuple[socket.socket, list[Any]]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(16)
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @staticmethod
    def reply(conn: socket.socket, msgid: int, result: Any, error: Any = None) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(msgpack.packb([1, msgid, error, result]))

    def _accept(self) -> None:
        conn_no = 0
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn_no += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn_no, conn), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn_no: int, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            unpacker.feed(data)
            for message in unpacker:
                self.seen.append((conn_no, message))
                self.handler(self, conn_no, message, conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread (Linux)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def peer(handler: Handler) -> Iterator[Peer]:
    p = Peer(handler)
    try:
        yield p
    finally:
        p.close()


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
            client._msgid = 2**32 - 2
            for _ in range(3):
                client.ping()

        async def scenario() -> None:
            async with AsyncClient(p.socket_path) as aclient:
                aclient._msgid = 2**32 - 2
                await asyncio.gather(*(aclient.ping() for _ in range(3)))

        asyncio.run(scenario())
        msgids = [m[1] for _, m in p.seen]
        assert msgids == [2**32 - 1, 0, 1] * 2
