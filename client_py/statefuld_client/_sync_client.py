"""The blocking client: one connection, one lock, one write and one read per call.

Every rule (timeouts, retries, errors and their messages, msgids, forks) is in `_core`; this
module only moves bytes and waits.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from statefuld_client import _core as core
from statefuld_client._paths import default_socket_path
from statefuld_client._sync_api import SyncAPI
from statefuld_client.errors import ClientTimeoutError, ProtocolError, StatefuldError

if TYPE_CHECKING:
    from statefuld_client._hold import PodHold
    from statefuld_client._watch import Watch

# MSG_NOSIGNAL: a daemon gone away must give EPIPE, not a SIGPIPE, even in a program that
# restored SIGPIPE's default action.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# A full listen backlog (a stalled daemon) makes a non-blocking AF_UNIX connect fail with EAGAIN
# rather than wait; we retry at this pace until the call's deadline.
_CONNECT_RETRY_S = 0.005
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO


class Client(SyncAPI):
    """Blocking client for the statefuld daemon.

    ``socket_path`` defaults to the daemon's own rule (``STATEFULD_SOCKET``, else
    ``/run/statefuld/statefuld.sock`` or a per-user path). ``timeout_s`` is the default bound of
    every call, connecting included; each method also takes ``timeout_s=``.

    Constructing does no I/O: the connection is made by the first call, and made again by the
    first call after the daemon restarted or the process forked. One client may be shared by any
    number of threads; their calls take turns on the one connection (for many calls in flight at
    once, use `AsyncClient`).

    Example::

        with Client() as client:
            client.set_linked_pod("game", "alice", "lobby", 3, -1)
            client.get_linked_pod("game", "alice", "lobby")      # 3
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 timeout_s: float = core.DEFAULT_TIMEOUT_S) -> None:
        self.socket_path: str = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout_s = core.checked_timeout(timeout_s)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        # The socket is in blocking mode, bounded by the kernel (SO_RCVTIMEO/SO_SNDTIMEO): a call
        # is one send() and one recv(), no poll() before each. The bound last set, in seconds:
        self._io_timeout_s = -1.0
        self._encoder = core.Encoder()
        self._decoder = core.Decoder()
        self._buffer = bytearray(core.RECV_SIZE)
        self._view = memoryview(self._buffer)
        self._msgids = core.MsgIds()
        self._closed = False
        # Registered now, not at the first connect: a fork while another thread holds the lock
        # during that connect must still hand the child a free lock.
        core.reset_after_fork(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._sock is not None else "idle"
        return f"<Client socket_path={self.socket_path!r} {state}>"

    def __enter__(self) -> Client:
        if self._closed:
            raise core.closed_error()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._closed

    def watch_service(self, ns: str, service: str) -> Watch:
        """Watch a service's pod states and workload state: an iterator of events, on a connection
        of its own. The first event is the current state, as a ``snapshot``; then ``pod`` and
        ``workload`` events as they change in Redis, whoever changes them.

        Example::

            for event in client.watch_service("game", "lobby"):
                print(event)   # {"kind": "pod", "pod_id": 3, "state": "Draining"}
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._watch import Watch

        return Watch(self.socket_path, self.timeout_s, "watch_service", ns, service)

    def watch_links(self, ns: str, service: str) -> Watch:
        """Watch every link of a service: ``link`` events with cause ``set``, ``removed`` or
        ``expired``, on a connection of its own; a ``gap`` event after anything was missed.

        Example::

            for event in client.watch_links("game", "lobby"):
                print(event)   # {"kind": "link", "uid": "alice", "pod_id": 3, "persistent": True, "cause": "set"}
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._watch import Watch

        return Watch(self.socket_path, self.timeout_s, "watch_links", ns, service)

    def hold_pod(self, ns: str, service: str, pod_id: int, state: str, load: int) -> PodHold:
        """Hold a pod: its liveness tied to a connection of its own (see `PodHold`).

        Writes the pod's state and load now; from then on the daemon refreshes its load report
        until the hold is closed or this process ends, then writes it ``Down``.

        Example::

            with client.hold_pod("game", "lobby", 3, "Ready", 0) as hold:
                hold.update(load=120)
        """
        if self._closed:
            raise core.closed_error()
        from statefuld_client._hold import PodHold

        return PodHold(self.socket_path, self.timeout_s, ns, service, pod_id, state, load)

    def close(self) -> None:
        """Close the connection; every later call raises `ClientClosedError`. Idempotent.

        A call blocked in another thread is woken and raises `ClientClosedError` too.
        """
        if self._closed:
            return
        self._closed = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread polling this socket
        with self._lock:
            self._drop()

    # -- the two primitives the generated API calls ----------------------------------------------

    def _call(self, method: str, params: list[Any], timeout_s: float | None, is_read: bool) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if self._closed or not self._lock.acquire(False):  # uncontended: no timed wait
            self._acquire(method, deadline)
        try:
            retried = False
            while True:
                sock = self._sock or self._connect(method, deadline)
                msgid = self._msgids.next()
                try:
                    self._send(sock, self._encoder.request(msgid, method, params), method, deadline)
                    return core.unwrap(self._receive(sock, msgid, method, timeout_s, deadline))
                except (core.NotSent, core.Lost) as exc:
                    self._drop()
                    retried = core.retry_or_raise(exc, method, is_read, self.socket_path, retried, self._closed)
        finally:
            self._lock.release()

    def _notify(self, method: str, params: list[Any], timeout_s: float | None) -> None:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self._acquire(method, deadline)
        try:
            payload = self._encoder.notification(method, params)
            retried = False
            while True:
                sock = self._sock or self._connect(method, deadline)
                try:
                    self._send(sock, payload, method, deadline)
                    return
                except core.NotSent as exc:
                    self._drop()
                    retried = core.retry_or_raise(exc, method, False, self.socket_path, retried, self._closed)
        finally:
            self._lock.release()

    # -- internals ------------------------------------------------------------------------------

    def _acquire(self, method: str, deadline: float) -> None:
        if self._closed:
            raise core.closed_error()
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise ClientTimeoutError(f"{method}: timed out waiting for the connection, busy with other threads' calls")

    def _connect(self, method: str, deadline: float) -> socket.socket:
        if self._closed:
            raise core.closed_error()
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a full backlog gives EAGAIN at once; retried below up to the deadline
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        raise core.timed_out_connecting(method) from None
                    time.sleep(min(_CONNECT_RETRY_S, remaining_s))
        except StatefuldError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise core.connect_error(path, exc) from exc
        sock.setblocking(True)
        self._sock = sock
        self._io_timeout_s = -1.0
        self._decoder = core.Decoder()
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # close() without shutdown(): after a fork the parent still uses this connection.
            sock.close()

    def _bound_io(self, sock: socket.socket, deadline: float) -> bool:
        """Bound the next send/recv by what is left until ``deadline``; False if nothing is left.

        The kernel's timeouts are set only when the bound changes (per call it is usually the
        same timeout_s), so the common call costs no extra syscall. Rounded up to a millisecond,
        as the poll() it replaces did; 0 would mean "no timeout" to the kernel.
        """
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return False
        bound_s = -(-remaining_s // 0.001) * 0.001
        if abs(bound_s - self._io_timeout_s) > 0.0015:
            seconds = int(bound_s)
            timeval = _TIMEVAL.pack(seconds, int((bound_s - seconds) * 1e6) or 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self._io_timeout_s = bound_s
        return True

    def _send(self, sock: socket.socket, payload: bytes, method: str, deadline: float) -> None:
        sent = 0
        view: memoryview | None = None
        while True:
            if not self._bound_io(sock, deadline):
                sent = -1
            else:
                try:
                    sent += sock.send(payload if view is None else view[sent:], _SEND_FLAGS)
                except BlockingIOError:  # SO_SNDTIMEO passed: the daemon is not reading
                    sent = -1 if sent == 0 else -sent - 1
                except OSError as exc:
                    raise core.NotSent from exc  # the daemon never runs half a message
            if sent == len(payload):
                return
            if sent < 0:
                if sent < -1:
                    self._drop()  # half a request on the wire: the stream is unusable
                raise core.timed_out_connecting(method)
            view = memoryview(payload)  # a partial send: the socket buffer is full

    def _receive(self, sock: socket.socket, msgid: int, method: str, timeout_s: float,
                 deadline: float) -> list[Any]:
        # Nothing can be buffered for this call before its request left (one call at a time),
        # so read first; what a read brings is then drained reply by reply.
        decoder = self._decoder
        while True:
            try:
                if not self._bound_io(sock, deadline):
                    raise BlockingIOError
                n = sock.recv_into(self._buffer)
            except BlockingIOError:  # SO_RCVTIMEO passed
                # The connection stays: this call's late reply will be skipped by msgid.
                raise core.timed_out(method, timeout_s) from None
            except OSError as exc:
                raise core.Lost from exc
            if n == 0:
                raise core.Lost
            decoder.feed(self._view[:n])
            while True:
                try:
                    reply = decoder.next_reply()
                except ProtocolError:
                    self._drop()
                    raise
                if reply is None:
                    break
                if reply[1] == msgid:
                    return reply
                # else: the late reply of an earlier call that timed out

    def _forget_after_fork(self) -> None:
        # In the child: the parent owns the connection and may be mid-call on it (lock held, a
        # reply on its way). Start from nothing; the next call connects anew.
        self._lock = threading.Lock()
        self._drop()
