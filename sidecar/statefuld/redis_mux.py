"""One multiplexed Redis connection: the commands of an event-loop turn leave in one write.

redis-py sends a command and awaits its reply on a connection taken from a pool, so N concurrent
requests cost N round trips and N syscall pairs. Here every caller of a turn appends its command,
RESP-encoded by ``hiredis.pack_command``, to one buffer; one ``transport.write`` sends them all,
and ``hiredis.Reader`` parses the replies, which Redis returns in order, so the N-th reply answers
the N-th command (docs/BENCHMARKS.md, statefuld against redis-py in the application).

redis-py still owns what is not the request path: URL parsing, TLS settings, credentials
(``Endpoint.from_url`` / ``Endpoint.from_redis_connection`` read a redis-py connection object's
public attributes). transports.py adds Sentinel and Cluster on top: one ``RedisMux`` per node.

Guarantees:
- an error reply (``-NOSCRIPT``, ``-WRONGTYPE``, ``-OOM`` ...) fails only the command it answers,
  as a ``ReplyError``;
- a caller cancelled while its command is in flight does not disturb the order: its reply is
  still read and dropped, never handed to another caller;
- a lost connection fails every command in flight at once with ``Unavailable``; the next call
  reconnects (bounded by the connect timeout; failed attempts are not repeated for
  ``reconnect_backoff_s``, so a dead Redis costs callers no wait at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.credentials import CredentialProvider

from statefuld.errors import RpcError, Unavailable

# hiredis returns this object, not a reply, when the buffer holds no complete reply yet; with
# the default (False) a RESP3 boolean reply would be indistinguishable from "need more bytes".
_NOT_ENOUGH_DATA = object()
# Half the default request deadline (2 s): when Redis's host stops answering, a caller waiting
# on the reconnect hears UNAVAILABLE, not TIMEOUT. A URL's socket_connect_timeout overrides it.
_DEFAULT_CONNECT_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the connection to go
# Busy polling is for a lightly loaded daemon, whose lone callers wait on a sleeping event loop;
# with more commands than this waiting, the loop is busy anyway.
_BUSY_POLL_MAX_WAITING = 8
# Error replies that mean "this Redis cannot serve now", not "this request is wrong".
_UNAVAILABLE_REPLIES = frozenset({"LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "NOREPLICAS"})

# A reply's decoder, handed down by the caller of ``execute``: it runs on the raw reply inside the
# read that brought it, so a plain command needs no coroutine to shape its result. It may instead
# return ``Then(awaitable)`` when the reply shows more work is needed: the command's future then
# answers as that awaitable does.
Decode = Callable[[Any], Any]


class Then:
    """A decoder's answer "not yet": the command's future follows ``work`` (a coroutine or future)."""

    __slots__ = ("work",)

    def __init__(self, work: Awaitable[Any]) -> None:
        self.work = work

# An error reply's second chance, handed down likewise: it may answer the command with another
# awaitable (scripts.py runs a script again after NOSCRIPT), or None to let the error stand.
Recover = Callable[["ReplyError"], "Awaitable[Any] | None"]


# A pub/sub connection's messages (``[b"message", channel, payload]``, ``[b"pmessage", pattern,
# channel, payload]``), handed to the callback its RedisMux was made with; the confirmations of
# SUBSCRIBE and its kin are replies like any other.
Push = Callable[[list[Any]], None]
_PUSHED = (b"message", b"pmessage")


class ReplyError(RpcError):
    """A Redis error reply, answered to the caller as INTERNAL; ``kind`` is its first word
    (``NOSCRIPT``, ``WRONGTYPE``, ``MOVED`` ...) and ``reply`` the whole text."""

    def __init__(self, reply: str) -> None:
        # One positional argument: hiredis builds it (through reply_error) from the reply's text.
        super().__init__(f"Redis error: {reply[:200]}")
        self.reply = reply
        self.kind = reply.split(" ", 1)[0]


class UnavailableReply(ReplyError, Unavailable):
    """An error reply that says Redis cannot serve now (LOADING, READONLY, CLUSTERDOWN ...): handled
    as a lost connection is, and answered UNAVAILABLE."""


def reply_error(reply: str) -> ReplyError:
    cls = UnavailableReply if reply.split(" ", 1)[0] in _UNAVAILABLE_REPLIES else ReplyError
    return cls(reply)


encode_command = hiredis.pack_command  # any command: a tuple of str, bytes, int or float


@dataclass(frozen=True)
class Endpoint:
    """Where one Redis node is and how to set up a connection to it (what redis-py parsed)."""

    path: str | None = None  # Unix socket; else host and port
    host: str = "localhost"
    port: int = 6379
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    credential_provider: CredentialProvider | None = field(default=None, repr=False)
    client_name: str | None = None
    connect_timeout_s: float = _DEFAULT_CONNECT_TIMEOUT_S
    busy_poll_s: float = 0.0  # see _Connection._flush

    @classmethod
    def from_url(cls, url: str, **redis_kwargs: Any) -> Endpoint:
        """Parse ``url`` (and redis-py connection kwargs) exactly as redis-py does."""
        pool = ConnectionPool.from_url(url, **redis_kwargs)
        conn = pool.connection_class(**pool.connection_kwargs)  # no I/O: only holds the settings
        endpoint = cls.from_redis_connection(conn)
        if "socket_connect_timeout" in redis_kwargs or "socket_connect_timeout" in parse_qs(urlsplit(url).query):
            return endpoint
        # Not asked for: redis-py's own default (5 s) would outlast the request deadline.
        return dataclasses.replace(endpoint, connect_timeout_s=_DEFAULT_CONNECT_TIMEOUT_S)

    @classmethod
    def from_redis_connection(cls, conn: AbstractConnection, *, host: str | None = None,
                              port: int | None = None) -> Endpoint:
        """The settings of a (not necessarily connected) redis-py connection; ``host``/``port``
        override its address, e.g. with a node that Sentinel or the Cluster topology named."""
        timeout_s = conn.socket_connect_timeout or _DEFAULT_CONNECT_TIMEOUT_S
        common: dict[str, Any] = {
            "db": int(conn.db or 0),
            "username": conn.username,
            "password": conn.password,
            "credential_provider": conn.credential_provider,
            "client_name": conn.client_name,
            "connect_timeout_s": float(timeout_s),
        }
        if isinstance(conn, UnixDomainSocketConnection):
            return cls(path=conn.path, **common)
        ssl_context = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        return cls(
            host=host if host is not None else str(getattr(conn, "host", "localhost")),
            port=port if port is not None else int(getattr(conn, "port", 6379)),
            ssl_context=ssl_context,
            **common,
        )

    def describe(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        return f"{'rediss' if self.ssl_context is not None else 'redis'}://{self.host}:{self.port}"



class _Connection(asyncio.Protocol):
    """One socket. Commands queue in ``_out`` during a turn; ``_waiting`` holds their futures (and
    decoders) in the order they were written, which is the order Redis answers them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[_Connection], None],
                 busy_poll_s: float = 0.0, push: Push | None = None) -> None:
        self._loop = loop
        self._on_lost = on_lost
        self._push = push
        self._busy_poll_s = busy_poll_s
        self._poll_until = 0.0
        self._reader = hiredis.Reader(replyError=reply_error, notEnoughData=_NOT_ENOUGH_DATA)
        self._waiting: deque[tuple[asyncio.Future[Any], Decode | None, Recover | None]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self.lost_reason: str | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        # commands / writes is the mean batch size (the metrics show both).
        self.commands = 0
        self.writes = 0

    def send(self, args: tuple[Any, ...], decode: Decode | None, recover: Recover | None = None
             ) -> asyncio.Future[Any]:
        # Encode before queueing: an argument of a type RESP cannot carry raises here, in the
        # caller, and never leaves a future without a command behind it.
        data = encode_command(args)
        future = self._loop.create_future()
        if self.lost_reason is not None:
            future.set_exception(Unavailable(self.lost_reason))
            return future
        self._out.append(data)
        self._waiting.append((future, decode, recover))
        if not self._flush_scheduled:
            # Runs after every task already scheduled in this turn has had its chance to send.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._transport is None:
            return
        self.commands += len(out)
        self.writes += 1
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self._busy_poll_s and len(self._waiting) <= _BUSY_POLL_MAX_WAITING:
            # A callback in the ready queue makes the loop poll without sleeping, so the reply is
            # read as soon as it lands instead of after a wake-up of the process: lower latency
            # for a lone caller, paid for in CPU (docs/OPERATIONS.md, "Busy polling").
            self._poll_until = perf_counter() + self._busy_poll_s
            self._loop.call_soon(self._busy_poll)

    def _busy_poll(self) -> None:
        if self._waiting and perf_counter() < self._poll_until:
            self._loop.call_soon(self._busy_poll)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := reader.gets()) is not _NOT_ENOUGH_DATA:
                if self._push is not None and type(reply) is list and reply and reply[0] in _PUSHED:
                    self._push(reply)  # a message of a subscription: nobody's reply
                    continue
                future, decode, recover = waiting.popleft()
                if future.done():  # its caller was cancelled: the reply is consumed and dropped
                    continue
                if isinstance(reply, ReplyError):
                    retry = None if recover is None else recover(reply)
                    if retry is None:
                        future.set_exception(reply)
                    else:
                        _follow(future, retry)
                elif decode is None:
                    future.set_result(reply)
                else:
                    _decoded(future, decode, reply)
        except IndexError:
            self._fail("Redis sent a reply nobody asked for; connection dropped")
        except hiredis.ProtocolError as exc:
            self._fail(f"unparsable reply from Redis ({exc}); connection dropped")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def eof_received(self) -> bool:
        return False  # Redis closed its side: close ours, connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = self.lost_reason or f"connection to Redis lost ({exc or 'closed by the server'})"
        self.lost_reason = reason
        self._out.clear()
        while self._waiting:
            future, _, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(Unavailable(reason))
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self)

    def _fail(self, reason: str) -> None:
        self.lost_reason = reason
        if self._transport is not None:
            self._transport.abort()

    def close(self, reason: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = reason
        if self._transport is not None:
            self._transport.close()


def _decoded(future: asyncio.Future[Any], decode: Decode, reply: Any) -> None:
    try:
        result = decode(reply)
    except Exception as exc:  # the decoder's verdict on what Redis holds (an RpcError), or a bug
        future.set_exception(exc)
        return
    if type(result) is Then:
        _follow(future, result.work)
    else:
        future.set_result(result)


def _follow(future: asyncio.Future[Any], retry: Awaitable[Any]) -> None:
    """``future`` answers as ``retry`` does; if its caller gives up on it first, ``retry`` is
    cancelled: no work outlives the call it was for."""

    def settle(done: asyncio.Future[Any]) -> None:
        exc = None if done.cancelled() else done.exception()  # retrieved either way
        if future.done():
            return
        if done.cancelled():
            future.cancel()
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(done.result())

    work = asyncio.ensure_future(retry)
    work.add_done_callback(settle)
    future.add_done_callback(lambda _: work.cancel() if future.cancelled() else None)


class RedisMux:
    """A multiplexed connection to one Redis node.

    ``await mux.execute("EVALSHA", sha, 1, key, arg)`` returns the raw reply (bytes, int, list,
    None), or ``decode(reply)`` when a decoder is given; raises ``ReplyError`` for an error reply
    and ``Unavailable`` when Redis cannot be reached. Nothing happens on construction; the first
    call (or ``connect()``) connects.
    """

    def __init__(self, endpoint: Endpoint, *, reconnect_backoff_s: float = 0.1, push: Push | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        """``push``: this is a pub/sub connection, its messages go there. ``on_lost``: called when
        a connection that was up is lost (the next command connects again)."""
        self.endpoint = endpoint
        self._push = push
        self._lost_callback = on_lost
        self._reconnect_backoff_s = reconnect_backoff_s
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._retry_after = 0.0
        self._last_error = ""
        self._closed = False
        self.commands = 0  # totals of closed connections; see stats()
        self.writes = 0

    def execute(self, *args: Any, decode: Decode | None = None, recover: Recover | None = None
                ) -> asyncio.Future[Any]:
        """Queue one command for this turn's write; the future answers it (decoded by ``decode``;
        an error reply offered to ``recover`` first)."""
        conn = self._conn
        if conn is not None:
            return conn.send(args, decode, recover)
        return asyncio.ensure_future(self._execute_after_connect(args, decode, recover))

    async def _execute_after_connect(self, args: tuple[Any, ...], decode: Decode | None,
                                     recover: Recover | None) -> Any:
        conn = await self._connection()
        return await conn.send(args, decode, recover)

    async def connect(self) -> None:
        """Connect now (start-up); raises ``Unavailable`` if Redis cannot be reached."""
        await self._connection()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def stats(self) -> dict[str, int]:
        commands, writes = self.commands, self.writes
        if self._conn is not None:
            commands += self._conn.commands
            writes += self._conn.writes
        return {"commands": commands, "writes": writes}

    async def close(self) -> None:
        """Fail what is in flight with ``Unavailable`` and close; later calls fail at once."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        conn = self._conn
        if conn is not None:
            conn.close("the Redis connection was closed by the daemon")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.closed), CLOSE_TIMEOUT_S)

    # --- connecting --------------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        if self._conn is not None:
            return self._conn
        if self._closed:
            raise Unavailable("the Redis connection was closed by the daemon")
        task = self._connecting
        if task is None:
            loop = asyncio.get_running_loop()
            if loop.time() < self._retry_after:
                raise Unavailable(self._last_error)
            task = self._connecting = loop.create_task(self._open(loop))
            task.add_done_callback(self._connect_done)
        # Shielded: the connection attempt is shared, one caller's cancellation must not end it.
        return await asyncio.shield(task)

    def _connect_done(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved when every waiter was cancelled
        if exc is not None:
            self._last_error = str(exc)
            self._retry_after = asyncio.get_running_loop().time() + self._reconnect_backoff_s
            return
        conn = task.result()
        if self._closed:
            conn.close("the Redis connection was closed by the daemon")
        elif conn.lost_reason is None:
            self._conn = conn

    def _on_lost(self, conn: _Connection) -> None:
        self.commands += conn.commands
        self.writes += conn.writes
        conn.commands = conn.writes = 0
        if self._conn is conn:
            self._conn = None
            if self._lost_callback is not None and not self._closed:
                self._lost_callback()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        ep = self.endpoint
        conn: _Connection | None = None

        def factory() -> _Connection:
            return _Connection(loop, self._on_lost, ep.busy_poll_s, self._push)

        try:
            async with asyncio.timeout(ep.connect_timeout_s):
                if ep.path is not None:
                    _, conn = await loop.create_unix_connection(factory, ep.path)
                else:
                    _, conn = await loop.create_connection(factory, ep.host, ep.port, ssl=ep.ssl_context)
                await self._handshake(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close("connection set-up failed")
            where = ep.describe()
            if isinstance(exc, ReplyError):
                raise Unavailable(f"Redis at {where} refused the connection set-up: {exc.reply}") from exc
            if isinstance(exc, TimeoutError):
                raise Unavailable(f"Redis at {where} did not answer within {ep.connect_timeout_s}s") from exc
            if isinstance(exc, (OSError, Unavailable)):  # refused, no such socket, TLS failure, lost
                raise Unavailable(f"cannot connect to Redis at {where}: {exc}") from exc
            raise
        return conn

    async def _handshake(self, conn: _Connection) -> None:
        ep = self.endpoint
        commands: list[tuple[Any, ...]] = []
        credentials: tuple[str, ...] | None = None
        if ep.credential_provider is not None:
            credentials = tuple(await ep.credential_provider.get_credentials_async())
        elif ep.password is not None:
            credentials = (ep.username, ep.password) if ep.username else (ep.password,)
        if credentials:
            commands.append(("AUTH", *credentials))
        if ep.db:
            commands.append(("SELECT", ep.db))
        if ep.client_name:
            commands.append(("CLIENT", "SETNAME", ep.client_name))
        if commands:
            # One write, as everything else; gather raises the first error reply.
            await asyncio.gather(*[conn.send(command, None) for command in commands])
