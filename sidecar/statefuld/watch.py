"""Watches (contract section 2d): pod, workload and link changes sent to the connections that
asked, as they happen in Redis.

A ``Feed`` is one watched thing on this daemon (a service's states and workload, or a service's
links), shared by every watch of it, subscribed once (notifications.py). A keyspace notification
makes the feed read the key again (reads of one key go in order on one connection, so their
answers come in the order of the changes); what changed becomes an event for each of its watches.
A ``Watch`` belongs to one connection and keeps a bounded queue for when that connection is not
writable: past ``--watch-queue-events`` the queue is dropped and the watch owes a gap event
(``snapshot`` or ``gap``), sent once the connection takes writes again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from statefuld.config import Config
from statefuld.errors import InvalidArgument, Overloaded, RpcError
from statefuld.executor import Executor
from statefuld.metrics import BOUNDS_S
from statefuld.notifications import Notifications, glob_escape

log = logging.getLogger("statefuld.watch")

MAX_WATCH_ID = 2**31 - 1
_READ_RETRY_S = 0.2
# Events of a key that mean it is gone, and the cause a link event gives for them.
_GONE = {b"del": "removed", b"expired": "expired", b"evicted": "removed", b"rename_from": "removed",
         b"move_from": "removed"}


class Connection(Protocol):
    """calls.Session as a watching connection."""

    def notify(self, method: str, params: Any, /) -> bool: ...
    def on_close(self, callback: Callable[[], None], /) -> None: ...
    def on_writable(self, callback: Callable[[], None], /) -> None: ...


class Watch:
    __slots__ = ("connection", "feed", "gap", "hub", "queue", "watch_id")

    def __init__(self, hub: Watches, connection: Connection, watch_id: int, feed: Feed) -> None:
        self.hub = hub
        self.connection = connection
        self.watch_id = watch_id
        self.feed = feed
        self.queue: deque[dict[str, Any]] = deque()
        self.gap = False  # owes a snapshot/gap event; events until it is sent are dropped

    def deliver(self, event: dict[str, Any], received_at: float) -> None:
        if self.gap:
            return
        if not self.queue and self.connection.notify("watch_event", [self.watch_id, event]):
            self.hub.sent(received_at)
            return
        self.queue.append(event)
        if len(self.queue) > self.hub.queue_limit:
            self.queue.clear()
            self.gap = True
            self.hub.gaps["slow_reader"] += 1

    def flush(self) -> None:
        """Send what waits, while the connection takes it: the gap event first, if one is owed."""
        if self.gap:
            if not self.connection.notify("watch_event", [self.watch_id, self.feed.gap_event()]):
                return
            self.gap = False
            self.hub.events_sent += 1
        queue = self.queue
        while queue:
            if not self.connection.notify("watch_event", [self.watch_id, queue[0]]):
                return
            queue.popleft()
            self.hub.events_sent += 1

    def owe_gap(self) -> None:
        self.queue.clear()
        self.gap = True


class Feed:
    """One watched thing, shared by its watches on this daemon."""

    def __init__(self, hub: Watches, ns: str, service: str) -> None:
        self.hub = hub
        self.ns = ns
        self.service = service
        self.watches: set[Watch] = set()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def subscriptions(self) -> list[tuple[str, bool]]:
        raise NotImplementedError

    def gap_event(self) -> dict[str, Any]:
        raise NotImplementedError

    def on_message(self, channel: bytes, event: bytes, received_at: float) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Read what the answer to the first watch call needs (after the subscription is in place)."""

    def resync(self) -> None:
        """Events may have been lost: every watch gets a snapshot/gap, then live events again."""
        for watch in self.watches:
            watch.owe_gap()
        self.hub.gaps["resubscribe"] += len(self.watches)
        for watch in list(self.watches):
            watch.flush()

    def emit(self, event: dict[str, Any], received_at: float) -> None:
        for watch in list(self.watches):
            watch.deliver(event, received_at)


