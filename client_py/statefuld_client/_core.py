"""The client's core, without I/O: every rule the blocking and the asyncio client share.

Encoding requests and decoding replies, mapping errors, msgids, the default timeout, the retry
rule, what each fault raises and its message, and the reset after a fork. The shells
(`_sync_client`, `_async_client`) only move bytes and wait; nothing here touches a socket, a clock
or a lock, so it is tested without a daemon.

Wire format (docs/PROTOCOL.md, MessagePack-RPC): request ``[0, msgid, method, params]``, reply
``[1, msgid, error, result]``, notification ``[2, method, params]``; ``error`` is nil or
``{"code": str, "message": str}``.
"""

from __future__ import annotations

import os
import stat
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import msgpack

from statefuld_client.errors import (
    SERVER_ERRORS,
    ClientClosedError,
    ClientTimeoutError,
    ConnectionLostError,
    ConnectRefusedError,
    ProtocolError,
    ServerError,
    SocketNotFoundError,
    TransportError,
)

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

DEFAULT_TIMEOUT_S = 5.0

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
    "describe_pods",
    "get_link_service",
})

RECV_SIZE = 65536


def checked_timeout(timeout_s: float) -> float:
    """A client's default timeout, as its constructor takes it."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    return timeout_s


# --- bytes ------------------------------------------------------------------------------------------


class Encoder:
    """Packs requests and notifications. Not thread-safe: one per client, used under its lock or loop."""

    __slots__ = ("_packer",)

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def request(self, msgid: int, method: str, params: Any) -> bytes:
        return self._packer.pack([REQUEST, msgid, method, params])  # type: ignore[no-any-return]

    def notification(self, method: str, params: Any) -> bytes:
        return self._packer.pack([NOTIFICATION, method, params])  # type: ignore[no-any-return]


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
        """The next complete reply, validated, as the decoded list itself (no copy); None if none
        yet. Notifications (watch events) are skipped: only a watch's own connection reads them."""
        while (message := self.next_message()) is not None:
            if message[0] == RESPONSE:
                return message
        return None

    def next_message(self) -> list[Any] | None:
        """The next complete reply ``[1, msgid, error, result]`` or notification ``[2, method,
        params]``, validated; None if none yet."""
        try:
            message = next(self._unpacker)
        except StopIteration:
            return None
        except (ValueError, msgpack.UnpackException) as exc:  # FormatError, StackError, ExtraData...
            raise ProtocolError(f"undecodable bytes from the daemon: {exc}") from exc
        if type(message) is list and len(message) == 4 and message[0] == RESPONSE and type(message[1]) is int:
            return message
        if type(message) is list and len(message) == 3 and message[0] == NOTIFICATION:
            return message
        raise ProtocolError(f"not a MessagePack-RPC reply: {message!r:.200}")


class MsgIds:
    """A client's msgids: one more per call, wrapping at 2**32, never one still awaited."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def next(self, awaited: Iterable[int] | dict[int, Any] = ()) -> int:
        msgid = (self.last + 1) & MSGID_MASK
        while msgid in awaited:  # only after a wrap-around past a call still waiting
            msgid = (msgid + 1) & MSGID_MASK
        self.last = msgid
        return msgid


# --- results and errors -------------------------------------------------------------------------------


def server_error(error: Any) -> ServerError:
    """Map a reply's error field to the exception of its code; an unknown code to `ServerError`."""
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        if isinstance(code, str):
            cls = SERVER_ERRORS.get(code, ServerError)
            return cls(message if isinstance(message, str) else repr(message), code)
    return ServerError(f"malformed error from the daemon: {error!r:.200}", "INTERNAL")


def unwrap(reply: list[Any]) -> Any:
    """The result of a reply ``[1, msgid, error, result]``, or its error raised."""
    if reply[2] is None:
        return reply[3]
    raise server_error(reply[2])


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


def connect_error(path: str, exc: OSError) -> TransportError:
    """What a failed connect to the socket at ``path`` raises (chain ``exc`` as its cause)."""
    if isinstance(exc, FileNotFoundError):
        return SocketNotFoundError(
            f"no statefuld socket at {path}: is the daemon running? (STATEFULD_SOCKET names the path)")
    if isinstance(exc, ConnectionRefusedError):
        kind = _file_kind(path)
        if kind != "socket":
            return TransportError(f"{path} is {kind}, not the daemon's socket: check socket_path or STATEFULD_SOCKET")
        return ConnectRefusedError(f"nothing accepts on {path}: the daemon stopped or is restarting")
    return TransportError(f"cannot connect to {path}: {exc}")


def _file_kind(path: str) -> str:
    # The one look at the file system here: only once a connect has already failed.
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "socket"  # gone meanwhile: say what the refusal says
    if stat.S_ISSOCK(mode):
        return "socket"
    return "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "another kind of file"


def closed_error() -> ClientClosedError:
    return ClientClosedError("this client was closed; create a new one")


def timed_out(method: str, timeout_s: float) -> ClientTimeoutError:
    return ClientTimeoutError(f"{method}: no reply from the daemon within {timeout_s}s")


def timed_out_connecting(method: str) -> ClientTimeoutError:
    return ClientTimeoutError(f"{method}: timed out connecting or sending to the daemon")


class NotSent(Exception):
    """The request did not reach the daemon whole: the daemon cannot have run it."""


class Lost(Exception):
    """The connection broke after the request was sent: the daemon may have run it."""


def retry_or_raise(exc: NotSent | Lost, method: str, is_read: bool, path: str, retried: bool, closed: bool) -> bool:
    """The retry rule of one call, after its attempt failed with ``exc``: returns True to send it
    once more, else raises what the caller sees (chained to the cause). A request that never
    reached the daemon is sent once more, whatever the method; one that may have reached it, only
    if it is a read (running a read twice changes nothing; a write's first copy may have run)."""
    if closed:
        raise ClientClosedError(f"{method}: the client was closed during the call") from exc.__cause__
    if not retried and (isinstance(exc, NotSent) or is_read):
        return True
    raise ConnectionLostError(f"{method}: the connection to the daemon at {path} was lost") from exc.__cause__


# --- fork -------------------------------------------------------------------------------------------------


class ForkAware(Protocol):
    def _forget_after_fork(self) -> None: ...


# Every live client, whatever its state: in the child of a fork each drops what it shares with the
# parent (its connection, its lock) and connects anew at its next call.
_clients: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def reset_after_fork(client: ForkAware) -> None:
    """Register ``client``: from now on, a forked child resets it. Bookkeeping only, no I/O."""
    _clients.add(client)


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
