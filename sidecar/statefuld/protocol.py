"""MessagePack-RPC over a stream: bytes in, messages out, flow control.

One ``RpcProtocol`` per connection. It frames the bytes into messages, checks each is a
well-formed request or notification, hands it to its ``Session`` (calls.py) and writes the replies
that come back through the callback it handed down. It knows no method names and no Redis.
``Connections`` is what the connections share: the limits, the peer allow lists, the counts.
See docs/PROTOCOL.md for the wire format and the cases that close a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, cast

import msgpack

from statefuld.config import Config

if TYPE_CHECKING:
    from statefuld.calls import Notify, Reply

log = logging.getLogger("statefuld.protocol")

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2
MAX_MSGID = 2**32 - 1  # MessagePack-RPC msgids are uint32

# The unpacker is fed at most this much at a time: its buffer limit is max_message_bytes plus
# one slice, so a read that carries many small messages (or the tail of one and the head of
# the next) never trips the limit, while any single message over max_message_bytes still does.
_FEED_SLICE = 64 * 1024

# Replies waiting for a peer that does not read them, past which its connection is cut.
_MAX_UNREAD_BYTES = 32 * 1024 * 1024
# The unpacker's first buffer, enough for the requests of a read in practice; it grows as a
# message needs, up to its limit.
_READ_SIZE = 4096

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Session(Protocol):
    """calls.Session as a connection uses it."""

    def submit(self, msgid: int | None, name: str, params: Any, read_at: float, /) -> None: ...
    def closed(self) -> None: ...
    def writable(self) -> None: ...


class Connections:
    """What every connection shares: limits, who may connect, the open connections, the counts."""

    def __init__(self, config: Config, open_session: Callable[[Reply, Notify], Session]) -> None:
        self.open_session = open_session
        self.max_message_bytes = config.max_message_bytes
        # One connection may have this many calls running; past it the daemon stops reading it
        # (backpressure onto the peer's socket) and takes more once half of them have ended.
        self.max_pending = config.max_in_flight_per_connection
        self.resume_pending = config.max_in_flight_per_connection // 2
        self.allow_uids = frozenset(config.allow_uid)
        self.allow_gids = frozenset(config.allow_gid)
        self.max_connections = config.max_connections
        self.max_buffered_bytes = config.max_buffered_bytes
        self.open: set[RpcProtocol] = set()
        self.draining = False
        self.buffered = 0  # bytes of incomplete messages held by all connections' unpackers
        self.accepted = 0
        self.refused = 0
        self.closed_malformed = 0
        self.over_limit = 0  # closed at once: --max-connections were open
        self.closed_buffered = 0  # closed for adding past --max-buffered-bytes
        self._limit_logged_s = -1.0
        self.packer = msgpack.Packer(use_bin_type=True)

    def peer_allowed(self, uid: int, gid: int) -> bool:
        if not self.allow_uids and not self.allow_gids:
            return True
        # The daemon's own user may always connect, so its health probes keep working.
        return uid in self.allow_uids or gid in self.allow_gids or uid == os.geteuid()

    def log_limit(self, message: str, *args: Any) -> None:
        # A local peer that opens connections in a loop must not flood the log: one line a second.
        now = time.monotonic()
        if now - self._limit_logged_s >= 1.0:
            self._limit_logged_s = now
            log.warning(message, *args, extra={"event": "connection_limit"})

    def factory(self) -> RpcProtocol:
        return RpcProtocol(self)

    def stop_reading(self) -> None:
        """Shutdown: take no new requests; calls in flight still get their replies."""
        self.draining = True
        for conn in list(self.open):
            conn.stop_reading()


class MalformedMessage(Exception):
    """The peer broke the protocol; its connection is closed."""


def parse_message(message: Any) -> tuple[int | None, str, list[Any]]:
    """(msgid, method, params) of a request, msgid None for a notification; raises
    MalformedMessage for anything else (docs/PROTOCOL.md, "Limits and closed connections")."""
    if type(message) is not list:
        raise MalformedMessage(f"a message must be an array, got {type(message).__name__}")
    size = len(message)
    kind = message[0] if size else None
    if size == 4 and type(kind) is int and kind == REQUEST:  # type(): bool and float equal 0 too
        _, msgid, method, params = message
        if type(msgid) is float and msgid.is_integer():  # encoders that write large ints as floats
            msgid = int(msgid)
        if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
            raise MalformedMessage("request msgid is not a uint32")
    elif size == 3 and type(kind) is int and kind == NOTIFICATION:
        msgid = None
        _, method, params = message
    else:
        raise MalformedMessage(f"not a request [0, msgid, method, params] or notification [2, method, params]: "
                               f"array of {size} starting with {kind!r:.100}")
    return msgid, _method_name(method), _params(params)


def _method_name(method: Any) -> str:
    if type(method) is str:
        return method
    if type(method) is bytes:  # some old msgpack-rpc clients send the name as bin
        return method.decode("utf-8", "surrogateescape")
    raise MalformedMessage("method name is not a string")


def _params(params: Any) -> list[Any]:
    if params is None:  # clients that send nil for "no arguments"
        return []
    if type(params) is not list:
        raise MalformedMessage("params is not an array")
    return params


class RpcProtocol(asyncio.Protocol):
    def __init__(self, shared: Connections) -> None:
        self._shared = shared
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None
        self._reading = False  # a peer admitted, not (yet) closed: its bytes are taken
        # Made at the first byte: a msgpack Unpacker holds tens of KiB (its parse stack) from its
        # creation on, which a connection that never sends should not cost.
        self._unpacker: Any = None
        self._message_start = 0  # unpacker offset where the message being read began
        self._fed = 0  # bytes fed to the unpacker; minus its offset, what it holds
        self._buffered = 0  # this connection's share of Connections.buffered
        self._pending = 0  # calls of this connection not yet ended
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._holding = False  # reading paused at max_pending
        self._backlog: bytes | memoryview | None = None  # read but not yet fed while holding
        self._resume_scheduled = False
        self._write_paused = False
        self._eof = False
        self._closing = False
        self._close_reason = ""
        self.closed: asyncio.Future[None] | None = None

    # --- connection events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        shared = self._shared
        self._transport = transport
        self._loop = loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        shared.open.add(self)
        shared.accepted += 1
        if len(shared.open) > shared.max_connections:
            shared.over_limit += 1
            shared.log_limit("closing a new connection: %d are open (--max-connections)", shared.max_connections)
            self._close("too many connections")
            return
        if (shared.allow_uids or shared.allow_gids) and not self._check_peer(transport):
            return
        self._reading = True
        self._session = shared.open_session(self._call_ended, self._notify)
        if shared.draining:  # accepted just before the listener closed
            self._close("the daemon is shutting down")

    def _check_peer(self, transport: asyncio.Transport) -> bool:
        sock: socket.socket | None = transport.get_extra_info("socket")
        uid = gid = -1  # unknown peers are refused unless nothing is restricted
        if sock is not None:
            with contextlib.suppress(OSError):
                _pid, uid, gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if self._shared.peer_allowed(uid, gid):
            return True
        self._shared.refused += 1
        log.warning("connection refused: peer uid=%d gid=%d is not in --allow-uid/--allow-gid", uid, gid,
                    extra={"event": "peer_refused"})
        self._close("peer not allowed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._shared.open.discard(self)
        self._shared.buffered -= self._buffered
        self._buffered = 0
        if exc is not None:  # not a close of ours or the peer's: say why
            log.info("connection closed: %s", exc, extra={"event": "connection_closed"})
        else:
            log.debug("connection closed: %s", self._close_reason or "peer closed it",
                      extra={"event": "connection_closed"})
        self._transport = None
        self._out.clear()
        # Requests held back at the per-connection bound were never taken: with nobody left to
        # answer, they are dropped, not run.
        self._reading = False
        self._unpacker = None
        self._backlog = None
        if self._session is not None:
            self._session.closed()
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

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it catches up,
        # so its replies cannot pile up in our memory.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._closing and not self._holding and not self._shared.draining:
            self._transport.resume_reading()
        if self._session is not None and not self._closing:
            self._session.writable()

    # --- bytes in ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._reading or self._closing:
            return
        if self._holding:  # a read that was already under way when reading paused
            self._backlog = data if self._backlog is None else bytes(self._backlog) + data
            return
        self._take(data)

    def _take(self, data: bytes | memoryview, resuming: bool = False) -> None:
        """Feed ``data`` and submit the messages it completes, until the connection has
        ``max_pending`` calls running: then the rest waits (``_hold``). ``resuming``: the
        unpacker may still hold messages fed before a hold; they go first."""
        unpacker = self._unpacker or self._new_unpacker()
        read_at = perf_counter()  # one clock read for every message taken now: they arrived together
        try:
            if resuming and not self._drain_unpacker(unpacker, read_at):
                self._hold(data)
                return
            view = memoryview(data)
            for start in range(0, len(view), _FEED_SLICE):
                piece = view[start : start + _FEED_SLICE]
                unpacker.feed(piece)
                self._fed += len(piece)
                if not self._drain_unpacker(unpacker, read_at):
                    self._hold(view[start + _FEED_SLICE :])
                    self._account(unpacker)
                    return
                if self._closing:
                    return
            self._account(unpacker)
        except MalformedMessage as malformed:
            self._malformed(str(malformed))
        except msgpack.BufferFull:
            self._malformed(f"message larger than {self._shared.max_message_bytes} bytes")
        except Exception as exc:  # undecodable msgpack: FormatError, StackError, limits, unhashable keys...
            self._malformed(f"undecodable MessagePack ({type(exc).__name__}: {exc})")

    def _new_unpacker(self) -> Any:
        limit = self._shared.max_message_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            unicode_errors="surrogateescape",
            max_buffer_size=limit + _FEED_SLICE,
            read_size=_READ_SIZE,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit // 2,
            max_ext_len=limit,
        )
        return self._unpacker

    def _account(self, unpacker: Any) -> None:
        """Count what the unpacker holds of incomplete messages into the daemon-wide total; the
        connection that takes the total past --max-buffered-bytes is closed."""
        shared = self._shared
        held = self._fed - unpacker.tell()
        shared.buffered += held - self._buffered
        self._buffered = held
        if shared.buffered > shared.max_buffered_bytes and held:
            shared.closed_buffered += 1
            shared.log_limit("closing connection%s: %d bytes of incomplete messages held across connections "
                             "(--max-buffered-bytes %d)", self._peer_description(), shared.buffered,
                             shared.max_buffered_bytes)
            self._close("too many bytes buffered")

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
        if not self._holding or self._closing or not self._reading or self._shared.draining:
            return
        transport = self._transport
        # A paused transport does not see its peer leave; a reply that could not be written
        # (EPIPE) has closed it, and nobody would read the answers to what is held.
        if transport is None or transport.is_closing():
            return
        self._holding = False
        backlog, self._backlog = self._backlog, None
        self._take(b"" if backlog is None else backlog, resuming=True)
        if not self._holding and not self._closing and not self._write_paused:
            transport.resume_reading()

    def _drain_unpacker(self, unpacker: Any, read_at: float) -> bool:
        """Submit the messages the unpacker holds; False if it stopped at ``max_pending``."""
        # The unpacker parses incrementally and drops the bytes it has consumed, so its buffer
        # limit alone does not bound a message made of many small items: count its bytes here.
        limit = self._shared.max_message_bytes
        max_pending = self._shared.max_pending
        for message in unpacker:
            end = unpacker.tell()
            if end - self._message_start > limit:
                raise MalformedMessage(f"message of {end - self._message_start} bytes, larger than {limit}")
            self._message_start = end
            self._on_message(message, read_at)
            if self._closing:
                return True
            if self._pending >= max_pending:
                return False
        if unpacker.tell() - self._message_start > limit:
            raise MalformedMessage(f"message larger than {limit} bytes")
        return True

    def _on_message(self, message: Any, read_at: float) -> None:
        msgid, method, params = parse_message(message)
        self._pending += 1
        assert self._session is not None
        self._session.submit(msgid, method, params, read_at)

    # --- bytes out ---------------------------------------------------------------------------

    def _call_ended(self, msgid: int | None, error: dict[str, str] | str | None, result: Any) -> None:
        """The callback this connection hands its Session: a call ended; send its reply."""
        self._pending -= 1
        if msgid is not None and self._transport is not None:  # else: nobody to send it to
            try:
                data: bytes = self._shared.packer.pack([RESPONSE, msgid, error, result])
            except Exception:
                log.exception("cannot encode the result of msgid %d", msgid)
                internal = {"code": "INTERNAL", "message": "internal error (see the daemon's log)"}
                data = self._shared.packer.pack([RESPONSE, msgid, internal, None])
            self._out.append(data)
            if not self._flush_scheduled:
                # Replies that complete in the same loop turn leave in one write.
                self._flush_scheduled = True
                self._loop.call_soon(self.flush)  # type: ignore[union-attr]
        if self._holding and self._pending <= self._shared.resume_pending and not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_input)  # type: ignore[union-attr]
        if self._eof and not self._pending:
            self._close("peer finished sending")

    def _notify(self, method: str, params: Any) -> bool:
        """The callback this connection hands its Session: send a notification, unless the peer
        is not reading (then the sender keeps it until ``writable``)."""
        if self._write_paused or self._closing or self._transport is None:
            return False
        self._out.append(self._shared.packer.pack([NOTIFICATION, method, params]))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)  # type: ignore[union-attr]
        return True

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
            self._reading = False
            self._unpacker = None
            transport.abort()

    # --- closing -----------------------------------------------------------------------------

    def _malformed(self, reason: str) -> None:
        self._shared.closed_malformed += 1
        log.warning("closing connection%s: %s", self._peer_description(), reason)
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
        self._reading = False
        self._unpacker = None  # what it held is freed now, not when the peer's close arrives
        self._shared.buffered -= self._buffered
        self._buffered = 0
        self.flush()  # replies already computed still go out before the close
        self._transport.close()

    def stop_reading(self) -> None:
        """Shutdown: take no new requests from this peer; calls in flight still get replies."""
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def close(self) -> None:
        self._close("shutdown")

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