class _Reads:
    """Reads of one key, one in flight at a time: a notification during a read asks for one more
    after it, so quick changes cost fewer reads and the last read always follows the last change."""

    def __init__(self, read: Callable[[], Awaitable[Any]], done: Callable[[Any, float], None],
                 failed: Callable[[], None]) -> None:
        self._read = read
        self._done = done
        self._failed = failed
        self._busy = False
        self._again = False
        self._received_at = 0.0

    def request(self, received_at: float) -> None:
        if self._busy:
            self._again = True
            return
        self._busy = True
        self._received_at = received_at
        asyncio.ensure_future(self._read()).add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._busy = False
        if future.cancelled() or future.exception() is not None:
            self._again = False
            self._failed()
        else:
            self._done(future.result(), self._received_at)
        if self._again:
            self._again = False
            self.request(time.monotonic())


class ServiceFeed(Feed):
    """A service's pod states and workload state."""

    def __init__(self, hub: Watches, ns: str, service: str) -> None:
        super().__init__(hub, ns, service)
        executor = hub.executor
        self.state_key = executor.keys.service_state(ns, service)
        self.workload_key = executor.keys.workload_state(ns, service)
        self.states: dict[int, str] = {}
        self.workload: str | None = None
        self._state_reads = _Reads(lambda: executor.get_service_state(ns, service), self._states_read, self._failed)
        self._workload_reads = _Reads(lambda: executor.get_workload_state(ns, service), self._workload_read,
                                      self._failed)
        db = hub.notifications.db()
        self._state_channel = hub.notifications.channel(self.state_key, db)
        self._workload_channel = hub.notifications.channel(self.workload_key, db)

    def subscriptions(self) -> list[tuple[str, bool]]:
        return [(self._state_channel, False), (self._workload_channel, False)]

    async def start(self) -> None:
        # Each value is taken the moment its own reply arrives: a read that a notification asked
        # for meanwhile answers after it (one connection per key, in order) and diffs against it.
        executor = self.hub.executor

        async def states() -> None:
            self.states = await executor.get_service_state(self.ns, self.service)

        async def workload() -> None:
            self.workload = await executor.get_workload_state(self.ns, self.service)

        await asyncio.gather(states(), workload())

    def gap_event(self) -> dict[str, Any]:
        return {"kind": "snapshot", "states": dict(self.states), "workload": self.workload}

    def on_message(self, channel: bytes, event: bytes, received_at: float) -> None:
        if channel == self._state_channel.encode():
            self._state_reads.request(received_at)
        else:
            self._workload_reads.request(received_at)

    def _states_read(self, states: dict[int, str], received_at: float) -> None:
        before, self.states = self.states, states
        for pod in sorted(before.keys() | states.keys()):
            state = states.get(pod)
            if before.get(pod) != state:
                self.emit({"kind": "pod", "pod_id": pod, "state": state}, received_at)

    def _workload_read(self, workload: str | None, received_at: float) -> None:
        if workload != self.workload:
            self.workload = workload
            self.emit({"kind": "workload", "state": workload}, received_at)

    def resync(self) -> None:
        for watch in self.watches:
            watch.owe_gap()
        self.hub.gaps["resubscribe"] += len(self.watches)
        self.hub.spawn(self._resync())

    async def _resync(self) -> None:
        while self.watches:
            try:
                await self.start()
            except RpcError:
                await asyncio.sleep(_READ_RETRY_S)
                continue
            for watch in list(self.watches):
                watch.flush()
            return

    def _failed(self) -> None:
        # A read failed (Redis unreachable): its change may be lost. Say so, once it can be read.
        self.hub.read_failures += 1
        self.resync()


