"""MessagePack-RPC spoken with msgpack and a raw socket, as another language's client would: the
one raw test client, for what statefuld_client does not show (bytes, msgids, closed connections)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import msgpack


class MessageReader:
    """Bytes of one connection in, decoded messages out (maps with int keys allowed)."""

    def __init__(self) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def feed(self, data: bytes) -> list[Any]:
        self._unpacker.feed(data)
        return list(self._unpacker)


class RawClient:
    """A Unix-socket connection to the daemon that speaks MessagePack-RPC with msgpack alone."""

    def __init__(self, socket_path: str, timeout_s: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise
        self.reader = MessageReader()
        self._read: list[Any] = []  # decoded but not yet taken

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def send(self, *messages: Any) -> None:
        self.sock.sendall(b"".join(msgpack.packb(m) for m in messages))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, msgid: int, method: str, params: Any) -> None:
        self.send([0, msgid, method, params])

    def messages(self) -> Iterator[Any]:
        """Every message the daemon sends, read as it comes; ConnectionResetError on EOF."""
        while True:
            while self._read:
                yield self._read.pop(0)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the daemon closed the connection")
            self._read = self.reader.feed(data)

    def replies(self, count: int) -> dict[int, tuple[Any, Any]]:
        """Read ``count`` responses: {msgid: (error, result)}. Fails on a duplicate msgid."""
        got: dict[int, tuple[Any, Any]] = {}
        messages = self.messages()
        while len(got) < count:
            message = next(messages)
            assert type(message) is list and len(message) == 4 and message[0] == 1, message
            assert message[1] not in got, f"msgid {message[1]} answered twice"
            got[message[1]] = (message[2], message[3])
        return got

    def call(self, msgid: int, method: str, params: Any) -> tuple[Any, Any]:
        """One request and its reply: (error, result)."""
        self.request(msgid, method, params)
        return self.replies(1)[msgid]

    def until_closed(self) -> list[Any]:
        """Every message the daemon sends until it closes the connection (EOF or reset)."""
        got = list(self._read)
        self._read = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += self.reader.feed(data)

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """True if the daemon closes the connection (EOF or reset) within timeout_s, sending nothing."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""

    def nothing_more(self, wait_s: float) -> bool:
        """True if no further message arrives within wait_s."""
        self.sock.settimeout(wait_s)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        return not self.reader.feed(data)

    def close(self) -> None:
        self.sock.close()


def rpc_call(socket_path: str, method: str, params: Any, timeout_s: float = 5.0,
             msgid: int = 1) -> tuple[Any, Any]:
    """One MessagePack-RPC call on a connection of its own: returns (error, result)."""
    with RawClient(socket_path, timeout_s) as client:
        return client.call(msgid, method, params)


def in_flight(socket_path: str) -> int:
    """The daemon's calls in flight now (stats is never shed, and does not count itself)."""
    error, stats = rpc_call(socket_path, "stats", [])
    assert error is None, error
    return int(stats["in_flight"])
