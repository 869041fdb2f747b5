"""A scripted MessagePack-RPC peer: a few lines of msgpack over a Unix socket playing the daemon,
for what a real daemon cannot be made to do on cue (replies out of order, a reply after the caller
gave up, a connection dropped between request and reply, garbage bytes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from support.processes import short_tmpdir

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


