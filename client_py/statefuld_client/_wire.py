"""The client's sans-I/O core: encode requests, decode replies, map errors, shape results.

Both shells (blocking `Client`, asyncio `AsyncClient`) do their I/O around this module; nothing
here touches a socket, a clock or a lock, so it is tested without a daemon.

Wire format (SPEC section 3, MessagePack-RPC): request ``[0, msgid, method, params]``, reply
``[1, msgid, error, result]``, notification ``[2, method, params]``; ``error`` is nil or
``{"code": str, "message": str}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

from statefuld_client.errors import SERVER_ERRORS, ProtocolError, ServerError

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

# msgids are uint32 on the wire (the MessagePack-RPC spec); they wrap around.
MSGID_MASK = 0xFFFFFFFF

# Reads may be sent again when the connection broke after the request went out: running one twice
# changes nothing. Writes are not, since the first copy may have been executed.
READ_METHODS = frozenset({
    "ping",
    "health",
    "get_service_state",
    "get_workload_state",
    "get_workload_state_batch",
    "get_linked_pod",
    "get_linked_pod_if_persist",
    "batch_get_linked_pod",
    "get_link_service",
})

RECV_SIZE = 65536


class Encoder:
    """Packs requests and notifications. Not thread-safe: one per connection, used under its lock."""

    __slots__ = ("packer",)

    def __init__(self) -> None:
        # Reused for every message (a shell's hot path may call packer.pack directly).
        self.packer = msgpack.Packer(use_bin_type=True)

    def request(self, msgid: int, method: str, params: Any) -> bytes:
        return self.packer.pack([REQUEST, msgid, method, params])  # type: ignore[no-any-return]

    def notification(self, method: str, params: Any) -> bytes:
        return self.packer.pack([NOTIFICATION, method, params])  # type: ignore[no-any-return]


class Decoder:
    """Turns the bytes of one connection into replies ``[1, msgid, error, result]``.

    Feed it whatever the socket returned; `next_reply` returns complete replies one by one, then
    None. A malformed stream raises `ProtocolError`, after which the connection must be dropped.
    """

    __slots__ = ("_unpacker",)

    def __init__(self) -> None:
        # strict_map_key=False: the daemon's maps have int keys (pod ids).
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._unpacker.feed(data)

    def next_reply(self) -> list[Any] | None:
        """The next complete reply, validated, as the decoded list itself (no copy); None if none yet."""
        while True:
            try:
                message = next(self._unpacker)
            except StopIteration:
                return None
            except (ValueError, msgpack.UnpackException) as exc:  # FormatError, StackError, ExtraData...
                raise ProtocolError(f"undecodable bytes from the daemon: {exc}") from exc
            if type(message) is list and len(message) == 4 and message[0] == RESPONSE \
                    and type(message[1]) is int:
                return message
            if type(message) is list and len(message) == 3 and message[0] == NOTIFICATION:
                continue  # the daemon sends none today; tolerated so that it may later
            raise ProtocolError(f"not a MessagePack-RPC reply: {message!r:.200}")


def server_error(error: Any) -> ServerError:
    """Map a reply's error field to the exception of its code; an unknown code to `ServerError`."""
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        if isinstance(code, str):
            cls = SERVER_ERRORS.get(code, ServerError)
            return cls(message if isinstance(message, str) else repr(message), code)
    return ServerError(f"malformed error from the daemon: {error!r:.200}", "INTERNAL")


def unwrap(error: Any, result: Any) -> Any:
    """The result of a reply, or its error raised."""
    if error is None:
        return result
    raise server_error(error)


def linked_pair(result: Any) -> tuple[bool, int]:
    """``try_set_linked_pod``'s ``[ok, pod_id]`` as a tuple."""
    ok, pod_id = result
    return bool(ok), pod_id


def as_list(items: Iterable[str]) -> Any:
    """A list param as msgpack can pack it. A str is passed as is, so the daemon rejects it by name
    instead of the client splitting it into characters."""
    if isinstance(items, list | tuple | str):
        return items
    return list(items)
