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
from time import perf_counter
from typing import Any, Final, Protocol, cast

import msgpack

from statefuld.config import Config
from statefuld.counters import CODES, INTERNAL, OK, OVERLOADED, RequestMetrics, code_index
from statefuld.errors import RpcError
from statefuld.redis_mux import Waiter
from statefuld.rpc import METHODS

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

# Replies waiting for a peer that does not read them, past which its connection is cut.
_MAX_UNREAD_BYTES: Final = 32 * 1024 * 1024

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid

# A reply whose result msgpack writes in one byte (nil, or an int in 0..127: the pod ids the hot
# methods answer, in practice), by the msgid's size: positive fixint, uint 8, uint 16, uint 32.
# One struct.pack instead of a list and Packer.pack, which were a tenth of a get_linked_pod's cost
# in the compiled daemon (tests/test_hot_path.py checks every form against msgpack).
_FIXARRAY_4: Final = 0x94
_NIL: Final = 0xC0
_SMALL_REPLY: Final = struct.Struct(">5B").pack
_SMALL_REPLY_U8: Final = struct.Struct(">6B").pack
_SMALL_REPLY_U16: Final = struct.Struct(">3BH2B").pack
_SMALL_REPLY_U32: Final = struct.Struct(">3BI2B").pack


def encode_small_reply(msgid: int, result: Any) -> bytes | None:
    """``[RESPONSE, msgid, nil, result]`` in MessagePack if ``result`` is nil or an int in 0..127,
    else None. ``msgid`` is a uint32 (_on_message checks it)."""
    if result is None:
        last = _NIL
    elif type(result) is int and 0 <= result < 128:
        last = result
    else:
        return None
    if msgid < 128:
        return _SMALL_REPLY(_FIXARRAY_4, RESPONSE, msgid, _NIL, last)
    if msgid < 0x100:
        return _SMALL_REPLY_U8(_FIXARRAY_4, RESPONSE, 0xCC, msgid, _NIL, last)
    if msgid < 0x10000:
        return _SMALL_REPLY_U16(_FIXARRAY_4, RESPONSE, 0xCD, msgid, _NIL, last)
    return _SMALL_REPLY_U32(_FIXARRAY_4, RESPONSE, 0xCE, msgid, _NIL, last)


# How often the deadline sweep runs while requests are in flight: a request's TIMEOUT reply
# leaves at most this long after its deadline.
_SWEEP_INTERVAL_S: Final = 0.01
# The message of the cancellation the sweep sends, so a request can tell it from a shutdown's.
_DEADLINE_PASSED: Final = "statefuld: the request's deadline passed"
# After the drain bound: how long cancelled Tasks get to end.
DRAIN_CANCEL_S: Final = 2.0


class Dispatcher(Protocol):
    """rpc.Dispatcher as the connections use it (see its docstring)."""

    hot: dict[str, Callable[[Any, Waiter | None], tuple[Awaitable[Any] | None, Callable[[Any], Any] | None]]]

    def start(self, method: str, params: list[Any], waiter: Waiter | None, /
              ) -> tuple[Awaitable[Any] | None, Callable[[Any], Any] | None]: ...
    def recover(self, method: str, params: list[Any], exc: BaseException, /) -> Awaitable[Any]: ...


class _Call(Waiter):
    """One request or notification being executed, and how it is answered.

    The hot path hands it to redis_mux as the command's Waiter: the reply is answered inside the
    read that brought it and leaves in that loop turn's write (no future, no Task, no extra loop
    turn). Otherwise ``future`` (a Task, or a transport's future) answers it from its done-callback.
    ``finished`` once answered (or expired): a reply that arrives later is dropped.
    """

    __slots__ = ("conn", "deadline", "decode", "finished", "future", "method", "msgid", "params", "started")

    def __init__(self, conn: RpcProtocol, msgid: int | None, method: str, params: list[Any], deadline: float) -> None:
        self.conn = conn
        self.msgid = msgid
        self.method = method
        self.params = params
        self.decode: Callable[[Any], Any] | None = None
        self.deadline = deadline
        self.future: asyncio.Future[Any] | None = None
        self.finished = False
        self.started = conn._read_at  # perf_counter of the read that brought it (the loop's clock is in ms)

    def reply(self, value: Any) -> RpcProtocol | None:
        """The hot path: redis_mux hands the raw reply (or the error) over during its read. The
        answer is queued, not flushed: redis_mux calls ``flush`` on what this returns after the read."""
        if self.finished:
            return None  # expired or shut down meanwhile: this late reply is dropped
        conn = self.conn
        try:
            if isinstance(value, BaseException):
                raise value
            decode = self.decode
            result = value if decode is None else decode(value)
        except RpcError as rejected:
            conn._done(self, rejected.to_wire(), None)
        except Exception as exc:
            conn._recover(self, exc)
        else:
            conn._done(self, None, result)
        return conn

    def future_done(self, future: asyncio.Future[Any]) -> None:
        if future is self.future:  # not a future this call has since moved on from
            self.conn._answer(self, future)


