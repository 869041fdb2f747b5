"""MessagePack-RPC over a stream: bytes in, requests dispatched, replies out, flow control.

One `RpcProtocol` per connection; `ServerState` is what the connections share (the
dispatcher, the daemon-wide in-flight count and task set, the counters). See
docs/PROTOCOL.md for the wire format and the cases that close a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, cast

import msgpack

from statefuld.config import Config
from statefuld.errors import RpcError

log = logging.getLogger("statefuld.protocol")

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2
MAX_MSGID: Final = 2**32 - 1  # MessagePack-RPC msgids are uint32

# Replies that carry no per-request data are built once.
_OVERLOADED: Final = {"code": "OVERLOADED", "message": "too many requests in flight; retry later"}
_TIMEOUT: Final = {"code": "TIMEOUT", "message": "the request's deadline passed"}
_INTERNAL: Final = {"code": "INTERNAL", "message": "internal error (see the daemon's log)"}
_SHUTTING_DOWN: Final = {"code": "UNAVAILABLE", "message": "the daemon is shutting down"}

# The unpacker is fed at most this much at a time: its buffer limit is max_message_bytes plus
# one slice, so a read that carries many small messages (or the tail of one and the head of
# the next) never trips the limit, while any single message over max_message_bytes still does.
_FEED_SLICE: Final = 64 * 1024

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid

# How often the deadline sweep runs while requests are in flight: a request's TIMEOUT reply
# leaves at most this long after its deadline.
_SWEEP_INTERVAL_S: Final = 0.01
# The message of the cancellation the sweep sends, so a request can tell it from a shutdown's.
_DEADLINE_PASSED: Final = "statefuld: the request's deadline passed"


class Dispatch(Protocol):
    def __call__(self, method: str, params: list[Any], /) -> Awaitable[Any]: ...


class ServerState:
    """What every connection shares. Plain attributes: the hot path reads them directly."""

    def __init__(self, config: Config, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.timeout_s = config.request_timeout_ms / 1000
        self.max_message_bytes = config.max_message_bytes
        self.max_in_flight = config.max_in_flight
        self.allow_uids = frozenset(config.allow_uid)
        self.allow_gids = frozenset(config.allow_gid)
        # Requests and notifications being executed, daemon-wide, each with its deadline; each
        # removes itself when done. Every deadline is arrival + timeout_s, so insertion order is
        # deadline order and the sweep only looks at the front (see _sweep_deadlines).
        self.tasks: dict[asyncio.Task[None], float] = {}
        self.task_done: Callable[[asyncio.Task[None]], object] = lambda task: self.tasks.pop(task, None)
        self._sweep: asyncio.TimerHandle | None = None
        self.in_flight = 0
        self.connections: set[RpcProtocol] = set()
        self.draining = False
        # Counters (also logged at shutdown).
        self.requests = 0
        self.notifications = 0
        self.overloaded = 0
        self.timeouts = 0
        self.internal_errors = 0
        self.notification_failures = 0
        self.closed_malformed = 0
        self._last_failure_log_s = -1.0
        self._failures_not_logged = 0
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")

    def track(self, task: asyncio.Task[None], deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        # One timer for all requests instead of asyncio.timeout_at per request: a per-request
        # timer (a libuv timer under uvloop) and current_task() cost more than the rest of a
        # get_linked_pod's handling in the daemon (docs/BENCHMARKS.md, profile).
        self.tasks[task] = deadline
        task.add_done_callback(self.task_done)
        if self._sweep is None:
            self._sweep = loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines, loop)

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        now = loop.time()
        expired = []
        for task, deadline in self.tasks.items():
            if deadline > now:
                break
            # One cancel per task: a second one would also interrupt the cleanup the first started.
            if not task.done() and not task.cancelling():
                expired.append(task)
        for task in expired:
            task.cancel(_DEADLINE_PASSED)
        if self.tasks:
            self._sweep = loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines, loop)

    def peer_allowed(self, uid: int, gid: int) -> bool:
        if not self.allow_uids and not self.allow_gids:
            return True
        # The daemon's own user may always connect, so its health probes keep working.
        return uid in self.allow_uids or gid in self.allow_gids or uid == os.geteuid()

    def notification_failed(self, method: str, reason: str, *, traceback: bool = False) -> None:
        # A client that fires notifications at a dead Redis must not flood the log: one line a second.
        self.notification_failures += 1
        now = time.monotonic()
        if now - self._last_failure_log_s < 1.0:
            self._failures_not_logged += 1
            return
        more = ""
        if self._failures_not_logged:
            more = f" ({self._failures_not_logged} more failed notifications not logged)"
        self._last_failure_log_s = now
        self._failures_not_logged = 0
        log.warning("notification %s failed: %s%s", method, reason, more, exc_info=traceback)

    def counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "notifications": self.notifications,
            "overloaded": self.overloaded,
            "timeouts": self.timeouts,
            "internal_errors": self.internal_errors,
            "notification_failures": self.notification_failures,
            "connections_closed_malformed": self.closed_malformed,
        }


class MalformedMessage(Exception):
    """The peer broke the protocol; its connection is closed."""


class RpcProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._unpacker: Any = None
        self._message_start = 0  # stream offset where the message being received began
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._closing = False
        self._pending = 0  # requests and notifications of this connection still executing
        self._eof = False
        self.closed: asyncio.Future[None] | None = None

    # --- connection events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        state = self._state
        self._transport = transport
        self._loop = loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        state.connections.add(self)
        if (state.allow_uids or state.allow_gids) and not self._check_peer(transport):
            return
        limit = state.max_message_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogateescape",
            max_buffer_size=limit + _FEED_SLICE,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit // 2,
            max_ext_len=limit,
        )
        if state.draining:  # accepted just before the listener closed
            self._close("the daemon is shutting down")

    def _check_peer(self, transport: asyncio.Transport) -> bool:
        sock: socket.socket | None = transport.get_extra_info("socket")
        uid = gid = -1  # unknown peers are refused unless nothing is restricted
        if sock is not None:
            with contextlib.suppress(OSError):
                _pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if self._state.peer_allowed(uid, gid):
            return True
        log.warning("connection refused: peer uid=%d gid=%d is not in --allow-uid/--allow-gid", uid, gid)
        self._close("peer not allowed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._transport = None
        self._out.clear()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool:
        # The peer shut down its sending side (e.g. `socat`, or a client done sending): it still
        # gets the replies to what it sent; the connection closes once they are out.
        self._eof = True
        if self._pending:
            return True  # keep the transport open for writing
        self.flush()
        return False  # asyncio closes the transport

    def _request_done(self) -> None:
        self._pending -= 1
        if self._eof and not self._pending:
            self._close("peer finished sending")

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it catches up,
        # so its replies cannot pile up in our memory.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._closing and not self._state.draining:
            self._transport.resume_reading()

    # --- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        unpacker = self._unpacker
        if unpacker is None or self._closing:
            return
        # One deadline for every message of this read: they all arrived now.
        deadline = self._loop.time() + self._state.timeout_s  # type: ignore[union-attr]
        try:
            if len(data) <= _FEED_SLICE:
                unpacker.feed(data)
                self._drain_unpacker(unpacker, deadline)
            else:
                view = memoryview(data)
                for start in range(0, len(view), _FEED_SLICE):
                    unpacker.feed(view[start : start + _FEED_SLICE])
                    self._drain_unpacker(unpacker, deadline)
                    if self._closing:
                        return
        except MalformedMessage as exc:
            self._malformed(str(exc))
        except msgpack.BufferFull:
            self._malformed(f"message larger than {self._state.max_message_bytes} bytes")
        except Exception as exc:  # undecodable msgpack: FormatError, StackError, limits, unhashable keys...
            self._malformed(f"undecodable MessagePack ({type(exc).__name__}: {exc})")

    def _drain_unpacker(self, unpacker: Any, deadline: float) -> None:
        # The unpacker parses incrementally and drops the bytes it has consumed, so its buffer
        # limit alone does not bound a message made of many small items: count its bytes here.
        limit = self._state.max_message_bytes
        for message in unpacker:
            end = unpacker.tell()
            if end - self._message_start > limit:
                raise MalformedMessage(f"message of {end - self._message_start} bytes, larger than {limit}")
            self._message_start = end
            self._on_message(message, deadline)
            if self._closing:
                return
        if unpacker.tell() - self._message_start > limit:
            raise MalformedMessage(f"message larger than {limit} bytes")

    def _on_message(self, message: Any, deadline: float) -> None:
        if type(message) is not list:
            raise MalformedMessage(f"a message must be an array, got {type(message).__name__}")
        size = len(message)
        kind = message[0] if size else None
        if type(kind) is not int:  # bool and float compare equal to 0 and 2: refuse them
            kind = None
        if size == 4 and kind == REQUEST:
            _, msgid, method, params = message
            if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
                raise MalformedMessage("request msgid is not a uint32")
        elif size == 3 and kind == NOTIFICATION:
            msgid = None
            _, method, params = message
        else:
            raise MalformedMessage(f"not a request [0, msgid, method, params] or notification [2, method, params]: "
                                   f"array of {size} starting with {message[0] if size else None!r}")
        if type(method) is not str:
            if type(method) is not bytes:  # some old msgpack-rpc clients send the name as bin
                raise MalformedMessage("method name is not a string")
            method = method.decode("utf-8", "surrogateescape")
        if type(params) is not list:
            raise MalformedMessage("params is not an array")

        state = self._state
        if state.in_flight >= state.max_in_flight:
            # Shed at once: queueing would only turn overload into timeouts for everyone.
            state.overloaded += 1
            if msgid is None:
                state.notification_failed(method, "OVERLOADED")
            else:
                self._reply(msgid, _OVERLOADED, None)
            return
        state.in_flight += 1
        self._pending += 1
        if msgid is None:
            state.notifications += 1
            coro = self._notify(method, params, deadline)
        else:
            state.requests += 1
            coro = self._request(msgid, method, params, deadline)
        loop = self._loop
        assert loop is not None
        state.track(loop.create_task(coro), deadline, loop)

    # --- execution ---------------------------------------------------------------------------

    async def _request(self, msgid: int, method: str, params: list[Any], deadline: float) -> None:
        state = self._state
        try:
            try:
                result = await state.dispatch(method, params)
            except RpcError as exc:
                self._reply(msgid, exc.to_wire(), None)
            except asyncio.CancelledError as exc:
                # Two things cancel requests: the deadline sweep and, after the drain bound, the shutdown.
                if exc.args == (_DEADLINE_PASSED,) or not state.draining:
                    state.timeouts += 1
                    self._reply(msgid, _TIMEOUT, None)
                    return
                self._reply(msgid, _SHUTTING_DOWN, None)
                raise
            except Exception:
                state.internal_errors += 1
                log.exception("internal error in %s (msgid %d)", method, msgid)
                self._reply(msgid, _INTERNAL, None)
            else:
                self._reply(msgid, None, result)
        finally:
            state.in_flight -= 1
            self._request_done()

    async def _notify(self, method: str, params: list[Any], deadline: float) -> None:
        state = self._state
        try:
            await state.dispatch(method, params)
        except RpcError as exc:
            state.notification_failed(method, f"{exc.code}: {exc.message}")
        except asyncio.CancelledError as exc:
            if exc.args != (_DEADLINE_PASSED,) and state.draining:
                raise  # the shutdown's
            state.timeouts += 1
            state.notification_failed(method, "TIMEOUT")
        except Exception:
            state.internal_errors += 1
            state.notification_failed(method, "INTERNAL", traceback=True)
        finally:
            state.in_flight -= 1
            self._request_done()

    # --- bytes out ---------------------------------------------------------------------------

    def _reply(self, msgid: int, error: dict[str, str] | None, result: Any) -> None:
        if self._transport is None:
            return  # the peer went away; the work is done, the reply has nowhere to go
        try:
            data: bytes = self._state.packer.pack([RESPONSE, msgid, error, result])
        except Exception:
            self._state.internal_errors += 1
            log.exception("cannot encode the result of msgid %d", msgid)
            data = self._state.packer.pack([RESPONSE, msgid, _INTERNAL, None])
        self._out.append(data)
        if not self._flush_scheduled:
            # Replies that complete in the same loop turn leave in one write.
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._transport is None:
            return
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    # --- closing -----------------------------------------------------------------------------

    def _malformed(self, reason: str) -> None:
        self._state.closed_malformed += 1
        peer = self._peer_description()
        log.warning("closing connection%s: %s", peer, reason)
        self._close(reason)

    def _peer_description(self) -> str:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return ""
        try:
            pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return ""
        return f" from pid {pid} uid {uid}"

    def _close(self, reason: str) -> None:
        if self._closing or self._transport is None:
            return
        self._closing = True
        self._unpacker = None
        self.flush()  # replies already computed still go out before the close
        self._transport.close()

    def stop_reading(self) -> None:
        """Shutdown: take no new requests from this peer; requests in flight still get replies."""
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def close(self) -> None:
        self._close("shutdown")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def protocol_factory(state: ServerState) -> Callable[[], RpcProtocol]:
    return lambda: RpcProtocol(state)