class LinksFeed(Feed):
    """Every link of a service: one pattern for all its users' link keys."""

    def __init__(self, hub: Watches, ns: str, service: str) -> None:
        super().__init__(hub, ns, service)
        keys = hub.executor.keys
        # P:{NS:lk:  UID  }SVC, the uid never holding '{' or '}' for keys of the layout.
        self._head = keys.link_hash(ns, "")[:-1]
        self._tail = "}" + service
        db = hub.notifications.db()
        self._channel_head = hub.notifications.channel(self._head, db).encode()
        self._tail_bytes = self._tail.encode()
        self._pattern = hub.notifications.channel(glob_escape(self._head) + "*" + glob_escape(self._tail), db)

    def subscriptions(self) -> list[tuple[str, bool]]:
        return [(self._pattern, True)]

    def gap_event(self) -> dict[str, Any]:
        return {"kind": "gap"}

    def on_message(self, channel: bytes, event: bytes, received_at: float) -> None:
        if not (channel.startswith(self._channel_head) and channel.endswith(self._tail_bytes)):
            return
        raw_uid = channel[len(self._channel_head):-len(self._tail_bytes)]
        if b"{" in raw_uid or b"}" in raw_uid:
            return  # not a key of the layout
        uid = raw_uid.decode("utf-8", "replace")
        cause = _GONE.get(event)
        read = self.hub.executor.read_link(self.ns, uid, self.service)
        asyncio.ensure_future(read).add_done_callback(
            lambda done: self._link_read(done, uid, cause, received_at))

    def _link_read(self, done: asyncio.Future[Any], uid: str, cause: str | None, received_at: float) -> None:
        if done.cancelled() or done.exception() is not None:
            self.hub.read_failures += 1
            self.resync()
            return
        pod, persistent = done.result()
        if pod is not None:
            self.emit({"kind": "link", "uid": uid, "pod_id": pod, "persistent": persistent, "cause": "set"},
                      received_at)
        elif cause is not None:
            # Gone. (A read that finds nothing after a "set" says nothing: the del or expired
            # notification that made it so follows, with its cause.)
            self.emit({"kind": "link", "uid": uid, "pod_id": None, "persistent": None, "cause": cause},
                      received_at)


