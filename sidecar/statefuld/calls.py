"""A call's life: admission (shed or run), its deadline, in-flight accounting, and its two exits,
``answer`` and ``fail``.

protocol.py hands each connection's messages to a ``Session`` (``submit``) together with the
callback that sends a reply back up (``Reply``); rpc.Dispatcher validates and starts the call and
returns its one pending object (a future or a coroutine); calls.py awaits it and ends the call
exactly once, whichever comes first: the result, an error, the deadline, the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, Protocol

from statefuld.config import Config
from statefuld.errors import DeadlineExceeded, Internal, Overloaded, RpcError, Unavailable
from statefuld.metrics import RequestMetrics
from statefuld.rpc import NEVER_SHED

log = logging.getLogger("statefuld.calls")

# How often the deadline sweep runs while calls are in flight: a call's TIMEOUT reply leaves at
# most this long after its deadline.
_SWEEP_INTERVAL_S = 0.01
# After the drain bound: how long cancelled calls' Tasks get to end.
DRAIN_CANCEL_S = 2.0
# The message of the cancellation a call's pending work gets when the call ends first.
_ENDED = "statefuld: the call ended before its work did (deadline or shutdown)"

# How a call's end goes back up: ``reply(msgid, error, result)``, handed down by protocol.py. A
# notification's end (msgid None) is reported too, with nothing to send: the connection counts it.
Reply = Callable[[int | None, "dict[str, str] | str | None", Any], None]
# How a notification goes to the peer (a watch's event): ``notify(method, params)``, handed down
# by protocol.py; False when the connection takes no more now (the peer does not read, or it
# closed): the sender keeps it and tries again when the connection says it is writable.
Notify = Callable[[str, Any], bool]


class Dispatcher(Protocol):
    """rpc.Dispatcher as calls use it."""

    def start(self, name: str, params: Any, connection: Session, /) -> Awaitable[Any]: ...


class Calls:
    """Every call in flight, daemon-wide: the bound that sheds, the deadline sweep, the drain."""

    def __init__(self, config: Config, dispatcher: Dispatcher, metrics: RequestMetrics) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.timeout_s = config.request_timeout_ms / 1000
        self.max_in_flight = config.max_in_flight
        # Calls running, in arrival order (a dict used as an ordered set). Every deadline is
        # arrival + timeout_s, so this is also deadline order and the sweep looks at the front only.
        self.in_flight: dict[Call, None] = {}
        self._sweeping = False
        self._drained: asyncio.Event | None = None
        self.requests = 0
        self.notifications = 0
        self.notification_failures = 0
        self._last_failure_log_s = -1.0
        self._failures_not_logged = 0
        # Per-call log lines are debug only; decided once, not per call.
        self.log_calls = log.isEnabledFor(logging.DEBUG)

    def session(self, reply: Reply, notify: Notify) -> Session:
        """The calls of one connection, whose ends go back through ``reply``."""
        return Session(self, reply, notify)

    # --- deadlines -------------------------------------------------------------------------------

    def admit(self, call: Call) -> None:
        self.in_flight[call] = None
        if not self._sweeping:
            # One timer for all calls, not one per call: a timer each costs more than the rest of
            # a simple call's handling in the daemon.
            self._sweeping = True
            asyncio.get_running_loop().call_later(_SWEEP_INTERVAL_S, self._sweep)

    def release(self, call: Call) -> None:
        del self.in_flight[call]
        if not self.in_flight and self._drained is not None:
            self._drained.set()

    def _sweep(self) -> None:
        now = perf_counter()
        expired = []
        for call in self.in_flight:
            if call.deadline > now:
                break
            expired.append(call)
        for call in expired:
            call.fail(DeadlineExceeded("the request's deadline passed"))
        if self.in_flight:
            asyncio.get_running_loop().call_later(_SWEEP_INTERVAL_S, self._sweep)
        else:
            self._sweeping = False

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: wait up to ``timeout_s`` for the calls in flight to end; end the rest
        UNAVAILABLE (their work cancelled), then give that work a moment to stop."""
        if not self.in_flight:
            return
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
            return
        except TimeoutError:
            pass
        log.warning("%d requests still in flight after %ss: cancelling them", len(self.in_flight), timeout_s)
        pending = [call.pending for call in self.in_flight if call.pending is not None]
        for call in list(self.in_flight):
            call.fail(Unavailable("the daemon is shutting down"))
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_CANCEL_S)

    # --- accounting ------------------------------------------------------------------------------

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


