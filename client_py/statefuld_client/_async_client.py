"""The asyncio client: every call of a client shares one connection, replies matched by msgid.

Every rule (timeouts, retries, errors and their messages, msgids, forks) is in `_core`; this
module only moves bytes and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from statefuld_client import _core as core
from statefuld_client._async_api import AsyncAPI
from statefuld_client._paths import default_socket_path
from statefuld_client.errors import ProtocolError, StatefuldError

if TYPE_CHECKING:
    from statefuld_client._hold import AsyncPodHold
    from statefuld_client._watch import AsyncWatch

# aclose() lets the transport flush queued notifications this long before aborting it.
_CLOSE_FLUSH_S = 1.0
# Calls with the client's default timeout are expired by one sweep per connection, this often,
# instead of a loop timer each (a timer per call cost more than the rest of the call's bookkeeping).
_SWEEP_INTERVAL_S = 0.01


class _Expired(Exception):
    """The sweep found the call older than the client's default timeout (the caller names the method)."""


def _older(reference: int, a: int, b: int) -> bool:
    """Whether msgid ``a`` was sent before msgid ``b``; both were sent at or before ``reference``.

    msgids grow by one per call and wrap at 2**32, so their distance back from the newest one
    orders them (calls waiting on one connection span far fewer than 2**31 msgids).
    """
    return (reference - a) & core.MSGID_MASK > (reference - b) & core.MSGID_MASK


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class _Connection(asyncio.Protocol):
    """One socket: requests queued during a loop turn go out in one write; replies go to their future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, newest: int) -> None:
        self.loop = loop
        self.sock = sock
        self.transport: asyncio.Transport | None = None
        # msgid -> the future of its call. Calls are added as they are sent, so this is in the
        # order of sending, which the deadline sweep and connection_lost() rely on.
        self.pending: dict[int, asyncio.Future[Any]] = {}
        # The msgid of the latest call sent (or queued) on this connection; before the first, the
        # client's latest on any connection. Either way the next call takes newest + 1.
        self.newest = newest
        # Calls with the client's default timeout (most calls) carry no deadline of their own:
        # while any waits, a sweep runs every _SWEEP_INTERVAL_S and notes the time and the newest
        # msgid, and fails every call sent at or before a note that is default_timeout_s old. So
        # a call times out between its timeout and its timeout plus two intervals, and the call
        # path does no clock read and no bookkeeping of its own. Calls with their own timeout_s=
        # have a loop timer each and are listed in `timed`, which the sweep skips.
        self.default_timeout_s = 0.0
        self.timed: set[int] = set()
        self._notes: deque[tuple[float, int]] = deque()  # (time, newest msgid then), oldest first
        self._sent_since = 0.0  # every call still waiting was sent at or after this time
        self._sweep: asyncio.TimerHandle | None = None
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self._decoder = core.Decoder()
        self._queue: list[bytes] = []
        self._first_queued = -1  # msgid of the first call in _queue; later calls follow it
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        decoder.feed(data)
        pending = self.pending
        try:
            while (reply := decoder.next_reply()) is not None:
                future = pending.pop(reply[1], None)
                # None: a call that was cancelled or timed out; its reply is dropped here.
                if future is not None and not future.done():
                    future.set_result(reply)
        except ProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        # Calls sent from the first still queued on are unsent: they may be tried again. Only
        # notifications queued (the first slot is still the next msgid): every call went out.
        first_unsent = self._first_queued if self._queue else None
        if first_unsent == (self.newest + 1) & core.MSGID_MASK:
            first_unsent = None
        self._queue.clear()
        for msgid, future in self.pending.items():
            if not future.done():
                if first_unsent is not None and not _older(self.newest, msgid, first_unsent):
                    future.set_exception(core.NotSent())
                else:
                    lost = core.Lost()
                    lost.__cause__ = exc
                    future.set_exception(lost)
        self.pending.clear()
        self.timed.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def start_sweep(self, timeout_s: float) -> None:
        """Called by the first call with the default timeout while no sweep runs."""
        self.default_timeout_s = timeout_s
        self._notes.clear()
        self._sent_since = self.loop.time()
        self._sweep = self.loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep = None
        pending, timed, notes = self.pending, self.timed, self._notes
        if not pending:
            # Nothing waits. (Not "nothing but calls in `timed`": such a call's msgid stays there
            # until its caller runs again, after its reply left `pending`.) The notes stay: a call
            # retried after connection_lost() may still read them; start_sweep() clears them.
            return
        now = self.loop.time()
        newest = self.newest
        notes.append((now, newest))
        cutoff = None
        while notes and notes[0][0] <= now - self.default_timeout_s:
            self._sent_since, cutoff = notes.popleft()
        if cutoff is not None:
            expired = []
            for msgid in pending:  # in the order sent: stop at the first one sent after the cutoff
                if _older(newest, cutoff, msgid):
                    break
                if msgid not in timed:
                    expired.append(msgid)
            for msgid in expired:
                future = pending.pop(msgid)
                if not future.done():
                    future.set_exception(_Expired())
        self._sweep = self.loop.call_later(_SWEEP_INTERVAL_S, self._sweep_deadlines)

    def sent_at_or_after(self, msgid: int) -> float:
        """A time the call with this default-timeout msgid was sent at or after (its deadline's start)."""
        since = self._sent_since
        for when, newest in self._notes:
            if not _older(self.newest, newest, msgid):
                break
            since = when  # that note was taken before this call was sent
        return since

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drain(self) -> None:
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def send(self, payload: bytes, msgid: int) -> None:
        """Queue a request, or a notification (msgid -1), for this turn's one write."""
        if self.lost:
            raise core.NotSent
        if not self._queue:
            # A notification first: the first call queued after it will be the next msgid.
            self._first_queued = msgid if msgid >= 0 else (self.newest + 1) & core.MSGID_MASK
            self.loop.call_soon(self._flush)
        self._queue.append(payload)

    def _flush(self) -> None:
        queue = self._queue
        transport = self.transport
        # A closing transport (the daemon went away while we were idle) would drop the bytes; keep
        # them queued so that connection_lost() tells their callers they were never sent.
        if not queue or transport is None or self.lost or transport.is_closing():
            return
        transport.write(queue[0] if len(queue) == 1 else b"".join(queue))
        if transport.is_closing():
            return  # the write itself failed (EPIPE): none of this batch left
        queue.clear()

    def fail(self, exc: Exception) -> None:
        """Drop the connection and fail every call waiting on it with ``exc``."""
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)
        self.pending.clear()
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def forget(self) -> None:
        """Close our copy of the socket without touching its event loop.

        For a child after a fork (the loop's epoll instance is shared with the parent, so even
        unregistering would break the parent) and for a loop already closed. detach() leaves the
        transport an fd of -1, so it cannot later close a reused descriptor number.
        """
        self.lost = True
        fd = self.sock.detach()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class AsyncClient(AsyncAPI):
    """Asyncio client for the statefuld daemon.

    Same methods and arguments as `Client`, awaited. Any number of concurrent calls share one
    connection: requests made in the same event-loop turn go out in one write, and replies are
    matched by msgid in whatever order they come. Cancelling a call (or its ``timeout_s`` passing)
    leaves the others alone; its late reply is dropped.

    Constructing does no I/O; the first call connects, and the first call after the daemon
    restarted reconnects. A client belongs to the event loop of its first call.

    Example::

        async with AsyncClient() as client:
            await client.set_linked_pod("game", "alice", "lobby", 3, -1)
            pods = await asyncio.gather(*(client.get_linked_pod("game", u, "lobby") for u in users))
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout_s: float = core.DEFAULT_TIMEOUT_S) -> None:
        self.socket_path: str = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout_s = core.checked_timeout(timeout_s)
        self._conn: _Connection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._connect_lock_loop: asyncio.AbstractEventLoop | None = None
        self._encoder = core.Encoder()
        self._msgids = core.MsgIds()
        self._closed = False
        # Registered now, not once connected: a fork in the middle of the first connect (run by
        # another thread's loop) must still leave the child nothing of the parent's.
        core.reset_after_fork(self)

    def __repr__(self) -> str:
        conn = self._conn
        state = "closed" if self._closed else "connected" if conn is not None and not conn.lost else "idle"
        return f"<AsyncClient socket_path={self.socket_path!r} {state}>"

    async def __aenter__(self) -> AsyncClient:
        if self._closed:
            raise core.closed_error()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once `aclose` was called."""
        return self._closed

    def watch_service(self, ns: str, service: str) -> AsyncWatch:
        """Watch a service's pod states and workload state: an iterator of events, on a connection
        of its own. The first event is the current state, as a ``snapshot``; then ``pod`` and
        ``workload`` events as they change in Redis, whoever changes them. The watch call is made
        at the first iteration, or when it is awaited (``watch = await client.watch_service(...)``).

        Example::

            async for event in client.watch_service("game", "lobby"):
                print(event)   # {"kind": "pod", "pod_id": 3, "state": "Draining"}
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._watch import AsyncWatch

        return AsyncWatch(self.socket_path, self.timeout_s, "watch_service", ns, service)

    def watch_links(self, ns: str, service: str) -> AsyncWatch:
        """Watch every link of a service: ``link`` events with cause ``set``, ``removed`` or
        ``expired``, on a connection of its own; a ``gap`` event after anything was missed.

        Example::

            async for event in client.watch_links("game", "lobby"):
                print(event)   # {"kind": "link", "uid": "alice", "pod_id": 3, "persistent": True, "cause": "set"}
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._watch import AsyncWatch

        return AsyncWatch(self.socket_path, self.timeout_s, "watch_links", ns, service)

    def hold_pod(self, ns: str, service: str, pod_id: int, state: str, load: int) -> AsyncPodHold:
        """Hold a pod: its liveness tied to a connection of its own (see `AsyncPodHold`).

        Await it, or use it with ``async with``: that writes the pod's state and load; from then on
        the daemon refreshes its load report until the hold is closed or this process ends, then
        writes it ``Down``.

        Example::

            async with client.hold_pod("game", "lobby", 3, "Ready", 0) as hold:
                await hold.update(load=120)
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._hold import AsyncPodHold

        return AsyncPodHold(self.socket_path, self.timeout_s, ns, service, pod_id, state, load)

    async def aclose(self) -> None:
        """Close the connection; calls still waiting and every later call raise `ClientClosedError`.

        Queued notifications get a moment to be written first. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is None or conn.lost or conn.transport is None:
            return
        for future in conn.pending.values():
            if not future.done():
                future.set_exception(core.Lost())  # the call sees the client closed: core.retry_or_raise says so
        conn.pending.clear()
        conn._flush()
        conn.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(conn.closed), _CLOSE_FLUSH_S)
        except TimeoutError:
            conn.transport.abort()

    # -- the two primitives the API calls -----------------------------------------------------------

    async def _call(self, method: str, params: list[Any], timeout_s: float | None, is_read: bool) -> Any:
        loop = asyncio.get_running_loop()
        retried = False
        # A call with the client's default timeout has no timer of its own: the connection's sweep
        # expires it (see _Connection). Its deadline is known only once it is sent, or resent.
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            conn = self._conn
            if self._closed or conn is None or conn.lost or conn.loop is not loop or conn._drained is not None:
                conn = await self._ready_connection(loop, method, deadline)
            msgid = self._msgids.next(conn.pending)
            conn.newest = msgid
            future: asyncio.Future[list[Any]] = loop.create_future()
            conn.pending[msgid] = future
            timer = None
            if deadline is None:
                if conn._sweep is None:
                    conn.start_sweep(self.timeout_s)
            else:
                conn.timed.add(msgid)
                timer = loop.call_at(deadline, _expire, future)
            try:
                conn.send(self._encoder.request(msgid, method, params), msgid)
                return core.unwrap(await future)
            except _Expired:
                raise core.timed_out(method, self.timeout_s if timeout_s is None else timeout_s) from None
            except (core.NotSent, core.Lost) as exc:
                retried = core.retry_or_raise(exc, method, is_read, self.socket_path, retried, self._closed)
                if deadline is None:  # a retry keeps the first attempt's deadline
                    deadline = conn.sent_at_or_after(msgid) + self.timeout_s
            finally:
                if timer is not None:
                    timer.cancel()
                    conn.timed.discard(msgid)
                # Still there if cancelled or timed out: forget it, so its reply is dropped.
                conn.pending.pop(msgid, None)

    async def _notify(self, method: str, params: list[Any], timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        payload = self._encoder.notification(method, params)
        retried = False
        while True:
            conn = await self._ready_connection(loop, method, deadline)
            try:
                conn.send(payload, -1)
                return
            except core.NotSent as exc:
                retried = core.retry_or_raise(exc, method, False, self.socket_path, retried, self._closed)

    # -- internals --------------------------------------------------------------------------------------

    async def _ready_connection(self, loop: asyncio.AbstractEventLoop, method: str,
                                deadline: float | None) -> _Connection:
        """A live connection with room in its write buffer; connects if there is none."""
        if self._closed:
            raise core.closed_error()
        if deadline is None:
            deadline = loop.time() + self.timeout_s
        while True:
            conn = self._conn
            if conn is None or conn.lost or conn.loop is not loop:
                conn = await self._connect(loop, method, deadline)
            if conn._drained is None:
                return conn
            # The daemon reads slower than we write: wait for the buffer to drain (flow control).
            await self._bounded(conn.drain(), method, deadline)

    async def _bounded(self, awaitable: Any, method: str, deadline: float) -> Any:
        try:
            async with asyncio.timeout_at(deadline):
                return await awaitable
        except TimeoutError as exc:
            if isinstance(exc, StatefuldError):
                raise
            raise core.timed_out_connecting(method) from exc

    async def _connect(self, loop: asyncio.AbstractEventLoop, method: str, deadline: float) -> _Connection:
        if self._connect_lock is None or self._connect_lock_loop is not loop:
            self._connect_lock = asyncio.Lock()
            self._connect_lock_loop = loop
        lock = self._connect_lock
        conn: _Connection = await self._bounded(self._connect_locked(loop, lock), method, deadline)
        return conn

    async def _connect_locked(self, loop: asyncio.AbstractEventLoop, lock: asyncio.Lock) -> _Connection:
        async with lock:
            # Another call may have connected while this one waited for the lock.
            conn = self._conn
            if conn is not None and not conn.lost and conn.loop is loop:
                return conn
            if self._closed:
                raise core.closed_error()
            if conn is not None and not conn.lost:
                if not conn.loop.is_closed():
                    raise StatefuldError("this AsyncClient is in use by another event loop; make one client per loop")
                conn.forget()
            return await self._open(loop)

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            _, conn = await loop.create_unix_connection(lambda: _Connection(loop, sock, self._msgids.last), sock=sock)
        except OSError as exc:
            sock.close()
            raise core.connect_error(path, exc) from exc
        except BaseException:  # cancelled, or the deadline passed
            sock.close()
            raise
        if self._closed:  # aclose() ran while we connected
            conn.fail(core.closed_error())
            raise core.closed_error()
        self._conn = conn
        return conn

    def _forget_after_fork(self) -> None:
        conn, self._conn = self._conn, None
        self._connect_lock = None
        if conn is not None:
            conn.forget()