class Watches:
    """Every watch of this daemon: the feeds, who watches them, the subscriptions under them."""

    def __init__(self, executor: Executor, config: Config) -> None:
        self.executor = executor
        self.queue_limit = config.watch_queue_events
        self._max_watches = config.max_watches
        self.notifications = Notifications(executor.transport, self._on_message, self._on_gap,
                                           prefix=config.key_prefix)
        self._feeds: dict[tuple[str, str, str], Feed] = {}
        self._by_channel: dict[bytes, Feed] = {}
        self._by_pattern: dict[bytes, Feed] = {}
        self._of_connection: dict[Connection, dict[int, Watch]] = {}
        self._next_id: dict[Connection, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.open = 0
        self.events_sent = 0
        self.read_failures = 0
        self.gaps = {"slow_reader": 0, "resubscribe": 0}
        self.delay_buckets = [0] * (len(BOUNDS_S) + 1)
        self.delay_sum_s = 0.0

    # --- the methods -----------------------------------------------------------------------------

    async def watch_service(self, connection: Connection, ns: str, service: str) -> dict[str, Any]:
        watch = await self._watch(connection, "service", ns, service)
        feed = watch.feed
        assert isinstance(feed, ServiceFeed)
        return {"watch_id": watch.watch_id, "states": dict(feed.states), "workload": feed.workload}

    async def watch_links(self, connection: Connection, ns: str, service: str) -> dict[str, Any]:
        watch = await self._watch(connection, "links", ns, service)
        return {"watch_id": watch.watch_id}

    async def unwatch(self, connection: Connection, watch_id: int) -> bool:
        watch = self._of_connection.get(connection, {}).get(watch_id)
        if watch is None:
            return False
        await self._drop(watch)
        return True

    # --- watches coming and going ----------------------------------------------------------------

    async def _watch(self, connection: Connection, kind: str, ns: str, service: str) -> Watch:
        if self.open >= self._max_watches:
            raise Overloaded(f"{self._max_watches} watches are open on this daemon (--max-watches)")
        key = (kind, ns, service)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = (ServiceFeed if kind == "service" else LinksFeed)(self, ns, service)
            self.spawn(self._start_feed(feed))
        self.open += 1  # counted while it starts, so the bound holds for watches not yet answered
        watch: Watch | None = None
        try:
            await asyncio.shield(feed.ready)
            watch = Watch(self, connection, self._new_id(connection), feed)
        finally:
            if watch is None:
                self.open -= 1
                if not feed.watches and self._feeds.get(key) is feed and feed.ready.done():
                    await self._retire(feed)
        feed.watches.add(watch)
        watches = self._of_connection.get(connection)
        if watches is None:
            watches = self._of_connection[connection] = {}
            connection.on_close(lambda: self.spawn(self._connection_closed(connection)))
            connection.on_writable(lambda: self._writable(connection))
        watches[watch.watch_id] = watch
        return watch

    async def _start_feed(self, feed: Feed) -> None:
        try:
            for name, pattern in feed.subscriptions():
                await self.notifications.add(name, pattern)
                (self._by_pattern if pattern else self._by_channel)[name.encode()] = feed
            await feed.start()
        except BaseException as exc:
            self._forget(feed)
            for name, pattern in feed.subscriptions():
                if (self._by_pattern if pattern else self._by_channel).pop(name.encode(), None) is not None:
                    await self.notifications.remove(name, pattern)
            if not feed.ready.done():
                feed.ready.set_exception(exc if isinstance(exc, Exception) else RpcError("cancelled"))
                feed.ready.exception()  # retrieved: the callers waiting get it themselves
            if not isinstance(exc, Exception):
                raise
            return
        feed.ready.set_result(None)
        # Its first caller may have given up (deadline) meanwhile: then nobody watches it.
        asyncio.get_running_loop().call_later(1.0, lambda: self.spawn(self._retire(feed)))

    def _new_id(self, connection: Connection) -> int:
        taken = self._of_connection.get(connection, {})
        candidate = self._next_id.get(connection, 1)
        while candidate in taken:
            candidate = candidate + 1 if candidate < MAX_WATCH_ID else 0
        self._next_id[connection] = candidate + 1 if candidate < MAX_WATCH_ID else 0
        return candidate

    async def _drop(self, watch: Watch) -> None:
        watches = self._of_connection.get(watch.connection)
        if watches is not None and watches.pop(watch.watch_id, None) is not None:
            self.open -= 1
        watch.queue.clear()
        feed = watch.feed
        feed.watches.discard(watch)
        if not feed.watches:
            await self._retire(feed)

    async def _retire(self, feed: Feed) -> None:
        if feed.watches or not self._forget(feed):
            return
        for name, pattern in feed.subscriptions():
            if (self._by_pattern if pattern else self._by_channel).pop(name.encode(), None) is not None:
                await self.notifications.remove(name, pattern)

    def _forget(self, feed: Feed) -> bool:
        for key, known in list(self._feeds.items()):
            if known is feed:
                del self._feeds[key]
                return True
        return False

    async def _connection_closed(self, connection: Connection) -> None:
        watches = self._of_connection.pop(connection, {})
        self._next_id.pop(connection, None)
        self.open -= len(watches)
        for watch in watches.values():
            watch.queue.clear()
            watch.feed.watches.discard(watch)
        for feed in {watch.feed for watch in watches.values()}:
            if not feed.watches:
                await self._retire(feed)

    def _writable(self, connection: Connection) -> None:
        for watch in list(self._of_connection.get(connection, {}).values()):
            watch.flush()

    # --- from Redis --------------------------------------------------------------------------------

    def _on_message(self, pattern: bytes | None, channel: bytes, event: bytes, received_at: float) -> None:
        # Taken from the moment the subscription is in place, before the feed's first read ends.
        feed = self._by_channel.get(channel) if pattern is None else self._by_pattern.get(pattern)
        if feed is not None:
            feed.on_message(channel, event, received_at)

    def _on_gap(self) -> None:
        for feed in list(self._feeds.values()):
            if feed.ready.done() and not feed.ready.exception():
                feed.resync()

    def sent(self, received_at: float) -> None:
        self.events_sent += 1
        delay_s = time.monotonic() - received_at
        self.delay_buckets[bisect_left(BOUNDS_S, delay_s)] += 1
        self.delay_sum_s += delay_s

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.notifications.close()


def check_watch_id(param: str, value: Any, config: Config) -> int:
    if type(value) is not int or not 0 <= value <= MAX_WATCH_ID:
        shown = value if type(value) is int else type(value).__name__
        raise InvalidArgument(f"{param} must be an integer in 0..{MAX_WATCH_ID}, got {shown}")
    return value