class ServerState:
    """What every connection shares. Plain attributes: the hot path reads them directly."""

    def __init__(self, config: Config, dispatcher: Dispatcher) -> None:
        self.start = dispatcher.start
        # The hot methods' starters by name (rpc.Dispatcher.hot): one dict lookup, no Dispatcher.start.
        self.hot = dispatcher.hot
        self.recover = dispatcher.recover
        self.timeout_s = config.request_timeout_ms / 1000
        self.max_message_bytes = config.max_message_bytes
        self.max_in_flight = config.max_in_flight
        # One connection may have this many calls running; past it the daemon stops reading it
        # (backpressure onto the peer's socket) and takes more once half of them are answered.
        self.max_pending = config.max_in_flight_per_connection
        self.resume_pending = config.max_in_flight_per_connection // 2
        self.allow_uids = frozenset(config.allow_uid)
        self.allow_gids = frozenset(config.allow_gid)
        # Requests and notifications being executed, daemon-wide (a dict used as an ordered set);
        # each is removed when answered. Every deadline is arrival + timeout_s, so insertion
        # order is deadline order and the sweep only looks at the front (see _sweep_deadlines).
        self.tasks: dict[_Call, None] = {}
        self.sweeping = False  # a deadline sweep is scheduled
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
        self.connections_accepted = 0
        self.connections_refused = 0
        # Per method and outcome, with latencies (counters.py; metrics.py shows them).
        self.metrics = RequestMetrics(METHODS)
        # Request-level log lines are debug only; decided once, not per request.
        self.log_requests = log.isEnabledFor(logging.DEBUG)
        self._last_failure_log_s = -1.0
        self._failures_not_logged = 0
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")

    def start_sweep(self) -> None:
        # One timer for all requests instead of asyncio.timeout_at per request: a per-request
        # timer (a libuv timer under uvloop) and current_task() cost more than the rest of a
        # get_linked_pod's handling in the daemon (docs/BENCHMARKS.md, profile). The caller has
        # just added a call to ``tasks``; the sweep runs while any is left.
        self.sweeping = True
        loop = asyncio.get_running_loop()
        loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines, loop)

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        expired = []
        for call in self.tasks:
            if call.deadline > now:
                break
            expired.append(call)
        for call in expired:
            call.conn._expire(call, _TIMEOUT)
        if self.tasks:
            loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines, loop)
        else:
            self.sweeping = False

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: wait up to ``timeout_s`` for the calls in flight to be answered; answer the
        rest UNAVAILABLE (their Tasks cancelled), then give those Tasks a moment to end."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while self.tasks and loop.time() < until:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
        if not self.tasks:
            return
        log.warning("%d requests still in flight after %ss: cancelling them", len(self.tasks), timeout_s)
        tasks = [call.future for call in self.tasks if call.future is not None]
        for call in list(self.tasks):
            call.conn._expire(call, _SHUTTING_DOWN)
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_CANCEL_S)

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
        # %r: the name is the peer's text; quoted and cut, it cannot start a forged log line.
        log.warning("notification %.100r failed: %s%s", method, reason, more, exc_info=traceback)

    def counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "notifications": self.notifications,
            "overloaded": self.overloaded,
            "timeouts": self.timeouts,
            "internal_errors": self.internal_errors,
            "notification_failures": self.notification_failures,
            "connections_closed_malformed": self.closed_malformed,
            "connections_accepted": self.connections_accepted,
            "connections_refused": self.connections_refused,
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
        # At max_pending: input not taken yet (the unpacker keeps its already-fed messages, the
        # rest of the read waits here) and reading paused until _resume_input.
        self._holding = False
        self._backlog: bytes | memoryview | None = None
        self._resume_scheduled = False
        self._eof = False
        self._read_at = 0.0
        self._close_reason = ""
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
        state.connections_accepted += 1
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
        self._state.connections_refused += 1
        log.warning("connection refused: peer uid=%d gid=%d is not in --allow-uid/--allow-gid", uid, gid,
                    extra={"event": "peer_refused"})
        self._close("peer not allowed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        if exc is not None:  # not a close of ours or the peer's: say why
            log.info("connection closed: %s", exc, extra={"event": "connection_closed"})
        else:
            log.debug("connection closed: %s", self._close_reason or "peer closed it",
                      extra={"event": "connection_closed"})
        self._transport = None
        self._out.clear()
        # Requests held back at the per-connection bound were never taken: with nobody left to
        # answer, they are dropped, not run.
        self._unpacker = None
        self._backlog = None
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

    def _after_request_done(self) -> None:
        # A call of a held or half-closed connection ended (_pending already counts it out).
        if self._holding and self._pending <= self._state.resume_pending and not self._resume_scheduled:
            # Not from here: this may run inside redis_mux's read, which must not send meanwhile.
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_input)  # type: ignore[union-attr]
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
        if self._transport is not None and not self._closing and not self._holding and not self._state.draining:
            self._transport.resume_reading()

    # --- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._unpacker is None or self._closing:
            return
        if self._holding:  # a read that was already under way when reading paused
            self._backlog = data if self._backlog is None else bytes(self._backlog) + data
            return
        self._read_at = perf_counter()
        self._take(data)

    def _take(self, data: bytes | memoryview, resuming: bool = False) -> None:
        """Feed ``data`` and start the messages it completes, until the connection has
        ``max_pending`` calls running: then the rest waits (``_hold``). ``resuming``: the
        unpacker may still hold messages fed before a hold; they go first."""
        unpacker = self._unpacker
        # One deadline for every message taken now: they all arrived (or were let in) now.
        deadline = self._loop.time() + self._state.timeout_s  # type: ignore[union-attr]
        try:
            if resuming and not self._drain_unpacker(unpacker, deadline):
                self._hold(data)
                return
            if len(data) <= _FEED_SLICE:
                unpacker.feed(data)
                if not self._drain_unpacker(unpacker, deadline):
                    self._hold(b"")
                return
            view = memoryview(data)
            for start in range(0, len(view), _FEED_SLICE):
                unpacker.feed(view[start : start + _FEED_SLICE])
                if not self._drain_unpacker(unpacker, deadline):
                    self._hold(view[start + _FEED_SLICE :])
                    return
                if self._closing:
                    return
        except MalformedMessage as malformed:
            self._malformed(str(malformed))
        except msgpack.BufferFull:
            self._malformed(f"message larger than {self._state.max_message_bytes} bytes")
        except Exception as exc:  # undecodable msgpack: FormatError, StackError, limits, unhashable keys...
            self._malformed(f"undecodable MessagePack ({type(exc).__name__}: {exc})")

    def _hold(self, rest: bytes | memoryview) -> None:
        # Backpressure, not an error: a peer that pipelines more than max_pending calls waits in
        # its own socket buffer (its sends block) instead of taking the daemon-wide budget, so it
        # neither starves other connections nor gets OVERLOADED for being fast. What it sent
        # beyond that is at most one read, kept here.
        self._holding = True
        self._backlog = rest if len(rest) else None
        if self._transport is not None:
            self._transport.pause_reading()

    def _resume_input(self) -> None:
        self._resume_scheduled = False
        if not self._holding or self._closing or self._unpacker is None or self._state.draining:
            return
        transport = self._transport
        # A paused transport does not see its peer leave; a reply that could not be written
        # (EPIPE) has closed it, and nobody would read the answers to what is held.
        if transport is None or transport.is_closing():
            return
        self._holding = False
        backlog, self._backlog = self._backlog, None
        self._read_at = perf_counter()
        self._take(b"" if backlog is None else backlog, resuming=True)
        if not self._holding and not self._closing and not self._write_paused:
            transport.resume_reading()

    def _drain_unpacker(self, unpacker: Any, deadline: float) -> bool:
        """Start the messages the unpacker holds; False if it stopped at ``max_pending``."""
        # The unpacker parses incrementally and drops the bytes it has consumed, so its buffer
        # limit alone does not bound a message made of many small items: count its bytes here.
        limit = self._state.max_message_bytes
        max_pending = self._state.max_pending
        for message in unpacker:
            end = unpacker.tell()
            if end - self._message_start > limit:
                raise MalformedMessage(f"message of {end - self._message_start} bytes, larger than {limit}")
            self._message_start = end
            self._on_message(message, deadline)
            if self._closing:
                return True
            if self._pending >= max_pending:
                return False
        if unpacker.tell() - self._message_start > limit:
            raise MalformedMessage(f"message larger than {limit} bytes")
        return True

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
                                   f"array of {size} starting with {(message[0] if size else None)!r:.100}")
        if type(method) is not str:
            if type(method) is not bytes:  # some old msgpack-rpc clients send the name as bin
                raise MalformedMessage("method name is not a string")
            method = method.decode("utf-8", "surrogateescape")
        if type(params) is not list:
            raise MalformedMessage("params is not an array")

        self._start(msgid, method, params, deadline)

    def _start(self, msgid: int | None, method: str, params: list[Any], deadline: float) -> None:
        state = self._state
        # ping is never shed: it costs nothing, and a saturated daemon must not fail its liveness probe.
        if state.in_flight >= state.max_in_flight and method != "ping":
            self._shed(msgid, method)
            return
        if msgid is None:
            state.notifications += 1
        else:
            state.requests += 1
        call = _Call(self, msgid, method, params, deadline)
        hot = state.hot.get(method)
        try:
            # Validates and starts the call; a rejected call (nothing sent to Redis) raises here.
            if hot is not None:
                awaitable, call.decode = hot(params, call)
            else:
                awaitable, call.decode = state.start(method, params, call)
        except RpcError as exc:
            self._finish(msgid, method, exc.to_wire(), None)
            return
        except Exception:
            self._internal_error(msgid, method)
            return
        state.in_flight += 1
        self._pending += 1
        state.tasks[call] = None
        if not state.sweeping:
            state.start_sweep()
        if awaitable is not None:
            self._await(call, awaitable)

    def _shed(self, msgid: int | None, method: str) -> None:
        # Shed at once: queueing would only turn overload into timeouts for everyone.
        state = self._state
        state.overloaded += 1
        state.metrics.count(method, OVERLOADED)
        if msgid is None:
            state.notification_failed(method, "OVERLOADED")
        else:
            self._reply(msgid, _OVERLOADED, None)

    # --- execution ---------------------------------------------------------------------------

    def _await(self, call: _Call, awaitable: Awaitable[Any]) -> None:
        # A future (a transport without waiters) is answered from its done-callback; anything
        # else (a coroutine) runs as a Task, answered the same way.
        future = awaitable if isinstance(awaitable, asyncio.Future) else self._loop.create_task(awaitable)  # type: ignore[union-attr, arg-type]
        call.future = future
        future.add_done_callback(call.future_done)

    def _answer(self, call: _Call, future: asyncio.Future[Any]) -> None:
        """The future of ``call`` is done: send its reply (or count its failure)."""
        if call.finished:
            return
        if future.cancelled():  # not by us (we answer before we cancel): treat as the deadline's
            self._expire(call, _TIMEOUT)
            return
        exc = future.exception()
        try:
            if exc is not None:
                raise exc
            result = future.result()
            decode = call.decode
            self._done(call, None, result if decode is None else decode(result))
        except RpcError as rejected:
            self._done(call, rejected.to_wire(), None)
        except Exception as error:
            self._recover(call, error)
        if self._out and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]

    def _recover(self, call: _Call, exc: Exception) -> None:
        # Not an RpcError: a Redis error reply on the hot path (NOSCRIPT continues on the full
        # path, keeping the call's place and deadline), or a bug.
        try:
            retry = self._state.recover(call.method, call.params, exc)
        except RpcError as rejected:
            self._done(call, rejected.to_wire(), None)
        except Exception as error:
            self._done(call, None, None, internal=error)
        else:
            call.decode = None  # the full path's result is already shaped: decoding it again fails
            self._await(call, retry)

    def _expire(self, call: _Call, error: dict[str, str]) -> None:
        """The deadline passed (TIMEOUT) or the shutdown's drain bound (UNAVAILABLE): answer now;
        a Task still working is cancelled, a Redis reply still to come is dropped."""
        if call.finished:
            return
        if error is _TIMEOUT:
            self._state.timeouts += 1
        future = call.future
        self._done(call, error, None)
        if future is not None and not future.done():
            future.cancel(_DEADLINE_PASSED)
        if self._out and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]

    def _done(self, call: _Call, error: dict[str, str] | None, result: Any, *,
              internal: BaseException | None = None) -> None:
        """Answer ``call`` (queued, not flushed: the caller flushes) and account for its end."""
        call.finished = True
        state = self._state
        state.tasks.pop(call, None)
        state.in_flight -= 1
        msgid = call.msgid
        if internal is not None:
            code = INTERNAL
        elif error is None:
            code = OK
        else:
            code = code_index(error)
        seconds = perf_counter() - call.started
        metrics = state.metrics
        metrics.by_method.get(call.method, metrics.unknown).done(code, seconds)
        if state.log_requests:
            log.debug("%s msgid=%s: %s in %.3fms", call.method, msgid, CODES[code], seconds * 1000)
        if internal is not None:
            state.internal_errors += 1
            if msgid is None:
                state.notification_failed(call.method, "INTERNAL", traceback=True)
            else:
                log.error("internal error in %s (msgid %d)", call.method, msgid, exc_info=internal)
                self._queue_reply(msgid, _INTERNAL, None)
        elif msgid is not None:
            self._queue_reply(msgid, error, result)
        elif error is not None:
            state.notification_failed(call.method, f"{error['code']}: {error['message']}")
        self._pending -= 1
        if self._holding or self._eof:
            self._after_request_done()

    def _finish(self, msgid: int | None, method: str, error: dict[str, str] | None, result: Any) -> None:
        self._state.metrics.count(method, OK if error is None else code_index(error))
        if msgid is not None:
            self._reply(msgid, error, result)
        elif error is not None:
            self._state.notification_failed(method, f"{error['code']}: {error['message']}")

    def _internal_error(self, msgid: int | None, method: str, exc: BaseException | None = None) -> None:
        state = self._state
        state.internal_errors += 1
        state.metrics.count(method, INTERNAL)
        if msgid is None:
            state.notification_failed(method, "INTERNAL", traceback=True)
            return
        log.error("internal error in %s (msgid %d)", method, msgid, exc_info=exc or True)
        self._reply(msgid, _INTERNAL, None)

    # --- bytes out ---------------------------------------------------------------------------

    def _queue_reply(self, msgid: int, error: dict[str, str] | None, result: Any) -> None:
        if self._transport is None:
            return  # the peer went away; the work is done, the reply has nowhere to go
        small = encode_small_reply(msgid, result) if error is None else None
        if small is not None:
            self._out.append(small)
            return
        try:
            data: bytes = self._state.packer.pack([RESPONSE, msgid, error, result])
        except Exception:
            self._state.internal_errors += 1
            log.exception("cannot encode the result of msgid %d", msgid)
            data = self._state.packer.pack([RESPONSE, msgid, _INTERNAL, None])
        self._out.append(data)

    def _reply(self, msgid: int, error: dict[str, str] | None, result: Any) -> None:
        self._queue_reply(msgid, error, result)
        if not self._flush_scheduled:
            # Replies that complete in the same loop turn leave in one write.
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._transport is None:
            return
        transport = self._transport
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self._write_paused and not self._closing and transport.get_write_buffer_size() > _MAX_UNREAD_BYTES:
            # Reading is paused, but requests read before the pause keep adding replies (a 30-byte
            # get_service_state can bring megabytes back): cut the peer rather than hold them all.
            log.warning("closing connection%s: more than %d bytes of replies it does not read",
                        self._peer_description(), _MAX_UNREAD_BYTES)
            self._closing = True
            self._unpacker = None
            transport.abort()

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
        self._close_reason = reason
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