class Session:
    """One connection's calls: what protocol.py submits, where their ends go, and the
    connection's own state (set_error_format, what it holds)."""

    __slots__ = ("_closers", "_writable", "calls", "error_format", "is_closed", "notify", "reply")

    def __init__(self, calls: Calls, reply: Reply, notify: Notify) -> None:
        self.calls = calls
        self.reply = reply
        self.notify = notify
        self._writable: list[Callable[[], None]] = []
        # "map": errors as {"code", "message"}; "string": as "CODE: message", for clients that can
        # only decode a string (Go's net/rpc with the common msgpack-rpc codec).
        self.error_format = "map"
        self._closers: list[Callable[[], None]] = []
        self.is_closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the connection ends (at once if it already has): the release of
        what a method of the connection (a hold) took for it."""
        if self.is_closed:
            callback()
        else:
            self._closers.append(callback)

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` whenever the connection takes writes again after refusing a notify."""
        self._writable.append(callback)

    def writable(self) -> None:
        for callback in list(self._writable):
            callback()

    def closed(self) -> None:
        """The connection ended, whoever closed it; its calls still in flight end on their own."""
        self.is_closed = True
        self._writable.clear()
        closers, self._closers = self._closers, []
        for callback in closers:
            try:
                callback()
            except Exception:  # one release's bug must not skip the others
                log.exception("releasing a closed connection's state failed")

    def submit(self, msgid: int | None, name: str, params: Any, read_at: float) -> None:
        """Run one request (``msgid``) or notification (None) that a read at ``read_at``
        (perf_counter) brought. Its end is reported through ``reply``, now or later."""
        calls = self.calls
        if msgid is None:
            calls.notifications += 1
        else:
            calls.requests += 1
        call = Call(self, msgid, name, read_at + calls.timeout_s)
        if len(calls.in_flight) >= calls.max_in_flight and name not in NEVER_SHED:
            # Shed at once: queueing would only turn overload into timeouts for everyone.
            call.fail(Overloaded("too many requests in flight; retry later"))
            return
        try:
            pending = calls.dispatcher.start(name, params, self)  # raises at once for a rejected call
        except Exception as exc:
            call.fail(exc)
            return
        # Running: a future as it is (a one-command method), a coroutine as a Task.
        future = pending if isinstance(pending, asyncio.Future) else asyncio.ensure_future(pending)
        call.pending = future
        call.read_at = read_at
        calls.admit(call)
        future.add_done_callback(call._work_done)


class Call:
    """One request or notification, ended exactly once by ``answer`` or ``fail``."""

    __slots__ = ("deadline", "ended", "method", "msgid", "pending", "read_at", "session")

    def __init__(self, session: Session, msgid: int | None, method: str, deadline: float) -> None:
        self.session = session
        self.msgid = msgid
        self.method = method  # as the peer named it: metrics count names not in the table as "unknown"
        self.deadline = deadline
        self.pending: asyncio.Future[Any] | None = None  # the call's work, once started
        self.read_at = 0.0  # when it started running (perf_counter); 0.0: refused before
        self.ended = False

    def _work_done(self, future: asyncio.Future[Any]) -> None:
        if self.ended:
            return  # the deadline or the shutdown ended the call first; this outcome is dropped
        if future.cancelled():  # not by us (we end a call before we cancel its work)
            self.fail(DeadlineExceeded("the request's deadline passed"))
        elif (exc := future.exception()) is not None:
            self.fail(exc)
        else:
            self.answer(future.result())

    def answer(self, result: Any) -> None:
        """The first exit: the call succeeded with ``result``."""
        self._end(None, result, "OK")

    def fail(self, exc: BaseException) -> None:
        """The second exit: an RpcError is answered with its code; anything else is a bug,
        answered INTERNAL and logged with its traceback."""
        if isinstance(exc, RpcError):
            self._end(exc.to_wire(), None, exc.code)
            return
        calls = self.session.calls
        if self.msgid is None:
            calls.notification_failed(self.method, "INTERNAL", traceback=True)
        else:
            log.error("internal error in %.100r (msgid %d)", self.method, self.msgid, exc_info=exc)
        self._end(_INTERNAL.to_wire(), None, _INTERNAL.code, logged=True)

    def _end(self, error: dict[str, str] | None, result: Any, code: str, *, logged: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        calls = self.session.calls
        seconds = None
        if self.pending is not None:
            calls.release(self)
            seconds = perf_counter() - self.read_at
            if not self.pending.done():
                self.pending.cancel(_ENDED)
        calls.metrics.count(self.method, code, seconds)
        if calls.log_calls:
            log.debug("%.100r msgid=%s: %s", self.method, self.msgid, code)
        if error is None:
            self.session.reply(self.msgid, None, result)
            return
        text = f"{error['code']}: {error['message']}"
        if self.msgid is None and not logged:
            calls.notification_failed(self.method, text)
        self.session.reply(self.msgid, text if self.session.error_format == "string" else error, None)


_INTERNAL = Internal("internal error (see the daemon's log)")
